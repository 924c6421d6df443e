"""Data rights and suppression: export, erasure, and the hashed do-not-mail list.

Erasure removes what identifies a person (address, name, IP, user agent, the
consent records) but keeps anonymous rows, so per-step counts stay true. An
address that must not be mailed again is kept only as a SHA-256 hash: enough to
refuse it at signup or import, not enough to mail it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from nurture.models import (
    Consent,
    Delivery,
    DeliveryStatus,
    Enrollment,
    Event,
    Subscriber,
    SubscriberStatus,
)
from nurture.subscribers import stop_enrollments, suppress


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def export_data(session: Session, subscriber_id: int) -> dict | None:
    """Everything we hold about one subscriber, as JSON-ready data."""
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None:
        return None
    consents = session.scalars(
        select(Consent).where(Consent.subscriber_id == subscriber_id).order_by(Consent.id)
    )
    enrollments = session.scalars(
        select(Enrollment).where(Enrollment.subscriber_id == subscriber_id).order_by(Enrollment.id)
    )
    deliveries = session.scalars(
        select(Delivery).where(Delivery.subscriber_id == subscriber_id).order_by(Delivery.id)
    )
    events = session.scalars(
        select(Event).where(Event.subscriber_id == subscriber_id).order_by(Event.id)
    )
    return {
        "subscriber": {
            "email": subscriber.email,
            "first_name": subscriber.first_name,
            "timezone": subscriber.timezone,
            "status": subscriber.status,
            "signed_up_at": _time(subscriber.created_at),
            "confirmed_at": _time(subscriber.confirmed_at),
            "unsubscribed_at": _time(subscriber.unsubscribed_at),
        },
        "consents": [
            {
                "source": c.source,
                "consent_text": c.consent_text,
                "consent_version": c.consent_version,
                "ip": c.ip,
                "user_agent": c.user_agent,
                "signed_up_at": _time(c.created_at),
                "confirmed_at": _time(c.confirmed_at),
            }
            for c in consents
        ],
        "enrollments": [
            {
                "sequence": e.sequence,
                "status": e.status,
                "next_step": e.next_step,
                "next_due_at": _time(e.next_due_at),
                "started_at": _time(e.started_at),
                "completed_at": _time(e.completed_at),
                "converted_at": _time(e.converted_at),
            }
            for e in enrollments
        ],
        "emails": [
            {
                "sequence": d.sequence,
                "step": d.step,
                "status": d.status,
                "message_id": d.message_id,
                "sent_at": _time(d.sent_at),
            }
            for d in deliveries
        ],
        "events": [{"kind": e.kind, "detail": e.detail, "at": _time(e.created_at)} for e in events],
    }


def erase(session: Session, subscriber_id: int, *, now: datetime) -> bool:
    """Remove a subscriber's personal data; keep the suppression hash and anonymous counts.

    The row stays, renamed to an address that cannot receive mail, so the
    deliveries and events that point at it still count in the statistics.
    """
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None or subscriber.status == SubscriberStatus.ERASED:
        return subscriber is not None
    reason = (
        subscriber.status
        if subscriber.status in SubscriberStatus.SUPPRESSED
        else SubscriberStatus.ERASED
    )
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
    session.add(Event(subscriber_id=subscriber_id, kind="erase", created_at=now))
    return True
