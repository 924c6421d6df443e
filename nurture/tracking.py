"""What subscribers do with the emails: link clicks, and conversions.

`GET /r/<token>` records a click and redirects to the link the email really
contained (the URL is inside the signed token). A click on the course link is
a conversion. `POST /api/v1/conversions` lets the enrollment system report one,
signed with WEBHOOK_SECRET.
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
    return hmac.compare_digest(expected, header.strip())


@bp.post("/api/v1/conversions")
@csrf.exempt
def conversion_webhook():
    """`{"email": ...}`, signed: header `X-Nurture-Signature: sha256=<HMAC-SHA256 of body>`."""
    app_state = state()
    settings = app_state.settings
    if not settings.webhook_secret:
        return jsonify({"errors": {"webhook": "Set WEBHOOK_SECRET to accept conversions."}}), 404
    body = request.get_data(cache=True)
    if not _signature_ok(settings.webhook_secret, body, request.headers.get(SIGNATURE_HEADER, "")):
        return jsonify({"errors": {"signature": f"Missing or wrong {SIGNATURE_HEADER}."}}), 401
    data = json_object()
    if data is None:
        return not_a_json_object()
    email = data.get("email")
    if not isinstance(email, str) or not email.strip():
        return jsonify({"errors": {"email": 'Send {"email": ...}.'}}), 422
    try:
        address = subscribers.normalize_email(email)  # as signup stored it
    except EmailNotValidError as error:
        return jsonify({"errors": {"email": str(error)}}), 422
    with session_scope(settings.database_url) as session:
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == address))
        if subscriber_id is None:
            return jsonify({"errors": {"email": "No subscriber has this address."}}), 404
        converted = subscribers.convert(
            session,
            subscriber_id,
            now=utcnow(),
            source="webhook",
            sales_steps=sales_steps(app_state.sequences()),
        )
    return jsonify({"status": "converted", "enrollments": converted}), 200
