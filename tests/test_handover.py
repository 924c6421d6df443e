"""A confirmation reaches the broker from the hand-over thread, never from the request."""

from __future__ import annotations

import base64
import json
import os
import select as io_select
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from conftest import BOTH_DATABASES, REDIS_URL, free_port, require, silent_server
from sqlalchemy import select

from nurture import ROOT, scheduler, tasks
from nurture.app import create_app
from nurture.db import session_scope
from nurture.handover import close_all
from nurture.models import CONFIRMATION_STEP, Delivery
from nurture.tasks import publisher

API = "/api/v1/subscribers"


@pytest.fixture
def on_redis(stack):
    """The stack with a Redis broker and a queue of this test's own; the Redis client."""
    broker = require(REDIS_URL, "Redis")
    settings = stack.with_env(
        BROKER_URL=broker,
        NURTURE_QUEUE=f"t-{uuid.uuid4().hex}",
        SIGNUP_RATE_LIMIT="1000 per minute",  # its counts in Redis outlive the test
    ).settings
    client = redis.Redis.from_url(broker)
    yield settings, client
    close_all()  # nothing published after the queue is gone
    client.delete(settings.queue)


def published_ids(client, queue: str) -> list[list[int]]:
    """The id lists of the send_batch messages waiting in `queue`, oldest first."""
    bodies = [json.loads(m) for m in reversed(client.lrange(queue, 0, -1))]
    return [json.loads(base64.b64decode(m["body"]))[0][0] for m in bodies]


def confirmations(settings) -> dict[int, object]:
    """Each confirmation delivery's id and its hand-over mark."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Delivery.id, Delivery.enqueued_at).where(Delivery.step == CONFIRMATION_STEP)
        )
        return dict(rows.all())


@BOTH_DATABASES
def test_signups_are_answered_before_the_broker_hears_of_them_then_published_together(on_redis):
    settings, client = on_redis
    app = create_app(settings)
    handover = app.extensions["nurture"].handover
    handover.linger = 60  # the thread would wait a minute: nothing but close() publishes
    web = app.test_client()

    for n in range(3):
        assert web.post(API, json={"email": f"p{n}@example.com"}).status_code == 202

    marks = confirmations(settings)
    assert len(marks) == 3 and all(marks.values())  # written marked as handed over
    assert published_ids(client, settings.queue) == []  # no request published anything
    handover.close()
    assert published_ids(client, settings.queue) == [sorted(marks)]  # one message for all


def test_the_thread_publishes_on_its_own(on_redis):
    settings, client = on_redis
    app = create_app(settings)
    app.extensions["nurture"].handover.linger = 0.01
    assert app.test_client().post(API, json={"email": "soon@example.com"}).status_code == 202

    deadline = time.monotonic() + 10  # a background thread, not a schedule: wait for it
    while not published_ids(client, settings.queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert published_ids(client, settings.queue) == [list(confirmations(settings))]


@BOTH_DATABASES
def test_a_confirmation_whose_note_was_lost_is_handed_over_by_the_due_scan(on_redis, monkeypatch):
    """A web process killed before its thread published: the marked row is requeued."""
    settings, client = on_redis
    app = create_app(settings)
    # What a killed process leaves: the committed row, and no note of it anywhere.
    monkeypatch.setattr(app.extensions["nurture"].handover, "add", lambda *_a, **_k: None)
    assert app.test_client().post(API, json={"email": "lost@example.com"}).status_code == 202
    [(delivery_id, marked_at)] = confirmations(settings).items()

    publish = publisher(create_app(settings).extensions["nurture"].celery)
    with session_scope(settings.database_url) as session:
        early = scheduler.enqueue_ready(session, settings, marked_at, publish)
        later = marked_at + timedelta(seconds=settings.requeue_after + 1)
        late = scheduler.enqueue_ready(session, settings, later, publish)

    assert early == (0, 0)  # handed over a moment ago: left alone
    assert late == (1, 0)
    assert published_ids(client, settings.queue) == [[delivery_id]]


def test_a_graceful_stop_publishes_the_last_batch(on_redis, stack, tmp_path):
    """gunicorn's TERM: the worker exits normally and hands over what was still gathering.

    The app is loaded before gunicorn forks its worker (`--preload`), as many deploy
    it: the worker starts its thread after the fork.
    """
    settings, client = on_redis
    (tmp_path / "slow_web.py").write_text(
        "from web import app\n"
        "app.extensions['nurture'].handover.linger = 60  # only the stop can publish\n"
    )
    env = {
        **stack.process_env(),
        "BROKER_URL": settings.broker_url,
        "NURTURE_QUEUE": settings.queue,
        "SIGNUP_RATE_LIMIT": settings.signup_rate_limit,
    }
    port = free_port()
    gunicorn = Path(sys.executable).parent / "gunicorn"
    server = subprocess.Popen(
        # --preload: the app (and its Handover) is made before the fork, as many deploy it
        [
            str(gunicorn),
            "slow_web:app",
            "--preload",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
        ],
        cwd=ROOT,
        env={**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )
    try:
        body = json.dumps({"email": "last@example.com"}).encode()
        deadline = time.monotonic() + 30
        while True:  # until gunicorn answers
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}{API}",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert response.status == 202
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.1)
        assert published_ids(client, settings.queue) == []
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert published_ids(client, settings.queue) == [list(confirmations(settings))]


@BOTH_DATABASES
def test_a_refused_batch_takes_back_every_mark_in_it(stack):
    """Rows marked at different moments, refused in one batch: none is left marked."""
    down = stack.with_env(BROKER_URL="redis://127.0.0.1:1/0")
    app = create_app(down.settings)
    app.extensions["nurture"].handover.linger = 60  # both go in one batch, at close()
    web = app.test_client()
    for n in range(2):
        assert web.post(API, json={"email": f"refused{n}@example.com"}).status_code == 202
    marks = confirmations(down.settings)
    assert len(set(marks.values())) == 2  # each row was marked at its own signup

    app.extensions["nurture"].handover.close()

    assert list(confirmations(down.settings).values()) == [None, None]


@BOTH_DATABASES
def test_a_broker_that_never_answers_fails_each_batch_and_the_thread_goes_on(stack, monkeypatch):
    """A Redis that accepts connections and never replies (a failover that left the
    connection open): each batch gives up after the reply timeout and its marks are
    taken back for the due-scan, rather than the thread waiting on it forever."""
    monkeypatch.setattr(tasks, "BROKER_REPLY_TIMEOUT", 0.5)
    with silent_server() as (port, accepted):
        hung = stack.with_env(BROKER_URL=f"redis://127.0.0.1:{port}/0")
        web = create_app(hung.settings).test_client()
        for n in range(2):  # the second is published by the same thread, after the first failed
            assert web.post(API, json={"email": f"hung{n}@example.com"}).status_code == 202
            deadline = time.monotonic() + 10
            while any(mark is not None for mark in confirmations(hung.settings).values()):
                assert time.monotonic() < deadline, f"signup {n} is still marked as handed over"
                time.sleep(0.05)
        assert accepted, "the publish did reach the server"
    assert len(confirmations(hung.settings)) == 2


def test_a_forked_child_starts_a_thread_of_its_own(on_redis):
    """Threads do not fork: a child must not leave its notes to its parent's thread.

    gunicorn's --preload forks workers from a process that may already hold a
    hand-over; the child's notes need a thread in the child, and its parent's
    notes stay with the parent.
    """
    settings, _client = on_redis
    handover = create_app(settings).extensions["nurture"].handover
    handover.linger = 60  # each thread holds its first note until close()
    handover.add(1, datetime.now(UTC))
    assert handover._thread is not None and handover._thread.is_alive()
    parents_thread = handover._thread

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sees, then leave without pytest's teardown
        try:
            seen = {
                "thread_after_fork": handover._thread is not None,
                "notes_after_fork": handover._notes.qsize(),
            }
            handover.add(2, datetime.now(UTC))
            seen["own_thread"] = (
                handover._thread is not parents_thread and handover._thread.is_alive()
            )
            os.write(write, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.close(write)
    ready: list[int] = []
    try:
        ready, _, _ = io_select.select([read], [], [], 30)  # a child that hangs fails the test
        seen = json.loads(os.read(read, 4096) or b"{}") if ready else {"child": "no answer"}
    finally:
        os.close(read)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    assert seen == {
        "thread_after_fork": False,
        "notes_after_fork": 0,
        "own_thread": True,
    }
    assert handover._thread is parents_thread and parents_thread.is_alive()  # untouched
