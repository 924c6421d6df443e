"""Compliance: one-click unsubscribe, pause, suppression, consent evidence, data rights.

Everything runs on the real parts: a real database, a real SMTP server
(aiosmtpd), the Flask test client and the real `nurture` console script. Time
is passed in as `now` to the due-scan and the sender; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import smtplib
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest
from conftest import BOTH_DATABASES, csrf_token, free_port
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import func, select, update
from test_delivery import ScriptedServer
from test_engine import signed

import nurture
from nurture.app import create_app
from nurture.catcher import start_catcher
from nurture.config import ConfigError, load_settings
from nurture.db import session_scope
from nurture.delivery import claim, send_batch
from nurture.lint import lint_templates
from nurture.mailer import SMTPConnection, SMTPSettings
from nurture.models import (
    CONFIRMATION_STEP,
    Base,
    Consent,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Event,
    Subscriber,
    SubscriberStatus,
    Suppression,
    utcnow,
)
from nurture.privacy import EXPORTED, NOT_EXPORTED, erase, export_data, prune_unconfirmed
from nurture.scheduler import dispatch
from nurture.sequences import current_sequences, first_steps
from nurture.subscribers import (
    CONSENT_TEXT,
    CONSENT_VERSION,
    SignupRequest,
    confirm,
    latest_consent,
    resend_confirmation_to,
    signup,
    suppression_of,
)
from nurture.tasks import make_celery
from nurture.tokens import make_click_token, make_confirm_token, make_unsubscribe_token
from nurture.users import add_user

SEQUENCE = "product-vs-project"
COURSE_KEYS = [
    "welcome",
    "product-manager",
    "project-manager",
    "overlap",
    "which-fits",
    "six-month-course",
    "last-reminder",
]
API = "/api/v1/subscribers"
ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"
ADMIN = "admin@example.com"
PASSWORD = "a long enough password"
PAUSE = timedelta(days=14)


# --- helpers -----------------------------------------------------------------------


def tick(settings, now: datetime) -> list[int]:
    """One due-scan as of `now`; the delivery ids it handed to the workers."""
    ids: list[int] = []
    with session_scope(settings.database_url) as session:
        sequences = current_sequences(settings.templates_path)
        dispatch(session, settings, sequences, now=now, publish=ids.extend)
    return ids


def send(settings, ids: list[int], now: datetime):
    """What a worker does with the ids it was given, as of `now`."""
    with session_scope(settings.database_url) as session:
        sequences = current_sequences(settings.templates_path)
        return send_batch(session, settings, sequences, ids, clock=lambda: now)


def subscriber_id_of(settings, email: str) -> int | None:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Subscriber.id).where(Subscriber.email == email))


def subscriber(settings, subscriber_id: int) -> Subscriber:
    with session_scope(settings.database_url) as session:
        return session.get(Subscriber, subscriber_id)


def enrollment(settings, subscriber_id: int) -> Enrollment:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Enrollment).where(Enrollment.subscriber_id == subscriber_id))


def deliveries(settings, subscriber_id: int, step: str | None = None) -> list[Delivery]:
    query = select(Delivery).where(Delivery.subscriber_id == subscriber_id).order_by(Delivery.id)
    if step is not None:
        query = query.where(Delivery.step == step)
    with session_scope(settings.database_url) as session:
        return list(session.scalars(query))


def delivery(settings, delivery_id: int) -> Delivery:
    with session_scope(settings.database_url) as session:
        return session.get(Delivery, delivery_id)


def events(settings, subscriber_id: int, kind: str | None = None) -> list[Event]:
    query = select(Event).where(Event.subscriber_id == subscriber_id).order_by(Event.id)
    if kind is not None:
        query = query.where(Event.kind == kind)
    with session_scope(settings.database_url) as session:
        return list(session.scalars(query))


def count(settings, model, *where) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def database_rows(settings) -> dict[str, list[tuple]]:
    """Every row of every table, in primary-key order: a snapshot of all we hold."""
    with session_scope(settings.database_url) as session:
        return {
            table.name: [
                tuple(row)
                for row in session.execute(select(table).order_by(*table.primary_key.columns)).all()
            ]
            for table in Base.metadata.sorted_tables
        }


def places_holding(settings, *needles: str) -> list[str]:
    """`table.column` for every stored value that contains one of `needles`."""
    found = []
    with session_scope(settings.database_url) as session:
        for table in Base.metadata.sorted_tables:
            for row in session.execute(select(table)).mappings():
                for column, value in row.items():
                    text = str(value).lower()
                    if any(needle.lower() in text for needle in needles):
                        found.append(f"{table.name}.{column}")
    return found


def messages_to(smtp, email: str, step: str | None = None):
    """Received messages for `email`: course emails only, or the one `step` given."""
    found = []
    for message in smtp.messages:
        if email not in str(message["To"]):
            continue
        label = message["X-Nurture-Step"]
        if step is None and label != CONFIRMATION_STEP or label == step:
            found.append(message)
    return found


def course_steps(smtp, email: str) -> list[str]:
    return [m["X-Nurture-Step"].removeprefix(f"{SEQUENCE}/") for m in messages_to(smtp, email)]


def text_part(message) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


def html_part(message) -> str:
    return message.get_body(preferencelist=("html",)).get_content()


def link_in(message, route: str) -> str:
    """The one link to `route` (e.g. "/confirm/") in the email's text part."""
    links = set(re.findall(rf"https?://[^\s\"'<>()]+{route}[\w.-]+", text_part(message)))
    assert len(links) == 1, links
    return links.pop()


def path_of(url: str) -> str:
    return urlsplit(url).path


def api_signup(client, email: str, **fields):
    return client.post(API, json={"email": email, **fields})


def form_signup(client, email: str, **extra):
    """Post the landing page's form as a browser does (with its CSRF token)."""
    environ = extra.pop("environ_base", {})
    headers = extra.pop("headers", {})
    data = {
        "csrf_token": csrf_token(client),
        "email": email,
        "first_name": "",
        "timezone": "",
        **extra,
    }
    return client.post("/subscribe", data=data, headers=headers, environ_base=environ)


def send_confirmation(settings, smtp, email: str):
    """Let a worker send the newest confirmation email; return the message."""
    subscriber_id = subscriber_id_of(settings, email)
    newest = deliveries(settings, subscriber_id, CONFIRMATION_STEP)[-1]
    assert newest.status == DeliveryStatus.QUEUED and newest.enqueued_at is not None
    assert send(settings, [newest.id], utcnow()).sent == 1
    return messages_to(smtp, email, CONFIRMATION_STEP)[-1]


def join(client, settings, smtp, email: str, **fields) -> int:
    """Sign up through the API, receive the confirmation email and click its link."""
    assert api_signup(client, email, **fields).status_code == 202
    message = send_confirmation(settings, smtp, email)
    fresh = client.application.test_client()  # the mail client, not the signup page
    response = fresh.get(path_of(link_in(message, "/confirm/")))
    assert response.status_code == 200, response.get_data(as_text=True)
    subscriber_id = subscriber_id_of(settings, email)
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.ACTIVE
    return subscriber_id


def send_due(settings, subscriber_id: int) -> datetime:
    """Run the due-scan at the enrollment's due time and send what it hands out."""
    now = enrollment(settings, subscriber_id).next_due_at
    assert now is not None
    result = send(settings, tick(settings, now), now)
    assert result.sent == 1, result
    return now


def one_click(app, path: str, body: str = ONE_CLICK):
    """POST as Gmail does (RFC 8058): a fresh client, no cookies, no CSRF token."""
    return app.test_client().post(path, data=body, content_type=FORM)


def run_nurture(stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The real console script, as `python -m nurture`."""
    return subprocess.run(
        [sys.executable, "-m", "nurture", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=stack.process_env(),
        cwd=nurture.ROOT,
        timeout=60,
    )


def signed_in_admin(app, settings):
    with session_scope(settings.database_url) as session:
        add_user(session, ADMIN, PASSWORD)
    admin = app.test_client()
    login = {"csrf_token": csrf_token(admin, "/admin/login"), "email": ADMIN, "password": PASSWORD}
    assert admin.post("/admin/login", data=login).status_code == 303
    return admin


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- 1. One-click unsubscribe, as Gmail does it ------------------------------------


@BOTH_DATABASES
@pytest.mark.parametrize("worker_state", ["queued", "claimed"])
def test_one_click_unsubscribe_mid_course_stops_everything(
    app, client, settings, smtp, worker_state
):
    email = "ann@example.com"
    subscriber_id = join(client, settings, smtp, email, first_name="Ann")
    for _ in range(3):
        send_due(settings, subscriber_id)
    assert course_steps(smtp, email) == COURSE_KEYS[:3]

    last = messages_to(smtp, email)[-1]
    assert last["List-Unsubscribe-Post"] == ONE_CLICK
    header = re.fullmatch(r"<(https?://[^>]+)>", last["List-Unsubscribe"])
    assert header, last["List-Unsubscribe"]
    url = header.group(1)
    assert url.startswith(f"{settings.base_url}/unsubscribe/")

    # Step 4 is dispatched and handed to a worker, not sent yet; the worker may even
    # have claimed it already when the unsubscribe comes.
    due = enrollment(settings, subscriber_id).next_due_at
    [pending_id] = tick(settings, due)
    assert delivery(settings, pending_id).step == "overlap"
    lease = timedelta(minutes=5)
    if worker_state == "claimed":
        with session_scope(settings.database_url) as session:
            assert claim(session, pending_id, due, lease) is not None
        assert delivery(settings, pending_id).status == DeliveryStatus.SENDING

    response = one_click(app, path_of(url))

    assert 200 <= response.status_code < 300
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.UNSUBSCRIBED
    # The worker gets to it (or another takes over its lapsed claim) and checks again
    # just before SMTP: nothing goes out.
    later = due + lease + timedelta(minutes=1)
    result = send(settings, [pending_id], later)
    assert result.sent == 0
    assert delivery(settings, pending_id).status == DeliveryStatus.CANCELLED
    assert course_steps(smtp, email) == COURSE_KEYS[:3]

    received = len(smtp.messages)
    for hours in range(6, 8 * 24 + 1, 6):  # the rest of the week, every six hours
        now = later + timedelta(hours=hours)
        send(settings, tick(settings, now), now)
    assert len(smtp.messages) == received
    assert course_steps(smtp, email) == COURSE_KEYS[:3]
    sent = [d.step for d in deliveries(settings, subscriber_id) if d.status == DeliveryStatus.SENT]
    assert sent == [CONFIRMATION_STEP, *COURSE_KEYS[:3]]
    stopped = enrollment(settings, subscriber_id)
    assert stopped.status == EnrollmentStatus.STOPPED and stopped.next_due_at is None

    again = one_click(app, path_of(url))

    assert 200 <= again.status_code < 300
    assert [e.detail for e in events(settings, subscriber_id, "unsubscribe")] == ["one-click"]
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.UNSUBSCRIBED


# --- 2. List-Unsubscribe with a mailto ---------------------------------------------


def test_list_unsubscribe_offers_a_mailto_when_configured(stack, smtp):
    settings = stack.with_env(UNSUBSCRIBE_MAILTO="unsubscribe@nurture.test").settings
    app = create_app(settings)
    client = app.test_client()
    email = "ann@example.com"
    subscriber_id = join(client, settings, smtp, email)

    send_due(settings, subscriber_id)

    [welcome] = messages_to(smtp, email)
    token = make_unsubscribe_token(settings.secret_key, subscriber_id)
    assert welcome["List-Unsubscribe"] == (
        f"<http://nurture.test/unsubscribe/{token}>, "
        "<mailto:unsubscribe@nurture.test?subject=unsubscribe>"
    )
    assert welcome["List-Unsubscribe-Post"] == ONE_CLICK
    [confirmation] = messages_to(smtp, email, CONFIRMATION_STEP)
    assert confirmation["List-Unsubscribe"] is None  # transactional: no list headers
    assert one_click(app, f"/unsubscribe/{token}").status_code == 200


@pytest.mark.parametrize(
    "value",
    [
        "unsubscribe",
        "mailto:unsubscribe@nurture.test",
        "Unsubscribe <unsubscribe@nurture.test>",
        "unsubscribe@nurture.test, other@nurture.test",
        "@nurture.test",
        "un subscribe@nurture.test",
        "unsubscribe@nurture.test?subject=stop",
    ],
)
def test_a_bad_unsubscribe_mailto_is_a_config_error(tmp_path, value):
    environ = {"NURTURE_INSTANCE": str(tmp_path), "SECRET_KEY": "k", "UNSUBSCRIBE_MAILTO": value}

    with pytest.raises(ConfigError, match="UNSUBSCRIBE_MAILTO"):
        load_settings(environ)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("SMTP_URL", "smtp://mail.example.com:notaport", "port must be a number"),
        ("SMTP_URL", "smtp://mail.example.com:99999", "port must be a number"),
        ("SMTP_URL", "smtp://mail.example.com:25?timeout=abc", "timeout must be"),
        ("SMTP_URL", "smtp://mail.example.com:25?timeout=0", "timeout must be"),
        ("SMTP_URL", "smtp://mail.example.com:587?tls=tsl", "tls must be starttls or ssl"),
        ("SMTP_URL", "mail.example.com:25", "must look like smtp://host:port"),
        ("BASE_URL", "courses.example.com", "BASE_URL must be the site's address"),
        ("BASE_URL", "https://", "BASE_URL must be the site's address"),
        ("NURTURE_TEMPLATES", "/no/such/folder", "NURTURE_TEMPLATES: there is no folder"),
    ],
)
def test_settings_every_email_depends_on_are_checked_at_start(tmp_path, name, value, problem):
    """A malformed SMTP_URL failed every batch (a traceback per batch, the emails
    handed out again and again); a BASE_URL without its scheme put broken
    confirmation and unsubscribe links in every email; a missing templates folder
    failed every page. Each now stops start-up with one line."""
    environ = {"NURTURE_INSTANCE": str(tmp_path), "SECRET_KEY": "k", name: value}

    with pytest.raises(ConfigError, match=re.escape(problem)) as refused:
        load_settings(environ)
    assert "notaport" not in str(refused.value), "an SMTP_URL may hold a password: not echoed"


def test_good_smtp_and_base_urls_are_taken_as_given(tmp_path):
    settings = load_settings(
        {
            "NURTURE_INSTANCE": str(tmp_path),
            "SECRET_KEY": "k",
            "SMTP_URL": "smtps://user:p%40ss@mail.example.com?timeout=2.5",
            "BASE_URL": "https://courses.example.com/",
        }
    )
    assert settings.smtp_url == "smtps://user:p%40ss@mail.example.com?timeout=2.5"
    assert settings.base_url == "https://courses.example.com"


@pytest.mark.parametrize("value", ["Mars/Base", "utc+2", "Europe/"])
def test_an_unknown_default_time_zone_is_a_config_error(tmp_path, value):
    """Otherwise every signup without a zone would store it, and be scheduled in UTC."""
    environ = {"NURTURE_INSTANCE": str(tmp_path), "SECRET_KEY": "k", "DEFAULT_TIMEZONE": value}

    with pytest.raises(ConfigError, match="DEFAULT_TIMEZONE"):
        load_settings(environ)
    assert load_settings({**environ, "DEFAULT_TIMEZONE": "Asia/Tokyo"}).default_timezone


# --- 3. The footer link: unsubscribe or pause --------------------------------------


@BOTH_DATABASES
def test_footer_link_offers_a_pause_that_holds_the_course_without_skipping(
    app, client, settings, smtp
):
    email = "ann@example.com"
    subscriber_id = join(client, settings, smtp, email)
    send_due(settings, subscriber_id)
    [welcome] = messages_to(smtp, email)
    header_url = welcome["List-Unsubscribe"].strip("<>")
    footer = set(re.findall(r'href="([^"]*/unsubscribe/[^"]+)"', html_part(welcome)))
    assert footer == {header_url}, "the footer link is the unsubscribe URL, not a tracked one"
    assert link_in(welcome, "/unsubscribe/") == header_url
    path = path_of(header_url)
    before = database_rows(settings)

    page = app.test_client().get(path)

    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert html.count(f'<form method="post" action="{path}">') == 2
    assert 'name="action" value="unsubscribe"' in html
    assert 'name="action" value="pause"' in html
    assert database_rows(settings) == before, "a GET (a mail scanner) changes nothing"

    due = enrollment(settings, subscriber_id).next_due_at
    [queued_id] = tick(settings, due)  # product-manager, handed to a worker, not yet sent
    assert delivery(settings, queued_id).step == "product-manager"
    paused_at = utcnow()

    response = app.test_client().post(path, data={"action": "pause"}, content_type=FORM)

    assert response.status_code == 200
    assert "Your course is paused" in response.get_data(as_text=True)
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.ACTIVE
    held = enrollment(settings, subscriber_id)
    assert held.status == EnrollmentStatus.ACTIVE
    assert held.next_step == "product-manager"
    assert paused_at + PAUSE <= held.next_due_at <= utcnow() + PAUSE
    assert delivery(settings, queued_id).status == DeliveryStatus.CANCELLED
    assert len(events(settings, subscriber_id, "pause")) == 1
    assert events(settings, subscriber_id, "unsubscribe") == []

    assert send(settings, [queued_id], due).sent == 0  # the worker finds it taken back
    thirteen_days = paused_at + timedelta(days=13)
    send(settings, tick(settings, thirteen_days), thirteen_days)
    assert course_steps(smtp, email) == ["welcome"], "held for two weeks"

    fifteen_days = paused_at + timedelta(days=15)
    result = send(settings, tick(settings, fifteen_days), fifteen_days)

    assert result.sent == 1
    assert course_steps(smtp, email) == ["welcome", "product-manager"]
    while enrollment(settings, subscriber_id).next_due_at is not None:
        send_due(settings, subscriber_id)
    assert course_steps(smtp, email) == COURSE_KEYS, "nothing skipped, nothing twice"
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.ACTIVE
    assert enrollment(settings, subscriber_id).status == EnrollmentStatus.COMPLETED


@BOTH_DATABASES
def test_a_paused_course_can_be_resumed_by_its_subscriber_and_only_a_paused_one(
    app, client, settings, smtp
):
    """The paused page offers "resume now"; it ends the pause, once, and leaves a
    course that is not paused alone (it must not pull the next email forward)."""
    email = "ben@example.com"
    subscriber_id = join(client, settings, smtp, email)
    send_due(settings, subscriber_id)
    [welcome] = messages_to(smtp, email)
    path = path_of(link_in(welcome, "/unsubscribe/"))
    due = enrollment(settings, subscriber_id).next_due_at
    web = app.test_client()

    def post(action: str) -> str:
        response = web.post(path, data={"action": action}, content_type=FORM)
        assert response.status_code == 200
        return response.get_data(as_text=True)

    assert "Nothing to resume" in post("resume")
    assert enrollment(settings, subscriber_id).next_due_at == due, "not paused: left alone"

    paused_page = post("pause")
    assert f'<form method="post" action="{path}">' in paused_page
    assert 'name="action" value="resume"' in paused_page
    assert enrollment(settings, subscriber_id).next_due_at > due + timedelta(days=10)
    resumed_at = utcnow()

    assert "Your course continues" in post("resume")

    assert resumed_at <= enrollment(settings, subscriber_id).next_due_at <= utcnow()
    assert "Nothing to resume" in post("resume"), "a second click changes nothing"
    assert len(events(settings, subscriber_id, "resume")) == 1
    result = send(settings, tick(settings, due), due)
    assert result.sent == 1
    assert course_steps(smtp, email) == ["welcome", "product-manager"], "on its old day"

    # A later pause that has run out: the old paused page's button changes nothing.
    post("pause")
    with session_scope(settings.database_url) as session:
        for event in session.scalars(
            select(Event).where(
                Event.subscriber_id == subscriber_id, Event.kind.in_(("pause", "resume"))
            )
        ):
            event.created_at -= PAUSE + timedelta(days=1)  # as if two weeks and a day ago
        next_due = utcnow() + timedelta(hours=5)  # its email went out; the next is ahead
        session.get(Enrollment, enrollment(settings, subscriber_id).id).next_due_at = next_due
    assert "Nothing to resume" in post("resume")
    assert enrollment(settings, subscriber_id).next_due_at == next_due


# --- 4. Suppression and erasure ----------------------------------------------------


@BOTH_DATABASES
def test_bounced_address_stays_suppressed_and_erasure_keeps_only_a_hash(client, settings, smtp):
    email = "zephyrine.bounce@example.com"
    name = "Zephyrine"
    first = api_signup(client, email, first_name=name)
    assert first.status_code == 202
    subscriber_id = subscriber_id_of(settings, email)
    [confirmation] = deliveries(settings, subscriber_id)
    smtp.handler.refuse_with = f"550 5.1.1 <{email}>: Recipient address rejected: User unknown"

    assert send(settings, [confirmation.id], utcnow()).failed == 1

    smtp.handler.refuse_with = None
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.BOUNCED
    assert len(events(settings, subscriber_id, "bounce")) == 1
    fresh = api_signup(client, "someone.new@example.com")
    again = api_signup(client, email, first_name=name)
    assert (again.status_code, again.get_json()) == (fresh.status_code, fresh.get_json())
    by_form = form_signup(client, email)
    assert by_form.status_code == 303 and path_of(by_form.headers["Location"]) == "/thanks"
    assert len(deliveries(settings, subscriber_id)) == 1, "no new confirmation for a bounce"
    assert count(settings, Consent, Consent.subscriber_id == subscriber_id) == 1
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.BOUNCED
    event_count = len(events(settings, subscriber_id))

    with session_scope(settings.database_url) as session:
        assert erase(session, subscriber_id, now=utcnow())

    with session_scope(settings.database_url) as session:
        suppressions = session.execute(select(Suppression.email_hash, Suppression.reason)).all()
    assert [tuple(row) for row in suppressions] == [(sha256(email), "bounced")]
    erased = subscriber(settings, subscriber_id)
    assert erased.status == SubscriberStatus.ERASED
    row = database_rows(settings)["subscribers"]
    [erased_row] = [r for r in row if r[0] == subscriber_id]
    assert not any(email in str(v) or name in str(v) for v in erased_row), erased_row
    assert count(settings, Consent, Consent.subscriber_id == subscriber_id) == 0
    assert len(deliveries(settings, subscriber_id)) == 1, "anonymous counts stay"
    assert len(events(settings, subscriber_id)) >= event_count
    assert len(events(settings, subscriber_id, "bounce")) == 1

    total = count(settings, Delivery)
    again = api_signup(client, email, first_name=name)
    assert (again.status_code, again.get_json()) == (fresh.status_code, fresh.get_json())
    assert form_signup(client, email).status_code == 303
    assert subscriber_id_of(settings, email) is None
    assert count(settings, Delivery) == total, "an erased bounce is still never mailed"

    assert places_holding(settings, email, name) == [], "erasure left the address behind"


def test_complained_address_signing_up_again_gets_no_email(client, settings, smtp):
    email = "spam.button@example.com"
    subscriber_id = join(client, settings, smtp, email)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Subscriber)
            .where(Subscriber.id == subscriber_id)
            .values(status=SubscriberStatus.COMPLAINED)
        )
    total = count(settings, Delivery)
    fresh = api_signup(client, "someone.new@example.com")

    again = api_signup(client, email)
    by_form = form_signup(client, email)

    assert (again.status_code, again.get_json()) == (fresh.status_code, fresh.get_json())
    assert by_form.status_code == 303 and path_of(by_form.headers["Location"]) == "/thanks"
    assert count(settings, Delivery) == total + 1  # only the new address's confirmation
    assert len(deliveries(settings, subscriber_id, CONFIRMATION_STEP)) == 1
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.COMPLAINED


def report(hooked, body: dict):
    raw = json.dumps(body).encode()
    return hooked.post("/api/v1/suppressions", data=raw, headers=signed(raw))


@BOTH_DATABASES
def test_a_complaint_reported_by_webhook_stops_the_course_for_good(stack, client, settings, smtp):
    """A provider's feedback loop tells of the "spam" button after the send: by webhook."""
    email = "pressed.spam@example.com"
    subscriber_id = join(client, settings, smtp, email)
    now = enrollment(settings, subscriber_id).next_due_at
    handed_out = tick(settings, now)  # the first lesson is in a worker's queue
    assert len(handed_out) == 1
    hooked = create_app(stack.with_env(WEBHOOK_SECRET="s3cret").settings).test_client()
    complaint = {"email": email.upper(), "reason": "complained"}

    raw = json.dumps(complaint).encode()
    unsigned = hooked.post("/api/v1/suppressions", data=raw, headers=signed(raw, "wrong"))
    assert unsigned.status_code == 401
    unknown_reason = report(hooked, {"email": email, "reason": "annoyed"})
    assert unknown_reason.status_code == 422
    assert "reason" in unknown_reason.get_json()["errors"]
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.ACTIVE

    response = report(hooked, complaint)

    assert response.status_code == 200
    assert response.get_json() == {
        "status": "suppressed",
        "reason": "complained",
        "subscriber": True,
    }
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.COMPLAINED
    assert enrollment(settings, subscriber_id).status == EnrollmentStatus.STOPPED
    [queued] = [d for d in deliveries(settings, subscriber_id) if d.id in handed_out]
    assert (queued.status, queued.last_error) == (DeliveryStatus.CANCELLED, "complained (webhook)")
    [event] = events(settings, subscriber_id, "complaint")
    assert event.detail == "webhook"
    assert send(settings, handed_out, now).sent == 0
    assert course_steps(smtp, email) == []

    # Reported again, as a bounce this time: still the complaint, and still nothing sent.
    assert report(hooked, {"email": email, "reason": "bounced"}).status_code == 200
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.COMPLAINED
    total = count(settings, Delivery)
    assert api_signup(client, email).status_code == 202
    assert count(settings, Delivery) == total, "a complained address got a confirmation"


@BOTH_DATABASES
def test_a_bounce_reported_for_an_address_with_no_subscriber_keeps_it_out(stack, client, settings):
    """A late bounce may name an address erased since: its hash is kept all the same."""
    hooked = create_app(stack.with_env(WEBHOOK_SECRET="s3cret").settings).test_client()

    response = report(hooked, {"email": "Gone.Away@Example.com", "reason": "bounced"})

    assert response.status_code == 200
    assert response.get_json() == {"status": "suppressed", "reason": "bounced", "subscriber": False}
    with session_scope(settings.database_url) as session:
        assert suppression_of(session, "gone.away@example.com") == SubscriberStatus.BOUNCED
    total = count(settings, Delivery)
    assert api_signup(client, "gone.away@example.com").status_code == 202
    assert count(settings, Delivery) == total, "a bounced address got a confirmation"


def test_the_cli_suppresses_a_complaint_read_from_a_feedback_loop(stack, client, settings, smtp):
    email = "fbl@example.com"
    subscriber_id = join(client, settings, smtp, email)

    done = run_nurture(stack, "subscribers", "suppress", "FBL@example.com")

    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == "FBL@example.com is suppressed (complained); nothing more is sent to it"
    )
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.COMPLAINED
    assert enrollment(settings, subscriber_id).status == EnrollmentStatus.STOPPED
    [event] = events(settings, subscriber_id, "complaint")
    assert event.detail == "cli"

    nobody = run_nurture(
        stack, "subscribers", "suppress", "nobody@example.com", "--reason", "bounced"
    )
    assert nobody.returncode == 0, nobody.stderr
    assert "no subscriber has nobody@example.com" in nobody.stdout
    with session_scope(settings.database_url) as session:
        assert suppression_of(session, "nobody@example.com") == SubscriberStatus.BOUNCED

    typo = run_nurture(stack, "subscribers", "suppress", "not an address")
    assert typo.returncode == 1
    assert typo.stderr.count("\n") == 1 and "not an email address" in typo.stderr


@BOTH_DATABASES
def test_erasing_an_unsubscribed_address_can_be_undone_by_a_confirmed_signup(
    app, client, settings, smtp
):
    email = "comes.back@example.com"
    subscriber_id = join(client, settings, smtp, email)
    token = make_unsubscribe_token(settings.secret_key, subscriber_id)
    assert one_click(app, f"/unsubscribe/{token}").status_code == 200
    with session_scope(settings.database_url) as session:
        assert erase(session, subscriber_id, now=utcnow())
    with session_scope(settings.database_url) as session:
        reason = session.scalar(
            select(Suppression.reason).where(Suppression.email_hash == sha256(email))
        )
    assert reason in SubscriberStatus.REVERSIBLE
    assert subscriber_id_of(settings, email) is None

    assert api_signup(client, email).status_code == 202

    new_id = subscriber_id_of(settings, email)
    assert new_id is not None and new_id != subscriber_id
    assert subscriber(settings, new_id).status == SubscriberStatus.PENDING
    [confirmation] = deliveries(settings, new_id)
    assert (confirmation.step, confirmation.status) == (CONFIRMATION_STEP, DeliveryStatus.QUEUED)
    message = send_confirmation(settings, smtp, email)
    assert app.test_client().get(path_of(link_in(message, "/confirm/"))).status_code == 200
    assert subscriber(settings, new_id).status == SubscriberStatus.ACTIVE
    assert count(settings, Suppression, Suppression.email_hash == sha256(email)) == 0


# --- 5. Coming back after an unsubscribe -------------------------------------------


@BOTH_DATABASES
def test_signup_after_unsubscribe_needs_a_new_confirmation(app, client, settings, smtp):
    email = "ann@example.com"
    subscriber_id = join(client, settings, smtp, email)
    old_link = link_in(messages_to(smtp, email, CONFIRMATION_STEP)[0], "/confirm/")
    start = send_due(settings, subscriber_id)
    token = make_unsubscribe_token(settings.secret_key, subscriber_id)
    assert one_click(app, f"/unsubscribe/{token}").status_code == 200

    assert api_signup(client, email).status_code == 202

    assert subscriber_id_of(settings, email) == subscriber_id
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.PENDING
    assert enrollment(settings, subscriber_id).status == EnrollmentStatus.PENDING
    confirmations = deliveries(settings, subscriber_id, CONFIRMATION_STEP)
    assert [d.status for d in confirmations] == [DeliveryStatus.SENT, DeliveryStatus.QUEUED]

    for days in (1, 2, 3):  # not active until confirmed: only the confirmation goes out
        now = start + timedelta(days=days)
        send(settings, tick(settings, now), now)
    assert course_steps(smtp, email) == ["welcome"]
    [_, second] = messages_to(smtp, email, CONFIRMATION_STEP)
    new_link = link_in(second, "/confirm/")
    assert new_link != old_link
    assert app.test_client().get(path_of(old_link)).status_code == 400
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.PENDING

    assert app.test_client().get(path_of(new_link)).status_code == 200
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.ACTIVE
    assert enrollment(settings, subscriber_id).status == EnrollmentStatus.ACTIVE


# --- 6. Consent evidence, export and erasure ---------------------------------------


def test_consent_evidence_is_kept_exported_shown_and_erasable(stack, app, client, settings, smtp):
    email = "evidence@example.com"
    ip = "203.0.113.7"
    agent = "Mozilla/5.0 (X11; Linux x86_64) NurtureCompliance/1.0"
    signed_up = utcnow()
    response = form_signup(
        client,
        email,
        first_name="Evi",
        timezone="Europe/Paris",
        headers={"User-Agent": agent},
        environ_base={"REMOTE_ADDR": ip},
    )
    assert response.status_code == 303
    confirmation = send_confirmation(settings, smtp, email)
    assert app.test_client().get(path_of(link_in(confirmation, "/confirm/"))).status_code == 200
    confirmed = utcnow()
    subscriber_id = subscriber_id_of(settings, email)
    send_due(settings, subscriber_id)
    [welcome] = messages_to(smtp, email)

    with session_scope(settings.database_url) as session:
        data = export_data(session, subscriber_id)

    assert data["subscriber"]["email"] == email
    assert data["subscriber"]["first_name"] == "Evi"
    [consent] = data["consents"]
    assert consent["source"] == "form"
    assert consent["consent_text"] == CONSENT_TEXT
    assert consent["consent_version"] == CONSENT_VERSION
    assert consent["ip"] == ip
    assert consent["user_agent"] == agent
    signup_time = datetime.fromisoformat(consent["signed_up_at"])
    confirm_time = datetime.fromisoformat(consent["confirmed_at"])
    assert signed_up <= signup_time <= confirm_time <= confirmed
    assert data["subscriber"]["signed_up_at"] == consent["signed_up_at"]
    assert data["subscriber"]["confirmed_at"] == consent["confirmed_at"]
    emails = [(e["step"], e["status"], e["message_id"]) for e in data["emails"]]
    assert emails == [
        (CONFIRMATION_STEP, DeliveryStatus.SENT, confirmation["Message-ID"]),
        ("welcome", DeliveryStatus.SENT, welcome["Message-ID"]),
    ]
    assert all(e["sent_at"] for e in data["emails"])

    cli = run_nurture(stack, "subscribers", "export-data", email)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == data

    admin = signed_in_admin(app, settings)
    assert email in admin.get("/admin/subscribers").get_data(as_text=True)
    page = admin.get(f"/admin/subscribers/{subscriber_id}")
    shown = page.get_data(as_text=True)
    assert page.status_code == 200
    for evidence in (CONSENT_TEXT, CONSENT_VERSION, ip, agent):
        assert evidence in shown, evidence
    download = admin.get(f"/admin/subscribers/{subscriber_id}/export.json")
    assert download.status_code == 200
    assert download.mimetype == "application/json"
    assert "attachment" in download.headers["Content-Disposition"]
    assert json.loads(download.get_data(as_text=True)) == data

    token = re.search(r'name="csrf_token" value="([^"]+)"', shown).group(1)
    erase_path = f"/admin/subscribers/{subscriber_id}/erase"
    for typed in ({}, {"confirm": ""}, {"confirm": "yes"}, {"confirm": "ERASE please"}):
        refused = admin.post(erase_path, data={"csrf_token": token, **typed})
        assert refused.status_code == 400, typed
    with session_scope(settings.database_url) as session:
        assert export_data(session, subscriber_id) == data, "nothing erased"

    erased = admin.post(erase_path, data={"csrf_token": token, "confirm": "erase"})

    assert erased.status_code == 303
    with session_scope(settings.database_url) as session:
        after = export_data(session, subscriber_id)
    assert after["subscriber"]["status"] == SubscriberStatus.ERASED
    assert after["subscriber"]["email"] != email and after["subscriber"]["first_name"] == ""
    assert after["consents"] == []
    assert [e["step"] for e in after["emails"]] == [CONFIRMATION_STEP, "welcome"]
    shown = admin.get(f"/admin/subscribers/{subscriber_id}").get_data(as_text=True)
    assert ip not in shown and agent not in shown and email not in shown

    other = "cli.erase@example.com"
    assert api_signup(client, other).status_code == 202
    other_id = subscriber_id_of(settings, other)
    declined = run_nurture(stack, "subscribers", "erase", other, stdin="n\n")
    assert declined.returncode != 0
    assert subscriber(settings, other_id).status == SubscriberStatus.PENDING
    assert count(settings, Consent, Consent.subscriber_id == other_id) == 1

    done = run_nurture(stack, "subscribers", "erase", other.upper(), "--yes")

    assert done.returncode == 0, done.stderr
    assert subscriber(settings, other_id).status == SubscriberStatus.ERASED
    assert count(settings, Consent, Consent.subscriber_id == other_id) == 0
    for args in (("export-data", "nobody@example.com"), ("erase", "nobody@example.com", "--yes")):
        unknown = run_nurture(stack, "subscribers", *args)
        assert unknown.returncode != 0, args
        assert "no subscriber has the address nobody@example.com" in unknown.stderr
        assert "Traceback" not in unknown.stderr
    gone = run_nurture(stack, "subscribers", "export-data", email)
    assert gone.returncode != 0 and "no subscriber has the address" in gone.stderr

    # An international domain is found as typed, in either form and any case.
    assert api_signup(client, "idn@b\u00fccher.example").status_code == 202
    found = run_nurture(stack, "subscribers", "export-data", " IDN@B\u00dcCHER.example")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["subscriber"]["email"] == "idn@xn--bcher-kva.example"


# --- 7. Confirmation links expire --------------------------------------------------


def test_the_export_shows_every_column_held_about_the_person_or_says_why_not():
    """A column added later must be exported or named as machinery, not forgotten."""
    for model, exported in EXPORTED.items():
        columns = {column.name for column in model.__table__.columns}
        missing = columns - set(exported) - set(NOT_EXPORTED)
        assert not missing, f"{model.__tablename__}: {sorted(missing)} neither exported nor excused"
        assert set(exported) <= columns, model.__tablename__
    person = {
        table.name
        for table in Base.metadata.sorted_tables
        if "subscriber_id" in table.columns or table.name == "subscribers"
    }
    assert person == {model.__tablename__ for model in EXPORTED}, "a table about the person"


def signed_up(settings, email: str, now: datetime) -> int:
    """A form signup at `now`, waiting for its confirmation; the subscriber's id."""
    request = SignupRequest(email, "Pat", "UTC", SEQUENCE, "form", ip="198.51.100.7")
    sequences = current_sequences(settings.templates_path)
    with session_scope(settings.database_url) as session:
        signup(session, settings, request, first_steps=first_steps(sequences), now=now)
    return subscriber_id_of(settings, email)


@BOTH_DATABASES
def test_signups_never_confirmed_are_erased_after_their_retention(client, settings, smtp):
    t0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    keep = timedelta(days=30)
    never = signed_up(settings, "never.clicked@example.com", t0)
    confirmed = signed_up(settings, "did.click@example.com", t0)
    with session_scope(settings.database_url) as session:
        starts = first_steps(current_sequences(settings.templates_path))
        assert confirm(session, confirmed, now=t0, first_steps=starts)
    fresh_link = signed_up(settings, "asked.again@example.com", t0)
    with session_scope(settings.database_url) as session:
        later = t0 + timedelta(days=20)
        assert resend_confirmation_to(session, settings, "asked.again@example.com", now=later)
    recent = signed_up(settings, "signed.up.lately@example.com", t0 + timedelta(days=25))
    kept = {i: subscriber(settings, i).status for i in (confirmed, fresh_link, recent)}

    with session_scope(settings.database_url) as session:
        assert prune_unconfirmed(session, now=t0 + keep - timedelta(minutes=1), keep=keep) == 0
        assert prune_unconfirmed(session, now=t0 + keep + timedelta(minutes=1), keep=keep) == 1

    assert subscriber(settings, never).status == SubscriberStatus.ERASED
    assert places_holding(settings, "never.clicked", "Pat") == ["subscribers.first_name"] * 3
    assert places_holding(settings, "198.51.100.7") == ["consents.ip"] * 3, "the kept ones'"
    assert count(settings, Consent, Consent.subscriber_id == never) == 0
    [erased] = events(settings, never, "erase")
    assert erased.detail == "never confirmed"
    assert [d.status for d in deliveries(settings, never)] == [DeliveryStatus.CANCELLED]
    assert {i: subscriber(settings, i).status for i in kept} == kept
    with session_scope(settings.database_url) as session:
        assert suppression_of(session, "never.clicked@example.com") is None
    # The address never asked for anything, so nothing keeps it out.
    assert api_signup(client, "never.clicked@example.com").status_code == 202
    again = subscriber_id_of(settings, "never.clicked@example.com")
    assert again != never and len(deliveries(settings, again, CONFIRMATION_STEP)) == 1


def test_prune_runs_from_the_cli_and_the_beat(stack, settings):
    t0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    never = signed_up(settings, "never.clicked@example.com", t0)
    assert "nurture.prune" in {
        entry["task"] for entry in make_celery(settings).conf.beat_schedule.values()
    }

    early = run_nurture(stack, "prune", "--now", (t0 + timedelta(days=29)).isoformat())
    assert (early.returncode, early.stdout) == (0, "erased 0 signups never confirmed\n")
    done = run_nurture(stack, "prune", "--now", (t0 + timedelta(days=31)).isoformat())
    assert (done.returncode, done.stdout) == (0, "erased 1 signups never confirmed\n")
    assert subscriber(settings, never).status == SubscriberStatus.ERASED

    # A --now in the future (a mistyped year) would erase today's signups: it asks first.
    today = signed_up(settings, "today@example.com", utcnow())
    at = utcnow() + timedelta(days=400)
    future = at.astimezone(timezone(timedelta(hours=5))).isoformat()  # given in UTC+5
    refused = run_nurture(stack, "prune", "--now", future)
    assert refused.returncode == 1 and "is in the future" in refused.stdout, refused
    assert f"--now {at:%Y-%m-%d %H:%M} UTC" in refused.stdout, "said in UTC"
    assert "Aborted" in refused.stderr
    assert subscriber(settings, today).status == SubscriberStatus.PENDING
    meant = run_nurture(stack, "prune", "--now", future, "--yes")
    assert (meant.returncode, meant.stdout) == (0, "erased 1 signups never confirmed\n")
    assert subscriber(settings, today).status == SubscriberStatus.ERASED

    kept_for_good = stack.with_env(UNCONFIRMED_RETENTION_DAYS="0")
    off = run_nurture(kept_for_good, "prune")
    assert off.stdout == "UNCONFIRMED_RETENTION_DAYS is 0: unconfirmed signups are kept\n"


@pytest.mark.parametrize(
    ("value", "problem"),
    [("3", "at least CONFIRM_MAX_AGE_DAYS"), ("a month", "must be a whole number")],
)
def test_a_retention_shorter_than_a_confirmation_link_is_a_config_error(tmp_path, value, problem):
    environ = {"NURTURE_INSTANCE": str(tmp_path), "UNCONFIRMED_RETENTION_DAYS": value}
    with pytest.raises(ConfigError, match=problem):
        load_settings(environ)
    assert load_settings({**environ, "UNCONFIRMED_RETENTION_DAYS": "0"}).unconfirmed_retention == 0


def catch(outbox, *recipients: str) -> None:
    """One message to each recipient through the real dev catcher, which files it in `outbox`."""
    port = free_port()
    controller = start_catcher(outbox, "127.0.0.1", port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as connection:
            for recipient in recipients:
                message = EmailMessage()
                message["From"], message["To"] = "course@nurture.test", recipient
                message["Subject"] = "Day 1"
                message.set_content(f"Hi, {recipient}")
                connection.send_message(message)
    finally:
        controller.stop()


def test_erasure_reaches_the_dev_outbox(stack, app, client, settings, smtp):
    """In development and the compose setup, the catcher holds the person's emails."""
    ann = join(client, settings, smtp, "ann@example.com")
    bob = join(client, settings, smtp, "bob@example.com")
    catch(settings.outbox_path, "Ann <ANN@example.com>", "bob@example.com", "ann@example.com")
    assert len(list(settings.outbox_path.glob("*.eml"))) == 3

    admin = signed_in_admin(app, settings)
    token = csrf_token(admin, f"/admin/subscribers/{ann}")
    erase_path = f"/admin/subscribers/{ann}/erase"
    assert admin.post(erase_path, data={"csrf_token": token, "confirm": "erase"}).status_code == 303

    left = [path.read_text() for path in settings.outbox_path.glob("*.eml")]
    assert len(left) == 1 and "bob@example.com" in left[0]
    assert run_nurture(stack, "subscribers", "erase", "bob@example.com", "--yes").returncode == 0
    assert list(settings.outbox_path.glob("*.eml")) == []
    assert subscriber(settings, bob).status == SubscriberStatus.ERASED


def expired_confirm_token(secret: str, subscriber_id: int, consent_id: int, age: int) -> str:
    class OldSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - age

    serializer = URLSafeTimedSerializer(secret, salt="confirm", signer=OldSigner)
    return serializer.dumps([subscriber_id, consent_id])


def test_expired_confirmation_offers_a_fresh_link(stack, smtp):
    settings = stack.with_env(CONFIRM_MAX_AGE_DAYS="3").settings
    app = create_app(settings)
    email = "slow.reader@example.com"
    assert api_signup(app.test_client(), email).status_code == 202
    first = send_confirmation(settings, smtp, email)
    assert "The link works for 3 days." in text_part(first)
    assert "3 days" in html_part(first)
    subscriber_id = subscriber_id_of(settings, email)
    with session_scope(settings.database_url) as session:
        consent_id = latest_consent(session, subscriber_id).id
        session.execute(  # the signup was four days ago
            update(Delivery)
            .where(Delivery.subscriber_id == subscriber_id)
            .values(created_at=utcnow() - timedelta(days=4))
        )
    token = expired_confirm_token(settings.secret_key, subscriber_id, consent_id, 3 * 86400 + 60)
    visitor = app.test_client()

    response = visitor.get(f"/confirm/{token}")

    page = response.get_data(as_text=True)
    assert response.status_code == 410
    assert "expired" in page and "3 days" in page
    form = re.search(r'<form method="post" action="([^"]+)"', page)
    assert form and form.group(1) == "/confirm/resend"
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf, "the form carries a CSRF token"
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.PENDING

    resent = visitor.post(form.group(1), data={"csrf_token": csrf.group(1), "email": email})

    assert resent.status_code == 303
    confirmations = deliveries(settings, subscriber_id, CONFIRMATION_STEP)
    assert [d.status for d in confirmations] == [DeliveryStatus.SENT, DeliveryStatus.QUEUED]
    second = send_confirmation(settings, smtp, email)
    assert "The link works for 3 days." in text_part(second)
    assert app.test_client().get(path_of(link_in(second, "/confirm/"))).status_code == 200
    assert subscriber(settings, subscriber_id).status == SubscriberStatus.ACTIVE


# --- 8. Signup abuse ---------------------------------------------------------------


def test_signups_are_rate_limited_per_address(stack):
    """The form and the API share one count per client address: alternating does not help."""
    settings = stack.with_env(SIGNUP_RATE_LIMIT="3 per minute").settings
    app = create_app(settings)
    client = app.test_client()
    assert api_signup(client, "api0@example.com").status_code == 202
    assert api_signup(client, "api1@example.com").status_code == 202
    assert form_signup(client, "form0@example.com").status_code == 303

    refused = api_signup(client, "api-refused@example.com")
    refused_form = form_signup(client, "form-refused@example.com")

    assert refused.status_code == 429
    assert refused.is_json and refused.get_json()["errors"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60, "within the minute of the limit"
    page = refused_form.get_data(as_text=True)
    assert refused_form.status_code == 429
    assert refused_form.mimetype == "text/html"
    assert "Too many requests" in page and "Traceback" not in page
    assert 1 <= int(refused_form.headers["Retry-After"]) <= 60

    elsewhere = {"REMOTE_ADDR": "198.51.100.23"}
    other = client.post(API, json={"email": "other-api@example.com"}, environ_base=elsewhere)
    assert other.status_code == 202
    assert form_signup(client, "other-form@example.com", environ_base=elsewhere).status_code == 303

    assert subscriber_id_of(settings, "api-refused@example.com") is None
    assert subscriber_id_of(settings, "form-refused@example.com") is None
    assert count(settings, Subscriber) == 5
    assert count(settings, Delivery) == 5


@BOTH_DATABASES
def test_the_confirmation_carries_no_words_of_whoever_filled_in_the_form(client, settings, smtp):
    """Anyone can type any address and any name into the form; until the address says
    yes, we must not mail it the name's words (a spam line, a link)."""
    email, payload = "victim@example.com", "WIN 500 now at https://evil.example/claim"
    assert api_signup(client, email, first_name=payload).status_code == 202

    message = send_confirmation(settings, smtp, email)

    everything = message.as_string()
    assert "evil.example" not in everything and "WIN 500" not in everything
    assert message["To"] == email
    assert text_part(message).startswith("Hi there,")
    # Once the address has confirmed, the course uses the name the person gave.
    fresh = client.application.test_client()
    assert fresh.get(path_of(link_in(message, "/confirm/"))).status_code == 200
    subscriber_id = subscriber_id_of(settings, email)
    assert subscriber(settings, subscriber_id).first_name == payload


def test_honeypot_gets_the_same_answer_and_creates_nothing(client, settings):
    landing = client.get("/").get_data(as_text=True)
    hidden = r'<div class="honeypot" aria-hidden="true">(?:(?!</div>).)*name="website"'
    assert re.search(hidden, landing, re.S), "the trap is in the form, hidden from people"
    person = form_signup(client, "person@example.com")
    before = database_rows(settings)

    bot = form_signup(client, "bot@example.com", website="https://spam.example/")

    assert bot.status_code == person.status_code == 303
    assert bot.headers["Location"] == person.headers["Location"]
    assert path_of(bot.headers["Location"]) == "/thanks"
    assert subscriber_id_of(settings, "bot@example.com") is None
    assert database_rows(settings) == before


# --- 9. Bad tokens -----------------------------------------------------------------


def _other(char: str) -> str:
    return "A" if char != "A" else "B"


def broken(token: str) -> dict[str, str]:
    """Tampered and truncated versions of a token (each surely different)."""
    payload, _, signature = token.rpartition(".")
    return {
        "tampered-payload": _other(token[0]) + token[1:],
        "tampered-signature": f"{payload}.{_other(signature[0])}{signature[1:]}",
        "truncated-half": token[: len(token) // 2],
        "truncated-end": token[:-3],
        "no-signature": payload,
    }


def test_bad_tokens_get_a_4xx_page_and_change_nothing(app, client, settings, smtp):
    ann = join(client, settings, smtp, "ann@example.com")
    send_due(settings, ann)
    assert api_signup(client, "bob@example.com").status_code == 202
    bob = subscriber_id_of(settings, "bob@example.com")
    secret = settings.secret_key
    with session_scope(settings.database_url) as session:
        consents = {sid: latest_consent(session, sid).id for sid in (ann, bob)}
    [welcome] = deliveries(settings, ann, "welcome")
    good = {
        "confirm": {sid: make_confirm_token(secret, sid, consents[sid]) for sid in (ann, bob)},
        "unsubscribe": {sid: make_unsubscribe_token(secret, sid) for sid in (ann, bob)},
        "click": {ann: make_click_token(secret, welcome.id, "https://example.com/page")},
    }
    bad: dict[str, dict[str, str]] = {kind: {} for kind in good}
    for kind, tokens in good.items():
        for sid, token in tokens.items():
            for damage, value in broken(token).items():
                bad[kind][f"{damage} {kind} token of {sid}"] = value
    common = {"garbage": "not-a-token", "dots": "...", "long": "A" * 4000, "slash": "a/b"}
    foreign_secret = {
        "confirm": make_confirm_token("another-secret", bob, consents[bob]),
        "unsubscribe": make_unsubscribe_token("another-secret", ann),
        "click": make_click_token("another-secret", welcome.id, "https://example.com/page"),
    }
    routes = {  # route -> (kind of token it takes, how to call it)
        "GET /unsubscribe/": ("unsubscribe", lambda c, t: c.get(f"/unsubscribe/{t}")),
        "POST /unsubscribe/ one-click": (
            "unsubscribe",
            lambda c, t: c.post(f"/unsubscribe/{t}", data=ONE_CLICK, content_type=FORM),
        ),
        "POST /unsubscribe/ button": (
            "unsubscribe",
            lambda c, t: c.post(f"/unsubscribe/{t}", data={"action": "unsubscribe"}),
        ),
        "POST /unsubscribe/ pause": (
            "unsubscribe",
            lambda c, t: c.post(f"/unsubscribe/{t}", data={"action": "pause"}),
        ),
        "GET /confirm/": ("confirm", lambda c, t: c.get(f"/confirm/{t}")),
        "GET /r/": ("click", lambda c, t: c.get(f"/r/{t}")),
    }
    before = database_rows(settings)

    for route, (kind, call) in routes.items():
        tokens = {**bad[kind], **common, f"{kind} token, another secret": foreign_secret[kind]}
        for other_kind, by_subscriber in good.items():
            if other_kind != kind:
                for sid, token in by_subscriber.items():
                    tokens[f"foreign: {other_kind} token of {sid}"] = token
        for label, token in tokens.items():
            response = call(app.test_client(), token)
            page = response.get_data(as_text=True)
            assert 400 <= response.status_code < 500, (route, label, response.status_code)
            assert response.mimetype == "text/html", (route, label)
            assert "Traceback" not in page, (route, label)

    assert database_rows(settings) == before
    # The good tokens do work, so the bad ones failed for being bad.
    assert app.test_client().get(f"/unsubscribe/{good['unsubscribe'][ann]}").status_code == 200
    followed = app.test_client().get(f"/r/{good['click'][ann]}")
    assert (followed.status_code, followed.headers["Location"]) == (302, "https://example.com/page")
    assert app.test_client().get(f"/confirm/{good['confirm'][bob]}").status_code == 200
    assert subscriber(settings, bob).status == SubscriberStatus.ACTIVE


# --- 10. Lint: the footer ----------------------------------------------------------


def broken_templates(tmp_path, layout: str, remove: str):
    copy = tmp_path / f"emails-without-{layout}"
    shutil.copytree(nurture.ROOT / "templates" / "emails", copy)
    path = copy / layout
    source = path.read_text()
    assert remove in source
    path.write_text(source.replace(remove, ""))
    return copy


@pytest.mark.parametrize(
    ("layout", "remove", "problem"),
    [
        ("_layout.html", "{{ unsubscribe_url }}", "course emails must show the unsubscribe link"),
        ("_layout.txt", "{{ postal_address }}", "course emails must show the postal address"),
    ],
)
def test_lint_reports_a_footer_without_its_link_or_address(
    stack, tmp_path, layout, remove, problem
):
    copy = broken_templates(tmp_path, layout, remove)
    broken_stack = stack.with_env(NURTURE_TEMPLATES=str(copy))

    problems = [str(p) for p in lint_templates(broken_stack.settings)]

    expected = f"{copy / layout}:1: {problem}"
    assert any(p.startswith(expected) for p in problems), problems
    other = "_layout.txt" if layout == "_layout.html" else "_layout.html"
    assert not [p for p in problems if str(copy / other) in p], "the other layout is fine"
    cli = run_nurture(broken_stack, "lint")
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert expected in cli.stdout


def test_lint_passes_the_shipped_templates(stack):
    assert lint_templates(stack.settings) == []
    cli = run_nurture(stack, "lint")
    assert cli.returncode == 0, cli.stdout + cli.stderr


@BOTH_DATABASES
@pytest.mark.parametrize(
    "status", [SubscriberStatus.BOUNCED, SubscriberStatus.COMPLAINED, SubscriberStatus.ERASED]
)
def test_an_old_unsubscribe_link_does_not_turn_a_suppression_into_an_unsubscribe(
    app, client, settings, smtp, status
):
    """An unsubscribe may be lifted by a new signup; a bounce or complaint never is.

    The unsubscribe link of an email sent before the bounce still works (mail
    clients keep List-Unsubscribe): using it must not rewrite the bounce as an
    unsubscribe, or the address could sign up and be mailed again.
    """
    email = "kept.out@example.com"
    subscriber_id = join(client, settings, smtp, email)
    with session_scope(settings.database_url) as session:
        if status == SubscriberStatus.ERASED:
            assert erase(session, subscriber_id, now=utcnow())
        else:
            session.execute(
                update(Subscriber).where(Subscriber.id == subscriber_id).values(status=status)
            )
    token = make_unsubscribe_token(settings.secret_key, subscriber_id)

    assert one_click(app, f"/unsubscribe/{token}").status_code == 200

    assert subscriber(settings, subscriber_id).status == status
    assert events(settings, subscriber_id, "unsubscribe") == []
    if status != SubscriberStatus.ERASED:
        total = count(settings, Delivery)
        assert api_signup(client, email).status_code == 202
        assert count(settings, Delivery) == total, "a suppressed address got a confirmation"


class _ErasesAtRecipient(ScriptedServer):
    """An SMTP server during whose conversation the person is erased, and which then
    refuses the address, quoting it, as servers do ("550 5.1.1 <ann@...>")."""

    def __init__(self, settings, subscriber_id: int, email: str):
        self.settings, self.subscriber_id, self.email = settings, subscriber_id, email
        super().__init__()

    def reply(self, command: str, number: int):
        if command.startswith("RCPT"):
            with session_scope(self.settings.database_url) as session:
                assert erase(session, self.subscriber_id, now=utcnow())
            return f"550 5.1.1 <{self.email}>: Recipient address rejected".encode()
        return None


@BOTH_DATABASES
def test_a_bounce_of_an_email_in_flight_at_erasure_brings_nothing_back(client, settings, smtp):
    """Erasure cannot stop an email already handed to the SMTP server; its refusal,
    which quotes the address, must not write the address back or undo the erasure."""
    email, name = "in.flight@example.com", "Inflight"
    subscriber_id = join(client, settings, smtp, email, first_name=name)
    now = enrollment(settings, subscriber_id).next_due_at
    ids = tick(settings, now)
    with session_scope(settings.database_url) as session:
        sequences = current_sequences(settings.templates_path)
        server = _ErasesAtRecipient(settings, subscriber_id, email)
        with SMTPConnection(SMTPSettings("127.0.0.1", server.port, timeout=5)) as connection:
            result = send_batch(
                session, settings, sequences, ids, clock=lambda: now, connection=connection
            )
    assert result.failed == 1

    assert subscriber(settings, subscriber_id).status == SubscriberStatus.ERASED
    assert places_holding(settings, email, name) == [], "the bounce wrote the address back"
    with session_scope(settings.database_url) as session:
        assert suppression_of(session, email) == SubscriberStatus.BOUNCED, "kept out for good"
