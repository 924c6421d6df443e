"""`GET /healthz`: is the database reachable, is the broker reachable."""

from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from nurture.app import state
from nurture.db import get_engine

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


@bp.get("/healthz")
def healthz():
    app_state = state()
    checks = {
        "database": _check_database(app_state.settings.database_url),
        "broker": _check_broker(app_state.celery),
    }
    healthy = all(value == "ok" for value in checks.values())
    return jsonify({"status": "ok" if healthy else "unavailable", **checks}), (
        200 if healthy else 503
    )
