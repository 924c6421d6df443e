"""Public pages: the signup form and API, confirmation, unsubscribe."""

from __future__ import annotations

import json
from datetime import datetime

from email_validator import EmailNotValidError
from flask import Blueprint, Response, jsonify, redirect, render_template, request, url_for
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from nurture import subscribers, tokens
from nurture.app import csrf, json_object, limit, not_a_json_object, state
from nurture.config import Settings
from nurture.db import is_postgresql, run_autocommit, session_scope
from nurture.models import utcnow
from nurture.sequences import Sequence, first_steps, manifest_errors
from nurture.subscribers import DEFAULT_SEQUENCE

bp = Blueprint("signup", __name__)

ACCEPTED = {
    "status": "accepted",
    "message": "Thanks. If this address can join, a confirmation email is on its way.",
}
ACCEPTED_JSON = json.dumps(ACCEPTED) + "\n"  # the same for every signup: serialized once


def _client_ip() -> str:
    return request.remote_addr or ""


def _record_signup(clean: dict[str, str], source: str, sequences: dict[str, Sequence]) -> None:
    """Store the signup, and note any confirmation email for the hand-over thread.

    The email is sent by a worker, never inside this request, and the request
    does not wait on the broker either. The delivery row is written already
    marked as handed over, and `handover` publishes it a moment later; if the
    broker refuses it, the mark is taken back and the next due-scan hands it
    over instead.
    """
    app_state = state()
    settings = app_state.settings
    now = utcnow()
    signup = subscribers.SignupRequest(
        email=clean["email"],
        first_name=clean.get("first_name", ""),
        timezone=clean["timezone"],
        sequence=clean["sequence"],
        source=source,
        consent_text=subscribers.consent_text(sequences[clean["sequence"]].title),
        ip=_client_ip(),
        user_agent=request.headers.get("User-Agent", ""),
    )
    delivery_id = _first_signup(settings, signup, now)
    if delivery_id is None:
        with session_scope(settings.database_url) as session:
            delivery_id = _signup(session, settings, signup, first_steps(sequences), now)
    if delivery_id is not None:
        app_state.handover.add(delivery_id, marked_at=now)


def _signup(
    session: Session,
    settings: Settings,
    signup: subscribers.SignupRequest,
    steps: dict[str, str],
    now: datetime,
) -> int | None:
    """Any signup, in a transaction committed before the confirmation is published.

    If the same address signed up at the same moment in another request (a
    double click), the insert conflicts: once that one is stored, the second
    try is a repeat signup.
    """

    def attempt() -> int | None:
        delivery_id = subscribers.signup(
            session, settings, signup, first_steps=steps, now=now, publishing=True
        )
        session.commit()  # the row exists before any worker can hear of it
        return delivery_id

    try:
        return attempt()
    except IntegrityError:
        session.rollback()
        return attempt()


def _first_signup(
    settings: Settings, signup: subscribers.SignupRequest, now: datetime
) -> int | None:
    """Write a first-time signup in one autocommitted statement, where that is possible.

    Most signups are new addresses. On PostgreSQL with double opt-in their five
    rows go in as one statement (`subscribers.first_signup`), which is atomic by
    itself: run on an autocommit connection it needs no BEGIN or COMMIT round
    trip, and no ORM session. Returns the delivery id, or None when the general
    path (`subscribers.signup`, in a transaction) must decide. The statement is
    safe to run twice (the second run finds the address and writes nothing), as
    `run_autocommit` asks.
    """
    if not settings.double_opt_in or not is_postgresql(settings.database_url):
        return None
    return run_autocommit(
        settings.database_url,
        lambda connection: subscribers.first_signup(
            connection, settings, signup, now=now, enqueued_at=now
        ),
    )


def _validate(data, sequences: dict[str, Sequence], *, strict_timezone: bool):
    return subscribers.validate_signup(
        data, sequences=frozenset(sequences), strict_timezone=strict_timezone
    )


def _form_page(values: dict, errors: dict, status: int = 200):
    """The signup form for the course `values` names (the main one by default), or
    the closed-course page if it is not served (removed, or its manifest never
    loaded in this process)."""
    sequence = state().sequences().get(values.get("sequence") or DEFAULT_SEQUENCE)
    if sequence is None:
        return _course_closed()
    page = render_template(
        "index.html",
        values=values,
        errors=errors,
        consent=subscribers.consent_text(sequence.title if sequence else ""),
        sequence=sequence if values.get("sequence") else None,
    )
    return page, status


@bp.get("/")
def index():
    return _form_page({}, {})


@bp.get("/join/<name>")
def join(name: str):
    """The signup form for any sequence, e.g. /join/career-switch-checklist."""
    return _form_page({"sequence": name}, {})


def _course_closed():
    """A 404 page for a form or link of a course that is not (or no longer) there.

    The form is not shown again: without its course it would be the main
    course's form, and a resubmit would sign the person up for a course whose
    consent text they never saw.
    """
    page = render_template(
        "error.html",
        title="This course is no longer open",
        message="The course this form is for no longer takes signups, so nothing was stored.",
    )
    return page, 404


def _signup_limit() -> None:
    """Each client address gets `SIGNUP_RATE_LIMIT` signups, form and API together."""
    limit("signup", state().settings.signup_rate_limit)


HONEYPOT = "website"  # a field people never see; bots fill it in


@bp.post("/subscribe")
def subscribe():
    _signup_limit()
    if request.form.get(HONEYPOT):
        return redirect(url_for("signup.thanks"), code=303)  # say nothing to the bot
    fields = ("email", "first_name", "timezone", "sequence")
    form = {key: request.form.get(key, "") for key in fields}
    sequences = state().sequences()  # read once per request
    clean, errors = _validate(form, sequences, strict_timezone=False)
    if "sequence" in errors:
        return _course_closed()
    if errors:
        return _form_page(form, errors, 422)
    _record_signup(clean, "form", sequences)
    return redirect(url_for("signup.thanks"), code=303)


@bp.get("/thanks")
def thanks():
    return render_template("thanks.html")


@bp.post("/api/v1/subscribers")
@csrf.exempt
def api_subscribe():
    _signup_limit()
    data = json_object()
    if data is None:
        return not_a_json_object()
    unknown = set(data) - {"email", "first_name", "timezone", "sequence"}
    sequences = state().sequences()  # read once per request
    clean, errors = _validate(data, sequences, strict_timezone=True)
    errors.update({field: "Unknown field." for field in sorted(unknown)})
    if errors:
        return jsonify({"errors": errors}), 422
    _record_signup(clean, "api", sequences)
    return Response(ACCEPTED_JSON, 202, mimetype="application/json")


@bp.get("/confirm/<token>")
def confirm(token: str):
    app_state = state()
    settings = app_state.settings
    try:
        subscriber_id, consent_id = tokens.read_confirm_token(
            settings.secret_key, token, settings.confirm_max_age
        )
    except tokens.TokenError as error:
        return _fresh_link_page(expired=error.expired), 410 if error.expired else 400
    sequences = app_state.sequences()
    # Courses whose manifest does not load and that this process never loaded.
    unserved = set(manifest_errors(settings.templates_path)) - set(sequences)
    with session_scope(settings.database_url) as session:
        if unserved and unserved & set(subscribers.pending_courses(session, subscriber_id)):
            return _course_being_updated()
        subscriber = subscribers.confirm(
            session,
            subscriber_id,
            now=utcnow(),
            first_steps=first_steps(sequences),
            consent_id=consent_id,
            min_gap=settings.min_gap,
        )
        confirmed = subscriber is not None
    if not confirmed:
        return _fresh_link_page(), 400
    return render_template("confirmed.html")


def _course_being_updated():
    """A 503 for a confirmation whose course's manifest does not load in this process.

    Confirming now would make the person active with a course that nothing starts
    later; the link keeps working, so they are asked to open it again.
    """
    page = render_template(
        "error.html",
        title="Please try again in a few minutes",
        message="The course you signed up for is being updated right now. Your "
        "confirmation link still works: open it again in a few minutes.",
    )
    return page, 503, {"Retry-After": "300"}


def _fresh_link_page(*, expired: bool = False, email: str = "", error: str = "") -> str:
    """The page of a confirmation link that expired or does not work, with its form."""
    days = state().settings.confirm_max_age // 86400
    return render_template(
        "confirm_invalid.html", expired=expired, days=days, email=email, error=error
    )


@bp.post("/confirm/resend")
def resend_confirmation():
    """The fresh-link form: the confirmation again, for what the person signed up for.

    The page it sits on names no course and shows no consent text, so it must
    not sign anyone up: it only sends a pending address its confirmation again
    (`subscribers.resend_confirmation_to`). It counts against the signup rate
    limit, since it sends mail too, and answers as a signup does whatever the
    address's history.
    """
    _signup_limit()
    typed = request.form.get("email", "").strip()
    if not typed:
        return _fresh_link_page(error="Please enter your email address."), 422
    try:
        email = subscribers.normalize_email(typed)
    except EmailNotValidError as error:
        return _fresh_link_page(email=typed[: subscribers.MAX_EMAIL], error=str(error)), 422
    app_state = state()
    settings = app_state.settings
    now = utcnow()
    with session_scope(settings.database_url) as session:
        delivery_id = subscribers.resend_confirmation_to(
            session, settings, email, now=now, publishing=True
        )
    if delivery_id is not None:  # committed: the hand-over thread may publish it
        app_state.handover.add(delivery_id, marked_at=now)
    return redirect(url_for("signup.thanks"), code=303)


def _unsubscribe_subscriber(token: str) -> int | None:
    try:
        return tokens.read_unsubscribe_token(state().settings.secret_key, token)
    except tokens.TokenError:
        return None


@bp.get("/unsubscribe/<token>")
def unsubscribe_page(token: str):
    """Only a page with a button: mail scanners fetch links, and must not unsubscribe."""
    if _unsubscribe_subscriber(token) is None:
        return render_template("unsubscribe_invalid.html"), 400
    return render_template("unsubscribe.html", token=token)


@bp.post("/unsubscribe/<token>")
@csrf.exempt  # RFC 8058: mail providers POST here without any token of ours
def unsubscribe(token: str):
    subscriber_id = _unsubscribe_subscriber(token)
    if subscriber_id is None:
        return render_template("unsubscribe_invalid.html"), 400
    one_click = request.form.get("List-Unsubscribe") == "One-Click"
    action = request.form.get("action", "")
    if not one_click and action not in ("unsubscribe", "pause", "resume"):
        return render_template("unsubscribe.html", token=token, missing_body=True), 400
    settings = state().settings
    with session_scope(settings.database_url) as session:
        if action == "pause" and not one_click:
            paused = subscribers.pause(
                session, subscriber_id, now=utcnow(), days_scale=settings.day_scale
            )
            return render_template("paused.html", paused=paused, token=token)
        if action == "resume" and not one_click:
            resumed = subscribers.resume(
                session, subscriber_id, now=utcnow(), days_scale=settings.day_scale
            )
            return render_template("resumed.html", resumed=resumed, token=token)
        subscribers.unsubscribe(
            session, subscriber_id, now=utcnow(), how="one-click" if one_click else "page"
        )
    return render_template("unsubscribed.html")
