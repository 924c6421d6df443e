"""Shared fixtures: real databases, a real SMTP server, real worker processes.

PostgreSQL and Redis come from DATABASE_URL and BROKER_URL (as `.ci/run` sets
them), or from the usual local ports when those answer. Where neither is
available, tests that need them are skipped, except under
NURTURE_REQUIRE_SERVICES=1 (CI), where a missing service fails the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from nurture import ROOT
from nurture.config import Settings, load_settings
from nurture.db import dispose_all, get_engine, normalize_url, scratch_database
from nurture.handover import close_all
from nurture.models import Base

REQUIRE_SERVICES = os.environ.get("NURTURE_REQUIRE_SERVICES") == "1"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
LOCAL_REDIS = "redis://127.0.0.1:6379/15"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _service_url(variable: str, scheme: str, local: str) -> str | None:
    value = os.environ.get(variable, "")
    if value.startswith(scheme):
        return value
    url = make_url(normalize_url(local)) if scheme == "postgres" else None
    host, port = (url.host, url.port) if url else ("127.0.0.1", 6379)
    return local if _port_open(host, port) else None


POSTGRES_URL = _service_url("DATABASE_URL", "postgres", LOCAL_POSTGRES)
REDIS_URL = _service_url("BROKER_URL", "redis", LOCAL_REDIS)


def require(url: str | None, what: str) -> str:
    if url is None:
        message = f"{what} is not available (set DATABASE_URL / BROKER_URL)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A port that accepts connections and never answers (a hung Redis); its port, and
    the connections it accepted so far."""
    accepted: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def serve() -> None:
            with contextlib.suppress(OSError):  # the listening socket was closed
                while True:
                    accepted.append(server.accept()[0])

        threading.Thread(target=serve, daemon=True).start()
        try:
            yield server.getsockname()[1], accepted
        finally:
            for connection in accepted:
                connection.close()


# --- SMTP --------------------------------------------------------------------------


class CapturingHandler:
    """An SMTP server's brain: keeps messages, or refuses them with `refuse_with`.

    Like Postfix and most providers it offers PIPELINING (`pipelining = False`
    for one that does not); `refuse_recipients_with` refuses at RCPT instead.
    """

    def __init__(self):
        self.messages: list[EmailMessage] = []
        self.refuse_with: str | None = None  # e.g. "451 4.3.0 Try again later"
        self.refuse_recipients_with: str | None = None
        self.pipelining = True
        self.on_message: Callable[[EmailMessage], None] | None = None  # before the 250
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, options) -> str:
        if self.refuse_recipients_with:
            return self.refuse_recipients_with
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.refuse_with:
            return self.refuse_with
        message = message_from_bytes(envelope.original_content, policy=policy.default)
        if self.on_message is not None:
            self.on_message(message)
        with self.lock:
            self.messages.append(message)
        return "250 OK"


@dataclass
class SMTPServer:
    handler: CapturingHandler
    port: int

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?timeout=5"

    @property
    def messages(self) -> list[EmailMessage]:
        with self.handler.lock:
            return list(self.handler.messages)

    def wait_for(self, count: int, timeout: float = 30) -> list[EmailMessage]:
        """Wait for a worker to deliver `count` messages (not for a schedule)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.messages) >= count:
                return self.messages
            time.sleep(0.05)
        raise AssertionError(f"expected {count} messages, got {len(self.messages)}")


@pytest.fixture
def smtp() -> Iterator[SMTPServer]:
    handler = CapturingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield SMTPServer(handler, port)
    controller.stop()


# --- Databases ---------------------------------------------------------------------


def _fresh_postgres(base_url: str) -> tuple[str, Callable[[], None]]:
    """A new, empty database on the PostgreSQL server; and how to drop it."""
    return scratch_database(base_url, "nurture_test")


def drop_every_connection(database_url: str, *, keep_out: bool = False) -> int:
    """What a database restart does to our pooled connections; how many it ended.

    With `keep_out` the database also refuses new connections, as one that has not
    come back yet does, until `let_connections_in`.
    """
    name = make_url(database_url).database
    with server_connection() as server:
        if keep_out:
            server.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        return server.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = :name"
            ),
            {"name": name},
        )


def let_connections_in(database_url: str) -> None:
    """The database accepts connections again (after `drop_every_connection(keep_out=True)`)."""
    with server_connection() as server:
        name = make_url(database_url).database
        server.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))


@contextlib.contextmanager
def server_connection() -> Iterator:
    """A connection to the PostgreSQL server's base database, outside any test's own."""
    engine = create_engine(
        normalize_url(require(POSTGRES_URL, "PostgreSQL")),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


@pytest.fixture
def empty_database(request, tmp_path) -> Iterator[str]:
    """An empty database URL: SQLite by default, PostgreSQL with param "postgresql"."""
    kind = getattr(request, "param", "sqlite")
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'nurture.db'}"
        close_all()  # no hand-over thread outlives its test's database
        dispose_all()
        return
    url, drop = _fresh_postgres(require(POSTGRES_URL, "PostgreSQL"))
    yield url
    close_all()
    drop()


@pytest.fixture
def database_url(empty_database) -> str:
    """A database with the schema in place."""
    Base.metadata.create_all(get_engine(empty_database))
    return empty_database


BOTH_DATABASES = pytest.mark.parametrize("empty_database", ["sqlite", "postgresql"], indirect=True)


# --- Settings and apps -------------------------------------------------------------


@dataclass
class Stack:
    """The settings of one test's service, and the environment that produces them."""

    environ: dict[str, str]
    settings: Settings = field(init=False)

    def __post_init__(self):
        # Each test's broker queue is its own, so runs sharing a Redis never swap messages.
        self.environ.setdefault("NURTURE_QUEUE", f"nurture-test-{uuid.uuid4().hex[:8]}")
        self.settings = load_settings(self.environ)

    def with_env(self, **changes: str) -> Stack:
        return Stack({**self.environ, **changes})

    def process_env(self) -> dict[str, str]:
        """Environment for a child process (worker, beat, CLI) of this service."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("NURTURE_", "SMTP_"))}
        for variable in ("DATABASE_URL", "BROKER_URL"):
            keep.pop(variable, None)
        return {**keep, **self.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def stack(database_url, smtp, tmp_path) -> Stack:
    return Stack(
        {
            "NURTURE_INSTANCE": str(tmp_path / "instance"),
            "DATABASE_URL": database_url,
            "BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "SMTP_URL": smtp.url,
            "SECRET_KEY": "test-secret-key",
            "BASE_URL": "http://nurture.test",
            "POSTAL_ADDRESS": "Course Team, 12 Test Street, Testville",
            "COURSE_URL": "https://courses.example.com/six-month",
            "MAIL_FROM": "Course Team <course@nurture.test>",
        }
    )


@pytest.fixture
def settings(stack) -> Settings:
    return stack.settings


@pytest.fixture
def app(stack):
    from nurture.app import create_app

    app = create_app(stack.settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def csrf_token(client, path: str = "/") -> str:
    page = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "the page has no CSRF token"
    return match.group(1)


# --- Processes ---------------------------------------------------------------------


class Process:
    """A child process of the service (worker, beat), with its output kept."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so kill -9 takes the pool too
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output()):
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not seen; output:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """kill -9 the process and all its children, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=15)
        self.kill()  # and anything the process left behind
        self._log.close()


@pytest.fixture
def start_worker(tmp_path) -> Iterator[Callable[[Stack], Process]]:
    """Start a real `celery -A worker worker` for a stack; stopped after the test."""
    started: list[Process] = []

    def start(stack: Stack, *extra: str) -> Process:
        from nurture.tasks import make_celery, prepare_broker

        if stack.settings.embedded_broker:
            prepare_broker(make_celery(stack.settings))
        command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO"]
        command += list(extra) or ["--pool", "solo"]
        log = tmp_path / f"worker-{len(started)}.log"
        process = Process(command, stack.process_env(), log)
        started.append(process)
        process.wait_for_output(r"ready\.", timeout=60)
        return process

    yield start
    for process in started:
        process.stop()
