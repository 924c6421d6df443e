"""The signup form and API: validation, consent, no enumeration, no mail in the request."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import urlencode

import flask
import pytest
from conftest import (
    BOTH_DATABASES,
    csrf_token,
    drop_every_connection,
    free_port,
    server_connection,
)
from flask.sessions import NullSession
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import make_url

from nurture import ROOT
from nurture.app import MAX_BODY, create_app
from nurture.db import session_scope
from nurture.models import (
    CONFIRMATION_STEP,
    Consent,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Subscriber,
    SubscriberStatus,
    utcnow,
)
from nurture.subscribers import CONSENT_TEXT, DEFAULT_SEQUENCE, latest_consent
from nurture.tokens import make_confirm_token, make_unsubscribe_token

API = "/api/v1/subscribers"
USER_AGENT = "Mozilla/5.0 (nurture tests)"
STATES = ("new", "pending", "confirmed", "gone")


# --- helpers -----------------------------------------------------------------------


def form_signup(client, email: str, first_name: str = "Ann", timezone: str = "Europe/Paris"):
    """Post the signup form as a browser would (with the CSRF token from the page)."""
    data = {
        "csrf_token": csrf_token(client),
        "email": email,
        "first_name": first_name,
        "timezone": timezone,
    }
    return client.post("/subscribe", data=data, headers={"User-Agent": USER_AGENT})


def api_signup(client, email: str, **fields):
    return client.post(API, json={"email": email, **fields})


def subscriber(settings, email: str) -> Subscriber | None:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Subscriber).where(Subscriber.email == email))


def count(settings, model, *where) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def confirmation_deliveries(settings, subscriber_id: int) -> list[Delivery]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(Delivery).where(
                    Delivery.subscriber_id == subscriber_id, Delivery.step == CONFIRMATION_STEP
                )
            )
        )


def confirm(client, settings, email: str) -> None:
    """Confirm through the real link, as the subscriber would."""
    with session_scope(settings.database_url) as session:
        sub = session.scalar(select(Subscriber).where(Subscriber.email == email))
        consent_id = latest_consent(session, sub.id).id
    token = make_confirm_token(settings.secret_key, sub.id, consent_id)
    assert client.get(f"/confirm/{token}").status_code == 200


def unsubscribe(client, settings, email: str) -> None:
    token = make_unsubscribe_token(settings.secret_key, subscriber(settings, email).id)
    assert client.post(f"/unsubscribe/{token}", data={"action": "unsubscribe"}).status_code == 200


# --- the form ----------------------------------------------------------------------


def test_landing_page_has_the_signup_form(client):
    response = client.get("/")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert re.search(r'<form[^>]+method="post"[^>]+action="/subscribe"', page)
    assert re.search(r'<input[^>]+name="email"', page)
    assert re.search(r'<input[^>]+name="first_name"', page)
    assert re.search(r'<input type="hidden" name="timezone"', page)
    assert re.search(r'<input type="hidden" name="csrf_token" value="[^"]+"', page)
    assert CONSENT_TEXT in page


@BOTH_DATABASES
def test_form_signup_stores_a_pending_subscriber_with_consent_and_no_mail(client, settings, smtp):
    response = form_signup(client, "ann@example.com", first_name="Ann")

    assert response.status_code == 303
    assert response.headers["Location"].endswith("/thanks")
    sub = subscriber(settings, "ann@example.com")
    assert sub is not None
    assert sub.status == SubscriberStatus.PENDING
    assert sub.first_name == "Ann"
    assert sub.timezone == "Europe/Paris"
    with session_scope(settings.database_url) as session:
        consents = list(session.scalars(select(Consent).where(Consent.subscriber_id == sub.id)))
        enrollments = list(
            session.scalars(select(Enrollment).where(Enrollment.subscriber_id == sub.id))
        )
    assert len(consents) == 1
    consent = consents[0]
    assert consent.source == "form"
    assert consent.consent_text == CONSENT_TEXT
    assert consent.ip == "127.0.0.1"
    assert consent.user_agent == USER_AGENT
    assert consent.created_at is not None
    assert consent.confirmed_at is None
    assert [(e.sequence, e.status) for e in enrollments] == [
        ("product-vs-project", EnrollmentStatus.PENDING)
    ]
    deliveries = confirmation_deliveries(settings, sub.id)
    assert [d.status for d in deliveries] == [DeliveryStatus.QUEUED]
    # The request only handed the delivery over; no worker runs, so nothing was sent.
    assert smtp.messages == []
    assert client.get("/thanks").status_code == 200


def test_form_without_csrf_token_is_refused(client, settings):
    response = client.post(
        "/subscribe", data={"email": "ann@example.com", "first_name": "Ann", "timezone": "UTC"}
    )
    page = response.get_data(as_text=True)

    assert response.status_code == 400
    assert response.mimetype == "text/html"
    assert "security token" in page
    assert "Traceback" not in page
    assert count(settings, Subscriber) == 0


@pytest.mark.parametrize(
    ("email", "first_name", "field"),
    [
        ("", "Ann", "email"),
        ("not-an-email", "Ann", "email"),
        ("a@example.com\r\nBcc: x@example.com", "Ann", "email"),
        ("a@example.com", "Ann\r\nBcc: x@example.com", "first_name"),
        ("a@example.com", "<script>alert(1)</script>", "first_name"),
        ("a@example.com", "A" * 101, "first_name"),
    ],
    ids=["missing-email", "not-an-email", "email-crlf", "name-crlf", "name-script", "name-long"],
)
def test_invalid_form_shows_the_form_again_with_a_message(
    client, settings, email, first_name, field
):
    response = form_signup(client, email, first_name=first_name)
    page = response.get_data(as_text=True)

    assert response.status_code == 422
    assert re.search(r'<input[^>]+name="email"', page), "the form is shown again"
    error_id = {"email": "email-error", "first_name": "first-name-error"}[field]
    other_id = {"email": "first-name-error", "first_name": "email-error"}[field]
    assert re.search(rf'<span class="error" id="{error_id}">[^<]+</span>', page)
    assert f'id="{other_id}"' not in page
    assert "<script>alert(1)" not in page
    if "script" in first_name:
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert count(settings, Subscriber) == 0


def test_a_course_form_is_titled_after_its_course(client):
    """The browser tab and a screen reader's first words name the course being joined."""
    joined = client.get("/join/career-switch-checklist").get_data(as_text=True)
    assert "<title>Career switch checklist</title>" in joined
    landing = client.get("/").get_data(as_text=True)
    assert "<title>Product manager or project manager?</title>" in landing


def test_form_with_unknown_time_zone_falls_back_to_default(client, settings):
    response = form_signup(client, "ann@example.com", timezone="Mars/Olympus_Mons")

    assert response.status_code == 303
    assert subscriber(settings, "ann@example.com").timezone == "UTC"


def test_api_rejects_unknown_time_zone(client, settings):
    response = api_signup(client, "ann@example.com", timezone="Mars/Olympus_Mons")

    assert response.status_code == 422
    assert set(response.get_json()["errors"]) == {"timezone"}
    assert count(settings, Subscriber) == 0


def age_confirmations(settings, email: str, minutes: int = 11) -> None:
    """Let the address's confirmation emails be older than the resend throttle."""
    with session_scope(settings.database_url) as session:
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        session.execute(
            update(Delivery)
            .where(Delivery.subscriber_id == subscriber_id)
            .values(created_at=utcnow() - timedelta(minutes=minutes))
        )


def zones(settings, email: str) -> tuple[str, list[str]]:
    """The subscriber's time zone and each of their enrollments'."""
    with session_scope(settings.database_url) as session:
        sub = session.scalar(select(Subscriber).where(Subscriber.email == email))
        enrollment_zones = session.scalars(
            select(Enrollment.timezone).where(Enrollment.subscriber_id == sub.id)
        )
        return sub.timezone, sorted(enrollment_zones)


@BOTH_DATABASES
def test_a_returning_signup_without_a_time_zone_keeps_the_stored_one(client, settings):
    email = "kenji@example.com"
    assert api_signup(client, email, first_name="Kenji", timezone="Asia/Tokyo").status_code == 202

    for sent in ("", "Mars/Olympus_Mons"):  # the browser sent none, or one nobody knows
        age_confirmations(settings, email)
        assert form_signup(client, email, first_name="Kenji", timezone=sent).status_code == 303
        assert zones(settings, email) == ("Asia/Tokyo", ["Asia/Tokyo"]), sent
    age_confirmations(settings, email)
    assert api_signup(client, email).status_code == 202
    assert zones(settings, email) == ("Asia/Tokyo", ["Asia/Tokyo"])

    age_confirmations(settings, email)
    moved = form_signup(client, email, first_name="Kenji", timezone="Europe/Paris")
    assert moved.status_code == 303
    assert zones(settings, email) == ("Europe/Paris", ["Europe/Paris"])
    assert len(confirmation_deliveries(settings, subscriber(settings, email).id)) == 5


def test_a_form_for_a_course_that_is_gone_says_so(client, settings):
    data = {
        "csrf_token": csrf_token(client),
        "email": "ann@example.com",
        "first_name": "Ann",
        "timezone": "UTC",
        "sequence": "nope",
    }

    response = client.post("/subscribe", data=data)

    page = response.get_data(as_text=True)
    assert response.status_code == 404
    assert "This course is no longer open" in page
    assert "\u201c\u201d" not in page, "no consent sentence for a course without a title"
    assert 'name="email"' not in page, "no form that would sign up for another course"
    assert count(settings, Subscriber) == 0
    joined = client.get("/join/nope")
    assert joined.status_code == 404
    assert "This course is no longer open" in joined.get_data(as_text=True)


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("\u0645\u062d\u0645\u062f\u200c\u0631\u0636\u0627", None),  # Persian, ZWNJ
        ("\u0dc1\u0dca\u200d\u0dbb\u0dd3", None),  # Sinhala, ZWJ
        ("\U0001f469\u200d\U0001f469\u200d\U0001f467 Ann", None),  # an emoji ZWJ sequence
        ("Anne\u00a0Marie", "Anne Marie"),  # a no-break space
        ("Jean\u202fLuc\u3000Li", "Jean Luc Li"),  # narrow no-break and ideographic spaces
    ],
    ids=["zwnj", "zwj", "emoji", "nbsp", "other-spaces"],
)
def test_names_with_joiners_and_no_break_spaces_are_welcome(client, settings, typed, stored):
    response = api_signup(client, "named@example.com", first_name=typed)

    assert response.status_code == 202, response.get_json()
    assert subscriber(settings, "named@example.com").first_name == (stored or typed)


@pytest.mark.parametrize(
    "name",
    [
        "Ann\u202eredli",  # right-to-left override
        "Ann\u202a",
        "\u200eAnn",  # left-to-right mark
        "Ann\u200f",
        "Ann\u2066x\u2069",  # isolates
        "Ann\ufeff",  # zero-width no-break space
        "Ann\u2028Bob",  # line separator
        "Ann\x07",
        "Ann\tBob",
    ],
    ids=["rlo", "lre", "lrm", "rlm", "isolate", "bom", "line-sep", "bell", "tab"],
)
def test_names_with_bidi_or_other_controls_are_refused(client, settings, name):
    response = api_signup(client, "named@example.com", first_name=name)

    assert response.status_code == 422
    assert set(response.get_json()["errors"]) == {"first_name"}
    assert count(settings, Subscriber) == 0


# --- the API -----------------------------------------------------------------------


@BOTH_DATABASES
def test_api_signup_is_accepted(client, settings, smtp):
    response = api_signup(client, "bob@example.com", first_name="Bob", timezone="Asia/Tokyo")

    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "accepted"
    assert body["message"]
    sub = subscriber(settings, "bob@example.com")
    assert (sub.status, sub.first_name, sub.timezone) == (
        SubscriberStatus.PENDING,
        "Bob",
        "Asia/Tokyo",
    )
    with session_scope(settings.database_url) as session:
        assert latest_consent(session, sub.id).source == "api"
    assert len(confirmation_deliveries(settings, sub.id)) == 1
    assert smtp.messages == []


def test_the_api_opens_no_session_and_pages_do(app):
    """API calls never sign anyone in, so their requests skip the cookie session
    (a twentieth of a signup's CPU); the pages, whose forms keep their CSRF token
    there, still have it."""
    with app.test_request_context(API, method="POST"):
        assert isinstance(flask.session, NullSession)
    with app.test_request_context("/"):
        assert not isinstance(flask.session, NullSession)
        flask.session["kept"] = True  # a page's session takes values


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"email": 5}, "email"),
        ({"email": "ann@example.com", "first_name": ["Ann"]}, "first_name"),
        ({"email": "ann@example.com", "sequence": "no-such-course"}, "sequence"),
        ({"email": "ann@example.com", "is_admin": True}, "is_admin"),
    ],
    ids=["bad-email", "email-not-text", "name-not-text", "unknown-sequence", "unknown-field"],
)
def test_api_invalid_fields_get_422_naming_the_field(client, settings, body, field):
    response = client.post(API, json=body)

    assert response.status_code == 422
    assert response.mimetype == "application/json"
    errors = response.get_json()["errors"]
    assert field in errors
    assert isinstance(errors[field], str) and errors[field]
    assert count(settings, Subscriber) == 0


#: Nested deeper than Python's JSON parser can recurse.
TOO_DEEP = '{"email": "ann@example.com", "first_name": ' + "[" * 1000 + "]" * 1000 + "}"


@pytest.mark.parametrize(
    "raw",
    ['{"email": "ann@example.com"', '["ann@example.com"]', '"ann@example.com"', "", TOO_DEEP],
    ids=["malformed", "array", "string", "empty", "nested-too-deep"],
)
def test_api_body_that_is_not_a_json_object_gets_400_json(client, settings, raw, caplog):
    response = client.post(API, data=raw, content_type="application/json")

    assert response.status_code == 400
    assert response.mimetype == "application/json"
    assert response.get_json() == {"errors": {"body": 'Send a JSON object, e.g. {"email": ...}.'}}
    assert count(settings, Subscriber) == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_api_huge_body_gets_413_json(client, settings):
    raw = '{"email": "ann@example.com", "first_name": "' + "A" * 200_000 + '"}'
    response = client.post(API, data=raw, content_type="application/json")

    assert response.status_code == 413
    assert response.mimetype == "application/json"
    errors = response.get_json()["errors"]
    assert "too large" in " ".join(errors.values())
    assert count(settings, Subscriber) == 0


@contextlib.contextmanager
def gunicorn(stack) -> Iterator[str]:
    """The service under a real gunicorn, as deployed; its base URL."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "gunicorn"), "web:app", "--workers", "1"]
    server = subprocess.Popen(
        [*command, "--bind", f"127.0.0.1:{port}"], cwd=ROOT, env=stack.process_env()
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # until gunicorn answers
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=5).close()
                break
            except urllib.error.HTTPError:
                break  # answered, only not healthy
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def post_chunked(opener, url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """POST `body` with Transfer-Encoding: chunked (no Content-Length); status and body."""
    request = urllib.request.Request(
        url, data=iter([body[:1000], body[1000:]]), headers={"Content-Type": content_type}
    )
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_chunked_bodies_over_the_limit_get_413_like_any_other(stack, settings):
    """Under gunicorn, a chunked body has no Content-Length to check up front; past
    64 KB it is still a 413, not a JSON body cut short (400) or a form losing its end."""
    padding = "x" * (MAX_BODY + 6 * 1024)  # a 70 KB body
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    with gunicorn(stack) as base:
        with opener.open(f"{base}/", timeout=10) as landing:
            token = re.search(r'name="csrf_token" value="([^"]+)"', landing.read().decode())[1]

        def form(email: str, extra: str = "") -> bytes:
            fields = {"csrf_token": token, "email": email, "timezone": "UTC", "note": extra}
            return urlencode(fields).encode()  # the fields first, anything long last

        api_big = json.dumps({"email": "big@example.com", "first_name": padding}).encode()
        status, answer = post_chunked(opener, f"{base}{API}", api_big, "application/json")
        assert status == 413, answer
        assert "too large" in json.dumps(json.loads(answer))

        form_big = form("bigform@example.com", padding)
        status, answer = post_chunked(
            opener, f"{base}/subscribe", form_big, "application/x-www-form-urlencoded"
        )
        assert status == 413, answer

        # Within the limit a chunked body is read whole, as before.
        api_small = ('{"email": "small@example.com"' + " " * 60_000 + "}").encode()
        status, answer = post_chunked(opener, f"{base}{API}", api_small, "application/json")
        assert status == 202, answer
        status, answer = post_chunked(
            opener,
            f"{base}/subscribe",
            form("smallform@example.com", "x" * 60_000),
            "application/x-www-form-urlencoded",
        )
        assert status == 200 and b"Check your inbox" in answer, answer  # after the 303

    assert subscriber(settings, "big@example.com") is None
    assert subscriber(settings, "bigform@example.com") is None
    assert subscriber(settings, "small@example.com") is not None
    assert subscriber(settings, "smallform@example.com") is not None


# --- no enumeration, throttling, options -------------------------------------------


def addresses_in_every_state(client, settings, prefix: str) -> list[str]:
    """A new, a pending, a confirmed and an unsubscribed address."""
    new, pending, confirmed, gone = (f"{prefix}-{kind}@example.com" for kind in STATES)
    api_signup(client, pending)
    api_signup(client, confirmed)
    confirm(client, settings, confirmed)
    api_signup(client, gone)
    confirm(client, settings, gone)
    unsubscribe(client, settings, gone)
    assert subscriber(settings, new) is None
    assert subscriber(settings, pending).status == SubscriberStatus.PENDING
    assert subscriber(settings, confirmed).status == SubscriberStatus.ACTIVE
    assert subscriber(settings, gone).status == SubscriberStatus.UNSUBSCRIBED
    return [new, pending, confirmed, gone]


@BOTH_DATABASES
def test_same_answer_whatever_the_address_history(stack):
    settings = stack.with_env(SIGNUP_RATE_LIMIT="100 per minute").settings  # 14 signups
    client = create_app(settings).test_client()
    api_answers = {
        (response.status_code, response.get_data())
        for response in (
            api_signup(client, email) for email in addresses_in_every_state(client, settings, "api")
        )
    }
    form_answers = {
        (response.status_code, response.headers.get("Location"), response.get_data())
        for response in (
            form_signup(client, email)
            for email in addresses_in_every_state(client, settings, "form")
        )
    }

    assert len(api_answers) == 1, api_answers
    assert next(iter(api_answers))[0] == 202
    assert len(form_answers) == 1, form_answers
    assert next(iter(form_answers))[0] == 303


@BOTH_DATABASES
def test_second_signup_within_ten_minutes_queues_no_second_confirmation(client, settings):
    assert api_signup(client, "ann@example.com").status_code == 202
    assert form_signup(client, "ann@example.com").status_code == 303

    sub = subscriber(settings, "ann@example.com")
    assert sub.status == SubscriberStatus.PENDING
    assert len(confirmation_deliveries(settings, sub.id)) == 1


@BOTH_DATABASES
def test_single_opt_in_activates_at_once(stack):
    single = stack.with_env(DOUBLE_OPT_IN="0")
    client = create_app(single.settings).test_client()

    assert api_signup(client, "ann@example.com").status_code == 202

    settings = single.settings
    sub = subscriber(settings, "ann@example.com")
    assert sub.status == SubscriberStatus.ACTIVE
    assert sub.confirmed_at is not None
    with session_scope(settings.database_url) as session:
        enrollment = session.scalar(select(Enrollment).where(Enrollment.subscriber_id == sub.id))
    assert enrollment.status == EnrollmentStatus.ACTIVE
    assert enrollment.next_step == "welcome"
    assert enrollment.next_due_at is not None
    assert confirmation_deliveries(settings, sub.id) == []


@BOTH_DATABASES
def test_email_case_does_not_make_a_second_subscriber(client, settings):
    assert api_signup(client, "Ann@Example.COM").status_code == 202
    assert form_signup(client, "ann@example.com").status_code == 303

    with session_scope(settings.database_url) as session:
        emails = list(session.scalars(select(Subscriber.email)))
    assert emails == ["ann@example.com"]


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
@pytest.mark.parametrize("first_path", ["transaction", "one statement"])
def test_the_same_address_at_the_same_moment_gets_the_same_answer(client, settings, first_path):
    """A double click: the second request's insert waits for the first, then conflicts.

    The first request's rows are written but not committed yet, by either way a
    signup is written (`signup` in a transaction, or `first_signup`).
    """
    from concurrent.futures import ThreadPoolExecutor

    from nurture.db import get_engine
    from nurture.models import utcnow
    from nurture.sequences import current_sequences, first_steps
    from nurture.subscribers import SignupRequest, first_signup, signup

    email = "twice@example.com"
    first = SignupRequest(
        email=email, first_name="Ann", timezone="UTC", sequence=DEFAULT_SEQUENCE, source="api"
    )
    steps = first_steps(current_sequences(settings.templates_path))
    with (
        get_engine(settings.database_url).connect() as connection,
        session_scope(settings.database_url) as session,
        ThreadPoolExecutor(1) as pool,
    ):
        if first_path == "transaction":
            signup(session, settings, first, first_steps=steps, now=utcnow())
        else:
            driver = connection.connection.driver_connection
            assert first_signup(driver, settings, first, now=utcnow()) is not None
        second = pool.submit(api_signup, client, email)
        with pytest.raises(TimeoutError):
            second.result(timeout=1)  # blocked on the first request's row
        session.commit()
        connection.connection.driver_connection.commit()
        response = second.result(timeout=10)

    assert response.status_code == 202, response.get_data(as_text=True)
    assert count(settings, Subscriber, Subscriber.email == email) == 1
    sub = subscriber(settings, email)
    assert sub.status == SubscriberStatus.PENDING
    assert len(confirmation_deliveries(settings, sub.id)) == 1
    assert count(settings, Consent, Consent.subscriber_id == sub.id) == 1


def pending_with_an_old_confirmation(client, settings, email: str) -> int:
    """A pending address whose last confirmation email is past the resend throttle."""
    assert api_signup(client, email).status_code == 202
    age_confirmations(settings, email)
    return subscriber(settings, email).id


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_a_repeat_signup_waits_for_one_in_progress(client, settings):
    """The ten-minute check runs under the subscriber's row lock.

    A repeat signup is written but not committed yet; another one for the
    same address waits for it, then finds its confirmation and sends none.
    """
    from concurrent.futures import ThreadPoolExecutor

    from nurture.models import utcnow
    from nurture.sequences import current_sequences, first_steps
    from nurture.subscribers import SignupRequest, signup

    email = "again@example.com"
    subscriber_id = pending_with_an_old_confirmation(client, settings, email)
    again = SignupRequest(  # the same values: no UPDATE of the row takes a lock for it
        email=email, first_name="", timezone="UTC", sequence=DEFAULT_SEQUENCE, source="api"
    )
    steps = first_steps(current_sequences(settings.templates_path))
    with session_scope(settings.database_url) as session, ThreadPoolExecutor(1) as pool:
        assert signup(session, settings, again, first_steps=steps, now=utcnow()) is not None
        second = pool.submit(api_signup, client, email)
        with pytest.raises(TimeoutError):
            second.result(timeout=1)  # blocked on the first signup's lock
        session.commit()
        response = second.result(timeout=10)

    assert response.status_code == 202
    assert len(confirmation_deliveries(settings, subscriber_id)) == 2
    assert count(settings, Consent, Consent.subscriber_id == subscriber_id) == 2


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_simultaneous_repeat_signups_send_one_confirmation(stack, settings):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(stack.with_env(SIGNUP_RATE_LIMIT="100 per minute").settings)
    email = "burst@example.com"
    subscriber_id = pending_with_an_old_confirmation(app.test_client(), settings, email)
    start = threading.Barrier(8)

    def sign_up_again(_):
        client = app.test_client()
        start.wait()
        return api_signup(client, email).status_code

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(sign_up_again, range(8)))

    assert answers == [202] * 8
    assert len(confirmation_deliveries(settings, subscriber_id)) == 2
    assert count(settings, Consent, Consent.subscriber_id == subscriber_id) == 2


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_the_one_statement_signup_writes_what_the_general_path_writes(settings):
    """A first signup on PostgreSQL takes one statement; its rows are those of `signup`."""
    from sqlalchemy import text

    from nurture.db import get_engine
    from nurture.models import utcnow
    from nurture.sequences import current_sequences, first_steps
    from nurture.subscribers import SignupRequest, first_signup, signup

    def request(email: str) -> SignupRequest:
        return SignupRequest(
            email=email,
            first_name="Ann",
            timezone="Europe/Paris",
            sequence=DEFAULT_SEQUENCE,
            source="api",
            consent_text=CONSENT_TEXT,
            ip="203.0.113.7",
            user_agent="x" * 600,  # cut to the column's 512, as on the general path
        )

    now = utcnow()
    steps = first_steps(current_sequences(settings.templates_path))
    with session_scope(settings.database_url) as session:
        general = signup(
            session,
            settings,
            request("general@example.com"),
            first_steps=steps,
            now=now,
            publishing=True,
        )
    with get_engine(settings.database_url).connect() as pooled:
        pooled.execution_options(isolation_level="AUTOCOMMIT")
        connection = pooled.connection.driver_connection  # as `run_autocommit` gives it
        one = first_signup(
            connection, settings, request("one@example.com"), now=now, enqueued_at=now
        )
        assert first_signup(connection, settings, request("one@example.com"), now=now) is None
        naive = now.replace(tzinfo=None)
        with pytest.raises(ValueError, match="naive datetime"):  # refused before it is sent
            first_signup(connection, settings, request("naive@example.com"), now=naive)
        with pytest.raises(ValueError, match="naive datetime"):
            first_signup(
                connection, settings, request("naive@example.com"), now=now, enqueued_at=naive
            )

    def rows(email: str) -> dict[str, list[tuple]]:
        """Every row of the address, without its ids, address and message id."""
        found: dict[str, list[tuple]] = {}
        with session_scope(settings.database_url) as session:
            sub_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
            for table in ("subscribers", "enrollments", "consents", "events", "deliveries"):
                column = "id" if table == "subscribers" else "subscriber_id"
                result = session.execute(
                    text(f"SELECT * FROM {table} WHERE {column} = :id"), {"id": sub_id}
                )
                skip = {"id", "subscriber_id", "email", "message_id"}
                found[table] = [
                    tuple(v for k, v in row._mapping.items() if k not in skip) for row in result
                ]
        return found

    assert one is not None and general is not None
    assert rows("one@example.com") == rows("general@example.com")
    with session_scope(settings.database_url) as session:
        delivery = session.get(Delivery, one)
        assert (delivery.step, delivery.status, delivery.enqueued_at) == (
            CONFIRMATION_STEP,
            DeliveryStatus.QUEUED,
            now,
        )


@BOTH_DATABASES
def test_a_confirmation_the_broker_refused_waits_for_the_due_scan(stack):
    """Broker down: the signup is still stored and answered, its confirmation not marked."""
    down = stack.with_env(BROKER_URL="redis://127.0.0.1:1/0")
    app = create_app(down.settings)

    response = api_signup(app.test_client(), "patient@example.com")
    app.extensions["nurture"].handover.close()  # its thread has tried the broker

    assert response.status_code == 202
    settings = down.settings
    sub = subscriber(settings, "patient@example.com")
    assert sub.status == SubscriberStatus.PENDING
    [confirmation] = confirmation_deliveries(settings, sub.id)
    assert confirmation.status == DeliveryStatus.QUEUED
    assert confirmation.enqueued_at is None  # the next due-scan hands it over


def test_publishing_to_redis_keeps_one_client_per_pool(stack):
    """The Redis channel reuses one client (kombu would build one per message)."""
    import base64
    import json

    import redis
    from conftest import REDIS_URL, require
    from kombu import Connection

    from nurture.tasks import KeptClientTransport, make_celery, publisher

    broker = require(REDIS_URL, "Redis")
    with Connection(broker, transport=KeptClientTransport) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        channel._disconnect_pools()  # what kombu does after a fork
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool

    settings = stack.with_env(BROKER_URL=broker).settings
    celery = make_celery(settings)
    with celery.connection_for_write() as connection:
        assert isinstance(connection.transport, KeptClientTransport)
    queue = settings.queue
    client = redis.Redis.from_url(broker)
    try:
        publish = publisher(celery)
        batch, huge = list(range(100, 150)), list(range(100_000, 101_000))
        publish([1])
        publish([2, 3])
        publish(batch)
        publish(huge)
        bodies = [json.loads(m) for m in reversed(client.lrange(queue, 0, -1))]
        assert [m["headers"]["task"] for m in bodies] == ["nurture.send_batch"] * 4
        shown = [m["headers"]["argsrepr"] for m in bodies]
        assert shown[:3] == ["[[1]]", "[[2, 3]]", str([batch])]
        assert len(shown[3]) == 1024 and shown[3].startswith("[[100000, 100001,")
        assert bodies[3]["body"] and json.loads(base64.b64decode(bodies[3]["body"]))[0] == [huge]
        assert [m["headers"]["kwargsrepr"] for m in bodies] == ["{}"] * 4
    finally:
        client.delete(queue)


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_a_signup_lands_on_the_first_try_after_the_database_restarted(client, settings):
    """A first-time signup's connection is not pinged first; a dead one is replaced,
    once, and the others the restart ended go with it (the retry does not take one)."""
    from nurture.db import autocommit_engine

    assert api_signup(client, "before@example.com").status_code == 202
    engine = autocommit_engine(settings.database_url)
    held = [engine.raw_connection() for _ in range(3)]  # three in the pool, as under load
    for pooled in held:
        pooled.close()
    assert drop_every_connection(settings.database_url) >= 3

    response = api_signup(client, "after@example.com")

    assert response.status_code == 202, response.get_data(as_text=True)
    assert subscriber(settings, "after@example.com").status == SubscriberStatus.PENDING
    assert count(settings, Delivery) == 2


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_a_database_that_refuses_the_signup_statement_gets_the_503_answer(client, settings, caplog):
    """The first-time signup runs on psycopg's connection; an error there is still
    the database's answer (a 503 and a log line, as for any statement), not a 500.
    Here the server has become read-only, as a replica does after a failover."""
    name = make_url(settings.database_url).database
    with server_connection() as server:
        server.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    try:
        drop_every_connection(settings.database_url)  # new connections take the setting
        response = api_signup(client, "readonly@example.com")
    finally:
        with server_connection() as server:
            server.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        drop_every_connection(settings.database_url)

    assert response.status_code == 503, response.get_data(as_text=True)
    assert "database is unavailable" in response.get_json()["errors"]["service"]
    assert "read-only transaction" in caplog.text
    assert subscriber(settings, "readonly@example.com") is None


def test_a_driver_statement_keeps_only_its_constants():
    """A value the caller must give is never filled in for it: left out, the driver
    refuses the statement instead of writing NULL."""
    from nurture.subscribers import _FIRST_SIGNUP

    _sql, constants = _FIRST_SIGNUP
    for given in ("now", "signup_email", "new_message_id", "enqueued", "email_hash"):
        assert given not in constants
    assert {"pending", "confirmation", "queued", "signup"} <= set(constants.values())
