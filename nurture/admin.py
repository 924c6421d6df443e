"""Marketers' pages under /admin: sign-in, the sequences, previews, the dev outbox."""

from __future__ import annotations

import hmac
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from functools import wraps
from pathlib import Path

from flask import (
    Blueprint,
    Response,
    abort,
    g,
    json,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy import func, or_, select

from nurture import catcher, importer, privacy, stats, users
from nurture import subscribers as lifecycle
from nurture.app import limit, state
from nurture.db import session_scope
from nurture.lint import SUBJECT_WARN
from nurture.mailer import PermanentFailure, TemporaryFailure
from nurture.models import Consent, Enrollment, Subscriber, User, utcnow
from nurture.preview import inbox_preview, parts, preview_message, send_test
from nurture.publishing import published_sequences
from nurture.render import LAYOUT_HTML, LAYOUT_TEXT, RenderError
from nurture.scheduler import hand_over, plan, zone
from nurture.sequences import current_sequences, manifest_errors, within_templates
from nurture.subscribers import DEFAULT_SEQUENCE
from nurture.tasks import publisher
from nurture.timeline import timeline

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _role() -> str | None:
    """The signed-in user's role, read each request so a change applies at once.

    None, as for no sign-in, when the session was made before the account's
    password last changed, or before it last signed out (see `users.session_key`).
    """
    if "role" not in g:
        settings = state().settings
        user_id = session.get("user_id")
        with session_scope(settings.database_url) as db:
            user = db.get(User, user_id) if user_id else None
            valid = user is not None and hmac.compare_digest(
                str(session.get("key", "")), users.session_key(settings.secret_key, user)
            )
            g.role = user.role if valid else None
    return g.role


def requires(role: str):
    """Sign-in and at least `role` (viewer < editor < admin) for a view."""

    def decorate(view):
        @wraps(view)
        def wrapped(*args, **kwargs):
            current = _role()
            if current is None:
                session.clear()
                return redirect(url_for("admin.login", next=request.full_path))
            if not users.can(current, role):
                abort(403, f"This needs the {role} role.")
            return view(*args, **kwargs)

        return wrapped

    return decorate


login_required = requires("viewer")


@bp.app_context_processor
def _roles():
    return {"can": lambda needed: users.can(_role(), needed) if session.get("user_id") else False}


def _safe_next(target: str | None) -> str:
    """Only redirect to our own admin pages after login (no open redirect).

    Control characters are refused too: a line break cannot go in a header.
    """
    if (
        target
        and target.startswith("/admin")
        and not target.startswith("//")
        and target.isprintable()
    ):
        return target
    return url_for("admin.index")


LOGIN_RATE_LIMIT = "10 per minute"  # password guesses per client address


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        limit("login", LOGIN_RATE_LIMIT)
        settings = state().settings
        with session_scope(settings.database_url) as db:
            user = users.authenticate(
                db, request.form.get("email", ""), request.form.get("password", "")
            )
            user_id = user.id if user else None
            key = users.session_key(settings.secret_key, user) if user else None
        if user_id is not None:
            session.clear()
            session["user_id"] = user_id
            session["key"] = key
            return redirect(_safe_next(request.args.get("next")), code=303)
        error = "That email and password do not match an account."
    return render_template("admin/login.html", error=error), 401 if error else 200


@bp.post("/logout")
def logout():
    """Sign out here and everywhere else: every session of the account stops working.

    Clearing this browser's cookie alone would leave a copy of it (another
    device, a stolen cookie) signed in until it expired.
    """
    if _role() is not None:
        with session_scope(state().settings.database_url) as db:
            users.end_sessions(db, session["user_id"])
    session.clear()
    return redirect(url_for("admin.login"), code=303)


def _date_range() -> tuple[date, date]:
    """The dashboard's range from ?start=YYYY-MM-DD&end=YYYY-MM-DD, the last 30 days by default."""
    today = utcnow().date()
    try:
        end = date.fromisoformat(request.args.get("end", "")) if request.args.get("end") else today
        start = (
            date.fromisoformat(request.args["start"])
            if request.args.get("start")
            else end - timedelta(days=29)
        )
        if end == date.max:  # the range runs to the end of `end`: there is no day after it
            raise OverflowError(end)
    except (ValueError, OverflowError):  # OverflowError: a range off the end of the calendar
        abort(400, "Dates look like 2026-11-25.")
    if start > end:
        abort(400, "The start date is after the end date.")
    return start, end


@bp.get("/")
@login_required
def index():
    """The dashboard: per sequence and step, what went out and what readers did."""
    start, end = _date_range()
    since = datetime.combine(start, time(0), tzinfo=UTC)
    until = datetime.combine(end + timedelta(days=1), time(0), tzinfo=UTC)
    sequences = state().sequences()
    settings = state().settings
    with session_scope(settings.database_url) as db:
        # A sequence whose folder is gone, as the due-scan last ran it: its history stays.
        gone = {
            name: sequence
            for name, (sequence, _) in published_sequences(db).items()
            if name not in sequences
        }
        report = {
            name: (stats.step_stats(db, seq, since, until), stats.funnel(db, seq, since, until))
            for name, seq in {**sequences, **gone}.items()
        }
        held = stats.held_steps(db)
    shown = {**sequences, **{name: s for name, s in gone.items() if stats.any_count(*report[name])}}
    folder = settings.templates_path
    return render_template(
        "admin/index.html",
        sequences=shown,
        gone=set(gone),
        report=report,
        start=start,
        end=end,
        broken={
            name: within_templates(folder, message)
            for name, message in manifest_errors(folder).items()
        },
        held=[replace(h, reason=within_templates(folder, h.reason)) for h in held],
        retried=request.args.get("retried", type=int),
        horizon=settings.retry_horizon_hours,
    )


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


def _sample_name(sequence: str, step: str) -> str:
    """The preview's ?first_name=, or a 422 page for one no subscriber can have.

    Signups refuse control characters in a name, so no email carries them; a
    line break would not even fit in the To header the preview builds.
    """
    first_name = request.args.get("first_name", "Alex")[:100]
    if not first_name.isprintable():
        page = render_template(
            "admin/preview_error.html",
            error="A first name cannot contain line breaks or other control characters "
            "(signups refuse them, so no subscriber has one).",
            retry=url_for("admin.preview", sequence=sequence, step=step),
        )
        abort(Response(page, 422))
    return first_name


def _render_error(error: RenderError, reload: str | None = None):
    """The 422 page of an email that does not render, naming its file as the marketer
    knows it (within the templates folder); with `reload`, it reloads itself once a
    file behind the email changes, as the preview does."""
    message = within_templates(state().settings.templates_path, str(error))
    return render_template("admin/preview_error.html", error=message, reload=reload), 422


@bp.get("/preview/<sequence>/<step>")
@login_required
def preview(sequence: str, step: str):
    seq = _previewed(sequence, step)
    first_name = _sample_name(sequence, step)
    try:
        message = preview_message(state().settings, sequence, step, first_name=first_name)
    except RenderError as error:
        return _render_error(
            error, reload=url_for("admin.preview_stamp", sequence=sequence, step=step)
        )
    text, html = parts(message)
    return render_template(
        "admin/preview.html",
        sequence=sequence,
        step=step,
        label=f"{sequence}/{step}" if seq else step,
        message=message,
        text=text,
        html=html,
        inbox_line=inbox_preview(html),
        long_subject=len(message["Subject"]) > SUBJECT_WARN,
        subject_limit=SUBJECT_WARN,
        first_name=first_name,
        sent=request.args.get("sent"),
    )


@bp.get("/preview/<sequence>/<step>.eml")
@login_required
def preview_eml(sequence: str, step: str):
    _previewed(sequence, step)
    first_name = _sample_name(sequence, step)
    try:
        message = preview_message(state().settings, sequence, step, first_name=first_name)
    except RenderError as error:
        return _render_error(error)
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
@requires("editor")
def preview_send_test(sequence: str, step: str):
    """Send this email to the signed-in marketer, marked [Test]."""
    _previewed(sequence, step)
    with session_scope(state().settings.database_url) as db:
        to = db.get(User, session["user_id"]).email
    try:
        send_test(state().settings, sequence, step, to)
    except RenderError as error:
        return _render_error(error)
    except (TemporaryFailure, PermanentFailure) as error:
        return render_template("admin/preview_error.html", error=f"Not sent: {error}"), 502
    return redirect(url_for("admin.preview", sequence=sequence, step=step, sent=to), code=303)


def _subject(settings, sequence: str, step: str) -> str:
    """The email's subject, or what stops it from rendering."""
    try:
        return preview_message(settings, sequence, step)["Subject"]
    except RenderError as error:
        return f"Cannot render: {within_templates(settings.templates_path, str(error))}"


@bp.get("/sequences/<name>")
@login_required
def calendar(name: str):
    """The sequence as a calendar for a sample subscriber who confirms today at 08:00."""
    settings = state().settings
    seq = state().sequences().get(name)
    if seq is None:
        abort(404)
    asked = request.args.get("timezone", "").strip()
    unknown = bool(asked) and asked not in lifecycle.known_timezones()
    timezone = asked if asked and not unknown else settings.default_timezone
    tz = zone(timezone)
    start = datetime.combine(utcnow().astimezone(tz).date(), time(8, 0), tzinfo=tz)
    sample = Enrollment(
        status="active",
        next_step=seq.first.key,
        next_due_at=start,
        started_at=start,
        timezone=timezone,
    )
    rows = [
        (step, due.astimezone(tz), _subject(settings, name, step.key))
        for step, due in plan(sample, seq, settings, start)
    ]
    return render_template(
        "admin/calendar.html",
        sequence=seq,
        rows=rows,
        timezone=timezone,
        unknown=asked[:100] if unknown else None,
    )


@bp.get("/outbox")
@requires("editor")
def outbox():
    """The dev catcher's mail, for editors: it holds working confirmation and unsubscribe
    links of whoever signed up, which a viewer must not be able to use."""
    messages = catcher.list_outbox(state().settings.outbox_path)
    return render_template("admin/outbox.html", messages=messages)


@bp.get("/outbox/<name>")
@requires("editor")
def outbox_message(name: str):
    try:
        message = catcher.read_message(state().settings.outbox_path, name)
    except (FileNotFoundError, IsADirectoryError):
        abort(404)
    text, html = parts(message)
    headers = catcher.shown_headers(message)
    return render_template("admin/message.html", name=name, headers=headers, text=text, html=html)


PAGE_SIZE = 50


def _search_term(name: str) -> str:
    """A search parameter, or a 400 if it holds control characters.

    No stored name, address, status or sequence has any, and PostgreSQL
    refuses text with a NUL byte in it outright.
    """
    value = request.args.get(name, "")
    if not value.isprintable():
        abort(400, "Search terms cannot contain control characters.")
    return value


@bp.get("/subscribers")
@login_required
def subscribers():
    query = _search_term("q").strip()[:200]
    status = _search_term("status")
    statement = select(Subscriber).order_by(Subscriber.id.desc()).limit(PAGE_SIZE)
    if query:
        pattern = f"%{query.lower()}%"
        statement = statement.where(
            or_(Subscriber.email.like(pattern), func.lower(Subscriber.first_name).like(pattern))
        )
    if status:
        statement = statement.where(Subscriber.status == status)
    sequence = _search_term("sequence")
    if sequence:
        statement = statement.where(
            Subscriber.id.in_(
                select(Enrollment.subscriber_id).where(Enrollment.sequence == sequence)
            )
        )
    with session_scope(state().settings.database_url) as db:
        rows = db.scalars(statement).all()
    return render_template(
        "admin/subscribers.html",
        rows=rows,
        q=query,
        status=status,
        sequence=sequence,
        sequences=state().sequences(),
    )


@bp.get("/subscribers/export.csv")
@requires("admin")
def subscribers_export():
    with session_scope(state().settings.database_url) as db:
        body = importer.export_csv(db)
    return Response(
        body,
        mimetype="text/csv",
        headers={"Content-Disposition": "attachment; filename=subscribers.csv"},
    )


@bp.route("/subscribers/import", methods=["GET", "POST"])
@requires("admin")
def subscribers_import():
    sequences = state().sequences()
    chosen = request.form.get("sequence", DEFAULT_SEQUENCE)

    def import_page(report=None, error=None, status=200):
        """The form, with the courses to choose from (a typed name could be misspelt)."""
        page = render_template(
            "admin/import.html", report=report, error=error, sequences=sequences, chosen=chosen
        )
        return page, status

    if request.method == "GET":
        return import_page()
    upload = request.files.get("file")
    data = upload.read() if upload else b""
    settings = state().settings
    try:
        with session_scope(settings.database_url) as db:
            report = importer.import_subscribers(
                db,
                settings,
                sequences,
                data,
                now=utcnow(),
                sequence=chosen,
                confirmed=request.form.get("confirmed") == "yes",
                consent_note=request.form.get("consent_note", ""),
            )
    except importer.CSVError as error:
        return import_page(error=f"{error} (nothing was imported)", status=422)
    return import_page(report=report)


@bp.get("/subscribers/<id:subscriber_id>")
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
        courses = db.scalars(
            select(Enrollment)
            .where(Enrollment.subscriber_id == subscriber_id)
            .order_by(Enrollment.id)
        ).all()
        now = utcnow()
        line = timeline(db, settings, current_sequences(settings.templates_path), found.email, now)
        paused = lifecycle.paused_until(db, subscriber_id, now=now, days_scale=settings.day_scale)
    return render_template(
        "admin/subscriber.html",
        s=found,
        consents=consents,
        courses=courses,
        line=line,
        paused_until=paused,
    )


@bp.get("/subscribers/<id:subscriber_id>/export.json")
@requires("admin")
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


@bp.post("/held/retry")
@requires("editor")
def retry_held():
    """Try the emails held by a broken template again at the next due-scan."""
    with session_scope(state().settings.database_url) as db:
        count = stats.retry_held_now(db, utcnow())
    return redirect(url_for("admin.index", retried=count), code=303)


@bp.post("/subscribers/<id:subscriber_id>/erase")
@requires("admin")
def subscriber_erase(subscriber_id: int):
    if request.form.get("confirm") != "erase":
        abort(400, "Type erase to confirm.")
    settings = state().settings
    with session_scope(settings.database_url) as db:
        if not privacy.erase_on_request(
            db, subscriber_id, now=utcnow(), outbox=settings.outbox_path
        ):
            abort(404)
    return redirect(url_for("admin.subscriber", subscriber_id=subscriber_id), code=303)


@bp.post("/subscribers/<id:subscriber_id>/<action>")
@requires("editor")
def subscriber_action(subscriber_id: int, action: str):
    """Pause, resume, unsubscribe, or resend the confirmation, on a subscriber's behalf."""
    app_state = state()
    settings = app_state.settings
    now = utcnow()
    with session_scope(settings.database_url) as db:
        if db.get(Subscriber, subscriber_id) is None:
            abort(404)
        if action == "pause":
            lifecycle.pause(db, subscriber_id, now=now, days_scale=settings.day_scale)
        elif action == "resume":
            lifecycle.resume(db, subscriber_id, now=now, days_scale=settings.day_scale)
        elif action == "unsubscribe":
            lifecycle.unsubscribe(db, subscriber_id, now=now, how="admin")
        elif action == "resend-confirmation":
            delivery_id = lifecycle.resend_confirmation(db, settings, subscriber_id, now)
            db.commit()
            if delivery_id is not None:
                hand_over(db, [delivery_id], now, publisher(app_state.celery))
        else:
            abort(404)
    return redirect(url_for("admin.subscriber", subscriber_id=subscriber_id), code=303)


@bp.route("/users", methods=["GET", "POST"])
@requires("admin")
def users_page():
    error = None
    if request.method == "POST":
        try:
            with session_scope(state().settings.database_url) as db:
                users.add_user(
                    db,
                    request.form.get("email", ""),
                    request.form.get("password", ""),
                    request.form.get("role", "viewer"),
                )
        except users.UserError as problem:
            error = str(problem)
    with session_scope(state().settings.database_url) as db:
        accounts = db.scalars(select(User).order_by(User.email)).all()
    return render_template("admin/users.html", accounts=accounts, error=error), (
        422 if error else 200
    )
