"""The Flask application factory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from tempfile import SpooledTemporaryFile

from celery import Celery
from flask import Flask, current_app, jsonify, render_template, request
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError, CSRFProtect
from sqlalchemy.exc import DataError, DBAPIError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, TooManyRequests
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from nurture.config import Settings
from nurture.db import database_problem
from nurture.handover import Handover
from nurture.models import MAX_ROW_ID
from nurture.ratelimit import RateLimiter
from nurture.sequences import Sequence, current_sequences
from nurture.tasks import make_celery

log = logging.getLogger(__name__)
csrf = CSRFProtect()

MAX_BODY = 64 * 1024  # no form or JSON body of ours comes near this
MAX_UPLOAD = 50 * 1024 * 1024  # a subscriber CSV in the admin
READ_SIZE = 64 * 1024  # a streamed body is read in pieces of this size


class RowIdConverter(IntegerConverter):
    """`<id:...>` in a route: a row id, at most MAX_ROW_ID.

    A larger number names no row, so the route is a 404 for it; asked for,
    PostgreSQL would refuse it as out of range and SQLite's driver could not
    even pass it on.
    """

    def __init__(self, url_map):
        super().__init__(url_map, max=MAX_ROW_ID)


@dataclass
class AppState:
    settings: Settings
    celery: Celery
    handover: Handover
    limiter: RateLimiter

    def sequences(self) -> dict[str, Sequence]:
        return current_sequences(self.settings.templates_path)


def state() -> AppState:
    return current_app.extensions["nurture"]


def limit(scope: str, value: str) -> None:
    """Refuse this request (429, with Retry-After) if its client is over `value`.

    `value` is in `limits` notation, e.g. `10 per minute;200 per day`; the
    client is the request's address (ProxyFix puts the real one there behind
    a trusted proxy).
    """
    client = request.remote_addr or "unknown"
    retry_after = state().limiter.hit(scope, client, value)
    if retry_after is not None:
        raise TooManyRequests(retry_after=retry_after)


def _hold_streamed_body_to_limit() -> None:
    """Refuse (413) a body sent without a length (chunked) that is over the limit.

    Werkzeug compares Content-Length with the limit before reading. A chunked
    body has none: Werkzeug reads it up to the limit and passes on what it
    got, so a JSON body over it arrived cut short (a 400) and a form lost its
    end without a word. Reading one byte past the limit here tells the two
    apart; a body within it is passed on from a spooled copy. Only where the
    server frames the body (`wsgi.input_terminated`, as gunicorn and
    Werkzeug's server do for chunked requests): elsewhere Werkzeug reads none.
    """
    environ = request.environ
    if "HTTP_TRANSFER_ENCODING" not in environ or "wsgi.input_terminated" not in environ:
        return  # nearly every request: a body with a length, or none
    limit = request.max_content_length
    if limit is None:
        return
    stream, size = environ["wsgi.input"], 0
    body = SpooledTemporaryFile(max_size=MAX_BODY)  # noqa: SIM115 (the request's from here on)
    while piece := stream.read(min(READ_SIZE, limit + 1 - size)):
        body.write(piece)
        size += len(piece)
    if size > limit:
        body.close()
        raise RequestEntityTooLarge()
    body.seek(0)
    environ["wsgi.input"] = body


class CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie session, except on the JSON API, which has none.

    API calls are signed or anonymous and never sign anyone in, so a session
    there is only cost: opening one (its serializer, the cookie's check) was
    about a twentieth of a signup's CPU under gunicorn.
    """

    def open_session(self, app, request):
        if request.path.startswith("/api/"):
            return None  # Flask puts its null session there
        return super().open_session(app, request)


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def json_object() -> dict | None:
    """The request body as a JSON object, or None when it is anything else.

    `get_json(silent=True)` turns malformed JSON into None, but JSON nested
    deeper than the parser can recurse raises RecursionError instead. That is
    a body we cannot use, like any other, not a fault of ours.
    """
    try:
        data = request.get_json(silent=True)
    except RecursionError:
        return None
    return data if isinstance(data, dict) else None


def not_a_json_object():
    """The API's answer to a body that is not a JSON object (see docs/decisions.md)."""
    return jsonify({"errors": {"body": 'Send a JSON object, e.g. {"email": ...}.'}}), 400


def create_app(settings: Settings, celery: Celery | None = None) -> Flask:
    app = Flask(__name__, instance_path=str(settings.instance_path))
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=MAX_BODY,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.base_url.startswith("https://"),
        WTF_CSRF_TIME_LIMIT=None,  # a signup form may sit open in a tab for hours
    )
    if settings.trusted_proxies:  # behind a reverse proxy, the client is in X-Forwarded-For
        app.wsgi_app = ProxyFix(
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies
        )

    @app.before_request
    def _limit_bodies():  # before CSRFProtect's check reads the form
        if request.endpoint == "admin.subscribers_import":
            request.max_content_length = MAX_UPLOAD
        _hold_streamed_body_to_limit()

    @app.after_request
    def _security_headers(response):
        """No page may be framed (clickjacking of the admin's and unsubscribe page's
        buttons), sniffed into another type, or send its path (the tokens in
        /confirm/ and /unsubscribe/ links) to another site; admin pages, which
        show subscribers' data, are not kept in any cache."""
        headers = response.headers
        headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "same-origin")
        if request.path.startswith("/admin"):
            headers["Cache-Control"] = "no-store"
        return response

    celery = celery or make_celery(settings)
    app.extensions["nurture"] = AppState(
        settings, celery, Handover(settings, celery), RateLimiter(settings.rate_limit_storage)
    )
    app.session_interface = CookieSessions()
    csrf.init_app(app)
    app.url_map.converters["id"] = RowIdConverter

    from nurture import admin, health, metrics, signup, tracking

    app.register_blueprint(signup.bp)
    app.register_blueprint(tracking.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(metrics.bp)
    _register_error_pages(app)
    return app


def _error(status: int, title: str, message: str, errors: dict | None = None):
    if wants_json():
        return jsonify({"errors": errors or {"request": message}}), status
    return render_template("error.html", title=title, message=message), status


def _register_error_pages(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def csrf_error(error):
        return _error(
            400,
            "Please try again",
            "This form was missing its security token (perhaps it was open too long). "
            "Go back, reload the page and send it again.",
        )

    @app.errorhandler(DBAPIError)
    def database_down(error):
        log.error("%s", database_problem(error))
        return _error(
            503,
            "We will be right back",
            "We cannot reach our database at the moment. Nothing you sent was lost; "
            "please try again in a minute.",
            {"service": "The database is unavailable; try again shortly."},
        )

    @app.errorhandler(DataError)
    def value_refused(error):
        """A value the database refused: a NUL byte in text, a number out of range.

        The routes check what they take in, so this is only the net below
        them. The database answered, so this is no outage (the handler above):
        the request is at fault, and gets a 400.
        """
        log.warning(
            "the database refused a value in %s %s: %s",
            request.method,
            request.path,
            error.orig or error,
        )
        return _error(
            400,
            "This request cannot be used",
            "Something in it cannot be stored or searched for, such as a control character "
            "in a text or a number out of range.",
        )

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        messages = {
            404: "There is nothing at this address.",
            405: "This address does not accept that kind of request.",
            413: f"The request body is too large (the limit is {MAX_BODY // 1024} KB).",
            429: "Too many requests from your network. Please wait a minute and try again.",
        }
        message = messages.get(error.code or 500, error.description or error.name)
        body, status = _error(error.code or 500, error.name, message)
        response = app.make_response((body, status))
        if status == 429:
            response.headers["Retry-After"] = str(getattr(error, "retry_after", None) or 60)
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "Something went wrong", "Something went wrong on our side.")
