"""`GET /healthz`: is the database reachable, is the broker reachable.

Load balancers poll it every second or so, so each check reuses a kept
connection: a pooled database connection, and one Redis client per process
for the broker. Nothing is cached: every answer is as of the request, and a
part that stops answering shows within about two seconds.
"""

from __future__ import annotations

import logging
import time
from functools import cache

import redis
from flask import Blueprint, jsonify
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import select

from nurture.app import state
from nurture.db import database_problem, get_engine, schema_behind
from nurture.models import Delivery
from nurture.sequences import manifest_errors, within_templates
from nurture.stats import HELD_BY_TEMPLATE

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)

#: The longest one try at reaching Redis may take; a stale kept connection gets one more.
BROKER_TIMEOUT_SECONDS = 1


#: An email held because its template fails to render (built once: every check runs it).
HELD_EMAIL = (
    select(Delivery.sequence, Delivery.step, Delivery.last_error).where(*HELD_BY_TEMPLATE).limit(1)
)


def _held_email(url: str):
    """The first email held because its template fails to render, if any.

    Also the database check: the query needs a working database.
    """
    with get_engine(url).connect() as connection:
        return connection.execute(HELD_EMAIL).first()


@cache
def _redis(url: str) -> redis.Redis:
    """A Redis client kept for the process: a new connection per check costs more than it."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=BROKER_TIMEOUT_SECONDS,
        socket_timeout=BROKER_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 1),  # a Redis restart must not fail the next check
    )


def _check_broker(app_state) -> str:
    try:
        url = app_state.settings.broker_url
        if url.startswith(("redis://", "rediss://")):
            _redis(url).ping()
        else:  # the embedded broker: opening it is cheap, and is the check
            with app_state.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as error:
        return _failed("broker", error)


#: Seconds between two log lines about the same part failing its check: a load
#: balancer polls every second, and one line a minute tells the operator enough.
LOG_EVERY = 60.0
_logged: dict[str, float] = {}  # part: when its failure was last logged


def _failed(part: str, error: Exception) -> str:
    """The page names only the error's kind (it is public); the log has the whole
    error, once a minute at most, for the operator."""
    now = time.monotonic()
    if now - _logged.get(part, -LOG_EVERY) >= LOG_EVERY:
        _logged[part] = now
        if part == "database" and schema_behind(error):
            log.error("/healthz: %s", database_problem(error))
        else:
            log.error("/healthz: the %s check failed: %s: %s", part, type(error).__name__, error)
    return f"error: {type(error).__name__}"


@bp.get("/healthz")
def healthz():
    """200 when the database and broker answer, 503 naming the part that does not.

    A held email, or a course manifest that does not load, shows as
    "templates": "error: ..." with status "degraded" and a 200, not as "down":
    a broken email must page someone, yet taking the web app out of a load
    balancer would stop signups too.
    """
    app_state = state()
    try:
        held = _held_email(app_state.settings.database_url)
        database = "ok"
    except Exception as error:
        held, database = None, _failed("database", error)
    checks = {"database": database, "broker": _check_broker(app_state)}
    down = any(value != "ok" for value in checks.values())
    folder = app_state.settings.templates_path
    broken = manifest_errors(folder)
    if down:
        templates = "unknown"
    elif broken:
        templates = "error: " + within_templates(folder, next(iter(broken.values())))
    elif held is None:
        templates = "ok"
    else:
        reason = within_templates(folder, held.last_error or "")
        templates = f"error: {held.sequence}/{held.step} is held: {reason}"
    status = "unavailable" if down else ("ok" if templates == "ok" else "degraded")
    return jsonify({"status": status, **checks, "templates": templates}), 503 if down else 200
