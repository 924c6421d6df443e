"""A subscriber's past and planned sends, for support and for the marketer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from nurture.config import Settings
from nurture.models import Delivery, Enrollment, Subscriber
from nurture.scheduler import plan, zone
from nurture.sequences import Sequence
from nurture.subscribers import lookup_address


@dataclass(frozen=True)
class Entry:
    sequence: str
    step: str
    status: str  # a delivery status, or "planned"
    at: datetime  # sent, last tried, or planned time (UTC)
    detail: str = ""


@dataclass(frozen=True)
class Timeline:
    subscriber: Subscriber
    enrollments: list[Enrollment]
    entries: list[Entry]

    def local(self, moment: datetime) -> datetime:
        return moment.astimezone(zone(self.subscriber.timezone))


def timeline(
    session: Session,
    settings: Settings,
    sequences: dict[str, Sequence],
    email: str,
    now: datetime,
) -> Timeline | None:
    address = lookup_address(email)
    subscriber = session.scalar(select(Subscriber).where(Subscriber.email == address))
    if subscriber is None:
        return None
    deliveries = session.scalars(
        select(Delivery).where(Delivery.subscriber_id == subscriber.id).order_by(Delivery.id)
    ).all()
    entries = [
        Entry(
            sequence=d.sequence or "-",
            step=d.step,
            status=d.status,
            at=d.sent_at or d.not_before,
            detail=d.last_error or "",
        )
        for d in deliveries
    ]
    enrollments = session.scalars(
        select(Enrollment).where(Enrollment.subscriber_id == subscriber.id)
    ).all()
    for enrollment in enrollments:
        sequence = sequences.get(enrollment.sequence)
        if sequence is None:
            continue
        had = [
            d.step
            for d in deliveries
            if d.enrollment_id == enrollment.id and d.status != "cancelled"
        ]
        for step, due in plan(enrollment, sequence, settings, now, had):
            entries.append(Entry(sequence.name, step.key, "planned", due))
    return Timeline(subscriber=subscriber, enrollments=list(enrollments), entries=entries)


def format_timeline(line: Timeline) -> str:
    """The timeline as text: one line per send, local time first, then UTC."""
    subscriber = line.subscriber
    out = [
        f"{subscriber.email} ({subscriber.status}, {subscriber.timezone})",
        f"  signed up {subscriber.created_at:%Y-%m-%d %H:%M} UTC"
        + (
            f", confirmed {subscriber.confirmed_at:%Y-%m-%d %H:%M} UTC"
            if subscriber.confirmed_at
            else ""
        ),
    ]
    for enrollment in line.enrollments:
        converted = (
            f", converted {enrollment.converted_at:%Y-%m-%d}" if enrollment.converted_at else ""
        )
        out.append(f"  {enrollment.sequence}: {enrollment.status}{converted}")
    out.append("")
    emails = [f"{entry.sequence}/{entry.step}" for entry in line.entries]
    times = [f"{line.local(entry.at):%a %Y-%m-%d %H:%M %Z}" for entry in line.entries]
    email_width = max(map(len, emails), default=0)
    time_width = max(map(len, times), default=0)  # zone names differ in length (CET, CEST, +05)
    for entry, email, local in zip(line.entries, emails, times, strict=True):
        out.append(
            f"  {entry.status:<10} {email:<{email_width}}  {local:<{time_width}}"
            f"  ({entry.at:%Y-%m-%d %H:%M} UTC)" + (f"  {entry.detail}" if entry.detail else "")
        )
    return "\n".join(out)
