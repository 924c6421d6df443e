"""`GET /healthz`: is the database reachable, is the broker reachable."""

from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import select, text

from nurture.app import state
from nurture.db import get_engine, session_scope
from nurture.models import Delivery, DeliveryStatus

bp = Blueprint("health", __name__)


def _check_database(url: str) -> str:
    try:
        with get_engine(url).connect() as connection:
            connection.execute(text("SELECT 1"))
        return "ok"
    except Exception as error:
        return f"error: {type(error).__name__}"


def _check_broker(celery) -> str:
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as error:
        return f"error: {type(error).__name__}"


def _check_templates(url: str) -> str:
    """Emails held because their template fails to render, if any.

    Reported, but not as "down": a broken email must page someone, yet taking
    the web app out of a load balancer would stop signups too.
    """
    try:
        with session_scope(url) as session:
            held = session.execute(
                select(Delivery.sequence, Delivery.step, Delivery.last_error)
                .where(
                    Delivery.status == DeliveryStatus.QUEUED,
                    Delivery.last_error.like("template error:%"),
                )
                .limit(1)
            ).first()
    except Exception:
        return "unknown"
    if held is None:
        return "ok"
    return f"error: {held.sequence}/{held.step} is held: {held.last_error}"


@bp.get("/healthz")
def healthz():
    """200 when the database and broker answer, 503 naming the part that does not.

    A held email shows as "templates": "error: ..." with status "degraded"
    and a 200, for the reason in `_check_templates`.
    """
    app_state = state()
    checks = {
        "database": _check_database(app_state.settings.database_url),
        "broker": _check_broker(app_state.celery),
    }
    down = any(value != "ok" for value in checks.values())
    templates = "unknown" if down else _check_templates(app_state.settings.database_url)
    status = "unavailable" if down else ("ok" if templates == "ok" else "degraded")
    return jsonify({"status": status, **checks, "templates": templates}), 503 if down else 200
