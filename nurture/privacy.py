"""Data rights and suppression: export, erasure, and the hashed do-not-mail list.

Erasure removes what identifies a person (address, name, IP, user agent, the
consent records) but keeps anonymous rows, so per-step counts stay true. An
address that must not be mailed again is kept only as a SHA-256 hash: enough to
refuse it at signup or import, not enough to mail it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from nurture.models import (
    CONFIRMATION_STEP,
    Consent,
    Delivery,
    DeliveryStatus,
    Enrollment,
    Event,
    Subscriber,
    SubscriberStatus,
)
from nurture.subscribers import stop_enrollments, suppress

#: What an export shows of each kind of row held about the person: each column and
#: its name in the export. `NOT_EXPORTED` names the columns left out, and a test
#: checks that every column is in one or the other, so a new column must choose.
EXPORTED: dict[type, dict[str, str]] = {
    Subscriber: {
        "email": "email",
        "first_name": "first_name",
        "timezone": "timezone",
        "status": "status",
        "created_at": "signed_up_at",
        "confirmed_at": "confirmed_at",
        "unsubscribed_at": "unsubscribed_at",
    },
    Consent: {
        "source": "source",
        "consent_text": "consent_text",
        "consent_version": "consent_version",
        "ip": "ip",
        "user_agent": "user_agent",
        "created_at": "signed_up_at",
        "confirmed_at": "confirmed_at",
    },
    Enrollment: {
        "sequence": "sequence",
        "timezone": "timezone",
        "status": "status",
        "next_step": "next_step",
        "next_due_at": "next_due_at",
        "created_at": "enrolled_at",
        "started_at": "started_at",
        "completed_at": "completed_at",
        "converted_at": "converted_at",
    },
    Delivery: {
        "sequence": "sequence",
        "step": "step",
        "status": "status",
        "message_id": "message_id",
        "attempts": "attempts",
        "created_at": "written_at",
        "not_before": "not_before",
        "sent_at": "sent_at",
        "failed_at": "failed_at",
        "last_error": "last_error",  # a server's refusal may quote the address
    },
    Event: {"kind": "kind", "detail": "detail", "created_at": "at"},
}
#: Columns that are our machinery, not information about the person.
NOT_EXPORTED = {
    "id": "the row's number",
    "subscriber_id": "the person the row belongs to",
    "enrollment_id": "the course the email belongs to (its sequence is exported)",
    "delivery_id": "the email an event answers",
    "enqueued_at": "when an email was handed to a worker",
    "lease_until": "how long a worker holds an email it is sending",
}


def _exported(row) -> dict:
    """A row as the export shows it: its columns under their export names, times in ISO 8601."""
    values = {}
    for column, name in EXPORTED[type(row)].items():
        value = getattr(row, column)
        values[name] = value.isoformat() if isinstance(value, datetime) else value
    return values


def export_data(session: Session, subscriber_id: int) -> dict | None:
    """Everything we hold about one subscriber, as JSON-ready data."""
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None:
        return None

    def rows(model) -> list[dict]:
        query = select(model).where(model.subscriber_id == subscriber_id).order_by(model.id)
        return [_exported(row) for row in session.scalars(query)]

    return {
        "subscriber": _exported(subscriber),
        "consents": rows(Consent),
        "enrollments": rows(Enrollment),
        "emails": rows(Delivery),
        "events": rows(Event),
    }


def erase(
    session: Session, subscriber_id: int, *, now: datetime, why: str = "", keep_out: bool = True
) -> bool:
    """Remove a subscriber's personal data; keep the suppression hash and anonymous counts.

    The row stays, renamed to an address that cannot receive mail, so the
    deliveries and events that point at it still count in the statistics.
    `keep_out=False` keeps no hash either: for a signup never confirmed, whose
    address never asked for anything (`prune_unconfirmed`).
    """
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None or subscriber.status == SubscriberStatus.ERASED:
        return subscriber is not None
    reason = (
        subscriber.status
        if subscriber.status in SubscriberStatus.SUPPRESSED
        else SubscriberStatus.ERASED
    )
    if keep_out:
        suppress(session, subscriber.email, reason, now)
    stop_enrollments(session, subscriber_id)
    # SMTP replies quote the address ("550 5.1.1 <ann@example.com>: ..."): drop them.
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber_id, Delivery.last_error.is_not(None))
        .values(last_error="")
    )
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber_id, Delivery.status == DeliveryStatus.QUEUED)
        .values(status=DeliveryStatus.CANCELLED, last_error="erased")
    )
    session.execute(delete(Consent).where(Consent.subscriber_id == subscriber_id))
    session.execute(
        update(Event)
        .where(Event.subscriber_id == subscriber_id, Event.kind.not_in(["click", "open"]))
        .values(detail="")
    )
    subscriber.email = f"erased-{subscriber_id}@erased.invalid"
    subscriber.first_name = ""
    subscriber.status = SubscriberStatus.ERASED
    session.add(Event(subscriber_id=subscriber_id, kind="erase", detail=why, created_at=now))
    return True


def erase_on_request(session: Session, subscriber_id: int, *, now: datetime, outbox: Path) -> bool:
    """`erase`, as the person asked it of us: their caught mail in `outbox` goes too.

    The outbox is the dev catcher's (`nurture dev`, the compose setup); a
    production setup, which sends through a real server, has none.
    """
    from nurture import catcher  # the dev catcher's module; a worker never needs it

    subscriber = session.get(Subscriber, subscriber_id)
    address = subscriber.email if subscriber is not None else None
    if not erase(session, subscriber_id, now=now):
        return False
    session.commit()  # the data first: mail deleted for an erasure that failed is lost
    if address is not None:
        catcher.forget(outbox, address)
    return True


#: Signups pruned per transaction, so a first run on a large backlog holds no lock for long.
PRUNE_BATCH = 500


def prune_unconfirmed(session: Session, *, now: datetime, keep: timedelta) -> int:
    """Erase the personal data of signups never confirmed within `keep`; how many.

    Someone who never clicked the confirmation link never agreed to anything,
    and their address, IP and user agent may be someone else's typing: kept no
    longer than needed (the GDPR's storage limitation). A signup counts from its
    newest confirmation email, so asking for a fresh link starts the time again.
    The rows stay, anonymous, so the dashboard's signup counts stay true, and
    no hash is kept: the address may sign up again. A signup stopped before it
    confirmed (its confirmation bounced, a complaint) is erased too, keeping the
    hash that keeps it out.
    """
    cutoff = now - keep
    newest = (
        select(func.max(Delivery.created_at))
        .where(Delivery.subscriber_id == Subscriber.id, Delivery.step == CONFIRMATION_STEP)
        .scalar_subquery()
    )
    pruned = 0
    while True:
        rows = session.execute(
            select(Subscriber.id, Subscriber.status)
            .where(
                # Pending, or stopped before confirming: a typo's confirmation bounces.
                Subscriber.status.not_in([SubscriberStatus.ACTIVE, SubscriberStatus.ERASED]),
                Subscriber.confirmed_at.is_(None),  # back after an unsubscribe: kept
                Subscriber.created_at < cutoff,
                func.coalesce(newest, Subscriber.created_at) < cutoff,
            )
            .order_by(Subscriber.id)
            .limit(PRUNE_BATCH)
            .with_for_update(skip_locked=True)  # a second beat's prune takes other rows
        ).all()
        for subscriber_id, status in rows:
            # A bounce, complaint or unsubscribe keeps its hash, as any erasure keeps it.
            keep_out = status != SubscriberStatus.PENDING
            erase(session, subscriber_id, now=now, why="never confirmed", keep_out=keep_out)
        session.commit()
        pruned += len(rows)
        if len(rows) < PRUNE_BATCH:
            return pruned
