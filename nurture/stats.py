"""The numbers on the dashboard and at /metrics, each one query, straight from the tables.

Per step, for a date range: emails scheduled (delivery rows written), sent,
failed, unique opens (an estimate), unique clicks, unsubscribes, bounces and
conversions; events carry the delivery they answer, so each lands on a step,
also on a step since renamed or removed (its row is marked retired).
The funnel follows the people who signed up in the range: confirmed, reached
each step, converted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime

from sqlalchemy import and_, distinct, func, select, update
from sqlalchemy.orm import Session

from nurture.delivery import SMTP_DOWN, TEMPLATE_ERROR
from nurture.models import Delivery, DeliveryStatus, Enrollment, Event, Heartbeat, Subscriber
from nurture.sequences import Sequence

EVENT_COLUMNS = {
    "opens": "open",
    "clicks": "click",
    "unsubscribes": "unsubscribe",
    "bounces": "bounce",
    "conversions": "conversion",
}


@dataclass
class StepStats:
    key: str
    retired: bool = False  # no longer in the sequence's manifest: renamed or removed
    scheduled: int = 0
    sent: int = 0
    failed: int = 0
    opens: int = 0  # unique: deliveries opened at least once
    clicks: int = 0  # unique: deliveries clicked at least once
    unsubscribes: int = 0
    bounces: int = 0
    conversions: int = 0


@dataclass
class Funnel:
    signed_up: int = 0
    confirmed: int = 0
    steps: list[tuple[str, int]] = field(default_factory=list)
    converted: int = 0
    retired: set[str] = field(default_factory=set)  # steps no longer in the manifest


def _step_keys(sequence: Sequence, *counts: dict[str, int]) -> list[tuple[str, bool]]:
    """The sequence's steps in order, then any other step the counts name, as (key, retired).

    A step renamed or removed keeps its history: its emails and their events
    are still in the tables under its old key, and still count.
    """
    current = [step.key for step in sequence.steps]
    seen = {key for count in counts for key, value in count.items() if value}
    return [(key, False) for key in current] + [(key, True) for key in sorted(seen - set(current))]


def _by_step(session: Session, statement) -> dict[str, int]:
    return {step: count for step, count in session.execute(statement)}


def step_stats(
    session: Session, sequence: Sequence, start: datetime, end: datetime
) -> list[StepStats]:
    """One row per step of `sequence`, for events in [start, end)."""
    in_sequence = Delivery.sequence == sequence.name
    scheduled = _by_step(
        session,
        select(Delivery.step, func.count())
        .where(in_sequence, Delivery.created_at >= start, Delivery.created_at < end)
        .group_by(Delivery.step),
    )
    sent = _by_step(
        session,
        select(Delivery.step, func.count())
        .where(in_sequence, Delivery.sent_at >= start, Delivery.sent_at < end)
        .group_by(Delivery.step),
    )
    failed_at = func.coalesce(Delivery.failed_at, Delivery.created_at)  # no time before 0010
    failed = _by_step(
        session,
        select(Delivery.step, func.count())
        .where(
            in_sequence,
            Delivery.status == DeliveryStatus.FAILED,
            failed_at >= start,
            failed_at < end,
        )
        .group_by(Delivery.step),
    )
    events = {}
    for column, kind in EVENT_COLUMNS.items():
        events[column] = _by_step(
            session,
            select(Delivery.step, func.count(distinct(Event.delivery_id)))
            .join(Delivery, Delivery.id == Event.delivery_id)
            .where(
                in_sequence, Event.kind == kind, Event.created_at >= start, Event.created_at < end
            )
            .group_by(Delivery.step),
        )
    return [
        StepStats(
            key=key,
            retired=retired,
            scheduled=scheduled.get(key, 0),
            sent=sent.get(key, 0),
            failed=failed.get(key, 0),
            **{column: counts.get(key, 0) for column, counts in events.items()},
        )
        for key, retired in _step_keys(sequence, scheduled, sent, failed, *events.values())
    ]


def funnel(session: Session, sequence: Sequence, start: datetime, end: datetime) -> Funnel:
    """People who signed up for `sequence` in [start, end), and how far they got."""
    cohort = and_(
        Enrollment.sequence == sequence.name,
        Enrollment.created_at >= start,
        Enrollment.created_at < end,
    )
    signed_up, confirmed, converted = session.execute(
        select(
            func.count(),
            func.count(Enrollment.started_at),
            func.count(Enrollment.converted_at),
        ).where(cohort)
    ).one()
    reached = _by_step(
        session,
        select(Delivery.step, func.count(distinct(Delivery.enrollment_id)))
        .join(Enrollment, Enrollment.id == Delivery.enrollment_id)
        .where(cohort, Delivery.status == DeliveryStatus.SENT)
        .group_by(Delivery.step),
    )
    keys = _step_keys(sequence, reached)
    return Funnel(
        signed_up=signed_up,
        confirmed=confirmed,
        steps=[(key, reached.get(key, 0)) for key, _ in keys],
        converted=converted,
        retired={key for key, retired in keys if retired},
    )


def any_count(rows: list[StepStats], funnel: Funnel) -> bool:
    """Whether a sequence has anything to show for the range: a signup, an email, an event."""
    counted = [f.name for f in fields(StepStats) if f.type == "int"]
    return funnel.signed_up > 0 or any(getattr(row, name) for row in rows for name in counted)


@dataclass(frozen=True)
class HeldStep:
    """Emails of one step held because its template fails to render."""

    sequence: str
    step: str
    emails: int
    reason: str  # one of theirs: the file, line and error


#: An email held because its template does not render: queued, its last try's error
#: a template's. For the dashboard, /healthz and the "try again now" button.
HELD_BY_TEMPLATE = (
    Delivery.status == DeliveryStatus.QUEUED,
    Delivery.last_error.startswith(TEMPLATE_ERROR, autoescape=True),
)


def held_steps(session: Session) -> list[HeldStep]:
    """Every step with emails held by a template error, for the dashboard."""
    rows = session.execute(
        select(Delivery.sequence, Delivery.step, func.count(), func.max(Delivery.last_error))
        .where(*HELD_BY_TEMPLATE)
        .group_by(Delivery.sequence, Delivery.step)
        .order_by(Delivery.sequence, Delivery.step)
    )
    return [HeldStep(sequence or "", step, count, reason) for sequence, step, count, reason in rows]


def retry_held_now(session: Session, now: datetime) -> int:
    """Make every email held by a template error due now, for a marketer who has just
    fixed the file: the next due-scan hands them out, instead of each waiting out its
    backoff (up to an hour). How many; one still broken is held again, as before."""
    result = session.execute(
        update(Delivery).where(*HELD_BY_TEMPLATE, Delivery.not_before > now).values(not_before=now)
    )
    session.commit()
    return result.rowcount


def service_counts(session: Session, now: datetime) -> dict[str, float]:
    """Totals for /metrics: counters since the start, the due-queue lag, and the
    emails waiting for the SMTP server to come back."""
    signups = session.scalar(select(func.count()).select_from(Subscriber))
    confirmations = session.scalar(select(func.count(Subscriber.confirmed_at)))
    statuses = {
        status: count
        for status, count in session.execute(
            select(Delivery.status, func.count()).group_by(Delivery.status)
        )
    }
    oldest_due = session.scalar(
        select(func.min(Enrollment.next_due_at)).where(
            Enrollment.status == "active", Enrollment.next_due_at <= now
        )
    )
    oldest_queued = session.scalar(
        select(func.min(Delivery.not_before)).where(
            Delivery.status == DeliveryStatus.QUEUED, Delivery.not_before <= now
        )
    )
    oldest = min((t for t in (oldest_due, oldest_queued) if t is not None), default=None)
    # Emails put back because the SMTP server is down or refuses us. Each waits only
    # for its next try, so the due lag shows an outage late: these show it at once.
    waiting, oldest_waiting = session.execute(
        select(func.count(), func.min(Delivery.created_at)).where(
            Delivery.status == DeliveryStatus.QUEUED,
            Delivery.last_error.startswith(SMTP_DOWN, autoescape=True),
        )
    ).one()
    dispatch = session.get(Heartbeat, "dispatch")
    return {
        "signups": signups,
        "confirmations": confirmations,
        "sent": statuses.get(DeliveryStatus.SENT, 0),
        "failed": statuses.get(DeliveryStatus.FAILED, 0),
        "queued": statuses.get(DeliveryStatus.QUEUED, 0) + statuses.get(DeliveryStatus.SENDING, 0),
        "lag_seconds": (now - oldest).total_seconds() if oldest else 0.0,
        "smtp_waiting": waiting,
        "smtp_wait_seconds": (now - oldest_waiting).total_seconds() if oldest_waiting else 0.0,
        "dispatch_seconds": dispatch.seconds if dispatch else 0.0,
        "dispatch_age_seconds": (now - dispatch.at).total_seconds() if dispatch else -1.0,
    }
