"""When steps are due, and the due-scan that turns them into deliveries.

Time is always passed in: the pure schedule takes `started_at`, the due-scan a
`now`. Nothing here sleeps. The broker is a plain function that collects ids.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import BOTH_DATABASES
from sqlalchemy import event, select, text, update
from sqlalchemy.orm import Session

from nurture.config import Settings, load_settings
from nurture.db import for_psycopg, get_engine, session_scope
from nurture.delivery import send_batch
from nurture.models import Delivery, DeliveryStatus, Enrollment, EnrollmentStatus, Subscriber
from nurture.scheduler import (
    _CLAIM_PLANNING,
    _DUE,
    CLAIM_LOOPS,
    SCAN_BATCH,
    _due_batch,
    _history,
    dispatch,
    next_due,
    next_to_send,
    scheduled_at,
)
from nurture.sequences import Sequence, Step, first_steps, load_sequences
from nurture.subscribers import SignupRequest, confirm, signup, unsubscribe

SEQUENCE = "product-vs-project"
COURSE_KEYS = [
    "welcome",
    "product-manager",
    "project-manager",
    "overlap",
    "which-fits",
    "six-month-course",
    "last-reminder",
]
NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # a Monday


def at(*args: int, tz=UTC) -> datetime:
    return datetime(*args, tzinfo=tz)


# --- The pure schedule -------------------------------------------------------------

DAY_1_AT_9 = Step(key="day-one", day=1, file="x.md", send_at=time(9, 0))


@pytest.mark.parametrize(
    ("started_at", "expected_local"),
    [
        # 11:00 in New York on June 10 -> 09:00 on June 11
        (at(2026, 6, 10, 15, 0), at(2026, 6, 11, 9, 0, tz=NEW_YORK)),
        # 22:00 in New York on June 10 (already June 11 in UTC) -> still June 11
        (at(2026, 6, 11, 2, 0), at(2026, 6, 11, 9, 0, tz=NEW_YORK)),
        # 00:30 in New York on June 11 -> June 12
        (at(2026, 6, 11, 4, 30), at(2026, 6, 12, 9, 0, tz=NEW_YORK)),
    ],
)
def test_send_time_is_local_to_new_york(started_at, expected_local):
    due = scheduled_at(
        DAY_1_AT_9, started_at=started_at, timezone="America/New_York", day_seconds=86400
    )
    assert due == expected_local
    local = due.astimezone(NEW_YORK)
    assert (local.hour, local.minute) == (9, 0)
    assert due.astimezone(UTC) == at(*expected_local.timetuple()[:3], 13, 0)  # EDT is UTC-4


@pytest.mark.parametrize(
    ("started_at", "expected_utc"),
    [
        # 05:00 in Tokyo on June 11 (June 10 in UTC) -> 09:00 on June 12 = 00:00 UTC
        (at(2026, 6, 10, 20, 0), at(2026, 6, 12, 0, 0)),
        # 18:00 in Tokyo on June 10 -> 09:00 on June 11
        (at(2026, 6, 10, 9, 0), at(2026, 6, 11, 0, 0)),
    ],
)
def test_send_time_is_local_to_tokyo(started_at, expected_utc):
    due = scheduled_at(DAY_1_AT_9, started_at=started_at, timezone="Asia/Tokyo", day_seconds=86400)
    assert due == expected_utc
    local = due.astimezone(TOKYO)
    assert (local.hour, local.minute) == (9, 0)


@pytest.mark.parametrize(
    ("started_at", "expected", "first_gap"),
    [
        (  # Friday 10:00 EST; clocks spring forward on Sunday 2026-03-08
            at(2026, 3, 6, 15, 0),
            [at(2026, 3, 7, 14, 0), at(2026, 3, 8, 13, 0), at(2026, 3, 9, 13, 0)],
            timedelta(hours=23),
        ),
        (  # Friday 10:00 EDT; clocks fall back on Sunday 2026-11-01
            at(2026, 10, 30, 14, 0),
            [at(2026, 10, 31, 13, 0), at(2026, 11, 1, 14, 0), at(2026, 11, 2, 14, 0)],
            timedelta(hours=25),
        ),
    ],
    ids=["spring-forward", "fall-back"],
)
def test_daylight_saving_keeps_nine_local(started_at, expected, first_gap):
    dues = [
        scheduled_at(
            Step(key=f"d{day}", day=day, file="x.md", send_at=time(9, 0)),
            started_at=started_at,
            timezone="America/New_York",
            day_seconds=86400,
        )
        for day in (1, 2, 3)
    ]
    assert dues == expected
    for due in dues:
        assert due.astimezone(NEW_YORK).time() == time(9, 0)
    assert dues[1] - dues[0] == first_gap


def test_step_without_send_time_is_an_exact_offset():
    started_at = at(2026, 3, 7, 15, 27)
    welcome = Step(key="welcome", day=0, file="x.md")
    later = Step(key="later", day=2, file="x.md")
    kwargs = dict(started_at=started_at, timezone="America/New_York", day_seconds=86400)
    assert scheduled_at(welcome, **kwargs) == started_at
    assert scheduled_at(later, **kwargs) == started_at + timedelta(days=2)


@pytest.mark.parametrize("day_seconds", [2, 60, 3600])
def test_shrunk_days_ignore_send_times(day_seconds):
    started_at = at(2026, 6, 10, 15, 0)
    step = Step(key="d3", day=3, file="x.md", send_at=time(9, 0))
    due = scheduled_at(step, started_at=started_at, timezone="Asia/Tokyo", day_seconds=day_seconds)
    assert due == started_at + timedelta(seconds=3 * day_seconds)


def test_unknown_time_zone_falls_back_to_utc():
    due = scheduled_at(
        DAY_1_AT_9, started_at=at(2026, 6, 10, 15, 0), timezone="Mars/Olympus", day_seconds=86400
    )
    assert due == at(2026, 6, 11, 9, 0)


# --- The minimum gap ---------------------------------------------------------------


def pure_settings(tmp_path, **env: str) -> Settings:
    return load_settings({"NURTURE_INSTANCE": str(tmp_path / "instance"), "SECRET_KEY": "k", **env})


def test_minimum_gap_default_waits_for_the_next_send_time(tmp_path):
    settings = pure_settings(tmp_path)
    assert settings.min_gap_hours == 20
    started_at = at(2026, 6, 10, 15, 0)
    planned = scheduled_at(DAY_1_AT_9, started_at=started_at, timezone="UTC", day_seconds=86400)
    previous = planned - timedelta(hours=2)
    due = next_due(
        DAY_1_AT_9,
        started_at=started_at,
        timezone="UTC",
        previous_send=previous,
        settings=settings,
    )
    # 07:00 + 20 h is 03:00 the next day; the step keeps its 09:00 send time.
    assert due == at(2026, 6, 12, 9, 0)
    untimed = Step(key="untimed", day=1, file="x.md")
    due = next_due(
        untimed, started_at=started_at, timezone="UTC", previous_send=previous, settings=settings
    )
    assert due == previous + timedelta(hours=20)


def test_minimum_gap_keeps_the_plan_when_it_is_far_enough(tmp_path):
    settings = pure_settings(tmp_path)
    started_at = at(2026, 6, 10, 15, 0)
    due = next_due(
        DAY_1_AT_9,
        started_at=started_at,
        timezone="America/New_York",
        previous_send=started_at,
        settings=settings,
    )
    assert due == at(2026, 6, 11, 9, 0, tz=NEW_YORK)


def test_minimum_gap_shrinks_with_the_day(tmp_path):
    settings = pure_settings(tmp_path, NURTURE_DAY_SECONDS="2")
    gap = timedelta(seconds=20 * 3600 * 2 / 86400)
    assert settings.min_gap == gap
    started_at = at(2026, 6, 10, 15, 0)
    planned = started_at + timedelta(seconds=2)  # day 1, send time ignored
    previous = started_at + timedelta(seconds=1.5)
    due = next_due(
        DAY_1_AT_9,
        started_at=started_at,
        timezone="America/New_York",
        previous_send=previous,
        settings=settings,
    )
    assert due == previous + gap
    assert due > planned


# --- The due-scan on a real database -----------------------------------------------


class Broker:
    """A publish function that keeps what it was given, or fails like a dead broker."""

    def __init__(self, down: bool = False):
        self.down = down
        self.batches: list[list[int]] = []

    def __call__(self, ids: list[int]) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.batches.append(list(ids))

    @property
    def ids(self) -> list[int]:
        return [i for batch in self.batches for i in batch]


def sequences(settings: Settings):
    return load_sequences(settings.templates_path)


def enroll(
    settings: Settings, email: str, *, now: datetime, timezone: str = "UTC", confirmed=True
) -> int:
    """Sign up (double opt-in), let the confirmation go out, confirm; the subscriber id."""
    steps = first_steps(sequences(settings))
    request = SignupRequest(
        email=email, first_name="Alex", timezone=timezone, sequence=SEQUENCE, source="api"
    )
    with session_scope(settings.database_url) as session:
        confirmation_id = signup(session, settings, request, first_steps=steps, now=now)
        assert confirmation_id is not None
        session.execute(
            update(Delivery)
            .where(Delivery.id == confirmation_id)
            .values(status=DeliveryStatus.SENT, sent_at=now)
        )
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        if confirmed:
            assert confirm(session, subscriber_id, now=now, first_steps=steps) is not None
    return subscriber_id


def run(settings: Settings, now: datetime, publish):
    with session_scope(settings.database_url) as session:
        return dispatch(session, settings, sequences(settings), now=now, publish=publish)


def course_deliveries(settings: Settings, subscriber_id: int | None = None) -> list[Delivery]:
    query = select(Delivery).where(Delivery.step != "confirmation").order_by(Delivery.id)
    if subscriber_id is not None:
        query = query.where(Delivery.subscriber_id == subscriber_id)
    with session_scope(settings.database_url) as session:
        return list(session.scalars(query))


def enrollment_of(settings: Settings, subscriber_id: int) -> Enrollment:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Enrollment).where(Enrollment.subscriber_id == subscriber_id))


def worker_sends(settings: Settings, now: datetime, subscriber_id: int | None = None) -> int:
    """The worker, simulated: every queued delivery (of one subscriber) is sent at `now`.

    The due-scan passes over an enrollment while it has an email still on its
    way, so a test that walks through the course sends each email before the
    next due-scan. Returns how many were sent.
    """
    query = update(Delivery).where(Delivery.status == DeliveryStatus.QUEUED)
    if subscriber_id is not None:
        query = query.where(Delivery.subscriber_id == subscriber_id)
    with session_scope(settings.database_url) as session:
        return session.execute(query.values(status=DeliveryStatus.SENT, sent_at=now)).rowcount


@BOTH_DATABASES
def test_due_enrollment_gets_one_delivery_and_moves_on(settings):
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    before = enrollment_of(settings, subscriber_id)
    assert (before.status, before.next_step, before.next_due_at) == ("active", "welcome", T0)

    broker = Broker()
    result = run(settings, T0, broker)

    [delivery] = course_deliveries(settings)
    assert (delivery.sequence, delivery.step, delivery.status) == (SEQUENCE, "welcome", "queued")
    assert delivery.subscriber_id == subscriber_id
    assert delivery.enrollment_id == before.id
    assert delivery.message_id.startswith("<") and delivery.message_id.endswith("@nurture.test>")
    assert delivery.enqueued_at == T0
    assert broker.ids == [delivery.id]
    assert (result.created, result.enqueued) == (1, 1)

    after = enrollment_of(settings, subscriber_id)
    assert after.status == "active"
    assert after.next_step == "product-manager"
    # Day 1 at 09:00 local (UTC here), which is more than the minimum gap away.
    assert after.next_due_at == at(2026, 6, 2, 9, 0)


@BOTH_DATABASES
def test_dispatch_twice_at_the_same_now_creates_nothing_new(settings):
    enroll(settings, "ann@example.com", now=T0)
    broker = Broker()
    run(settings, T0, broker)
    again = run(settings, T0, broker)
    assert (again.created, again.enqueued) == (0, 0)
    assert len(course_deliveries(settings)) == 1
    assert len(broker.ids) == 1


@BOTH_DATABASES
def test_nothing_before_it_is_due(settings):
    subscriber_id = enroll(settings, "ann@example.com", now=T0, timezone="America/New_York")
    enroll(settings, "unconfirmed@example.com", now=T0, confirmed=False)
    broker = Broker()
    run(settings, T0, broker)
    assert [d.step for d in course_deliveries(settings)] == ["welcome"]
    # The welcome goes out at once, so only the schedule holds the next step back.
    assert worker_sends(settings, T0) == 1

    due = enrollment_of(settings, subscriber_id).next_due_at
    assert due == at(2026, 6, 2, 9, 0, tz=NEW_YORK)
    early = run(settings, due - timedelta(seconds=1), broker)
    assert early.created == 0
    assert len(course_deliveries(settings)) == 1
    on_time = run(settings, due, broker)
    assert on_time.created == 1
    deliveries = course_deliveries(settings)
    assert [d.step for d in deliveries] == ["welcome", "product-manager"]
    assert broker.ids[-1] == deliveries[-1].id


@BOTH_DATABASES
def test_a_rewound_enrollment_does_not_deliver_a_step_twice(settings):
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    run(settings, T0, Broker())
    assert worker_sends(settings, T0) == 1
    [welcome] = course_deliveries(settings)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Enrollment)
            .where(Enrollment.subscriber_id == subscriber_id)
            .values(next_step="welcome", next_due_at=T0)
        )
    for tick in range(8 * 4 + 1):
        now = T0 + timedelta(minutes=1) + timedelta(hours=6 * tick)
        run(settings, now, Broker())
        worker_sends(settings, now)
    deliveries = course_deliveries(settings)
    steps = [d.step for d in deliveries]
    assert steps == COURSE_KEYS, steps  # each step once, in order, none stranded
    # The welcome was passed over, not written or sent again.
    first = deliveries[0]
    assert (first.id, first.message_id, first.sent_at) == (
        welcome.id,
        welcome.message_id,
        T0,
    )


@BOTH_DATABASES
def test_a_returning_subscriber_gets_each_step_once_and_none_skipped(settings):
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    run(settings, T0, Broker())
    assert worker_sends(settings, T0) == 1  # the welcome went out
    pm_due = enrollment_of(settings, subscriber_id).next_due_at
    run(settings, pm_due, Broker())
    with session_scope(settings.database_url) as session:
        # Leaves before the product-manager email went out: it is cancelled.
        unsubscribe(session, subscriber_id, now=pm_due + timedelta(minutes=1), how="one-click")
    before = {d.step: d for d in course_deliveries(settings)}
    assert {step: d.status for step, d in before.items()} == {
        "welcome": "sent",
        "product-manager": "cancelled",
    }

    back = T0 + timedelta(days=10)
    assert enroll(settings, "ann@example.com", now=back) == subscriber_id
    broker = Broker()
    for tick in range(8 * 4 + 1):
        now = back + timedelta(hours=6 * tick)
        run(settings, now, broker)
        worker_sends(settings, now)

    deliveries = course_deliveries(settings)
    assert [d.step for d in deliveries] == COURSE_KEYS
    statuses = {d.step: d.status for d in deliveries}
    assert all(status == "sent" for status in statuses.values()), statuses
    by_step = {d.step: d for d in deliveries}
    # The welcome is not sent again; the cancelled email comes back first, at once.
    assert by_step["welcome"].sent_at == T0
    assert by_step["product-manager"].id == before["product-manager"].id
    assert by_step["product-manager"].created_at == back
    returned = sorted(deliveries[1:], key=lambda d: d.created_at)
    assert [d.step for d in returned] == COURSE_KEYS[1:]
    for earlier, later in zip(returned, returned[1:], strict=False):
        assert later.created_at - earlier.created_at >= timedelta(hours=settings.min_gap_hours)
    # Each handed out exactly once.
    assert sorted(broker.ids) == sorted(d.id for d in deliveries if d.step != "welcome")


@BOTH_DATABASES
def test_after_the_last_step_the_enrollment_waits_for_the_send(settings, smtp):
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    broker = Broker()
    now = T0
    for _ in COURSE_KEYS:
        run(settings, now, broker)
        due = enrollment_of(settings, subscriber_id).next_due_at
        if due is None:
            break
        assert worker_sends(settings, now) == 1  # every email but the last goes out
        now = due
    deliveries = course_deliveries(settings)
    assert [d.step for d in deliveries] == COURSE_KEYS
    assert [d.status for d in deliveries] == ["sent"] * (len(COURSE_KEYS) - 1) + ["queued"]
    enrollment = enrollment_of(settings, subscriber_id)
    assert enrollment.next_step is None
    assert enrollment.next_due_at is None
    assert enrollment.status == EnrollmentStatus.ACTIVE
    assert enrollment.completed_at is None

    later = now + timedelta(days=30)
    assert run(settings, later, Broker()).created == 0
    assert enrollment_of(settings, subscriber_id).status == EnrollmentStatus.ACTIVE

    # Once the last email is sent, the enrollment is done.
    with session_scope(settings.database_url) as session:
        result = send_batch(
            session, settings, sequences(settings), [deliveries[-1].id], clock=lambda: later
        )
    assert result.sent == 1
    assert smtp.messages[-1]["X-Nurture-Step"] == f"{SEQUENCE}/last-reminder"
    enrollment = enrollment_of(settings, subscriber_id)
    assert (enrollment.status, enrollment.completed_at) == (EnrollmentStatus.COMPLETED, later)


@BOTH_DATABASES
def test_broker_down_keeps_deliveries_for_the_next_tick(settings):
    enroll(settings, "ann@example.com", now=T0)
    enroll(settings, "bob@example.com", now=T0)

    result = run(settings, T0, Broker(down=True))
    assert result.created == 2
    assert result.enqueued == 0
    assert result.publish_failed == 2
    deliveries = course_deliveries(settings)
    assert len(deliveries) == 2
    assert all(d.status == "queued" and d.enqueued_at is None for d in deliveries)

    broker = Broker()
    later = T0 + timedelta(minutes=1)
    result = run(settings, later, broker)
    assert result.created == 0
    assert sorted(broker.ids) == sorted(d.id for d in deliveries)
    assert all(d.enqueued_at == later for d in course_deliveries(settings))


@BOTH_DATABASES
def test_a_lost_broker_message_is_published_again(settings):
    enroll(settings, "ann@example.com", now=T0)
    broker = Broker()
    run(settings, T0, broker)
    [delivery] = course_deliveries(settings)
    assert broker.ids == [delivery.id]

    # Handed out a moment ago: the worker has it, do not publish it again.
    run(settings, T0 + timedelta(seconds=10), broker)
    run(settings, T0 + timedelta(seconds=settings.requeue_after - 1), broker)
    assert broker.ids == [delivery.id]

    # Still queued long after it was handed out: the message was lost.
    late = T0 + timedelta(seconds=settings.requeue_after + 1)
    result = run(settings, late, broker)
    assert result.enqueued == 1
    assert broker.ids == [delivery.id, delivery.id]
    [delivery] = course_deliveries(settings)
    assert delivery.enqueued_at == late
    assert delivery.status == "queued"


@BOTH_DATABASES
def test_an_expired_lease_is_released(settings):
    enroll(settings, "ann@example.com", now=T0)
    run(settings, T0, Broker())
    [delivery] = course_deliveries(settings)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery.id)
            .values(status=DeliveryStatus.SENDING, lease_until=T0 + timedelta(minutes=10))
        )

    broker = Broker()
    result = run(settings, T0 + timedelta(minutes=5), broker)  # the worker is still on it
    assert result.released == 0
    assert course_deliveries(settings)[0].status == "sending"
    assert broker.ids == []

    later = T0 + timedelta(minutes=11)  # the worker died
    result = run(settings, later, broker)
    assert result.released == 1
    [delivery] = course_deliveries(settings)
    assert delivery.status == "queued"
    assert delivery.lease_until is None
    assert broker.ids == [delivery.id]
    assert delivery.enqueued_at == later


@BOTH_DATABASES
def test_outage_catch_up_is_spaced_by_the_minimum_gap(settings):
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    run(settings, T0, Broker())
    assert worker_sends(settings, T0) == 1
    assert enrollment_of(settings, subscriber_id).next_due_at == at(2026, 6, 2, 9, 0)

    now = at(2026, 6, 5, 10, 0)  # the service was down for three days
    broker = Broker()
    assert run(settings, now, broker).created == 1
    assert [d.step for d in course_deliveries(settings)][-1] == "product-manager"
    # It goes out at once, so only the minimum gap holds the next step back.
    assert worker_sends(settings, now) == 1
    # 20 hours later is 06:00; the next step keeps its 09:00 send time.
    next_morning = at(2026, 6, 6, 9, 0)
    assert enrollment_of(settings, subscriber_id).next_due_at == next_morning

    assert run(settings, now + timedelta(hours=1), broker).created == 0
    assert run(settings, now + timedelta(hours=20), broker).created == 0
    assert run(settings, next_morning - timedelta(minutes=1), broker).created == 0
    assert len(course_deliveries(settings)) == 2

    assert run(settings, next_morning, broker).created == 1
    assert [d.step for d in course_deliveries(settings)] == [
        "welcome",
        "product-manager",
        "project-manager",
    ]


@BOTH_DATABASES
def test_a_week_of_ticks_sends_the_course_once_in_order(settings):
    subscriber_id = enroll(settings, "ann@example.com", now=T0, timezone="America/New_York")
    other_id = enroll(settings, "kenji@example.com", now=T0, timezone="Asia/Tokyo")
    broker = Broker()
    for tick in range(8 * 4 + 1):
        now = T0 + timedelta(hours=6 * tick)
        run(settings, now, broker)
        worker_sends(settings, now)

    for who, tz in ((subscriber_id, NEW_YORK), (other_id, TOKYO)):
        deliveries = course_deliveries(settings, who)
        assert [d.step for d in deliveries] == COURSE_KEYS
        assert all(d.status == "sent" for d in deliveries)
        created = [d.created_at for d in deliveries]
        assert created == sorted(created)
        for earlier, later in zip(created, created[1:], strict=False):
            assert later - earlier >= timedelta(hours=settings.min_gap_hours)
        # Every step after the welcome waits for 09:00 local on its day.
        for delivery in deliveries[1:]:
            local = delivery.created_at.astimezone(tz)
            day = COURSE_KEYS.index(delivery.step)
            assert local >= datetime.combine(
                T0.astimezone(tz).date() + timedelta(days=day), time(9, 0), tzinfo=tz
            )
        enrollment = enrollment_of(settings, who)
        assert (enrollment.next_step, enrollment.status) == (None, "active")

    assert len(course_deliveries(settings)) == 14
    # Each handed out exactly once.
    assert sorted(broker.ids) == sorted(d.id for d in course_deliveries(settings))


# --- One email on its way per subscriber -------------------------------------------


@BOTH_DATABASES
def test_an_unsent_email_holds_back_the_next_step(settings):
    ann = enroll(settings, "ann@example.com", now=T0)
    bob = enroll(settings, "bob@example.com", now=T0)
    assert run(settings, T0, Broker()).created == 2
    pm_due = at(2026, 6, 2, 9, 0)
    # Bob's welcome goes out; Ann's stays queued (a 451 retry, a broken template).
    assert worker_sends(settings, T0, bob) == 1

    much_later = T0 + timedelta(days=30)
    assert run(settings, much_later, Broker()).created == 1
    assert [d.step for d in course_deliveries(settings, bob)] == ["welcome", "product-manager"]
    assert [d.step for d in course_deliveries(settings, ann)] == ["welcome"]
    waiting = enrollment_of(settings, ann)
    assert (waiting.next_step, waiting.next_due_at) == ("product-manager", pm_due)

    # A worker holding it (sending, lease not yet expired) holds the course too.
    [welcome] = course_deliveries(settings, ann)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == welcome.id)
            .values(status=DeliveryStatus.SENDING, lease_until=much_later + timedelta(hours=1))
        )
    assert run(settings, much_later + timedelta(minutes=1), Broker()).created == 0
    assert [d.step for d in course_deliveries(settings, ann)] == ["welcome"]

    # Once it is sent, the next step comes a minimum gap later (at its send time), only it.
    sent_at = much_later + timedelta(minutes=2)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == welcome.id)
            .values(status=DeliveryStatus.SENT, sent_at=sent_at, lease_until=None)
        )
    assert run(settings, sent_at + timedelta(minutes=1), Broker()).created == 0
    next_morning = at(2026, 7, 2, 9, 0)  # sent_at + 20 h is 06:02; the step keeps 09:00
    assert enrollment_of(settings, ann).next_due_at == next_morning
    broker = Broker()
    result = run(settings, next_morning, broker)
    assert result.created == 1
    deliveries = course_deliveries(settings, ann)
    assert [d.step for d in deliveries] == ["welcome", "product-manager"]
    # (Bob's product-manager email, never sent, is handed over again too: a lost message.)
    assert deliveries[-1].id in broker.ids and welcome.id not in broker.ids
    assert enrollment_of(settings, ann).next_step == "project-manager"


# --- Which step comes next (pure) --------------------------------------------------


def course(*steps: Step) -> Sequence:
    return Sequence(name="s", title="s", description="", path=Path("."), steps=steps)


def step(key: str, day: int, **flags: bool) -> Step:
    return Step(key=key, day=day, file=f"{key}.md", **flags)


A, B, C, D = step("a", 0), step("b", 1), step("c", 2), step("d", 3)
SALE, LAST = step("sale", 4, sales=True), step("last", 5)


def walk(sequence: Sequence, current: str | None, had: list[str], converted=False) -> list[str]:
    """The steps the due-scan sends from here on, one per tick, as `_advance` does."""
    had, sent = list(had), []
    while True:
        chosen, following = next_to_send(sequence, current, had, converted)
        if chosen is None:
            return sent
        sent.append(chosen.key)
        had.append(chosen.key)
        if following is None:
            return sent
        current = following.key
        assert len(sent) <= len(sequence.steps), sent


def test_next_to_send_follows_the_course_in_order():
    sequence = course(A, B, C, D)
    assert next_to_send(sequence, "a", [], False) == (A, B)
    assert next_to_send(sequence, "c", ["a", "b"], False) == (C, D)
    assert next_to_send(sequence, "d", ["a", "b", "c"], False) == (D, None)
    assert next_to_send(sequence, None, ["a", "b", "c", "d"], False) == (None, None)
    assert walk(sequence, "a", []) == ["a", "b", "c", "d"]
    # A step already had is passed over, wherever the enrollment points.
    assert next_to_send(sequence, "a", ["a"], False) == (B, C)
    assert walk(sequence, "a", ["a", "b"]) == ["c", "d"]


def test_next_to_send_skips_an_inserted_step_unless_it_is_a_backfill():
    inserted = step("inserted", 1)
    sequence = course(A, inserted, B, C)
    # Already past its place: not sent to them.
    assert next_to_send(sequence, "b", ["a"], False) == (B, C)
    assert walk(sequence, "b", ["a"]) == ["b", "c"]
    # Not yet there: it is part of their course like any other step.
    assert walk(sequence, "a", []) == ["a", "inserted", "b", "c"]

    backfill = step("backfill", 1, backfill=True)
    sequence = course(A, backfill, B, C)
    # Past its place: it comes first, then the course resumes where it was.
    assert next_to_send(sequence, "c", ["a", "b"], False) == (backfill, C)
    assert walk(sequence, "c", ["a", "b"]) == ["backfill", "c"]
    # Had it already, or not yet there: once, in its place.
    assert walk(sequence, "c", ["a", "backfill", "b"]) == ["c"]
    assert walk(sequence, "a", []) == ["a", "backfill", "b", "c"]


def test_next_to_send_goes_on_after_a_removed_step():
    # Waiting for c, which the marketer removed: on after b, the last step they had.
    assert next_to_send(course(A, B, D), "c", ["a", "b"], False) == (D, None)
    # b is gone too: on after a, the last one they had that still exists.
    assert next_to_send(course(A, D), "c", ["a", "b"], False) == (D, None)
    # Not from the start: a step inserted before their place is still not theirs.
    assert next_to_send(course(step("new", 0), A, B, D), "c", ["a", "b"], False) == (D, None)
    # Nothing they had still exists: from the start.
    assert next_to_send(course(C, D), "b", ["a"], False) == (C, D)
    # The last step they had is the one that counts, not the furthest along
    # (c came before a for them, in an earlier order of the steps).
    assert walk(course(A, B, C, D), "gone", ["c", "a"]) == ["b", "d"]
    # Removed and nothing after it: they are done.
    assert next_to_send(course(A, B), "c", ["a", "b"], False) == (None, None)


def test_next_to_send_never_repeats_a_step_after_a_reorder():
    # Had a and b, waiting for c; the marketer moves b after c.
    sequence = course(A, C, B, D)
    assert next_to_send(sequence, "c", ["a", "b"], False) == (C, B)
    assert walk(sequence, "c", ["a", "b"]) == ["c", "d"]
    # Moved before the start: still not sent again.
    assert walk(course(D, A, B, C), "c", ["a", "b"]) == ["c"]
    for order in ((A, B, C, D), (D, C, B, A), (B, D, A, C)):
        sent = walk(course(*order), "b", ["a"])
        assert "a" not in sent
        assert len(sent) == len(set(sent))


def test_next_to_send_passes_over_sales_steps_after_a_conversion():
    sequence = course(A, B, SALE, LAST)
    assert walk(sequence, "b", ["a"]) == ["b", "sale", "last"]
    assert walk(sequence, "b", ["a"], converted=True) == ["b", "last"]
    assert next_to_send(sequence, "sale", ["a", "b"], True) == (LAST, None)
    assert next_to_send(course(A, B, SALE), "sale", ["a", "b"], True) == (None, None)
    # A sales step inserted as a backfill is not sent after a conversion either.
    offer = step("offer", 1, sales=True, backfill=True)
    assert next_to_send(course(A, offer, B, C), "c", ["a", "b"], True) == (C, None)
    assert next_to_send(course(A, offer, B, C), "c", ["a", "b"], False) == (offer, C)


@BOTH_DATABASES
def test_the_gap_counts_from_when_the_last_email_was_really_sent(settings):
    """A welcome retried until late in the day pushes the next lesson back a whole gap."""
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    run(settings, T0, Broker())  # the welcome is written at 10:00 ...
    late = T0 + timedelta(hours=19)
    assert worker_sends(settings, late, subscriber_id) == 1  # ... and goes out at 05:00
    nine = at(2026, 6, 2, 9, 0)  # product-manager's planned time, 4 hours after the welcome
    assert run(settings, nine, Broker()).created == 0
    due = enrollment_of(settings, subscriber_id).next_due_at
    assert due >= late + timedelta(hours=20)
    assert due == at(2026, 6, 3, 9, 0), "and it keeps its 09:00 send time"
    assert run(settings, due, Broker()).created == 1


# --- Claim loops side by side (PostgreSQL) -----------------------------------------

ON_POSTGRES = pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)


def many_due(settings: Settings, count: int, now: datetime) -> None:
    """`count` confirmed subscribers whose first course email is due at `now`."""
    with session_scope(settings.database_url) as session:
        session.execute(
            text(
                "INSERT INTO subscribers (email, first_name, timezone, status, created_at) "
                "SELECT 'reader' || i || '@example.com', 'Reader', 'UTC', 'active', :now "
                "FROM generate_series(1, :count) AS i"
            ),
            {"count": count, "now": now},
        )
        session.execute(
            text(
                "INSERT INTO enrollments (subscriber_id, sequence, timezone, status, next_step, "
                "next_due_at, started_at, created_at) "
                "SELECT id, :sequence, timezone, 'active', 'welcome', :now, :now, :now "
                "FROM subscribers"
            ),
            {"sequence": SEQUENCE, "now": now},
        )


@ON_POSTGRES
def test_the_claim_loops_share_the_due_set_without_overlap(settings):
    many_due(settings, 400, T0)
    with session_scope(settings.database_url) as session:
        shares = [
            {row.id for row in _due_batch(session, T0, 1000, (k, CLAIM_LOOPS))}
            for k in range(CLAIM_LOOPS)
        ]
        everything = {row.id for row in _due_batch(session, T0, 1000)}
    assert len(everything) == 400
    assert set().union(*shares) == everything
    assert sum(len(share) for share in shares) == 400  # no enrollment in two shares
    assert all(len(share) > 100 for share in shares)  # spread, not all in one


@ON_POSTGRES
def test_a_big_tick_claims_each_step_once_with_loops_side_by_side(settings):
    due = 3 * SCAN_BATCH * CLAIM_LOOPS + 7
    many_due(settings, due, T0)
    engine = get_engine(settings.database_url)
    open_now, most_open, counting = [0], [0], threading.Lock()

    def checked_out(*_):
        with counting:
            open_now[0] += 1
            most_open[0] = max(most_open[0], open_now[0])

    def checked_in(*_):
        with counting:
            open_now[0] -= 1

    event.listen(engine, "checkout", checked_out)
    event.listen(engine, "checkin", checked_in)
    broker = Broker()
    try:
        result = run(settings, T0, broker)
    finally:
        event.remove(engine, "checkout", checked_out)
        event.remove(engine, "checkin", checked_in)

    deliveries = course_deliveries(settings)
    assert (result.created, result.enqueued, result.publish_failed) == (due, due, 0)
    assert len({d.enrollment_id for d in deliveries}) == len(deliveries) == due
    # Drawn for a whole batch at once, each Message-ID is still its own.
    assert len({d.message_id for d in deliveries}) == due
    domain = re.escape(settings.mail_domain)
    assert all(re.fullmatch(rf"<[0-9a-f]{{32}}@{domain}>", d.message_id) for d in deliveries)
    assert sorted(broker.ids) == sorted(d.id for d in deliveries)  # each handed out once
    assert most_open[0] >= CLAIM_LOOPS  # the loops really ran at the same time
    assert run(settings, T0, Broker()).created == 0


@ON_POSTGRES
def test_with_the_broker_down_no_loop_loses_a_step(settings):
    due = 2 * SCAN_BATCH + 3
    many_due(settings, due, T0)
    result = run(settings, T0, Broker(down=True))
    assert (result.created, result.enqueued, result.publish_failed) == (due, 0, due)
    assert all(d.enqueued_at is None for d in course_deliveries(settings))
    broker = Broker()
    again = run(settings, T0 + timedelta(minutes=1), broker)  # the next tick hands them out
    assert (again.created, again.enqueued) == (0, due)
    assert len(set(broker.ids)) == due


@ON_POSTGRES
def test_the_due_batch_is_planned_for_its_values_however_often_it_runs(settings):
    many_due(settings, 200, T0)
    with get_engine(settings.database_url).connect() as connection:
        # PostgreSQL picks a cached generic plan on its own when its estimates
        # favour one (they did right after an import, with no deliveries yet);
        # here it is told to, so the test does not hang on the statistics.
        connection.execute(text("SET plan_cache_mode = force_generic_plan"))
        connection.commit()
        session = Session(connection)
        for _ in range(10):  # psycopg prepares a statement on the server after five runs
            assert len(_due_batch(session, T0, 20, (0, 2))) == 20
            session.commit()

        plans = connection.execute(
            text(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%FROM enrollments%FOR UPDATE SKIP LOCKED%'"
            )
        ).one()
        assert plans == (0, 5)  # prepared, yet never run from a generic plan
        assert connection.execute(text("SHOW jit")).scalar() == "off"
        connection.execute(text("RESET plan_cache_mode"))
        connection.commit()


def _due_batch_plan(settings: Settings) -> str:
    """The plan of a claim loop's due batch, planned as in the claim's own transaction."""
    statement, constants = for_psycopg(_DUE[True])
    values = {"now": T0, "limit": SCAN_BATCH, "share": 0, "shares": CLAIM_LOOPS}
    with get_engine(settings.database_url).connect() as connection:
        connection.exec_driver_sql(_CLAIM_PLANNING)
        rows = connection.exec_driver_sql("EXPLAIN " + statement, {**constants, **values})
        plan = "\n".join(row[0] for row in rows)
        connection.rollback()
    return plan


def _analyze(settings: Settings) -> None:
    engine = get_engine(settings.database_url).execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:  # VACUUM runs outside a transaction
        connection.execute(text("VACUUM ANALYZE enrollments"))
        connection.execute(text("VACUUM ANALYZE deliveries"))


@ON_POSTGRES
def test_the_due_batch_walks_its_index_whatever_the_statistics_say(settings):
    """Each due batch reads due enrollments in index order up to its limit, and checks
    each one's own deliveries, so a tick costs what is due. Planned otherwise, a tick of
    100,000 due among 1,000,000 took 39 s rather than 3."""
    many_due(settings, 100_000, T0)
    with session_scope(settings.database_url) as session:
        # One in ten due, spread through the table; the rest over the coming week.
        session.execute(
            text(
                "UPDATE enrollments SET next_due_at = CASE WHEN id % 10 = 0 "
                "THEN CAST(:now AS timestamptz) - (id % 60) * interval '1 second' "
                "ELSE CAST(:now AS timestamptz) + interval '1 hour' + id * interval '1 second' END"
            ),
            {"now": T0},
        )
    _analyze(settings)
    # PostgreSQL cannot tell how many rows a claim loop's share keeps (it guesses one in
    # 200), so it expects fewer than the limit: left to choose, it reads every due row
    # and sorts them, in every batch.
    plan = _due_batch_plan(settings)
    assert "Index Scan using ix_enrollments_status_next_due_at" in plan, plan
    assert "Sort" not in plan, plan

    # The statistics say there are no deliveries, then a big tick queues mail for
    # everyone: a check that also used the status index read every unsent delivery for
    # each due row (0.7 s a batch late in a tick of 100,000).
    with session_scope(settings.database_url) as session:
        session.execute(
            text(
                "INSERT INTO deliveries (subscriber_id, enrollment_id, sequence, step, status, "
                "message_id, attempts, not_before, created_at) "
                "SELECT subscriber_id, id, sequence, 'welcome', 'queued', 'w' || id || '@x', "
                "0, :now, :now FROM enrollments"
            ),
            {"now": T0},
        )
    plan = _due_batch_plan(settings)
    assert "Index Scan using ix_enrollments_status_next_due_at" in plan, plan
    assert "ix_deliveries_status_not_before" not in plan, plan
    assert "deliveries_enrollment_id_step_key" in plan, plan


@ON_POSTGRES
def test_the_history_gives_send_times_in_utc_whatever_the_servers_time_zone(settings):
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    run(settings, T0, Broker())
    sent_at = datetime(2026, 3, 7, 15, 0, tzinfo=UTC)  # the day before New York's clocks change
    worker_sends(settings, sent_at, subscriber_id)
    enrollment_id = enrollment_of(settings, subscriber_id).id
    with get_engine(settings.database_url).connect() as connection:
        connection.execute(text("SET TIME ZONE 'America/New_York'"))
        history = _history(Session(connection), [enrollment_id])[enrollment_id]
        connection.execute(text("RESET TIME ZONE"))
        connection.commit()
    assert history.steps == ["welcome"]
    assert history.last_sent == sent_at
    # In UTC, so that adding the minimum gap across the change adds real hours.
    assert history.last_sent.utcoffset() == timedelta(0)


@BOTH_DATABASES
def test_a_naive_now_is_refused_before_anything_is_claimed(settings):
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    with session_scope(settings.database_url) as session, pytest.raises(ValueError, match="naive"):
        _due_batch(session, T0.replace(tzinfo=None) + timedelta(days=1), 10)
    with session_scope(settings.database_url) as session:  # the same moment, in UTC
        assert [due.subscriber_id for due in _due_batch(session, T0 + timedelta(days=1), 10)] == [
            subscriber_id
        ]


@ON_POSTGRES
def test_the_due_batch_gives_times_in_utc_whatever_the_servers_time_zone(settings):
    """A step's day is added to the start: in UTC that is whole days, across a clock change."""
    subscriber_id = enroll(settings, "ann@example.com", now=T0)
    with session_scope(settings.database_url) as session:
        session.execute(text("SET TIME ZONE 'America/New_York'"))
        (due,) = _due_batch(session, T0 + timedelta(days=1), 10)
        session.execute(text("RESET TIME ZONE"))
    assert due.subscriber_id == subscriber_id
    assert due.started_at == T0 and due.started_at.utcoffset() == timedelta(0)
    assert due.next_due_at.utcoffset() == timedelta(0)
