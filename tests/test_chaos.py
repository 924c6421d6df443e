"""Chaos: 1,000 due sends through real workers, beat, PostgreSQL, Redis and SMTP, while
things break. Nothing may be lost; duplicates only where the design allows them.

(a) kill -9 the worker mid-batch and start a new one: 0 lost, duplicates at most the
    deliveries that were in flight; (b) flush the broker's Redis database mid-run: 0 lost,
    0 duplicates; (c) the SMTP server answers 451 for a while: all delivered, 0 duplicates;
    (d) two beats and two workers (one prefork, one of four threads) for the whole run:
    0 duplicates; (e) every database connection ended mid-run, as a PostgreSQL restart or
    failover does, with the delivery lease at its ten minutes: 0 lost, 0 duplicates, and
    all sent within a minute (what the batches cut short held is given back at once).

Each scenario's counts are written to test-artifacts/chaos.json.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest
import redis
from conftest import (
    POSTGRES_URL,
    REDIS_URL,
    Process,
    Stack,
    _fresh_postgres,
    drop_every_connection,
    require,
)
from sqlalchemy import func, insert, select

from nurture import ROOT, migrate
from nurture.db import session_scope
from nurture.models import Delivery, DeliveryStatus, Enrollment, Subscriber, utcnow

N = 1000
RESULTS = ROOT / "test-artifacts" / "chaos.json"
WORKER = ("--pool", "prefork", "--concurrency", "2", "--without-gossip", "--without-mingle")
THREADED = ("--pool", "threads", "--concurrency", "4", "--without-gossip", "--without-mingle")


class Chaos:
    """One run: a seeded database, a broker, an SMTP server, and the processes."""

    def __init__(self, stack: Stack, smtp, tmp_path):
        self.stack = stack
        self.settings = stack.settings
        self.smtp = smtp
        self.tmp_path = tmp_path
        self.processes: list[Process] = []

    def seed(self) -> None:
        """N confirmed subscribers whose welcome email is due now."""
        now = utcnow()
        with session_scope(self.settings.database_url) as session:
            session.execute(
                insert(Subscriber),
                [
                    {
                        "id": i,
                        "email": f"reader{i}@example.com",
                        "first_name": f"Reader{i}",
                        "timezone": "UTC",
                        "status": "active",
                        "created_at": now,
                        "confirmed_at": now,
                    }
                    for i in range(1, N + 1)
                ],
            )
            session.execute(
                insert(Enrollment),
                [
                    {
                        "subscriber_id": i,
                        "sequence": "product-vs-project",
                        "timezone": "UTC",
                        "status": "active",
                        "next_step": "welcome",
                        "next_due_at": now - timedelta(minutes=1),
                        "started_at": now,
                        "created_at": now,
                    }
                    for i in range(1, N + 1)
                ],
            )

    def configure(self, **environ: str) -> None:
        """Change settings for the processes this run starts from now on."""
        self.stack = self.stack.with_env(**environ)
        self.settings = self.stack.settings

    def _start(self, name: str, *args: str) -> Process:
        command = [sys.executable, "-m", "celery", "-A", "worker", *args, "--loglevel", "INFO"]
        process = Process(command, self.stack.process_env(), self.tmp_path / f"{name}.log")
        self.processes.append(process)
        return process

    def worker(self, name: str = "worker", pool: tuple[str, ...] = WORKER) -> Process:
        process = self._start(name, "worker", "--hostname", f"{name}@%h", *pool)
        process.wait_for_output(r"ready\.", timeout=60)
        return process

    def beat(self, name: str = "beat") -> Process:
        return self._start(name, "beat", "--schedule", str(self.tmp_path / f"{name}-schedule"))

    def received(self) -> int:
        return len(self.smtp.messages)

    def wait_received(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.received() < count:
            assert time.monotonic() < deadline, f"only {self.received()} of {count} arrived"
            time.sleep(0.02)

    def in_flight(self) -> int:
        with session_scope(self.settings.database_url) as session:
            return session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.status == DeliveryStatus.SENDING)
            )

    def refused(self) -> int:
        with session_scope(self.settings.database_url) as session:
            return session.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.last_error.like("451%"))
            )

    def wait_all_sent(self, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with session_scope(self.settings.database_url) as session:
                sent = session.scalar(
                    select(func.count())
                    .select_from(Delivery)
                    .where(Delivery.status == DeliveryStatus.SENT)
                )
            if sent >= N:
                return
            assert time.monotonic() < deadline, f"only {sent} of {N} deliveries were sent"
            time.sleep(0.2)

    def outcome(self, scenario: str, **extra) -> dict:
        """Lost and duplicate counts, as the SMTP server saw them."""
        time.sleep(2)  # two more dispatch ticks: a late duplicate would show here
        ids = Counter(message["Message-ID"] for message in self.smtp.messages)
        with session_scope(self.settings.database_url) as session:
            statuses = {
                status: count
                for status, count in session.execute(
                    select(Delivery.status, func.count()).group_by(Delivery.status)
                )
            }
            rows = session.scalar(select(func.count()).select_from(Delivery))
        result = {
            "scenario": scenario,
            "due": N,
            "delivery_rows": rows,
            "received": sum(ids.values()),
            "lost": N - len(ids),
            "duplicates": sum(ids.values()) - len(ids),
            "statuses": statuses,
            **extra,
        }
        RESULTS.parent.mkdir(exist_ok=True)
        recorded = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        recorded[scenario] = result
        RESULTS.write_text(json.dumps(recorded, indent=2, sort_keys=True))
        print(json.dumps(result))
        return result

    def close(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
def chaos(tmp_path, smtp):
    database, drop = _fresh_postgres(require(POSTGRES_URL, "PostgreSQL"))
    broker = require(REDIS_URL, "Redis")
    redis.Redis.from_url(broker).flushdb()
    stack = Stack(
        {
            "NURTURE_INSTANCE": str(tmp_path / "instance"),
            "DATABASE_URL": database,
            "BROKER_URL": broker,
            "SMTP_URL": smtp.url,
            "SECRET_KEY": "chaos",
            "BASE_URL": "http://nurture.test",
            "POSTAL_ADDRESS": "Course Team, 12 Test Street, Testville",
            "DISPATCH_INTERVAL_SECONDS": "1",
            # Recover in seconds rather than minutes, so the test stays short.
            "DELIVERY_LEASE_SECONDS": "5",
            "REQUEUE_AFTER_SECONDS": "5",
            "RETRY_BASE_SECONDS": "1",
        }
    )
    migrate.upgrade(database)
    run = Chaos(stack, smtp, tmp_path)
    run.seed()
    yield run
    run.close()
    drop()


def test_worker_killed_mid_batch(chaos):
    worker = chaos.worker()
    chaos.beat()
    chaos.wait_received(N // 3)
    worker.kill()
    in_flight = chaos.in_flight()
    chaos.worker("worker-restarted")
    chaos.wait_all_sent()
    result = chaos.outcome("a-worker-killed", in_flight_at_kill=in_flight)
    assert result["lost"] == 0
    assert result["duplicates"] <= in_flight
    assert result["delivery_rows"] == N


def test_broker_flushed_mid_run(chaos):
    chaos.worker()
    chaos.beat()
    chaos.wait_received(N // 3)
    redis.Redis.from_url(chaos.settings.broker_url).flushdb()
    flushed_at = chaos.received()
    chaos.wait_all_sent()
    result = chaos.outcome("b-broker-flushed", received_at_flush=flushed_at)
    assert result["lost"] == 0
    assert result["duplicates"] == 0


def test_smtp_server_refuses_for_a_while(chaos):
    chaos.smtp.handler.refuse_with = "451 4.3.0 Try again later"
    chaos.worker()
    chaos.beat()
    deadline = time.monotonic() + 60
    while (refused := chaos.refused()) < N // 4:  # the outage lasts until many were refused
        assert time.monotonic() < deadline, f"only {refused} attempts were refused"
        time.sleep(0.1)
    time.sleep(2)  # and a little longer, so retries are refused too
    assert chaos.received() == 0
    refused = chaos.refused()
    chaos.smtp.handler.refuse_with = None
    chaos.wait_all_sent()
    result = chaos.outcome("c-smtp-451", deferred_during_outage=refused)
    assert result["lost"] == 0
    assert result["duplicates"] == 0


def test_two_beats_and_two_workers(chaos):
    chaos.worker("worker-1")
    chaos.worker("worker-2", THREADED)  # the pool docker-compose runs: four sending threads
    chaos.beat("beat-1")
    chaos.beat("beat-2")
    chaos.wait_all_sent()
    result = chaos.outcome("d-two-beats")
    assert result["lost"] == 0
    assert result["duplicates"] == 0
    assert result["delivery_rows"] == N


def test_database_connections_ended_mid_run(chaos):
    chaos.configure(DELIVERY_LEASE_SECONDS="600")  # the default: nothing may wait it out
    worker = chaos.worker(pool=THREADED)  # as docker-compose runs it: four sending threads
    chaos.beat()
    chaos.wait_received(N // 3)
    ended = drop_every_connection(chaos.settings.database_url)
    started = time.monotonic()
    chaos.wait_all_sent(timeout=60)
    result = chaos.outcome(
        "e-database-connections-ended",
        connections_ended=ended,
        seconds_to_all_sent=round(time.monotonic() - started, 1),
    )
    assert ended >= 1
    assert "back in the queue for the next due-scan" in worker.output(), "no batch was cut short"
    assert result["lost"] == 0
    assert result["duplicates"] == 0
