"""Database engines and sessions.

One engine per URL per process. A plain `postgresql://` URL is given the driver
the project installs (psycopg 3); SQLite runs in WAL mode with a busy timeout,
because the web app, the worker and beat write the same file at once.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


def normalize_url(url: str) -> str:
    """Give a bare PostgreSQL URL the psycopg 3 driver (`postgres://` too)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def insert_for(session: Session | Connection):
    """The dialect's own `insert`, whose `on_conflict_do_*` writes an upsert in one statement."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def is_postgresql(url: str) -> bool:
    return normalize_url(url).startswith("postgresql")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_engines: dict[tuple[str, bool], Engine] = {}  # by URL, and whether it autocommits
_sessionmakers: dict[str, sessionmaker[Session]] = {}
_creating = threading.Lock()  # the web's hand-over thread uses them too


def get_engine(url: str) -> Engine:
    """The process's engine for `url`, created on first use."""
    return _engine(url, autocommit=False)


def autocommit_engine(url: str) -> Engine:
    """The process's engine for `run_autocommit`: autocommit connections, no ping."""
    return _engine(url, autocommit=True)


def _engine(url: str, *, autocommit: bool) -> Engine:
    key = (url, autocommit)
    if key not in _engines:
        with _creating:
            if key not in _engines:
                _engines[key] = _create_engine(normalize_url(url), autocommit)
    return _engines[key]


#: libpq's connection settings, where the URL does not give its own (e.g.
#: `?connect_timeout=20`). Without them a PostgreSQL that cannot be reached holds
#: a connection attempt for the system's two minutes, and one that accepts and
#: never answers holds it, and the request, health check or due-scan waiting on
#: it, forever; an established connection whose server vanished (a failover to
#: another host) is noticed only after two hours. With them a connection attempt
#: fails after 5 s (per address tried), and a dead server's connection after
#: about a minute: on Linux `tcp_user_timeout` ends it once sent data has gone
#: unacknowledged for 60 s, or once it has been silent that long and a keepalive
#: probe (after 30 s, then every 10 s) went unanswered. A live server, however
#: slow a statement, acknowledges and answers probes at once. Needs libpq 12 or
#: newer, which psycopg's binary package brings. docs/decisions.md has more.
POSTGRESQL_CONNECT = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # milliseconds
}


def _create_engine(url: str, autocommit: bool) -> Engine:
    """A pooled engine; with `autocommit` (PostgreSQL) its connections stay so, unpinged."""
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 15})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    options = {"isolation_level": "AUTOCOMMIT"} if autocommit else {"pool_pre_ping": True}
    given = make_url(url).query
    connect = {key: value for key, value in POSTGRESQL_CONNECT.items() if key not in given}
    engine = create_engine(url, pool_size=5, max_overflow=10, connect_args=connect, **options)
    event.listen(engine, "connect", _postgresql_settings)
    return engine


def run_autocommit(url: str, statement: Callable[[psycopg.Connection], T]) -> T:
    """Run one statement that commits itself, on PostgreSQL; what it returns.

    For the hottest single-statement writes (a first-time signup). Their pool
    keeps its connections in autocommit, so a checkout sets nothing and a
    return resets nothing, and it does not ping a connection before each use
    (a round trip, a tenth of a signup's cost). Instead, a connection found
    dead (the database restarted) is dropped with every other one as old,
    and the statement runs once more on a new connection. So
    `statement` must be safe to run twice: a single INSERT ... ON CONFLICT
    that writes nothing the second time is. (If the first run did commit and
    only its reply was lost, the second returns what a repeat would: for a
    signup, no new confirmation, and the one already written leaves after
    REQUEUE_AFTER_SECONDS, as for a process killed before its hand-over.)

    `statement` is given psycopg's connection itself: around one short
    statement, SQLAlchemy's Connection and execution context cost a signup a
    twelfth of its CPU. Its errors still reach the caller as SQLAlchemy's
    (`DBAPIError` and its kinds), as the app's error pages expect.
    """
    engine = autocommit_engine(url)
    try:
        return _on_driver(engine, statement)
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
    return _on_driver(engine, statement)


def _on_driver(engine: Engine, statement: Callable[[psycopg.Connection], T]) -> T:
    """`statement` on a pooled connection's psycopg connection, the driver's errors
    (connecting included) made SQLAlchemy's; a connection found dead is dropped
    with every other one as old."""
    pooled = None
    try:
        pooled = engine.raw_connection()
        return statement(pooled.driver_connection)
    except psycopg.Error as error:
        dead = pooled is not None and engine.dialect.is_disconnect(
            error, pooled.driver_connection, None
        )
        if dead:
            # As SQLAlchemy's own Connection does after a disconnect: this connection
            # now, and every one made before it at its next checkout (what ended this
            # one, a restart, ended them), without touching those other threads hold
            # or opened since. A test restarts the server under a full pool.
            engine.pool._invalidate(pooled, error)
        raise DBAPIError.instance(
            None, None, error, psycopg.Error, connection_invalidated=dead
        ) from error
    finally:
        if pooled is not None:
            pooled.close()


#: SQLSTATEs of a table or column the database does not have (PostgreSQL).
_MISSING_OBJECT = frozenset({"42P01", "42703"})


def schema_behind(error: BaseException) -> bool:
    """Whether a database error says a table or column is missing: the database was
    not migrated to this code's schema (`nurture db upgrade`), not that it is down."""
    orig = getattr(error, "orig", None) or error
    if getattr(orig, "sqlstate", None) in _MISSING_OBJECT:
        return True
    return str(orig).startswith(("no such table", "no such column"))  # SQLite's words


def database_problem(error: BaseException) -> str:
    """A log line's words for a database error, naming the fix when there is one."""
    orig = getattr(error, "orig", None) or error
    if schema_behind(error):
        return (
            f"the database is not migrated to this code's schema ({orig}): run `nurture db upgrade`"
        )
    return f"database unavailable: {orig}"


_PSYCOPG = postgresql.psycopg.dialect()


@functools.cache
def for_psycopg(statement) -> tuple[str, dict]:
    """`statement` compiled once for psycopg: its SQL, and its constant parameters.

    For the hottest statements, run as driver SQL: SQLAlchemy's execution of a
    statement (its cache lookup, context, bind and result processing) costs
    more CPU than a short statement's round trip.
    """
    compiled = statement.compile(dialect=_PSYCOPG)
    # Only the values the statement itself fixes: a parameter the caller must give
    # stays out, so that leaving it out is the driver's error rather than a NULL.
    constants = {
        name: value for name, value in compiled.params.items() if not compiled.binds[name].required
    }
    return str(compiled), constants


def require_aware(what: str, *times: datetime | None) -> None:
    """Refuse a naive time bound to driver SQL (`for_psycopg`), which skips the check
    the UTC column type makes; None passes."""
    if any(value is not None and value.tzinfo is None for value in times):
        raise ValueError(f"naive datetime given {what}")


def _postgresql_settings(dbapi_connection, _record) -> None:
    """No JIT compilation: our statements are short, and JIT pays off only for long ones.

    PostgreSQL compiles a statement whose estimated cost passes jit_above_cost,
    and the due-scan's batch query is estimated above it (it cannot tell how
    many rows the claim loop's share filter keeps): compiling made a 10,000-step
    tick about a quarter slower. A session setting, so an operator's own
    server-wide choice is left alone for everything else.
    """
    cursor = dbapi_connection.cursor()
    cursor.execute("SET jit = off")
    cursor.close()
    dbapi_connection.commit()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    factory = _sessionmakers.get(url)
    if factory is None:
        engine = get_engine(url)
        with _creating:
            factory = _sessionmakers.setdefault(url, sessionmaker(engine, expire_on_commit=False))
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_all() -> None:
    """Close every pooled connection (after a fork, and between tests)."""
    with _creating:
        engines = list(_engines.values())
        _engines.clear()
        _sessionmakers.clear()
    for engine in engines:
        engine.dispose()


def scratch_database(base_url: str, prefix: str) -> tuple[str, Callable[[], None]]:
    """A new, empty PostgreSQL database next to `base_url`'s, and how to drop it.

    For the tests and the benchmarks, which each want a database of their own.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalize_url(base_url)).set(database=name).render_as_string(False)

    def drop() -> None:
        dispose_all()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop
