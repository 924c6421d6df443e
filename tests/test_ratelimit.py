"""Per-client limits on signups and logins: every window in one Redis call, or in memory."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from conftest import (
    REDIS_URL,
    REQUIRE_SERVICES,
    Process,
    csrf_token,
    free_port,
    require,
    silent_server,
)

from nurture.app import create_app
from nurture.config import ConfigError, load_settings
from nurture.handover import close_all
from nurture.ratelimit import PAUSE, PREFIX, RateLimiter, parse

API = "/api/v1/subscribers"


@pytest.fixture
def redis_url() -> str:
    return require(REDIS_URL, "Redis")


def client_address() -> str:
    """An address of this test's own, so counters left in Redis never meet another run's."""
    return f"test-{uuid.uuid4().hex}"


def counter(client: redis.Redis, limit: str, scope: str, address: str) -> int:
    (item,) = parse(limit)
    return int(client.get(item.key_for(PREFIX, scope, address)) or 0)


def test_refuses_past_the_limit_and_says_when_to_retry(redis_url):
    limiter = RateLimiter(redis_url)
    address = client_address()

    allowed = [limiter.hit("signup", address, "3 per minute") for _ in range(3)]
    refused = limiter.hit("signup", address, "3 per minute")

    assert allowed == [None, None, None]
    assert refused is not None and 1 <= refused <= 60
    assert limiter.hit("signup", client_address(), "3 per minute") is None, "per client"
    assert limiter.hit("login", address, "3 per minute") is None, "per scope"


def test_a_window_expires_with_its_counter(redis_url):
    limiter = RateLimiter(redis_url)
    client = redis.Redis.from_url(redis_url)
    address = client_address()
    limiter.hit("signup", address, "3 per minute")

    (item,) = parse("3 per minute")
    ttl = client.ttl(item.key_for(PREFIX, "signup", address))

    assert 0 < ttl <= 60, "the first request opens a window of a minute"


def test_a_counter_without_an_expiry_is_given_one(redis_url):
    """A counter must never outlive its window, or its client would be refused for good."""
    limiter = RateLimiter(redis_url)
    client = redis.Redis.from_url(redis_url)
    address = client_address()
    (item,) = parse("3 per minute")
    key = item.key_for(PREFIX, "signup", address)
    client.set(key, 10)  # as if its EXPIRE had been lost

    refused = limiter.hit("signup", address, "3 per minute")

    assert refused is not None and 1 <= refused <= 60
    assert 0 < client.ttl(key) <= 60


def test_windows_are_counted_shortest_first(redis_url):
    limiter = RateLimiter(redis_url)
    client = redis.Redis.from_url(redis_url)
    address = client_address()
    limit = "5 per day;2 per minute"  # in any order
    minute, day = parse(limit)

    assert [limiter.hit("signup", address, limit) for _ in range(2)] == [None, None]
    by_the_minute = limiter.hit("signup", address, limit)
    assert by_the_minute is not None and by_the_minute <= 60
    assert client.get(day.key_for(PREFIX, "signup", address)) == b"2", (
        "a request the minute refused does not use up the day"
    )

    client.delete(minute.key_for(PREFIX, "signup", address))  # the minute is over
    assert [limiter.hit("signup", address, limit) for _ in range(2)] == [None, None]
    client.delete(minute.key_for(PREFIX, "signup", address))
    assert limiter.hit("signup", address, limit) is None
    by_the_day = limiter.hit("signup", address, limit)

    assert by_the_day is not None and 3600 < by_the_day <= 86400, "the day's window refuses"


def test_in_memory_without_redis():
    limiter = RateLimiter("memory://")

    assert [limiter.hit("signup", "a", "2 per minute;3 per day") for _ in range(2)] == [None, None]
    refused = limiter.hit("signup", "a", "2 per minute;3 per day")

    assert refused is not None and 1 <= refused <= 60
    assert limiter.hit("signup", "b", "2 per minute;3 per day") is None


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Refusing:
    """A port that accepts connections and closes them at once, counting them (a Redis gone bad)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept; close alone would not
        self.server.close()
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            connection.close()


def test_a_dead_redis_lets_requests_through_and_says_so(caplog):
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there

    with caplog.at_level(logging.WARNING, logger="nurture.ratelimit"):
        allowed = limiter.hit("signup", "a", "1 per minute")

    assert allowed is None
    assert "signup rate limit not checked: Redis is unavailable" in caplog.text


def test_an_outage_is_logged_once_and_redis_is_asked_once_per_pause(caplog):
    refusing = Refusing()
    clock = Clock()
    limiter = RateLimiter(refusing.url, clock=clock)
    try:
        with caplog.at_level(logging.WARNING, logger="nurture.ratelimit"):
            assert limiter.hit("signup", "a", "1 per minute") is None
            tried = refusing.accepted
            assert tried >= 1
            assert [limiter.hit("signup", "a", "1 per minute") for _ in range(20)] == [None] * 20
            assert refusing.accepted == tried  # not asked again within the pause

            clock.now += PAUSE
            assert limiter.hit("login", "a", "1 per minute") is None
            assert refusing.accepted > tried  # asked again once the pause was over
    finally:
        refusing.close()
    assert len(caplog.records) == 1
    assert "requests go unchecked until it answers" in caplog.records[0].getMessage()


def start_redis(port: int, tmp_path: Path) -> Process:
    """A redis-server of this test's own on `port`, answering PING (or the test fails)."""
    if shutil.which("redis-server") is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    server = Process(command, dict(os.environ), tmp_path / "redis.log")
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 30  # a server starting, not a schedule
    while server.popen.poll() is None and time.monotonic() < deadline:
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            time.sleep(0.05)
    server.stop()
    pytest.fail(f"redis-server on port {port} did not answer:\n{server.output()[-2000:]}")


def test_counting_resumes_when_redis_answers_again(caplog, tmp_path):
    port = free_port()
    clock = Clock()
    limiter = RateLimiter(f"redis://127.0.0.1:{port}/0", clock=clock)
    address = client_address()
    with caplog.at_level(logging.WARNING, logger="nurture.ratelimit"):
        assert limiter.hit("signup", address, "1 per minute") is None  # down: let through
        assert limiter.hit("signup", address, "1 per minute") is None  # unchecked
        server = start_redis(port, tmp_path)
        try:
            clock.now += PAUSE
            first = limiter.hit("signup", address, "1 per minute")
            second = limiter.hit("signup", address, "1 per minute")
            counted = counter(redis.Redis(port=port), "1 per minute", "signup", address)
        finally:
            server.stop()
    assert (first, counted) == (None, 2)
    assert second is not None  # the limit holds again
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "Redis answers; 2 requests went unchecked" in messages[1]


def test_a_redis_that_never_answers_holds_a_request_about_a_second():
    with silent_server() as (port, accepted):
        limiter = RateLimiter(f"redis://127.0.0.1:{port}/0")

        started = time.monotonic()
        allowed = limiter.hit("signup", "a", "1 per minute")
        waited = time.monotonic() - started

    assert allowed is None
    assert accepted, "the limiter did reach the server"
    assert waited < 3, f"held for {waited:.1f}s"


@pytest.fixture
def on_redis(stack, redis_url):
    """The stack with Redis as its broker; its confirmations are removed afterwards."""
    settings = stack.with_env(BROKER_URL=redis_url, SIGNUP_RATE_LIMIT="2 per minute").settings
    yield settings
    close_all()
    redis.Redis.from_url(redis_url).delete(settings.queue)


def test_the_signup_routes_share_one_count_on_redis(on_redis):
    client = create_app(on_redis).test_client()
    here = {"REMOTE_ADDR": client_address()}

    form = {"csrf_token": csrf_token(client), "email": "two@example.com"}

    first = client.post(API, json={"email": "one@example.com"}, environ_base=here)
    second = client.post("/subscribe", data=form, environ_base=here)
    third = client.post(API, json={"email": "three@example.com"}, environ_base=here)

    assert first.status_code == 202
    assert second.status_code == 303
    assert third.status_code == 429
    assert 1 <= int(third.headers["Retry-After"]) <= 60
    assert third.get_json()["errors"]


def test_admin_login_allows_ten_tries_a_minute(client):
    token = csrf_token(client, "/admin/login")

    def attempt():
        form = {"csrf_token": token, "email": "a@example.com", "password": "wrong"}
        return client.post("/admin/login", data=form)

    tries = [attempt().status_code for _ in range(10)]
    refused = attempt()

    assert tries == [401] * 10
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert client.get("/admin/login").status_code == 200, "the page itself is not limited"


@pytest.mark.parametrize(
    "value", ["ten per minute", "10 per fortnight", "10/minute;x", "5 per minute;5 per 1 minute"]
)
def test_a_malformed_limit_stops_the_service_at_start(stack, value):
    with pytest.raises(ConfigError, match="SIGNUP_RATE_LIMIT must be like"):
        load_settings({**stack.environ, "SIGNUP_RATE_LIMIT": value})
