"""What subscribers do with the emails: link clicks, conversions, complaints.

`GET /r/<token>` records a click and redirects to the link the email really
contained (the URL is inside the signed token). A click on the course link is
a conversion. `POST /api/v1/conversions` lets the enrollment system report one,
and `POST /api/v1/suppressions` the mail provider a complaint or a late bounce,
both signed with WEBHOOK_SECRET.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from email_validator import EmailNotValidError
from flask import Blueprint, Response, jsonify, redirect, render_template, request
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from nurture import subscribers, tokens
from nurture.app import csrf, json_object, not_a_json_object, state
from nurture.db import session_scope
from nurture.models import Delivery, Event, Subscriber, utcnow
from nurture.sequences import sales_steps

log = logging.getLogger(__name__)
bp = Blueprint("tracking", __name__)

SIGNATURE_HEADER = "X-Nurture-Signature"


def _record_click(delivery_id: int, url: str) -> None:
    app_state = state()
    settings = app_state.settings
    now = utcnow()
    with session_scope(settings.database_url) as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return
        session.add(
            Event(
                subscriber_id=delivery.subscriber_id,
                delivery_id=delivery_id,
                kind="click",
                detail=url[:2000],
                created_at=now,
            )
        )
        if url == settings.course_url:
            subscribers.convert(
                session,
                delivery.subscriber_id,
                now=now,
                source=f"click:{delivery.sequence}/{delivery.step}",
                sales_steps=sales_steps(app_state.sequences()),
                delivery_id=delivery_id,
            )


@bp.get("/r/<token>")
def click(token: str):
    try:
        delivery_id, url = tokens.read_click_token(state().settings.secret_key, token)
    except tokens.TokenError:
        return render_template(
            "error.html",
            title="This link does not work",
            message="It may have been cut short when it was copied. "
            "The link in the email itself still works.",
        ), 400
    try:
        _record_click(delivery_id, url)
    except DBAPIError as error:  # the reader still gets where they were going
        log.error("click on delivery %s not recorded: %s", delivery_id, error)
    return redirect(url, code=302)


#: A transparent 1x1 GIF.
PIXEL = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)


@bp.get("/o/<token>")
def open_pixel(token: str):
    """Record an open and answer with a transparent pixel, whatever happens."""
    settings = state().settings
    try:
        delivery_id = tokens.read_open_token(settings.secret_key, token)
    except tokens.TokenError:
        delivery_id = None
    if delivery_id is not None and settings.track_opens:
        try:
            with session_scope(settings.database_url) as session:
                delivery = session.get(Delivery, delivery_id)
                if delivery is not None:
                    session.add(
                        Event(
                            subscriber_id=delivery.subscriber_id,
                            delivery_id=delivery_id,
                            kind="open",
                            created_at=utcnow(),
                        )
                    )
        except DBAPIError as error:
            log.error("open of delivery %s not recorded: %s", delivery_id, error)
    response = Response(PIXEL, mimetype="image/gif")
    response.headers["Cache-Control"] = "no-store, private"
    return response


def _signature_ok(secret: str, body: bytes, header: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    # As bytes: compare_digest raises TypeError for a str that is not ASCII (a 500).
    return hmac.compare_digest(expected.encode(), header.strip().encode())


def _signed_report():
    """The webhooks' shared front: (the JSON object, the address as stored), or an error reply.

    The body must be signed with WEBHOOK_SECRET (header `X-Nurture-Signature:
    sha256=<HMAC-SHA256 of the body>`) and hold an `email`; without the secret
    set, the webhooks do not exist.
    """
    settings = state().settings
    if not settings.webhook_secret:
        return None, (jsonify({"errors": {"webhook": "Set WEBHOOK_SECRET to use webhooks."}}), 404)
    body = request.get_data(cache=True)
    if not _signature_ok(settings.webhook_secret, body, request.headers.get(SIGNATURE_HEADER, "")):
        failure = jsonify({"errors": {"signature": f"Missing or wrong {SIGNATURE_HEADER}."}})
        return None, (failure, 401)
    data = json_object()
    if data is None:
        return None, not_a_json_object()
    email = data.get("email")
    if not isinstance(email, str) or not email.strip():
        return None, (jsonify({"errors": {"email": 'Send {"email": ...}.'}}), 422)
    try:
        return (data, subscribers.normalize_email(email)), None  # as signup stored it
    except EmailNotValidError as error:
        return None, (jsonify({"errors": {"email": str(error)}}), 422)


@bp.post("/api/v1/conversions")
@csrf.exempt
def conversion_webhook():
    """`{"email": ...}`, signed: the enrollment system reports that someone took the course."""
    report, failure = _signed_report()
    if failure:
        return failure
    _, address = report
    with session_scope(state().settings.database_url) as session:
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == address))
        if subscriber_id is None:
            return jsonify({"errors": {"email": "No subscriber has this address."}}), 404
        converted = subscribers.convert(
            session,
            subscriber_id,
            now=utcnow(),
            source="webhook",
            sales_steps=sales_steps(state().sequences()),
        )
    return jsonify({"status": "converted", "enrollments": converted}), 200


@bp.post("/api/v1/suppressions")
@csrf.exempt
def suppression_webhook():
    """`{"email": ..., "reason": "complained" | "bounced"}`, signed: keep an address out for good.

    For what the mail provider reports after the send: a complaint from its
    feedback loop, or a bounce that came as a delivery report. An address that
    is no subscriber's is suppressed all the same (it may have been erased).
    """
    report, failure = _signed_report()
    if failure:
        return failure
    data, address = report
    reason = data.get("reason")
    if reason not in subscribers.REPORTS:
        choices = " or ".join(f'"{r}"' for r in subscribers.REPORTS)
        return jsonify({"errors": {"reason": f"Send a reason: {choices}."}}), 422
    with session_scope(state().settings.database_url) as session:
        known = subscribers.suppress_reported(
            session, address, reason, now=utcnow(), source="webhook"
        )
    return jsonify({"status": "suppressed", "reason": reason, "subscriber": known}), 200
