"""Marketers' pages under /admin: sign-in, the sequences, previews, the dev outbox."""

from __future__ import annotations

from datetime import datetime, time
from functools import wraps
from pathlib import Path

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
from nurture.mailer import PermanentFailure, TemporaryFailure
from nurture.models import Consent, Delivery, Enrollment, Subscriber, User, utcnow
from nurture.preview import parts, preview_message, send_test
from nurture.render import LAYOUT_HTML, LAYOUT_TEXT, RenderError
from nurture.scheduler import plan, zone
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


def _previewed(sequence: str, step: str):
    """The sequence (None for the confirmation email), or 404 for an unknown email."""
    seq = state().sequences().get(sequence)
    if step != "confirmation" and (seq is None or seq.step(step) is None):
        abort(404)
    return seq


def _source_files(seq, step: str) -> list[Path]:
    """The files a preview is made of, to reload it when one changes."""
    root = state().settings.templates_path
    files = [root / LAYOUT_HTML, root / LAYOUT_TEXT, *sorted((root / "_snippets").glob("*"))]
    if seq is None:
        return [*files, root / "confirmation.md"]
    return [*files, seq.path / "sequence.toml", seq.path / seq.step(step).file]


@bp.get("/preview/<sequence>/<step>")
@login_required
def preview(sequence: str, step: str):
    seq = _previewed(sequence, step)
    first_name = request.args.get("first_name", "Alex")[:100]
    try:
        message = preview_message(state().settings, sequence, step, first_name=first_name)
    except RenderError as error:
        return render_template("admin/preview_error.html", error=str(error)), 422
    text, html = parts(message)
    return render_template(
        "admin/preview.html",
        sequence=sequence,
        step=step,
        label=f"{sequence}/{step}" if seq else step,
        message=message,
        text=text,
        html=html,
        first_name=first_name,
        sent=request.args.get("sent"),
    )


@bp.get("/preview/<sequence>/<step>.eml")
@login_required
def preview_eml(sequence: str, step: str):
    _previewed(sequence, step)
    first_name = request.args.get("first_name", "Alex")[:100]
    message = preview_message(state().settings, sequence, step, first_name=first_name)
    return Response(
        message.as_bytes(),
        mimetype="message/rfc822",
        headers={"Content-Disposition": f"attachment; filename={sequence}-{step}.eml"},
    )


@bp.get("/preview/<sequence>/<step>/stamp")
@login_required
def preview_stamp(sequence: str, step: str):
    """Changes whenever a file behind the preview changes; the page polls it."""
    seq = _previewed(sequence, step)
    stamps = [p.stat().st_mtime_ns for p in _source_files(seq, step) if p.exists()]
    return {"stamp": str(max(stamps, default=0))}


@bp.post("/preview/<sequence>/<step>/send-test")
@login_required
def preview_send_test(sequence: str, step: str):
    """Send this email to the signed-in marketer, marked [Test]."""
    _previewed(sequence, step)
    with session_scope(state().settings.database_url) as db:
        to = db.get(User, session["user_id"]).email
    try:
        send_test(state().settings, sequence, step, to)
    except (TemporaryFailure, PermanentFailure) as error:
        return render_template("admin/preview_error.html", error=f"Not sent: {error}"), 502
    return redirect(url_for("admin.preview", sequence=sequence, step=step, sent=to), code=303)


@bp.get("/sequences/<name>")
@login_required
def calendar(name: str):
    """The sequence as a calendar for a sample subscriber who confirms today at 08:00."""
    settings = state().settings
    seq = state().sequences().get(name)
    if seq is None:
        abort(404)
    timezone = request.args.get("timezone", settings.default_timezone)
    tz = zone(timezone)
    start = datetime.combine(utcnow().astimezone(tz).date(), time(8, 0), tzinfo=tz)
    sample = Enrollment(
        status="active", next_step=seq.first.key, next_due_at=start, started_at=start
    )
    rows = [
        (step, due.astimezone(tz), preview_message(settings, name, step.key)["Subject"])
        for step, due in plan(sample, seq, timezone, settings, start)
    ]
    return render_template("admin/calendar.html", sequence=seq, rows=rows, timezone=timezone)


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
