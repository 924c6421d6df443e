"""When each step is due, and the due-scan that turns due steps into deliveries.

Everything here takes `now`: the schedule is a pure function of the manifest,
the subscriber's time zone and the time the enrollment started, and the
due-scan is one call that tests and `nurture dispatch --now` can make at any
simulated moment. The database is the only clock that matters; the broker only
carries delivery ids, and anything it loses is found again here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from nurture.config import Settings
from nurture.models import Delivery, DeliveryStatus, Enrollment, EnrollmentStatus, Subscriber
from nurture.sequences import Sequence, Step
from nurture.subscribers import new_message_id

log = logging.getLogger(__name__)

Publish = Callable[[list[int]], None]


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def scheduled_at(step: Step, *, started_at: datetime, timezone: str, day_seconds: int) -> datetime:
    """When `step` is meant to go out for an enrollment that started at `started_at`.

    In real time (`day_seconds` 86400) a step with a send time goes out at that
    local time on its day in the subscriber's zone; the wall clock is kept
    across daylight-saving changes. With shrunk days, send times are ignored
    and offsets shrink in proportion.
    """
    if step.send_at is None or day_seconds != 86400:
        return started_at + timedelta(seconds=step.day * day_seconds)
    tz = zone(timezone)
    local_day = started_at.astimezone(tz).date() + timedelta(days=step.day)
    local = datetime.combine(local_day, step.send_at, tzinfo=tz)
    # A time that does not exist (the spring-forward gap) comes out an hour later.
    return local.astimezone(UTC)


def next_due(
    step: Step,
    *,
    started_at: datetime,
    timezone: str,
    previous_send: datetime,
    settings: Settings,
) -> datetime:
    """The step's scheduled time, but never sooner than the minimum gap after the last.

    After an outage this spaces the overdue steps out one per gap, in order,
    instead of sending several days of the course at once.
    """
    planned = scheduled_at(
        step, started_at=started_at, timezone=timezone, day_seconds=settings.day_seconds
    )
    return max(planned, previous_send + timedelta(seconds=settings.min_gap_seconds))


@dataclass
class DispatchResult:
    created: int = 0
    enqueued: int = 0
    released: int = 0
    publish_failed: int = 0


def _write_delivery(session: Session, settings: Settings, enrollment: Enrollment, step: Step, now):
    """Write the delivery for `step`; False if the subscriber already had this step.

    A delivery cancelled by an unsubscribe is revived for a returning subscriber;
    one that was sent, failed or is on its way is left alone, so nobody gets a
    step twice.
    """
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    values = {
        "subscriber_id": enrollment.subscriber_id,
        "enrollment_id": enrollment.id,
        "sequence": enrollment.sequence,
        "step": step.key,
        "status": DeliveryStatus.QUEUED,
        "message_id": new_message_id(settings),
        "attempts": 0,
        "not_before": now,
        "created_at": now,
    }
    statement = insert(Delivery).values(**values)
    inserted = session.scalar(
        statement.on_conflict_do_nothing(index_elements=["enrollment_id", "step"]).returning(
            Delivery.id
        )
    )
    if inserted is not None:
        return True
    revived = session.execute(
        update(Delivery)
        .where(
            Delivery.enrollment_id == enrollment.id,
            Delivery.step == step.key,
            Delivery.status == DeliveryStatus.CANCELLED,
        )
        .values(
            status=DeliveryStatus.QUEUED,
            message_id=values["message_id"],
            attempts=0,
            not_before=now,
            enqueued_at=None,
            lease_until=None,
            last_error=None,
            created_at=now,
        )
    ).rowcount
    return bool(revived)


def _due_batch(session: Session, now: datetime, limit: int):
    return session.execute(
        select(Enrollment, Subscriber.timezone)
        .join(Subscriber, Subscriber.id == Enrollment.subscriber_id)
        .where(Enrollment.status == EnrollmentStatus.ACTIVE, Enrollment.next_due_at <= now)
        .order_by(Enrollment.next_due_at)
        .limit(limit)
        .with_for_update(of=Enrollment, skip_locked=True)
    ).all()


def create_due_deliveries(
    session: Session, settings: Settings, sequences: Mapping[str, Sequence], now: datetime
) -> int:
    """Write a delivery row for every due step and move each enrollment on.

    Batches of `settings.batch_size`, each committed on its own; on PostgreSQL
    the rows are taken with SKIP LOCKED, so two dispatchers share the work
    instead of doubling it, and the unique (enrollment, step) constraint backs
    that up everywhere.
    """
    created = 0
    while True:
        rows = _due_batch(session, now, settings.batch_size)
        for enrollment, timezone in rows:
            created += _advance(session, settings, sequences, enrollment, timezone, now)
        session.commit()
        if len(rows) < settings.batch_size:
            return created


def _advance(session, settings, sequences, enrollment: Enrollment, timezone: str, now) -> int:
    """Write the due step's delivery and point the enrollment at the step after it.

    Steps this subscriber already had (a returning subscriber) are passed over
    in the same tick, so they neither repeat nor wait a gap each.
    """
    sequence = sequences.get(enrollment.sequence)
    step = sequence.step(enrollment.next_step) if sequence and enrollment.next_step else None
    if step is None:
        log.error(
            "enrollment %s points at %s/%s, which does not exist; holding it",
            enrollment.id,
            enrollment.sequence,
            enrollment.next_step,
        )
        enrollment.next_due_at = None
        return 0
    written = False
    while step is not None and not written:
        written = _write_delivery(session, settings, enrollment, step, now)
        step = sequence.after(step.key)
    enrollment.next_step = step.key if step else None
    enrollment.next_due_at = (
        next_due(
            step,
            started_at=enrollment.started_at or now,
            timezone=timezone,
            previous_send=now,
            settings=settings,
        )
        if step
        else None
    )
    return int(written)


def release_expired_leases(session: Session, now: datetime) -> int:
    """Deliveries claimed by a worker that died go back to the queue."""
    result = session.execute(
        update(Delivery)
        .where(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until < now)
        .values(status=DeliveryStatus.QUEUED, enqueued_at=None, lease_until=None)
    )
    session.commit()
    return result.rowcount


def enqueue_ready(
    session: Session, settings: Settings, now: datetime, publish: Publish
) -> tuple[int, int]:
    """Hand every ready delivery to the broker; return (enqueued, failed to publish).

    Ready means queued, due, and either never handed over or handed over so
    long ago that the broker must have lost it. A duplicate message is
    harmless: a worker claims a delivery with a conditional update, so only one
    sends it.
    """
    stale = now - timedelta(seconds=settings.requeue_after)
    enqueued = failed = 0
    while True:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.status == DeliveryStatus.QUEUED,
                    Delivery.not_before <= now,
                    or_(Delivery.enqueued_at.is_(None), Delivery.enqueued_at < stale),
                )
                .order_by(Delivery.not_before, Delivery.id)
                .limit(settings.batch_size)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            return enqueued, failed
        handed, failed = hand_over(session, ids, now, publish)
        enqueued += handed
        if failed:
            return enqueued, failed


def hand_over(session: Session, ids: list[int], now: datetime, publish: Publish) -> tuple[int, int]:
    """Mark deliveries as handed to the broker, then publish them.

    If the broker is down the mark is taken back, so the next tick tries again
    at once; the delivery rows themselves stay, so nothing is lost. Returns
    (published, failed).
    """
    session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(enqueued_at=now))
    session.commit()
    try:
        publish(ids)
    except Exception as error:
        log.warning("broker unavailable, %d deliveries wait for the next tick: %s", len(ids), error)
        session.execute(
            update(Delivery)
            .where(and_(Delivery.id.in_(ids), Delivery.enqueued_at == now))
            .values(enqueued_at=None)
        )
        session.commit()
        return 0, len(ids)
    return len(ids), 0


def dispatch(
    session: Session,
    settings: Settings,
    sequences: Mapping[str, Sequence],
    *,
    now: datetime,
    publish: Publish,
) -> DispatchResult:
    """One due-scan: release dead claims, write due deliveries, hand them out."""
    result = DispatchResult()
    result.released = release_expired_leases(session, now)
    result.created = create_due_deliveries(session, settings, sequences, now)
    result.enqueued, result.publish_failed = enqueue_ready(session, settings, now, publish)
    return result
