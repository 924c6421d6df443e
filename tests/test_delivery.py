"""Sending deliveries to a real SMTP server (aiosmtpd), and what each outcome leaves behind.

Deliveries are made the way the service makes them: a signup writes the
confirmation, the due-scan writes course steps and hands their ids to a
publish function, and `send_batch` sends those ids. The sender's clock is
passed in, so retries and backoff need no sleeping.
"""

from __future__ import annotations

import dataclasses
import html as htmllib
import re
import shutil
import socket
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime

import psycopg
import pytest
from conftest import BOTH_DATABASES, drop_every_connection, free_port, let_connections_in
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError

from nurture import tokens
from nurture.config import Settings
from nurture.db import session_scope
from nurture.delivery import (
    _CLAIM,
    _RECIPIENT,
    Claimed,
    _Recipient,
    _SentMarks,
    claim_many,
    send_batch,
)
from nurture.mailer import (
    OutgoingEmail,
    PermanentFailure,
    ServerUnreachable,
    SessionRefused,
    SMTPConnection,
    SMTPSettings,
    SMTPURLError,
    TemporaryFailure,
    build_message,
    parse_smtp_url,
)
from nurture.models import (
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Event,
    Subscriber,
    SubscriberStatus,
)
from nurture.render import RenderedEmail
from nurture.scheduler import dispatch, release_expired_leases
from nurture.sequences import first_steps, load_sequences
from nurture.subscribers import SignupRequest, confirm, signup, unsubscribe

SEQUENCE = "product-vs-project"
T0 = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)


class Broker:
    def __init__(self):
        self.ids: list[int] = []

    def __call__(self, ids: list[int]) -> None:
        self.ids.extend(ids)


def sequences(settings: Settings):
    return load_sequences(settings.templates_path)


def sign_up(settings: Settings, email: str, *, now: datetime, first_name: str = "Alex") -> int:
    """A double opt-in signup; the id of the confirmation delivery it writes."""
    request = SignupRequest(
        email=email, first_name=first_name, timezone="UTC", sequence=SEQUENCE, source="form"
    )
    with session_scope(settings.database_url) as session:
        confirmation_id = signup(
            session, settings, request, first_steps=first_steps(sequences(settings)), now=now
        )
    assert confirmation_id is not None
    return confirmation_id


def subscriber_id_of(settings: Settings, email: str) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Subscriber.id).where(Subscriber.email == email))


def enroll(settings: Settings, email: str, *, now: datetime = T0) -> int:
    """Sign up and confirm (the confirmation is taken as delivered); the subscriber id."""
    confirmation_id = sign_up(settings, email, now=now)
    subscriber_id = subscriber_id_of(settings, email)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == confirmation_id)
            .values(status=DeliveryStatus.SENT, sent_at=now)
        )
        steps = first_steps(sequences(settings))
        assert confirm(session, subscriber_id, now=now, first_steps=steps) is not None
    return subscriber_id


def hand_out(settings: Settings, now: datetime) -> list[int]:
    """One due-scan at `now`; the delivery ids it gave the broker."""
    broker = Broker()
    with session_scope(settings.database_url) as session:
        dispatch(session, settings, sequences(settings), now=now, publish=broker)
    return broker.ids


def send(settings: Settings, ids: list[int], now: datetime):
    with session_scope(settings.database_url) as session:
        return send_batch(session, settings, sequences(settings), ids, clock=lambda: now)


def delivery(settings: Settings, delivery_id: int) -> Delivery:
    with session_scope(settings.database_url) as session:
        return session.get(Delivery, delivery_id)


def enrollment_of(settings: Settings, subscriber_id: int) -> Enrollment:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Enrollment).where(Enrollment.subscriber_id == subscriber_id))


def course_deliveries(settings: Settings) -> list[Delivery]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(Delivery).where(Delivery.enrollment_id.is_not(None)).order_by(Delivery.id)
            )
        )


def subscriber(settings: Settings, subscriber_id: int) -> Subscriber:
    with session_scope(settings.database_url) as session:
        return session.get(Subscriber, subscriber_id)


@BOTH_DATABASES
def test_the_claim_reads_each_recipient_and_gives_times_in_utc(settings):
    """What the batch is composed from comes with its claim, whatever the server's zone."""
    ann, bea = enroll(settings, "ann@example.com"), enroll(settings, "bea@example.com")
    with session_scope(settings.database_url) as session:
        session.execute(update(Subscriber).where(Subscriber.id == bea).values(first_name="Béa"))
    ids = hand_out(settings, T0)
    now = T0 + timedelta(minutes=1)
    with session_scope(settings.database_url) as session:
        postgresql = session.get_bind().dialect.name == "postgresql"
        if postgresql:
            session.execute(text("SET TIME ZONE 'America/New_York'"))
        claimed = claim_many(session, ids, now, timedelta(minutes=10))
        if postgresql:
            session.execute(text("RESET TIME ZONE"))
    assert sorted((c.subscriber_id, c.email, c.first_name) for c in claimed) == [
        (ann, "ann@example.com", "Alex"),
        (bea, "bea@example.com", "Béa"),
    ]
    for c in claimed:
        assert c.lease_until == now + timedelta(minutes=10)
        assert c.lease_until.utcoffset() == c.created_at.utcoffset() == timedelta(0)


def test_the_rows_read_as_driver_sql_have_the_fields_their_tuples_name():
    """Rows made by position (`Claimed`, `_Recipient`) name what their statements read."""
    for statement in _CLAIM.values():
        assert tuple(c.name for c in statement._returning) == Claimed._fields
    assert tuple(c.name for c in _RECIPIENT.selected_columns) == _Recipient._fields


# --- What a sent email looks like --------------------------------------------------


@BOTH_DATABASES
def test_a_course_email_carries_every_header(settings, smtp):
    subscriber_id = enroll(settings, "ann@example.com")
    [delivery_id] = hand_out(settings, T0)

    result = send(settings, [delivery_id], T0)
    assert result.sent == 1

    [message] = smtp.messages
    row = delivery(settings, delivery_id)
    assert row.status == DeliveryStatus.SENT
    assert row.sent_at == T0
    assert row.attempts == 1
    assert row.lease_until is None
    assert row.last_error is None

    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert message["From"] == "Course Team <course@nurture.test>"
    assert message["To"] == "Alex <ann@example.com>"
    assert message["Subject"] == "Welcome: product manager or project manager?"
    assert parsedate_to_datetime(message["Date"]) == T0
    assert message["Message-ID"] == row.message_id
    assert message["X-Nurture-Step"] == f"{SEQUENCE}/welcome"

    unsubscribe = re.fullmatch(
        r"<http://nurture\.test/unsubscribe/([^>]+)>", message["List-Unsubscribe"]
    )
    assert unsubscribe, message["List-Unsubscribe"]
    assert tokens.read_unsubscribe_token(settings.secret_key, unsubscribe.group(1)) == subscriber_id
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "<product-vs-project.nurture.test>" in message["List-Id"]

    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    url = message["List-Unsubscribe"][1:-1]
    assert url in text and url in html
    assert settings.postal_address in text and settings.postal_address in html
    assert "Hi Alex," in text


@BOTH_DATABASES
def test_the_confirmation_email(settings, smtp):
    confirmation_id = sign_up(settings, "ann@example.com", now=T0)
    assert hand_out(settings, T0) == [confirmation_id]

    assert send(settings, [confirmation_id], T0).sent == 1

    [message] = smtp.messages
    assert message["X-Nurture-Step"] == "confirmation"
    assert message["Message-ID"] == delivery(settings, confirmation_id).message_id
    assert message["To"] == "ann@example.com"  # the name waits for the address to say yes
    assert message["List-Unsubscribe"] is None
    assert message["List-Unsubscribe-Post"] is None
    assert message["List-Id"] is None
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(preferencelist=("plain",)).get_content()
    link = re.search(r"http://nurture\.test/confirm/(\S+)", text)
    assert link
    subscriber_id = subscriber_id_of(settings, "ann@example.com")
    assert tokens.read_confirm_token(settings.secret_key, link.group(1), max_age=3600)[0] == (
        subscriber_id
    )
    assert delivery(settings, confirmation_id).status == DeliveryStatus.SENT


@BOTH_DATABASES
def test_a_duplicate_broker_message_sends_once(settings, smtp):
    enroll(settings, "ann@example.com")
    ids = hand_out(settings, T0)
    assert len(ids) == 1

    first = send(settings, ids + ids, T0)
    second = send(settings, ids, T0 + timedelta(seconds=5))

    assert (first.sent, first.skipped) == (1, 1)
    assert (second.sent, second.skipped) == (0, 1)
    assert len(smtp.messages) == 1
    assert delivery(settings, ids[0]).attempts == 1


@BOTH_DATABASES
def test_a_slow_batch_renews_its_claim_and_sends_everything_once(settings, smtp):
    # Each send takes most of a lease on this clock: without renewing, the later
    # emails of the batch would be past their lease, free for the sweep to hand
    # to another worker while this one still sends them.
    for n in range(4):
        enroll(settings, f"reader{n}@example.com")
    ids = hand_out(settings, T0)
    assert len(ids) == 4
    lease = timedelta(seconds=settings.lease_seconds)
    ticks = iter(T0 + i * lease * 0.4 for i in range(100))
    released = []

    def clock():
        """Time moves on, and the dispatcher's sweep runs at every step of it."""
        now = next(ticks)
        with session_scope(settings.database_url) as dispatcher:
            released.append(release_expired_leases(dispatcher, now))
        return now

    with session_scope(settings.database_url) as session:
        result = send_batch(session, settings, sequences(settings), ids, clock=clock)

    assert sum(released) == 0, "no claim ran out while its email was still to send"
    assert (result.sent, result.skipped) == (4, 0)
    assert len(smtp.messages) == 4
    assert {delivery(settings, i).status for i in ids} == {DeliveryStatus.SENT}


@BOTH_DATABASES
def test_a_batch_leaves_alone_what_another_worker_took_over(settings, smtp):
    for n in range(2):
        enroll(settings, f"reader{n}@example.com")
    first, second = hand_out(settings, T0)
    lease = timedelta(seconds=settings.lease_seconds)
    ticks = iter([T0, T0 + lease * 0.6, T0 + lease * 0.7])

    def clock():
        now = next(ticks)
        if now == T0 + lease * 0.6:  # meanwhile the sweep gave the second to someone else
            with session_scope(settings.database_url) as other:
                other.execute(
                    update(Delivery).where(Delivery.id == second).values(lease_until=T0 + lease * 9)
                )
        return now

    with session_scope(settings.database_url) as session:
        result = send_batch(session, settings, sequences(settings), [first, second], clock=clock)

    assert (result.sent, result.skipped) == (1, 1)
    assert len(smtp.messages) == 1
    assert delivery(settings, first).status == DeliveryStatus.SENT
    assert delivery(settings, second).status == DeliveryStatus.SENDING
    assert delivery(settings, second).lease_until == T0 + lease * 9, "the other worker's claim"


# --- Failures ----------------------------------------------------------------------


@BOTH_DATABASES
def test_a_temporary_refusal_is_retried_with_the_same_message_id(settings, smtp):
    enroll(settings, "ann@example.com")
    [delivery_id] = hand_out(settings, T0)

    smtp.handler.refuse_with = "451 4.3.0 Try again later"
    result = send(settings, [delivery_id], T0)
    assert result.retry == 1
    assert smtp.messages == []
    row = delivery(settings, delivery_id)
    assert row.status == DeliveryStatus.QUEUED
    assert row.not_before > T0
    assert row.enqueued_at is None
    assert row.lease_until is None
    assert "451" in row.last_error
    assert row.attempts == 1
    message_id = row.message_id

    # A stray copy of the old broker message does not jump the backoff.
    smtp.handler.refuse_with = None
    assert send(settings, [delivery_id], T0 + timedelta(seconds=1)).skipped == 1
    assert smtp.messages == []

    # Not handed out again before its backoff is over ...
    assert hand_out(settings, row.not_before - timedelta(seconds=1)) == []
    # ... and handed out once it is.
    later = T0 + timedelta(minutes=5)
    assert hand_out(settings, later) == [delivery_id]
    assert send(settings, [delivery_id], later).sent == 1

    [message] = smtp.messages
    assert message["Message-ID"] == message_id
    row = delivery(settings, delivery_id)
    assert row.status == DeliveryStatus.SENT
    assert row.sent_at == later
    assert row.attempts == 2
    assert row.last_error is None


@BOTH_DATABASES
def test_a_permanent_refusal_bounces_the_subscriber(settings, smtp):
    subscriber_id = enroll(settings, "ann@example.com")
    [delivery_id] = hand_out(settings, T0)

    smtp.handler.refuse_with = "550 5.1.1 No such user"
    result = send(settings, [delivery_id], T0)
    assert result.failed == 1
    assert smtp.messages == []

    row = delivery(settings, delivery_id)
    assert row.status == DeliveryStatus.FAILED
    assert "550" in row.last_error
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.BOUNCED
    enrollment = enrollment_of(settings, subscriber_id)
    assert enrollment.status == EnrollmentStatus.STOPPED
    assert enrollment.next_due_at is None
    with session_scope(settings.database_url) as session:
        events = list(
            session.scalars(
                select(Event).where(Event.subscriber_id == subscriber_id, Event.kind == "bounce")
            )
        )
    assert len(events) == 1
    assert events[0].delivery_id == delivery_id
    assert "550" in events[0].detail

    # Nothing more is ever written for a bounced address.
    smtp.handler.refuse_with = None
    assert hand_out(settings, T0 + timedelta(days=3)) == []


@BOTH_DATABASES
def test_an_unreachable_server_loses_nothing(stack, settings, smtp):
    for name in ("ann", "bob", "cy"):
        enroll(settings, f"{name}@example.com")
    ids = hand_out(settings, T0)
    assert len(ids) == 3

    dead = stack.with_env(SMTP_URL=f"smtp://127.0.0.1:{free_port()}?timeout=2").settings
    result = send(dead, ids, T0)
    assert result.sent == 0
    assert result.failed == 0
    assert result.retry == 3
    for delivery_id in ids:
        row = delivery(settings, delivery_id)
        assert row.status == DeliveryStatus.QUEUED
        assert row.enqueued_at is None
        assert row.lease_until is None
        assert row.not_before > T0
        assert row.last_error

    # When the server is back, the next due-scan hands all of them out again.
    later = T0 + timedelta(minutes=5)
    assert sorted(hand_out(settings, later)) == sorted(ids)
    assert send(settings, ids, later).sent == 3
    assert len(smtp.messages) == 3
    assert {m["Message-ID"] for m in smtp.messages} == {
        delivery(settings, i).message_id for i in ids
    }


# --- The database going away mid-batch ---------------------------------------------

ON_POSTGRESQL = pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)


def restart_database_during(
    smtp, settings: Settings, nth: int, *, before=None, keep_out: bool = False
) -> list[int]:
    """While the SMTP server takes the `nth` email (before its 250), end every database
    connection of ours, as a restart or failover does; the list gets how many it ended.

    `before` runs first; with `keep_out` the database then refuses new connections.
    """
    taken, ended = [], []

    def on_message(message) -> None:
        taken.append(message)
        if len(taken) == nth:
            if before is not None:
                before()
            ended.append(drop_every_connection(settings.database_url, keep_out=keep_out))

    smtp.handler.on_message = on_message
    return ended


def received_by(smtp) -> Counter:
    """How many emails each address got, as the SMTP server saw them."""
    return Counter(message["To"].addresses[0].addr_spec for message in smtp.messages)


@ON_POSTGRESQL
def test_a_batch_the_database_cut_short_gives_back_what_it_did_not_send(settings, smtp):
    readers = [f"reader{n}@example.com" for n in range(5)]
    for email in readers:
        enroll(settings, email)
    ids = hand_out(settings, T0)
    ended = restart_database_during(smtp, settings, 2)

    with pytest.raises(psycopg.OperationalError):
        send(settings, ids, T0)

    assert ended[0] >= 1
    first, second, *rest = (delivery(settings, i) for i in ids)
    # The second's mark rode with the third's check and went with the connection; it
    # is committed afterwards, for given back the second would go out twice.
    for row in (first, second):
        assert (row.status, row.sent_at, row.lease_until) == (DeliveryStatus.SENT, T0, None)
    # The rest are queued again at once, as if never handed out, no attempt counted.
    for row in rest:
        assert row.status == DeliveryStatus.QUEUED
        assert (row.lease_until, row.enqueued_at, row.attempts) == (None, None, 0)

    # The next due-scan hands out just those, and every reader gets one email.
    smtp.handler.on_message = None
    later = T0 + timedelta(minutes=1)
    assert sorted(hand_out(settings, later)) == sorted(row.id for row in rest)
    assert send(settings, [row.id for row in rest], later).sent == len(rest)
    assert received_by(smtp) == Counter(readers)
    assert {delivery(settings, i).status for i in ids} == {DeliveryStatus.SENT}


@ON_POSTGRESQL
def test_a_batch_the_database_cut_short_leaves_alone_what_another_worker_took_over(settings, smtp):
    for n in range(3):
        enroll(settings, f"reader{n}@example.com")
    first, second, third = hand_out(settings, T0)
    lease = timedelta(seconds=settings.lease_seconds)

    def taken_over() -> None:
        """Meanwhile the sweep gave the third to another worker, whose claim it now is."""
        with session_scope(settings.database_url) as other:
            other.execute(
                update(Delivery).where(Delivery.id == third).values(lease_until=T0 + lease * 9)
            )

    restart_database_during(smtp, settings, 1, before=taken_over)
    with pytest.raises(psycopg.OperationalError):
        send(settings, [first, second, third], T0)

    assert delivery(settings, first).status == DeliveryStatus.SENT
    assert delivery(settings, second).status == DeliveryStatus.QUEUED
    row = delivery(settings, third)
    assert (row.status, row.lease_until, row.attempts) == (
        DeliveryStatus.SENDING,
        T0 + lease * 9,
        1,
    ), "the other worker's claim, untouched"


@ON_POSTGRESQL
def test_a_batch_the_database_cut_short_after_renewing_its_claim_gives_back_the_rest(
    settings, smtp
):
    for n in range(4):
        enroll(settings, f"reader{n}@example.com")
    ids = hand_out(settings, T0)
    lease = timedelta(seconds=settings.lease_seconds)
    ticks = iter(T0 + i * lease * 0.4 for i in range(100))  # renewed before the third
    restart_database_during(smtp, settings, 3)

    with (
        pytest.raises(psycopg.OperationalError),
        session_scope(settings.database_url) as session,
    ):
        send_batch(session, settings, sequences(settings), ids, clock=lambda: next(ticks))

    *sent, last = (delivery(settings, i) for i in ids)
    assert [row.status for row in sent] == [DeliveryStatus.SENT] * 3
    assert (last.status, last.lease_until, last.attempts) == (DeliveryStatus.QUEUED, None, 0)


@ON_POSTGRESQL
def test_a_batch_whose_database_stays_down_leaves_its_claims_to_their_lease(settings, smtp, caplog):
    readers = [f"reader{n}@example.com" for n in range(3)]
    for email in readers:
        enroll(settings, email)
    ids = hand_out(settings, T0)
    restart_database_during(smtp, settings, 1, keep_out=True)
    try:
        with pytest.raises(psycopg.OperationalError):
            send(settings, ids, T0)
    finally:
        let_connections_in(settings.database_url)

    assert "could not give back" in caplog.text
    lease = timedelta(seconds=settings.lease_seconds)
    for delivery_id in ids:
        row = delivery(settings, delivery_id)
        assert (row.status, row.lease_until) == (DeliveryStatus.SENDING, T0 + lease)

    # As for a worker that died: when the lease runs out they go out, nothing lost; the
    # first, whose mark went with the connection, twice (the at-least-once window).
    first = received_by(smtp)
    assert first.total() == 1
    smtp.handler.on_message = None
    later = T0 + lease + timedelta(seconds=1)
    assert sorted(hand_out(settings, later)) == sorted(ids)
    assert send(settings, ids, later).sent == len(ids)
    assert received_by(smtp) == Counter(readers) + first


@BOTH_DATABASES
def test_any_database_error_mid_batch_gives_back_what_was_not_sent(settings, smtp, monkeypatch):
    """An error of the database's other than a lost connection (SQLite's "database is
    locked" past its busy timeout, say) settles the batch the same way."""
    for n in range(3):
        enroll(settings, f"reader{n}@example.com")
    ids = hand_out(settings, T0)
    check = _SentMarks.recipient
    checks = []

    def failing_second(marks, delivery):
        checks.append(delivery.id)
        if len(checks) == 2:
            raise OperationalError("the check", {}, Exception("database is locked"))
        return check(marks, delivery)

    monkeypatch.setattr(_SentMarks, "recipient", failing_second)
    with pytest.raises(OperationalError):
        send(settings, ids, T0)

    assert [delivery(settings, i).status for i in ids] == [
        DeliveryStatus.SENT,
        DeliveryStatus.QUEUED,
        DeliveryStatus.QUEUED,
    ]
    monkeypatch.undo()
    later = T0 + timedelta(minutes=1)
    assert sorted(hand_out(settings, later)) == sorted(ids[1:])
    assert send(settings, ids[1:], later).sent == 2
    assert len(smtp.messages) == 3


@BOTH_DATABASES
def test_no_mail_after_unsubscribing(settings, smtp):
    subscriber_id = enroll(settings, "ann@example.com")
    [delivery_id] = hand_out(settings, T0)
    with session_scope(settings.database_url) as session:
        assert unsubscribe(session, subscriber_id, now=T0, how="one-click")

    send(settings, [delivery_id], T0 + timedelta(seconds=1))
    assert smtp.messages == []
    assert delivery(settings, delivery_id).status == DeliveryStatus.CANCELLED
    assert hand_out(settings, T0 + timedelta(days=3)) == []


@BOTH_DATABASES
def test_the_sender_checks_the_subscriber_just_before_sending(settings, smtp):
    """An unsubscribe that lands while the delivery is already on its way to a worker."""
    subscriber_id = enroll(settings, "ann@example.com")
    [delivery_id] = hand_out(settings, T0)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Subscriber)
            .where(Subscriber.id == subscriber_id)
            .values(status=SubscriberStatus.UNSUBSCRIBED)
        )

    result = send(settings, [delivery_id], T0)
    assert result.sent == 0
    assert smtp.messages == []
    row = delivery(settings, delivery_id)
    assert row.status == DeliveryStatus.CANCELLED
    assert row.last_error


@BOTH_DATABASES
def test_each_email_is_marked_sent_before_the_next_one_goes_out(settings, smtp):
    for name in ("ann", "bob", "cy"):
        enroll(settings, f"{name}@example.com")
    ids = hand_out(settings, T0)
    marked_when_received = []
    smtp.handler.on_message = lambda message: marked_when_received.append(
        sum(delivery(settings, i).status == DeliveryStatus.SENT for i in ids)
    )

    assert send(settings, ids, T0).sent == 3
    # What the server had already taken is committed as sent by the time the next
    # email arrives: a crash can only ever resend the one email in flight.
    assert marked_when_received == [0, 1, 2]
    assert all(delivery(settings, i).status == DeliveryStatus.SENT for i in ids)


@BOTH_DATABASES
def test_a_change_after_the_batch_was_composed_still_counts(settings, smtp):
    """A batch's emails are composed before the first goes out; what changes meanwhile wins."""
    ann, bob, cy, dee = (enroll(settings, f"{n}@example.com") for n in ("ann", "bob", "cy", "dee"))
    by_subscriber = {delivery(settings, i).subscriber_id: i for i in hand_out(settings, T0)}
    ids = [by_subscriber[subscriber_id] for subscriber_id in (ann, bob, cy, dee)]
    changed = []

    def meanwhile(message):
        if changed:
            return
        with session_scope(settings.database_url) as session:
            changes = {bob: {"first_name": "Robert"}, cy: {"email": "cy@new.example.com"}}
            for subscriber_id, values in changes.items():
                session.execute(
                    update(Subscriber).where(Subscriber.id == subscriber_id).values(**values)
                )
            assert unsubscribe(session, dee, now=T0, how="one-click")
        changed.append(message["To"])

    smtp.handler.on_message = meanwhile
    result = send(settings, ids, T0)

    assert (result.sent, result.skipped) == (3, 1)
    to = [message["To"] for message in smtp.messages]
    assert to == ["Alex <ann@example.com>", "Robert <bob@example.com>", "Alex <cy@new.example.com>"]
    assert smtp.messages[2].get_content_type() == "multipart/alternative"
    assert delivery(settings, ids[3]).status == DeliveryStatus.CANCELLED


@BOTH_DATABASES
def test_an_email_that_waited_long_for_its_turn_is_dated_when_it_goes(settings, smtp):
    for name in ("ann", "bob"):
        enroll(settings, f"{name}@example.com")
    ids = hand_out(settings, T0)
    # The claim (and the emails composed with it), then each email's turn: on a slow
    # server the second one's turn comes over a minute after the claim.
    ticks = iter([T0, T0 + timedelta(seconds=5), T0 + timedelta(seconds=90)])

    with session_scope(settings.database_url) as session:
        result = send_batch(session, settings, sequences(settings), ids, clock=lambda: next(ticks))

    assert result.sent == 2
    dates = [parsedate_to_datetime(message["Date"]) for message in smtp.messages]
    assert dates == [T0, T0 + timedelta(seconds=90)]


@BOTH_DATABASES
def test_an_email_that_cannot_be_composed_is_held_in_its_turn(settings, smtp, tmp_path):
    """A template that fails for one subscriber's values holds that email, with the
    template's file and line, and the others in the batch go."""
    templates = tmp_path / "emails"
    shutil.copytree(settings.templates_path, templates)
    welcome = templates / SEQUENCE / "01-welcome.md"
    broken_for_bob = "{{ 100 // (first_name|length - 3) }}"  # Bob: divided by zero
    welcome.write_text(welcome.read_text(encoding="utf-8") + broken_for_bob, encoding="utf-8")
    settings = dataclasses.replace(settings, templates_path=templates)
    people = [enroll(settings, f"{name}@example.com") for name in ("ann", "cy", "bob")]
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Subscriber).where(Subscriber.id == people[2]).values(first_name="Bob")
        )
    by_subscriber = {delivery(settings, i).subscriber_id: i for i in hand_out(settings, T0)}
    ids = [by_subscriber[subscriber_id] for subscriber_id in people]

    result = send(settings, ids, T0)

    assert (result.sent, result.retry) == (2, 1)
    assert [message["To"].addresses[0].username for message in smtp.messages] == ["ann", "cy"]
    statuses = [delivery(settings, i).status for i in ids]
    assert statuses == [DeliveryStatus.SENT, DeliveryStatus.SENT, DeliveryStatus.QUEUED]
    held = delivery(settings, ids[2]).last_error
    assert held.startswith(f"template error: {welcome}:"), held
    assert held.endswith("ZeroDivisionError: integer division or modulo by zero"), held


@BOTH_DATABASES
def test_a_non_ascii_name_goes_in_a_7bit_html_part_as_a_reference(settings, smtp):
    zoe = enroll(settings, "zoe@example.com")
    with session_scope(settings.database_url) as session:
        session.execute(update(Subscriber).where(Subscriber.id == zoe).values(first_name="Zoë"))

    assert send(settings, hand_out(settings, T0), T0).sent == 1
    [message] = smtp.messages
    part = message.get_body(("html",))
    assert part["Content-Transfer-Encoding"] == "7bit"
    content = part.get_content()
    assert "Hi Zo&#235;," in content and "/o/" in content  # filled in, open pixel added
    assert "Hi Zoë," in message.get_body(("plain",)).get_content()


@BOTH_DATABASES
def test_the_enrollment_completes_only_when_everything_is_sent(settings, smtp):
    subscriber_id = enroll(settings, "ann@example.com")
    keys = [step.key for step in sequences(settings)[SEQUENCE].steps]
    handed: dict[str, int] = {}
    now = T0
    while True:
        for delivery_id in hand_out(settings, now):
            handed[delivery(settings, delivery_id).step] = delivery_id
        if len(handed) == len(keys):
            break  # the last one stays unsent for now
        assert send(settings, list(handed.values())[-1:], now).sent == 1
        now = enrollment_of(settings, subscriber_id).next_due_at

    assert list(handed) == keys
    enrollment = enrollment_of(settings, subscriber_id)
    assert enrollment.next_step is None
    assert enrollment.status == EnrollmentStatus.ACTIVE, "not finished while one is unsent"
    assert enrollment.completed_at is None

    later = now + timedelta(minutes=1)
    assert send(settings, [handed[keys[-1]]], later).sent == 1
    enrollment = enrollment_of(settings, subscriber_id)
    assert enrollment.status == EnrollmentStatus.COMPLETED
    assert enrollment.completed_at == later
    assert [m["X-Nurture-Step"] for m in smtp.messages] == [f"{SEQUENCE}/{k}" for k in keys]


@BOTH_DATABASES
def test_the_next_step_waits_for_the_previous_email(settings, smtp):
    """A retried email keeps the course in order: the next step is not written meanwhile."""
    subscriber_id = enroll(settings, "ann@example.com")
    [welcome] = hand_out(settings, T0)
    smtp.handler.refuse_with = "451 4.3.0 Try again later"
    assert send(settings, [welcome], T0).retry == 1
    tomorrow = enrollment_of(settings, subscriber_id).next_due_at
    assert hand_out(settings, tomorrow + timedelta(hours=1)) == [welcome], "only the retry"
    assert [d.step for d in course_deliveries(settings)] == ["welcome"]
    smtp.handler.refuse_with = None
    sent_at = tomorrow + timedelta(hours=1)
    assert send(settings, [welcome], sent_at).sent == 1
    assert hand_out(settings, tomorrow + timedelta(hours=2)) == [], "a whole gap after the send"
    later = enrollment_of(settings, subscriber_id).next_due_at
    assert later >= sent_at + timedelta(hours=20)
    assert len(hand_out(settings, later)) == 1
    assert [d.step for d in course_deliveries(settings)] == ["welcome", "product-manager"]


# --- SMTP settings and message building --------------------------------------------


def test_parse_smtp_url_with_credentials_and_starttls():
    parsed = parse_smtp_url("smtp://u:p%40ss@host:2525?tls=starttls")
    assert parsed.host == "host"
    assert parsed.port == 2525
    assert parsed.username == "u"
    assert parsed.password == "p@ss"
    assert parsed.tls == "starttls"


def test_parse_smtps_url():
    parsed = parse_smtp_url("smtps://host")
    assert (parsed.host, parsed.port, parsed.tls) == ("host", 465, "ssl")
    assert parsed.username is None and parsed.password is None


def test_parse_plain_smtp_url():
    parsed = parse_smtp_url("smtp://127.0.0.1:1025")
    assert (parsed.host, parsed.port, parsed.tls) == ("127.0.0.1", 1025, None)


@pytest.mark.parametrize(
    "url", ["http://host:25", "smtp:///nohost", "host:25", "smtp://host?tls=maybe"]
)
def test_parse_smtp_url_refuses_bad_urls(url):
    with pytest.raises(SMTPURLError):
        parse_smtp_url(url)


def outgoing_email(subject="Hello", to_name="Ann", html="<p>Hi</p>", **overrides):
    values = dict(
        to_email="ann@example.com",
        to_name=to_name,
        mail_from="Course Team <course@nurture.test>",
        message_id="<abc@nurture.test>",
        step_label=f"{SEQUENCE}/welcome",
        date=T0,
    )
    values.update(overrides)
    return build_message(RenderedEmail(subject, "pre", html, "Hi\n"), **values)


def build(subject: str = "Hello", to_name: str = "Ann", html: str = "<p>Hi</p>", **overrides):
    """The message `build_message` makes, parsed back."""
    return outgoing_email(subject, to_name, html, **overrides).message()


def test_build_message_is_well_formed():
    message = build(list_id="Course <c.nurture.test>", unsubscribe_url="http://x/unsubscribe/t")
    assert message["To"] == "Ann <ann@example.com>"
    assert message["List-Unsubscribe"] == "<http://x/unsubscribe/t>"
    assert message.get_content_type() == "multipart/alternative"


@pytest.mark.parametrize(
    ("subject", "to_name"),
    [
        ("Hello", "Ann\r\nBcc: evil@example.com"),
        ("Hello", "Ann\nBcc: evil@example.com"),
        ("Hello\r\nBcc: evil@example.com", "Ann"),
        ("Hello\nBcc: evil@example.com", "Ann"),
    ],
)
def test_build_message_refuses_header_injection(subject, to_name):
    with pytest.raises(ValueError, match="(?i)CR|LF|linefeed|carriage"):
        build(subject=subject, to_name=to_name)


def test_a_long_non_ascii_subject_and_list_name_are_encoded_on_one_line():
    subject = "Leçon 3 — where the two roles meet, and where they part ways for good"
    title = "Produktmanager oder Projektmanager — der Kurs für Quereinsteiger"
    message = build(subject=subject, list_id=f"{title} <c.nurture.test>")

    assert message["Subject"] == subject
    assert message["List-Id"] == f"{title} <c.nurture.test>"
    raw = build_message(
        RenderedEmail(subject, "pre", "<p>Hi</p>", "Hi\n"),
        to_email="ann@example.com",
        to_name="Zoë",
        mail_from="Course Team <course@nurture.test>",
        message_id="<abc@nurture.test>",
        step_label=f"{SEQUENCE}/welcome",
        date=T0,
    ).data
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert any(line.startswith(b"Subject: =?utf-8?") for line in head)
    assert all(len(line) <= 998 and not line.startswith((b" ", b"\t")) for line in head)


def to_header(to_name: str) -> bytes:
    """The To line exactly as `build_message` writes it."""
    raw = outgoing_email(to_name=to_name).data
    [line] = [line for line in raw.split(b"\r\n") if line.startswith(b"To: ")]
    return line


@pytest.mark.parametrize(
    "name",
    [
        "=?utf-8?b?SGk=?=",
        "=?utf-8?q?Bob=0D=0ABcc:_x@evil.com?=",
        "Ann =?iso-8859-1?q?=E9?= Lee",
        "Zo\u00eb =?utf-8?b?SGk=?=",
    ],
    ids=["b-word", "q-word-with-crlf", "word-inside", "non-ascii"],
)
def test_a_name_that_looks_like_an_encoded_word_shows_as_typed(name):
    line = to_header(name)

    assert line.startswith(b"To: =?utf-8?"), line
    assert name.encode() not in line
    assert build(to_name=name)["To"].addresses[0].display_name == name


def test_a_long_non_ascii_name_is_folded_into_short_encoded_words():
    name = " ".join(["\u03a9\u03bc\u03ad\u03b3\u03b1"] * 16)  # 95 characters of Greek

    line = to_header(name)

    phrase = line.removeprefix(b"To: ").rpartition(b" <")[0].decode("ascii")
    words = phrase.split(" ")
    assert len(words) > 1
    assert all(w.startswith("=?utf-8?") and len(w) <= 75 for w in words), words
    # The space between two encoded words is not part of the name (RFC 2047, 6.2).
    assert str(make_header(decode_header(phrase))) == name


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("Ann", b"To: Ann <ann@example.com>"),
        ("", b"To: ann@example.com"),
        ("O'Brien, Jr.", b'To: "O\'Brien, Jr." <ann@example.com>'),
        ("Zo\u00eb", b"To: =?utf-8?q?Zo=C3=AB?= <ann@example.com>"),
        ("\u5c71\u7530", b"To: =?utf-8?b?5bGx55Sw?= <ann@example.com>"),
        ("a = b ? c", b"To: a = b ? c <ann@example.com>"),
    ],
)
def test_ordinary_names_keep_their_bytes(name, line):
    assert to_header(name) == line


# --- The SMTP conversation ---------------------------------------------------------


def outgoing(recipient: str, text: str = "Hi\n") -> OutgoingEmail:
    return build_message(
        RenderedEmail("Hello", "pre", "<p>Hi</p>", text),
        to_email=recipient,
        to_name="Ann",
        mail_from="Course Team <course@nurture.test>",
        message_id=f"<{recipient}@nurture.test>",
        step_label=f"{SEQUENCE}/welcome",
        date=T0,
    )


def counting_writes(connection: SMTPConnection) -> list[bytes]:
    """What the client writes to the server, one entry per write (after the greeting)."""
    connection.send(outgoing("warm@example.com"))  # connects and says EHLO
    writes: list[bytes] = []
    smtp = connection._smtp
    original = smtp.send
    smtp.send = lambda data: (writes.append(data), original(data))[1]
    return writes


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
def test_emails_cross_one_connection_intact_with_or_without_pipelining(smtp, pipelining):
    smtp.handler.pipelining = pipelining
    text = ".a line that starts with a dot\n..and two\n.\nend\n"
    with SMTPConnection(parse_smtp_url(smtp.url)) as connection:
        writes = counting_writes(connection)
        for name in ("ann", "bob", "cy"):
            connection.send(outgoing(f"{name}@example.com", text))
        # MAIL, RCPT and DATA in one write and the body in another, or four writes.
        assert len(writes) == (2 if pipelining else 4) * 3
    messages = smtp.messages[1:]
    assert [m["To"].addresses[0].addr_spec for m in messages] == [
        "ann@example.com",
        "bob@example.com",
        "cy@example.com",
    ]
    plain = messages[0].get_body(("plain",)).get_content()
    assert plain.replace("\r\n", "\n") == text


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
@pytest.mark.parametrize(
    ("at", "reply", "failure"),
    [
        # Only a refusal of the address is a bounce.
        ("recipient", "550 5.1.1 No such user", PermanentFailure),
        ("recipient", "550 No such user here", PermanentFailure),
        ("recipient", "550 5.2.1 Mailbox disabled", PermanentFailure),
        ("data", "550 5.1.1 No such user", PermanentFailure),
        # A policy, the content or our account: tried again, the address kept.
        ("recipient", "550 5.7.1 Relaying denied", TemporaryFailure),
        ("recipient", "450 4.2.0 Mailbox busy", TemporaryFailure),
        ("data", "554 5.7.1 Message refused", TemporaryFailure),
        ("data", "554 Transaction failed", TemporaryFailure),
        ("data", "552 5.2.3 Message too big", TemporaryFailure),
        ("data", "451 4.3.0 Try again later", TemporaryFailure),
    ],
)
def test_a_refusal_is_sorted_and_the_connection_goes_on(smtp, pipelining, at, reply, failure):
    smtp.handler.pipelining = pipelining
    with SMTPConnection(parse_smtp_url(smtp.url)) as connection:
        connection.send(outgoing("ann@example.com"))
        if at == "recipient":
            smtp.handler.refuse_recipients_with = reply
        else:
            smtp.handler.refuse_with = reply
        with pytest.raises(failure, match=reply.split()[0]) as raised:
            connection.send(outgoing("bob@example.com"))
        assert type(raised.value) is failure
        smtp.handler.refuse_recipients_with = smtp.handler.refuse_with = None
        connection.send(outgoing("cy@example.com"))

    recipients = [m["To"].addresses[0].addr_spec for m in smtp.messages]
    assert recipients == ["ann@example.com", "cy@example.com"]


def test_non_ascii_html_goes_as_7bit_with_character_references():
    html = '<p title="Zoë">“Quoted” — café</p>'
    message = build(html=html)
    part = message.get_body(("html",))
    assert part["Content-Transfer-Encoding"] == "7bit"
    assert htmllib.unescape(part.get_content()).strip() == html
    # Inside a style element a reference would be shown as written: quoted-printable.
    styled = '<style>p::before { content: "—"; }</style><p>“Quoted”</p>'
    part = build(html=styled).get_body(("html",))
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content().strip() == styled
    # Likewise a style element without its end tag, and CDATA.
    for raw in ('<p>“Quoted”</p><style>p::before { content: "—"; }', "<svg><![CDATA[—]]></svg>“"):
        assert build(html=raw).get_body(("html",))["Content-Transfer-Encoding"] != "7bit"


class ScriptedServer:
    """An SMTP server on a socket whose conversation a subclass writes in `_talk`.

    It counts connections (`accepted`, numbering each) and the messages it took.
    """

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.delivered: list[int] = []  # the number of the connection of each message
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.listener:
            while True:
                try:
                    client, _ = self.listener.accept()
                except OSError:
                    return
                self.accepted += 1
                threading.Thread(
                    target=self._talk, args=(client, self.accepted), daemon=True
                ).start()

    #: `reply`'s answer for "say this, then close the connection".
    HANG_UP = object()

    def greeting(self, number: int) -> bytes:
        """The first line of connection `number`; anything but a 220 ends it."""
        return b"220 ready"

    def reply(self, command: str, number: int):
        """A scripted reply to `command` (bytes, or (bytes, HANG_UP)); None: the usual one."""
        return None

    def _talk(self, client: socket.socket, number: int) -> None:
        with client, client.makefile("rb") as lines:
            greeting = self.greeting(number)
            client.sendall(greeting + b"\r\n")
            if not greeting.startswith(b"220"):
                return
            for raw in lines:
                command = raw.decode().strip().upper()
                scripted = self.reply(command, number)
                if isinstance(scripted, tuple):
                    client.sendall(scripted[0] + b"\r\n")
                    return
                if scripted is not None:
                    client.sendall(scripted + b"\r\n")
                elif command.startswith("EHLO"):
                    client.sendall(b"250-hello\r\n250-AUTH PLAIN LOGIN\r\n250 PIPELINING\r\n")
                elif command == "DATA":
                    client.sendall(b"354 go on\r\n")
                    for line in lines:
                        if line == b".\r\n":
                            break
                    self.delivered.append(number)
                    client.sendall(b"250 queued\r\n")
                elif command == "QUIT":
                    client.sendall(b"221 bye\r\n")
                    return
                else:
                    client.sendall(b"250 ok\r\n")


class HangingUpServer(ScriptedServer):
    """A pipelining SMTP server that refuses `refuse_at` ("MAIL" or "RCPT") with `reply`
    and closes the connection at once, as RFC 5321 has a server do after a 421 (and many
    do after a 5xx); every later connection it serves normally."""

    def __init__(self, refuse_at: str, reply: str):
        self.refuse_at, self.reply_text = refuse_at, reply
        super().__init__()

    def reply(self, command: str, number: int):
        if number == 1 and command.startswith(self.refuse_at):
            return self.reply_text.encode(), self.HANG_UP
        return None


@pytest.mark.parametrize(
    ("refuse_at", "reply", "failure"),
    [
        ("MAIL", "550 5.7.1 Sender blocked", SessionRefused),
        ("MAIL", "421 4.7.0 Too many connections", TemporaryFailure),
        ("RCPT", "550 5.1.1 No such user", PermanentFailure),
        ("RCPT", "421 4.7.0 Try again later", TemporaryFailure),
    ],
)
def test_a_refusal_followed_by_a_hang_up_is_reported_as_the_refusal(refuse_at, reply, failure):
    server = HangingUpServer(refuse_at, reply)
    with SMTPConnection(SMTPSettings("127.0.0.1", server.port, timeout=5)) as connection:
        with pytest.raises(failure) as raised:
            connection.send(outgoing("bob@example.com"))
        assert type(raised.value) is failure
        assert reply.split()[0] in str(raised.value)
        assert server.accepted == 1, "not sent again on a new connection at once"
        connection.send(outgoing("cy@example.com"))  # the next one opens a new connection
    assert server.delivered == [2]


class RefusingServer(ScriptedServer):
    """An SMTP server that refuses the session, never a recipient.

    "greeting" answers the connection with 554 (a blocklisted sending IP), "auth"
    refuses the login with 535 (a rotated password), "mail" refuses our sender
    with 550 5.7.1, "busy" greets with 421. Once `fixed`, it takes every message.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.fixed = False
        self.sender_refused = False  # one connection at a time in these tests
        super().__init__()

    def _refuses(self, mode: str) -> bool:
        return self.mode == mode and not self.fixed

    def greeting(self, number: int) -> bytes:
        if self._refuses("greeting"):
            return b"554 5.7.1 Client host blocked"
        return b"421 busy" if self._refuses("busy") else b"220 ready"

    def reply(self, command: str, number: int):
        if command.startswith("AUTH"):
            return (
                b"535 5.7.8 Authentication credentials invalid"
                if self._refuses("auth")
                else b"235 ok"
            )
        if command.startswith("MAIL") and self._refuses("mail"):
            self.sender_refused = True
            return b"550 5.7.1 Sender address rejected: not owned by user"
        if command.startswith("MAIL"):
            self.sender_refused = False
        if command.startswith(("RCPT", "DATA")) and self.sender_refused:
            return b"503 5.5.1 Need MAIL first"
        return None


@pytest.mark.parametrize(
    ("mode", "failure"),
    [
        ("greeting", SessionRefused),
        ("auth", SessionRefused),
        ("mail", SessionRefused),
        ("busy", ServerUnreachable),
    ],
)
def test_a_refused_session_is_not_a_refused_recipient(mode, failure):
    server = RefusingServer(mode)
    settings = SMTPSettings("127.0.0.1", server.port, username="course", password="x", timeout=5)
    with SMTPConnection(settings) as connection:
        with pytest.raises(failure) as raised:
            connection.send(outgoing("bob@example.com"))
        assert type(raised.value) is failure
        server.fixed = True
        connection.send(outgoing("cy@example.com"))
    assert len(server.delivered) == 1


def test_starttls_asked_of_a_server_without_it_is_a_settings_mismatch(smtp):
    """`?tls=starttls` against a server that offers no STARTTLS is ours to fix, and
    the log must say so, not that the server cannot be reached."""
    settings = SMTPSettings("127.0.0.1", smtp.port, tls="starttls", timeout=5)
    with SMTPConnection(settings) as connection, pytest.raises(SessionRefused) as raised:
        connection.send(outgoing("bob@example.com"))
    assert type(raised.value) is SessionRefused
    assert "STARTTLS" in str(raised.value)
    assert smtp.messages == []


@pytest.mark.parametrize("mode", ["greeting", "auth", "mail"])
@BOTH_DATABASES
def test_a_refused_session_bounces_nobody_and_loses_nothing(stack, mode):
    """A blocklisted IP, a rotated password or a refused sender is ours to fix: every
    email of the batch waits for a later tick, and every address stays as it was."""
    server = RefusingServer(mode)
    settings = stack.with_env(
        SMTP_URL=f"smtp://course:rotated@127.0.0.1:{server.port}?timeout=5"
    ).settings
    people = [enroll(settings, f"reader{n}@example.com") for n in range(3)]
    ids = hand_out(settings, T0)

    result = send(settings, ids, T0)

    assert (result.sent, result.failed, result.retry) == (0, 0, 3)
    assert [subscriber(settings, p).status for p in people] == [SubscriberStatus.ACTIVE] * 3
    rows = [delivery(settings, i) for i in ids]
    assert {row.status for row in rows} == {DeliveryStatus.QUEUED}
    assert "session refused" in rows[0].last_error
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(Event).where(Event.kind == "bounce")).all() == []

    # Fixed: the next tick after the backoff sends all three, once each.
    server.fixed = True
    later = T0 + timedelta(hours=2)
    assert send(settings, hand_out(settings, later), later).sent == 3
    assert len(server.delivered) == 3


def welcomed_on_templates_copy(stack, tmp_path):
    """Ann, welcomed on a copy of the templates the test may edit; her first lesson's due time."""
    from test_engine import copy_templates

    templates = copy_templates(tmp_path)
    settings = stack.with_env(NURTURE_TEMPLATES=str(templates)).settings
    ann = enroll(settings, "ann@example.com")
    [welcome] = hand_out(settings, T0)
    assert send(settings, [welcome], T0).sent == 1
    due = enrollment_of(settings, ann).next_due_at
    return templates, settings, ann, due


@BOTH_DATABASES
def test_a_step_removed_while_its_email_is_queued_moves_the_reader_on(stack, smtp, tmp_path):
    templates, settings, ann, due = welcomed_on_templates_copy(stack, tmp_path)
    [queued] = hand_out(settings, due)
    assert delivery(settings, queued).step == "product-manager"

    # The marketer removes that step while its email waits in the queue.
    manifest = templates / SEQUENCE / "sequence.toml"
    blocks = manifest.read_text(encoding="utf-8").split("[[steps]]")
    kept = [block for block in blocks if 'key = "product-manager"' not in block]
    manifest.write_text("[[steps]]".join(kept), encoding="utf-8")

    assert send(settings, [queued], due).skipped == 1
    row = delivery(settings, queued)
    assert (row.status, row.last_error) == (
        DeliveryStatus.CANCELLED,
        "step removed from the sequence",
    )
    # The step after it goes out on its own day, as planned.
    next_due = enrollment_of(settings, ann).next_due_at
    assert next_due - due < timedelta(days=2)
    [following] = hand_out(settings, next_due)
    assert delivery(settings, following).step == "project-manager"
    assert send(settings, [following], next_due).sent == 1


@BOTH_DATABASES
def test_a_sequence_missing_for_a_while_resumes_when_it_is_back(stack, smtp, tmp_path, caplog):
    """A deploy that swaps the templates folder, or a folder renamed and put back."""
    from nurture import scheduler

    templates, settings, ann, due = welcomed_on_templates_copy(stack, tmp_path)

    folder = templates / SEQUENCE
    folder.rename(tmp_path / "away")
    scheduler._missing_reported.clear()  # said once an hour per process
    assert hand_out(settings, due) == []
    assert enrollment_of(settings, ann).next_due_at == due + timedelta(hours=1)
    assert hand_out(settings, due + timedelta(minutes=30)) == []  # not due yet
    assert f"sequence {SEQUENCE} no longer exists" in caplog.text
    (tmp_path / "away").rename(folder)

    [lesson] = hand_out(settings, due + timedelta(hours=1))
    assert delivery(settings, lesson).step == "product-manager"
    assert send(settings, [lesson], due + timedelta(hours=1)).sent == 1


def test_two_due_scans_at_once_on_sqlite_write_the_due_step_once(settings, smtp, monkeypatch):
    """A tick that outlasts DISPATCH_INTERVAL_SECONDS on `nurture dev`'s worker, or
    `nurture dispatch` beside beat: on SQLite the second due-scan waits for the first
    one's batch, rather than reading the same due enrollment and writing its next step
    at once."""
    from nurture import scheduler

    assert settings.database_url.startswith("sqlite")
    ann = enroll(settings, "ann@example.com")
    [welcome] = hand_out(settings, T0)
    assert send(settings, [welcome], T0).sent == 1
    due = enrollment_of(settings, ann).next_due_at

    b_has_read, a_runs = threading.Event(), threading.Event()
    real_history = scheduler._history

    def history(session, ids):  # B, right after its due batch was read
        if threading.current_thread().name == "dispatch-b" and ids:
            b_has_read.set()
            assert a_runs.wait(10)
            time.sleep(0.3)  # A's due-scan is under way: it must wait for this batch
        return real_history(session, ids)

    monkeypatch.setattr(scheduler, "_history", history)
    brokers = {"dispatch-a": Broker(), "dispatch-b": Broker()}
    errors = []

    def run():
        name = threading.current_thread().name
        if name == "dispatch-a":
            a_runs.set()
        try:
            with session_scope(settings.database_url) as session:
                dispatch(session, settings, sequences(settings), now=due, publish=brokers[name])
        except Exception as error:
            errors.append(error)

    b = threading.Thread(target=run, name="dispatch-b")
    b.start()
    assert b_has_read.wait(10)
    a = threading.Thread(target=run, name="dispatch-a")
    a.start()
    for thread in (a, b):
        thread.join(30)
    assert not errors

    handed = brokers["dispatch-a"].ids + brokers["dispatch-b"].ids
    assert len(handed) == 1
    unsent = [(d.step, d.status) for d in course_deliveries(settings) if d.sent_at is None]
    assert unsent == [("product-manager", DeliveryStatus.QUEUED)]
    assert enrollment_of(settings, ann).next_step == "project-manager"
