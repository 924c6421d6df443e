"""Marketers' pages under /admin: sign-in, the sequences, previews, the dev outbox."""

from __future__ import annotations

from functools import wraps

from flask import (
    Blueprint,
    Response,
    abort,
    json,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy import func, or_, select

from nurture import catcher, privacy, users
from nurture.app import limiter, state
from nurture.db import session_scope
from nurture.models import Consent, Delivery, Subscriber, utcnow
from nurture.preview import parts, preview_message
from nurture.sequences import current_sequences
from nurture.timeline import timeline

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
@limiter.limit("10 per minute", methods=["POST"])
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


PAGE_SIZE = 50


@bp.get("/subscribers")
@login_required
def subscribers():
    query = request.args.get("q", "").strip()[:200]
    status = request.args.get("status", "")
    statement = select(Subscriber).order_by(Subscriber.id.desc()).limit(PAGE_SIZE)
    if query:
        pattern = f"%{query.lower()}%"
        statement = statement.where(
            or_(Subscriber.email.like(pattern), func.lower(Subscriber.first_name).like(pattern))
        )
    if status:
        statement = statement.where(Subscriber.status == status)
    with session_scope(state().settings.database_url) as db:
        rows = db.scalars(statement).all()
    return render_template("admin/subscribers.html", rows=rows, q=query, status=status)


@bp.get("/subscribers/<int:subscriber_id>")
@login_required
def subscriber(subscriber_id: int):
    settings = state().settings
    with session_scope(settings.database_url) as db:
        found = db.get(Subscriber, subscriber_id)
        if found is None:
            abort(404)
        consents = db.scalars(
            select(Consent).where(Consent.subscriber_id == subscriber_id).order_by(Consent.id)
        ).all()
        line = timeline(
            db, settings, current_sequences(settings.templates_path), found.email, utcnow()
        )
    return render_template("admin/subscriber.html", s=found, consents=consents, line=line)


@bp.get("/subscribers/<int:subscriber_id>/export.json")
@login_required
def subscriber_export(subscriber_id: int):
    with session_scope(state().settings.database_url) as db:
        data = privacy.export_data(db, subscriber_id)
    if data is None:
        abort(404)
    return Response(
        json.dumps(data, indent=2, ensure_ascii=False),
        mimetype="application/json",
        headers={"Content-Disposition": f"attachment; filename=subscriber-{subscriber_id}.json"},
    )


@bp.post("/subscribers/<int:subscriber_id>/erase")
@login_required
def subscriber_erase(subscriber_id: int):
    if request.form.get("confirm") != "erase":
        abort(400, "Type erase to confirm.")
    with session_scope(state().settings.database_url) as db:
        if not privacy.erase(db, subscriber_id, now=utcnow()):
            abort(404)
    return redirect(url_for("admin.subscriber", subscriber_id=subscriber_id), code=303)
