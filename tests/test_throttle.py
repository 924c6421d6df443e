"""Provider rate limits, shared by every worker through Redis."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime

import pytest
from conftest import BOTH_DATABASES, REDIS_URL, free_port, require
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy import select

from nurture.config import ConfigError, Settings, load_settings
from nurture.db import session_scope
from nurture.delivery import composer_for, send_batch
from nurture.models import Delivery, Subscriber, utcnow
from nurture.scheduler import dispatch
from nurture.sequences import first_steps, load_sequences
from nurture.subscribers import SignupRequest, confirm, signup, unsubscribe
from nurture.throttle import Throttle, parse_domain_rates


def redis_settings(tmp_path, **env):
    return load_settings(
        {
            "NURTURE_INSTANCE": str(tmp_path),
            "SECRET_KEY": "k",
            # A fresh key space per test: the limiter's counters live in this Redis.
            "BROKER_URL": require(REDIS_URL, "Redis"),
            "NURTURE_QUEUE": uuid.uuid4().hex,
            **env,
        }
    )


def test_parse_domain_rates():
    assert parse_domain_rates("gmail.com=20, Outlook.com=10") == {
        "gmail.com": 20,
        "outlook.com": 10,
    }
    for bad in ("gmail.com", "gmail.com=0", "=5", "gmail.com=fast"):
        with pytest.raises(ConfigError, match="SEND_RATE_PER_DOMAIN"):
            parse_domain_rates(bad)


def test_no_limit_takes_no_time(tmp_path):
    throttle = Throttle.from_settings(load_settings({"NURTURE_INSTANCE": str(tmp_path)}))
    started = time.monotonic()
    assert all(throttle.acquire(f"a{i}@example.com") for i in range(1000))
    assert time.monotonic() - started < 0.5


def test_two_workers_share_one_overall_limit(tmp_path):
    """Two throttles (two workers) on one Redis: 5 a second between them, not 10."""
    settings = redis_settings(tmp_path, SEND_RATE_PER_SECOND="5")
    workers = [Throttle.from_settings(settings), Throttle.from_settings(settings)]
    key = uuid.uuid4().hex  # keep this run's counters apart from any other
    for worker in workers:
        worker.overall, worker.per_domain = 5, {}
        worker.limiter.storage.key_prefix = key  # type: ignore[attr-defined]
    time.sleep(1 - time.time() % 1)  # start at the top of a second
    started = time.monotonic()
    for i in range(15):
        assert workers[i % 2].acquire(f"a{i}@example.com")
    elapsed = time.monotonic() - started
    assert 1.8 < elapsed < 4, f"15 sends at 5/s took {elapsed:.2f}s"


def test_a_busy_domain_waits_and_others_do_not(tmp_path):
    settings = redis_settings(tmp_path, SEND_RATE_PER_DOMAIN="gmail.com=2")
    throttle = Throttle.from_settings(settings)
    throttle.max_wait = 0.2
    time.sleep(1 - time.time() % 1)
    assert throttle.acquire("a@gmail.com") and throttle.acquire("b@GMAIL.com")
    started = time.monotonic()
    assert not throttle.acquire("c@gmail.com"), "a third in the same second is deferred"
    assert time.monotonic() - started >= 0.2
    assert all(throttle.acquire(f"x{i}@example.org") for i in range(50)), "others go on"


@dataclass
class BusyDomain:
    """Course emails due now for people at one domain that takes one email a second."""

    settings: Settings
    sequences: dict
    people: dict[str, int]  # address -> subscriber id
    ids: list[int]  # the due deliveries, handed out
    now: datetime


def due_at_a_busy_domain(tmp_path, smtp, database_url, names: tuple[str, ...]) -> BusyDomain:
    settings = redis_settings(
        tmp_path,
        DATABASE_URL=database_url,
        SMTP_URL=smtp.url,
        DOUBLE_OPT_IN="0",
        SEND_RATE_PER_DOMAIN=f"{uuid.uuid4().hex[:8]}.example=1",
    )
    domain = next(iter(settings.send_rate_per_domain))
    sequences = load_sequences(settings.templates_path)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        for name in names:
            request = SignupRequest(f"{name}@{domain}", "", "UTC", "product-vs-project", "api")
            signup(session, settings, request, first_steps=first_steps(sequences), now=now)
        session.commit()
        people = dict(session.execute(select(Subscriber.email, Subscriber.id)).all())
        for subscriber_id in people.values():
            confirm(session, subscriber_id, now=now, first_steps=first_steps(sequences))
        session.commit()
        ids: list[int] = []
        dispatch(session, settings, sequences, now=now, publish=ids.extend)
    assert len(ids) == len(names)
    return BusyDomain(settings, sequences, people, ids, now)


def test_a_delivery_over_the_limit_goes_back_to_the_queue(tmp_path, smtp, database_url):
    """Through send_batch: the first email to a busy domain goes, the rest wait for a tick."""
    busy = due_at_a_busy_domain(tmp_path, smtp, database_url, ("ann", "bob", "cy"))
    composer_for(busy.settings, busy.sequences).throttle.max_wait = 0.1
    time.sleep(1 - time.time() % 1)  # all three in one second
    with session_scope(busy.settings.database_url) as session:
        result = send_batch(session, busy.settings, busy.sequences, busy.ids)
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(busy.ids))).all()

    assert (result.sent, result.retry) == (1, 2)
    assert len(smtp.messages) == 1
    waiting = [row for row in rows if row.status == "queued"]
    assert len(waiting) == 2
    assert all(row.last_error == "rate limited" and row.attempts == 0 for row in waiting)
    assert all(row.enqueued_at is None and row.not_before > busy.now for row in waiting)


def test_a_send_rate_redis_that_is_down_defers_the_batch_and_says_so(
    tmp_path, smtp, database_url, caplog
):
    """The counters' Redis gone mid-run: the emails wait for a later tick as over the
    limit, rather than go out unchecked or stay stuck as "sending" until their
    lease runs out; the outage is logged once, not once per email."""
    busy = due_at_a_busy_domain(tmp_path, smtp, database_url, ("ann", "bob", "cy"))
    dead = storage_from_string(f"redis://127.0.0.1:{free_port()}?socket_connect_timeout=1")
    limiter = FixedWindowRateLimiter(dead)
    asked = []
    limiter.hit = lambda *args, hit=limiter.hit: asked.append(args) or hit(*args)
    composer_for(busy.settings, busy.sequences).throttle.limiter = limiter
    with session_scope(busy.settings.database_url) as session:
        result = send_batch(session, busy.settings, busy.sequences, busy.ids)
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(busy.ids))).all()

    assert (result.sent, result.retry) == (0, 3)
    assert smtp.messages == []
    assert {(row.status, row.last_error, row.attempts) for row in rows} == {
        ("queued", "rate limited", 0)
    }
    said = [r for r in caplog.records if "send rate cannot be counted" in r.getMessage()]
    assert len(said) == 1
    assert len(asked) == 1, "the others did not each wait on the Redis that just failed"


@BOTH_DATABASES
def test_an_unsubscribe_while_waiting_for_a_slot_stops_the_email(tmp_path, smtp, database_url):
    """The check before sending comes before the wait for a send-rate slot, which may last
    seconds: an unsubscribe in that time must still stop the email."""
    busy = due_at_a_busy_domain(tmp_path, smtp, database_url, ("ann", "bob"))
    throttle = composer_for(busy.settings, busy.sequences).throttle
    throttle.max_wait = 3.0
    waited, sleep = [], throttle.sleep

    def the_waiting_one_unsubscribes_meanwhile(seconds: float) -> None:
        if not waited:
            [first] = [message["To"] for message in smtp.messages]
            [second] = set(busy.people) - {first}
            waited.append(second)
            with session_scope(busy.settings.database_url) as other:
                assert unsubscribe(other, busy.people[second], now=utcnow(), how="link")
        sleep(seconds)

    throttle.sleep = the_waiting_one_unsubscribes_meanwhile
    time.sleep(1 - time.time() % 1)  # both in one second: the second waits for the next
    with session_scope(busy.settings.database_url) as session:
        result = send_batch(session, busy.settings, busy.sequences, busy.ids)
        rows = {row.subscriber_id: row for row in session.scalars(select(Delivery))}

    assert waited, "the second email waited for a slot"
    assert (result.sent, result.skipped) == (1, 1)
    assert len(smtp.messages) == 1
    stopped = rows[busy.people[waited[0]]]
    assert (stopped.status, stopped.last_error) == ("cancelled", "subscriber is unsubscribed")
