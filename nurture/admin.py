"""Marketers' pages under /admin: sign-in, the sequences, previews, the dev outbox."""

from __future__ import annotations

from functools import wraps

from flask import (
    Blueprint,
    abort,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy import func, select

from nurture import catcher, users
from nurture.app import state
from nurture.db import session_scope
from nurture.models import Delivery
from nurture.preview import parts, preview_message

bp = Blueprint("admin", __name__, url_prefix="/admin")


def login_required(view):
    @wraps(view)
    def wrapped(*args, **kwargs):
        if not session.get("user_id"):
            return redirect(url_for("admin.login", next=request.full_path))
        return view(*args, **kwargs)

    return wrapped


def _safe_next(target: str | None) -> str:
    """Only redirect to our own admin pages after login (no open redirect)."""
    if target and target.startswith("/admin") and not target.startswith("//"):
        return target
    return url_for("admin.index")


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        settings = state().settings
        with session_scope(settings.database_url) as db:
            user = users.authenticate(
                db, request.form.get("email", ""), request.form.get("password", "")
            )
            user_id = user.id if user else None
        if user_id is not None:
            session.clear()
            session["user_id"] = user_id
            return redirect(_safe_next(request.args.get("next")), code=303)
        error = "That email and password do not match an account."
    return render_template("admin/login.html", error=error), 401 if error else 200


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("admin.login"), code=303)


@bp.get("/")
@login_required
def index():
    settings = state().settings
    with session_scope(settings.database_url) as db:
        counts = {
            (sequence, step, status): count
            for sequence, step, status, count in db.execute(
                select(Delivery.sequence, Delivery.step, Delivery.status, func.count()).group_by(
                    Delivery.sequence, Delivery.step, Delivery.status
                )
            )
        }
    return render_template("admin/index.html", sequences=state().sequences(), counts=counts)


@bp.get("/preview/<sequence>/<step>")
@login_required
def preview(sequence: str, step: str):
    app_state = state()
    seq = app_state.sequences().get(sequence)
    if step != "confirmation" and (seq is None or seq.step(step) is None):
        abort(404)
    first_name = request.args.get("first_name", "Alex")[:100]
    message = preview_message(app_state.settings, sequence, step, first_name=first_name)
    text, html = parts(message)
    return render_template(
        "admin/preview.html",
        label=f"{sequence}/{step}" if seq else step,
        message=message,
        text=text,
        html=html,
        first_name=first_name,
    )


@bp.get("/outbox")
@login_required
def outbox():
    messages = catcher.list_outbox(state().settings.outbox_path)
    return render_template("admin/outbox.html", messages=messages)


@bp.get("/outbox/<name>")
@login_required
def outbox_message(name: str):
    try:
        message = catcher.read_message(state().settings.outbox_path, name)
    except (FileNotFoundError, IsADirectoryError):
        abort(404)
    text, html = parts(message)
    return render_template("admin/message.html", name=name, message=message, text=text, html=html)
