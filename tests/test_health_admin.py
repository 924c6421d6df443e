"""Health checks and outages, the admin pages, and the `nurture` command line."""

from __future__ import annotations

import html
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from conftest import (
    BOTH_DATABASES,
    POSTGRES_URL,
    _fresh_postgres,
    csrf_token,
    free_port,
    require,
    silent_server,
)
from sqlalchemy import Integer, cast, literal, select

from nurture import ROOT
from nurture import health as health_module
from nurture.app import create_app
from nurture.catcher import start_catcher
from nurture.config import PRODUCTION_REQUIRED
from nurture.db import dispose_all, get_engine, session_scope
from nurture.models import CONFIRMATION_STEP, Delivery, DeliveryStatus, Subscriber, User
from nurture.tokens import make_unsubscribe_token
from nurture.users import add_user

NURTURE = str(ROOT / ".venv" / "bin" / "nurture")
ADMIN = "marketer@example.com"
PASSWORD = "correct horse battery"
STEPS = [
    "welcome",
    "product-manager",
    "project-manager",
    "overlap",
    "which-fits",
    "six-month-course",
    "last-reminder",
]
DOWN_DATABASE = "postgresql://postgres@127.0.0.1:1/nope"  # nothing listens on port 1


# --- helpers -----------------------------------------------------------------------


def nurture(stack, *args: str, stdin: str = "", env: dict[str, str] | None = None):
    """Run the real console script for this stack."""
    return subprocess.run(
        [NURTURE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env if env is not None else stack.process_env(),
        cwd=ROOT,
        timeout=60,
    )


def login(client, email: str = ADMIN, password: str = PASSWORD, next_: str | None = None):
    path = "/admin/login" + (f"?next={quote(next_, safe='')}" if next_ is not None else "")
    data = {"csrf_token": csrf_token(client, "/admin/login"), "email": email, "password": password}
    return client.post(path, data=data)


def signed_in(client, settings):
    """An admin account (made the way the CLI makes it) and a signed-in client."""
    with session_scope(settings.database_url) as session:
        add_user(session, ADMIN, PASSWORD)
    assert login(client).status_code == 303
    return client


def text(response) -> str:
    return response.get_data(as_text=True)


# --- /healthz and outages ----------------------------------------------------------


def test_healthz_reports_database_and_broker(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["database"] == "ok"
    assert body["broker"] == "ok"


def test_broker_down_is_reported_and_signups_wait_in_the_database(stack):
    down = stack.with_env(BROKER_URL="redis://127.0.0.1:1/0")
    app = create_app(down.settings)
    client = app.test_client()

    health = client.get("/healthz")

    assert health.status_code == 503
    assert health.get_json()["database"] == "ok"
    assert health.get_json()["broker"].startswith("error")

    response = client.post("/api/v1/subscribers", json={"email": "ann@example.com"})
    app.extensions["nurture"].handover.close()  # its thread has tried the broker

    assert response.status_code == 202
    assert response.get_json()["status"] == "accepted"
    with session_scope(down.settings.database_url) as session:
        delivery = session.scalar(
            select(Delivery)
            .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
            .where(Subscriber.email == "ann@example.com")
        )
    assert delivery.step == CONFIRMATION_STEP
    assert delivery.status == DeliveryStatus.QUEUED
    assert delivery.enqueued_at is None  # so the next due-scan hands it over again


@pytest.fixture
def db_down_client(stack):
    return create_app(stack.with_env(DATABASE_URL=DOWN_DATABASE).settings).test_client()


def test_database_down_is_reported_by_healthz(db_down_client, caplog):
    health_module._logged.clear()
    response = db_down_client.get("/healthz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["database"] == "error: OperationalError"  # the public page: its kind only
    assert body["broker"] == "ok"
    # The operator's log has the whole error, once however often the check is polled.
    for _ in range(5):
        assert db_down_client.get("/healthz").status_code == 503
    said = [
        r.getMessage() for r in caplog.records if "/healthz: the database check" in r.getMessage()
    ]
    assert len(said) == 1, said
    assert "OperationalError" in said[0] and "connection" in said[0].lower()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_database_not_migrated_says_what_to_run(stack, tmp_path, kind, caplog):
    """New code deployed before `nurture db upgrade`: the request still gets the 503
    answer, and the log says what to run, not that the database is down."""
    health_module._logged.clear()
    if kind == "sqlite":
        url, drop = f"sqlite:///{tmp_path / 'never-migrated.db'}", lambda: None
    else:
        url, drop = _fresh_postgres(require(POSTGRES_URL, "PostgreSQL"))
    try:
        client = create_app(stack.with_env(DATABASE_URL=url).settings).test_client()
        signup = client.post("/api/v1/subscribers", json={"email": "ann@example.com"})
        health = client.get("/healthz")
    finally:
        dispose_all()
        drop()

    assert signup.status_code == 503 and health.status_code == 503
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    told = [line for line in said if "run `nurture db upgrade`" in line]
    assert len(told) == 2, said  # the signup's and the health check's
    assert not [line for line in said if line.startswith("database unavailable")], said


def test_database_down_api_signup_gets_503_json(db_down_client):
    response = db_down_client.post("/api/v1/subscribers", json={"email": "ann@example.com"})

    assert response.status_code == 503
    assert response.mimetype == "application/json"
    assert response.get_json()["errors"]


def test_database_down_form_signup_gets_503_page(db_down_client):
    data = {
        "csrf_token": csrf_token(db_down_client),
        "email": "ann@example.com",
        "first_name": "Ann",
        "timezone": "UTC",
    }
    response = db_down_client.post("/subscribe", data=data)

    page = text(response)
    assert response.status_code == 503
    assert response.mimetype == "text/html"
    assert "try again" in page
    for leak in ("Traceback", "OperationalError", "psycopg", "127.0.0.1:1", "nope"):
        assert leak not in page


@pytest.mark.parametrize(("query", "seconds"), [("", 5), ("?connect_timeout=2", 2)])
def test_a_database_that_never_answers_is_given_up_on_in_seconds(stack, query, seconds):
    """A PostgreSQL that accepts connections and never answers (a hung server, a
    failover half done) is reported down after `connect_timeout`, the URL's own if it
    gives one, rather than holding the health check and the signup for good."""
    with silent_server() as (port, accepted):
        url = f"postgresql://postgres@127.0.0.1:{port}/nope{query}"
        client = create_app(stack.with_env(DATABASE_URL=url).settings).test_client()
        started = time.monotonic()
        health = client.get("/healthz")
        waited = time.monotonic() - started
        signup = client.post("/api/v1/subscribers", json={"email": "ann@example.com"})
    assert accepted, "the check did reach the server"
    assert health.status_code == 503
    assert health.get_json()["database"].startswith("error")
    assert seconds - 0.5 < waited < seconds + 3
    assert signup.status_code == 503
    assert "database is unavailable" in signup.get_json()["errors"]["service"]


def test_postgresql_connections_probe_a_server_that_vanished():
    """Keepalives and a limit on unacknowledged data end a connection whose server
    went away without a word, which no statement timeout can; the URL may set its own."""
    base = require(POSTGRES_URL, "PostgreSQL")

    def parameters(url: str) -> dict[str, str]:
        with get_engine(url).connect() as connection:
            return connection.connection.driver_connection.info.get_parameters()

    ours = parameters(base)
    own = parameters(f"{base}?keepalives_idle=45")
    assert {
        key: ours.get(key) for key in ("keepalives", "keepalives_idle", "tcp_user_timeout")
    } == {
        "keepalives": "1",
        "keepalives_idle": "30",
        "tcp_user_timeout": "60000",
    }
    assert (own["keepalives_idle"], own["keepalives_count"]) == ("45", "3")


def test_a_value_the_database_refuses_is_a_400_not_an_outage(stack, caplog):
    """The net below the routes' own checks: PostgreSQL refusing a value (here a
    number out of range) is the request's fault, not a database that is down."""
    require(POSTGRES_URL, "PostgreSQL")
    app = create_app(stack.with_env(DATABASE_URL=POSTGRES_URL).settings)

    def out_of_range():
        with session_scope(app.extensions["nurture"].settings.database_url) as session:
            session.scalar(select(cast(literal(2**31), Integer)))

    app.add_url_rule("/api/v1/out-of-range", "api_out_of_range", out_of_range)
    app.add_url_rule("/out-of-range", "out_of_range", out_of_range)
    client = app.test_client()

    api = client.get("/api/v1/out-of-range")
    page = client.get("/out-of-range")

    assert api.status_code == 400
    assert "cannot be stored" in api.get_json()["errors"]["request"]
    assert page.status_code == 400
    assert page.mimetype == "text/html"
    assert "cannot be stored" in text(page)
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert not [m for _, m in logged if "database unavailable" in m]
    assert [level for level, m in logged if "refused a value" in m] == ["WARNING", "WARNING"]


# --- admin sign-in -----------------------------------------------------------------


def test_admin_requires_login(client):
    response = client.get("/admin/")

    assert response.status_code == 302
    assert urlsplit(response.headers["Location"]).path == "/admin/login"
    for path in ("/admin/outbox", "/admin/preview/product-vs-project/welcome"):
        assert urlsplit(client.get(path).headers["Location"]).path == "/admin/login"


def test_users_add_from_cli_then_login_shows_the_sequence(stack, client):
    created = nurture(stack, "users", "add", ADMIN, "--password-stdin", stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    assert ADMIN in created.stdout

    wrong = login(client, password="not the password")
    assert wrong.status_code == 401
    assert "do not match" in text(wrong)
    assert client.get("/admin/").status_code == 302

    right = login(client)
    assert right.status_code == 303
    assert urlsplit(right.headers["Location"]).path == "/admin/"
    index = client.get("/admin/")
    page = text(index)
    assert index.status_code == 200
    assert "product-vs-project" in page
    shown = re.findall(r'href="/admin/preview/product-vs-project/([^"]+)"', page)
    assert shown == STEPS


@BOTH_DATABASES
@pytest.mark.parametrize("email", ["a\x00b", f"{ADMIN}\x00", "a\x7fb"])
def test_a_control_character_in_the_login_email_matches_no_account(client, settings, email, caplog):
    with session_scope(settings.database_url) as session:
        add_user(session, ADMIN, PASSWORD)

    response = login(client, email=email)

    assert response.status_code == 401
    assert "do not match" in text(response)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_an_unknown_login_address_costs_as_much_hashing_as_a_known_one(
    client, settings, monkeypatch
):
    """Refusing an unknown address must not take longer than a wrong password:
    it used to hash a fresh dummy password first (two key derivations, not one),
    so timing the login told which admin accounts exist."""
    import hashlib

    with session_scope(settings.database_url) as session:
        add_user(session, ADMIN, PASSWORD)
    derivations = []
    real_scrypt = hashlib.scrypt

    def counting_scrypt(*args, **kwargs):
        derivations.append(1)
        return real_scrypt(*args, **kwargs)

    def hashing_for(email: str) -> int:
        derivations.clear()
        assert login(client, email=email, password="wrong password").status_code == 401
        return len(derivations)

    monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)
    hashing_for("nobody@example.com")  # the first one may make what later ones reuse

    assert hashing_for("someone@example.com") == hashing_for(ADMIN) == 1


def test_a_new_password_ends_the_sessions_signed_in_with_the_old_one(client, settings, app):
    """A stolen session cookie must not outlive a password reset."""
    signed_in(client, settings)
    stolen = client.get_cookie("session").value
    thief = app.test_client()
    thief.set_cookie("session", stolen)
    assert thief.get("/admin/users").status_code == 200

    token = csrf_token(client, "/admin/users")
    new = {"csrf_token": token, "email": ADMIN, "password": "a brand new password", "role": "admin"}
    assert client.post("/admin/users", data=new).status_code == 200

    refused = thief.get("/admin/users")
    assert refused.status_code == 302
    assert urlsplit(refused.headers["Location"]).path == "/admin/login"
    fresh = app.test_client()
    assert login(fresh, password="a brand new password").status_code == 303
    assert fresh.get("/admin/users").status_code == 200


def test_signing_out_ends_every_session_of_the_account(client, settings, app):
    """A session is a signed cookie: a copy of it must not outlive signing out."""
    signed_in(client, settings)
    copied = app.test_client()
    copied.set_cookie("session", client.get_cookie("session").value)
    assert copied.get("/admin/users").status_code == 200

    token = csrf_token(client, "/admin/users")
    assert client.post("/admin/logout", data={"csrf_token": token}).status_code == 303

    for browser in (client, copied):
        refused = browser.get("/admin/users")
        assert refused.status_code == 302
        assert urlsplit(refused.headers["Location"]).path == "/admin/login"
    again = app.test_client()
    assert login(again).status_code == 303
    assert again.get("/admin/users").status_code == 200, "signing in again works"


def test_pages_cannot_be_framed_or_sniffed_and_admin_pages_are_not_cached(client, settings):
    """Clickjacking: a page of another site must not frame the admin's buttons
    (unsubscribe, erase) or the public unsubscribe page."""
    signed_in(client, settings)
    unsubscribe = "/unsubscribe/" + make_unsubscribe_token(settings.secret_key, 1)

    for path in ("/", unsubscribe, "/admin/login", "/admin/subscribers", "/admin/users"):
        headers = client.get(path).headers
        assert headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Referrer-Policy"] == "same-origin", path
    for path in ("/admin/login", "/admin/subscribers", "/admin/subscribers/export.csv"):
        assert client.get(path).headers["Cache-Control"] == "no-store", path


def test_cli_refuses_a_short_password(stack, settings):
    result = nurture(stack, "users", "add", ADMIN, "--password-stdin", stdin="short\n")

    assert result.returncode != 0
    assert "at least 10 characters" in result.stderr
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(User.id)) is None
    client = create_app(settings).test_client()
    assert login(client, password="short").status_code == 401


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example",
        "//evil.example",
        "//evil.example/admin",
        "/\\evil.example",
        "https://evil.example/admin/",
    ],
)
def test_login_never_redirects_off_site(client, settings, target):
    with session_scope(settings.database_url) as session:
        add_user(session, ADMIN, PASSWORD)

    response = login(client, next_=target)

    assert response.status_code == 303
    location = response.headers["Location"]
    assert urlsplit(location).netloc in ("", "localhost")
    assert not location.startswith(("//", "/\\"))
    assert "evil" not in location


def test_login_does_not_follow_a_next_with_a_line_break(client, settings, caplog):
    with session_scope(settings.database_url) as session:
        add_user(session, ADMIN, PASSWORD)

    response = login(client, next_="/admin\r\nX-Injected: 1")

    assert response.status_code == 303
    assert response.headers["Location"] == "/admin/"
    assert "X-Injected" not in response.headers
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_login_follows_a_local_next(client, settings):
    with session_scope(settings.database_url) as session:
        add_user(session, ADMIN, PASSWORD)

    response = login(client, next_="/admin/outbox")

    assert response.status_code == 303
    assert response.headers["Location"] == "/admin/outbox"


# --- outbox ------------------------------------------------------------------------


def catch_one(outbox: Path, subject: str, body: str) -> None:
    """Send one message through the real dev catcher, which writes it to `outbox`."""
    port = free_port()
    controller = start_catcher(outbox, "127.0.0.1", port)
    try:
        message = EmailMessage()
        message["From"] = "course@nurture.test"
        message["To"] = "ann@example.com"
        message["Subject"] = subject
        message.set_content(body)
        message.add_alternative(f"<p>{body}</p>", subtype="html")
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as connection:
            connection.send_message(message)
    finally:
        controller.stop()


def test_outbox_lists_and_shows_caught_mail(client, settings):
    catch_one(settings.outbox_path, "Caught in the outbox", "The text part of the message.")
    (names,) = [[p.name for p in settings.outbox_path.glob("*.eml")]]
    assert len(names) == 1
    signed_in(client, settings)

    listing = client.get("/admin/outbox")

    assert listing.status_code == 200
    assert "Caught in the outbox" in text(listing)
    assert f'href="/admin/outbox/{names[0]}"' in text(listing)

    shown = client.get(f"/admin/outbox/{names[0]}")

    assert shown.status_code == 200
    assert "Caught in the outbox" in text(shown)
    assert "The text part of the message." in text(shown)


def test_outbox_shows_a_message_whose_headers_do_not_parse(client, settings):
    """An encoded word that decodes to a line break makes the To header unparsable."""
    raw = (
        b"From: course@nurture.test\r\n"
        b"To: =?utf-8?q?Bob=0D=0ABcc:_x@evil.com?= <n0@example.com>\r\n"
        b"Subject: Caught with a broken header\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        b"The body of the message.\r\n"
    )
    port = free_port()
    controller = start_catcher(settings.outbox_path, "127.0.0.1", port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as connection:
            connection.sendmail("course@nurture.test", ["n0@example.com"], raw)
    finally:
        controller.stop()
    [name] = [p.name for p in settings.outbox_path.glob("*.eml")]
    signed_in(client, settings)

    listing = client.get("/admin/outbox")
    shown = client.get(f"/admin/outbox/{name}")

    for response in (listing, shown):
        assert response.status_code == 200
        assert "Caught with a broken header" in text(response)
        assert "n0@example.com" in text(response), "the raw header text is shown"
    assert "The body of the message." in text(shown)


@pytest.mark.parametrize(
    "name",
    [
        "..%2Fsecret.eml",
        "../secret.eml",
        "..%5Csecret.eml",
        ".hidden.eml",
        "missing.eml",
        "..%2Fsecret_key",
        "%00.eml",
        "a" * 300 + ".eml",
    ],
    ids=lambda name: name if len(name) < 50 else "name-too-long",
)
def test_outbox_refuses_names_outside_it(client, settings, name):
    settings.outbox_path.mkdir(parents=True, exist_ok=True)
    secret = settings.outbox_path.parent / "secret.eml"
    secret.write_text("Subject: secret\n\nTOP-SECRET-CONTENT\n")
    (settings.outbox_path.parent / "secret_key").write_text("TOP-SECRET-CONTENT")
    (settings.outbox_path / ".hidden.eml").write_text("Subject: hidden\n\nTOP-SECRET-CONTENT\n")
    signed_in(client, settings)

    response = client.get(f"/admin/outbox/{name}")

    assert response.status_code == 404
    assert "TOP-SECRET-CONTENT" not in text(response)


# --- previews ----------------------------------------------------------------------


def test_preview_shows_subject_html_and_text(client, settings):
    signed_in(client, settings)

    response = client.get("/admin/preview/product-vs-project/welcome")

    page = text(response)
    assert response.status_code == 200
    assert "<h1>Welcome: product manager or project manager?</h1>" in page
    assert re.search(r'<iframe[^>]+srcdoc="[^"]*&lt;html', page, re.IGNORECASE)
    assert "Hi Alex," in page


def test_preview_shows_the_inbox_line_after_the_subject(client, settings):
    """The preheader marketers tune is what an inbox shows after the subject; the
    preview shows that line, read from the email's HTML as an inbox reads it."""
    signed_in(client, settings)
    source = (settings.templates_path / "product-vs-project" / "01-welcome.md").read_text()
    preheader = re.search(r"^preheader: (.+)$", source, re.MULTILINE).group(1).strip()

    page = html.unescape(text(client.get("/admin/preview/product-vs-project/welcome")))

    shown = re.search(r"In the inbox, after the subject:</span> (.+?)</p>", page).group(1)
    assert shown.startswith(preheader[:60]), (shown, preheader)


def test_preview_without_a_first_name_uses_the_fallback(client, settings):
    signed_in(client, settings)

    page = text(client.get("/admin/preview/product-vs-project/welcome?first_name="))

    assert "Hi there," in page
    assert "Hi Alex" not in page


def test_preview_of_unknown_step_or_sequence_is_404(client, settings):
    signed_in(client, settings)

    assert client.get("/admin/preview/product-vs-project/no-such-step").status_code == 404
    assert client.get("/admin/preview/no-such-sequence/welcome").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/admin/preview/product-vs-project/welcome",
        "/admin/preview/product-vs-project/welcome.eml",
        "/admin/preview/-/confirmation",
    ],
)
def test_preview_for_a_name_with_a_line_break_is_422(client, settings, path, caplog):
    signed_in(client, settings)

    response = client.get(f"{path}?first_name=a%0d%0aBcc:%20x@evil.example")

    assert response.status_code == 422
    assert "control characters" in text(response)
    assert "evil.example" not in text(response)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_preview_of_the_confirmation_email(client, settings):
    signed_in(client, settings)

    response = client.get("/admin/preview/-/confirmation")

    assert response.status_code == 200
    assert "Please confirm your email address" in text(response)
    assert "/confirm/" in text(response)
    assert "which uses no name" in text(response)
    assert "a subscriber named Alex" not in text(response)  # it greets nobody by name


# --- command line ------------------------------------------------------------------


def test_cli_preview_text(stack):
    result = nurture(stack, "preview", "product-vs-project", "overlap", "--format", "text")

    assert result.returncode == 0, result.stderr
    assert "Hi Alex," in result.stdout
    assert "Today they meet." in result.stdout
    assert "<p>" not in result.stdout and "<html" not in result.stdout.lower()
    assert "Course Team, 12 Test Street, Testville" in result.stdout


def test_cli_preview_eml_has_the_headers(stack):
    result = nurture(stack, "preview", "product-vs-project", "overlap", "--format", "eml")

    assert result.returncode == 0, result.stderr
    headers = result.stdout.split("\n\n", 1)[0]
    assert "X-Nurture-Step: product-vs-project/overlap" in headers.splitlines()
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in headers.splitlines()
    assert re.search(r"^List-Unsubscribe: <http://nurture\.test/unsubscribe/[^>]+>$", headers, re.M)
    assert re.search(r"^Subject: Day 3: where the two roles meet", headers, re.M)
    assert "multipart/alternative" in headers


def test_cli_lint_passes_on_shipped_templates(stack):
    result = nurture(stack, "lint")

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("missing", PRODUCTION_REQUIRED)
def test_production_refuses_to_start_without_required_setting(stack, missing):
    env = stack.process_env()
    env.pop(missing)
    env["NURTURE_ENV"] = "production"

    result = nurture(stack, "db", "upgrade", env=env)

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert missing in lines[0]
    assert "Traceback" not in result.stderr


def test_gunicorn_stops_on_a_configuration_error(stack):
    """Not a worker restarted with the same bad setting for ever, the port open and mute."""
    env = {**stack.process_env(), "SIGNUP_RATE_LIMIT": "lots"}
    command = [str(Path(sys.executable).parent / "gunicorn"), "web:app", "--workers", "2"]
    server = subprocess.Popen(
        [*command, "--bind", f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        code = server.wait(timeout=60)
    finally:
        server.kill()
    log = server.stderr.read()
    assert code != 0
    said = [line for line in log.splitlines() if line.startswith("nurture: configuration error")]
    assert 1 <= len(said) <= 2, log  # once per worker that started
    assert "SIGNUP_RATE_LIMIT" in said[0]


def test_beat_starts_where_no_instance_folder_was_made_yet(stack, tmp_path):
    """With SECRET_KEY set nothing made the instance folder, and beat, which keeps
    its schedule there, stopped calling the file corrupt: it now starts."""
    instance = tmp_path / "instance-not-made"
    env = {**stack.process_env(), "NURTURE_INSTANCE": str(instance), "SECRET_KEY": "set"}
    command = [str(Path(sys.executable).parent / "celery"), "-A", "worker", "beat"]
    beat = subprocess.Popen(
        [*command, "--loglevel", "INFO"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and beat.poll() is None:
            if list(instance.glob("celerybeat-schedule*")):
                break
            time.sleep(0.2)
        started = beat.poll() is None
    finally:
        beat.terminate()
        log = beat.communicate(timeout=30)[1]
    assert started, log[-3000:]
    assert list(instance.glob("celerybeat-schedule*")), log[-3000:]
    assert "corrupted" not in log


def one_line_error(result) -> str:
    """The single line a failing command printed; asserts it printed no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_cli_says_in_one_line_what_went_wrong(stack, tmp_path):
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = {**stack.process_env(), "DATABASE_URL": fresh}
    assert nurture(stack, "db", "upgrade", env=env).stdout.startswith("database at revision 0")
    gone = {**env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}
    for args in (("db", "upgrade"), ("subscribers", "export", str(tmp_path / "out.csv"))):
        said = one_line_error(nurture(stack, *args, env=gone))
        assert "the database cannot be used" in said and "refused" in said

    missing = tmp_path / "no" / "such" / "out.csv"
    assert "No such file or directory" in one_line_error(
        nurture(stack, "subscribers", "export", str(missing), env=env)
    )
    with get_engine(fresh).begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    said = one_line_error(nurture(stack, "db", "upgrade", env=env))
    assert "at revision 9999, which this version of nurture does not know" in said


def test_the_catcher_says_its_port_is_taken_in_one_line(stack):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        said = one_line_error(nurture(stack, "catcher", "--port", str(port)))
    assert "address already in use" in said


def test_the_catcher_stops_on_sigterm_as_a_containers_first_process(stack):
    """As PID 1 (the compose mailcatcher service) a signal without a handler is dropped."""
    port = free_port()
    command = ["unshare", "--pid", "--fork", "--mount-proc", NURTURE, "catcher"]
    catcher = subprocess.Popen(
        [*command, "--port", str(port)], env=stack.process_env(), stdout=subprocess.PIPE, text=True
    )
    first = None
    try:
        assert catcher.stdout.readline().startswith("catching mail on")
        [first] = Path(f"/proc/{catcher.pid}/task/{catcher.pid}/children").read_text().split()
        os.kill(int(first), signal.SIGTERM)
        assert catcher.wait(timeout=10) == 0
    finally:
        if first is not None and catcher.poll() is None:
            os.kill(int(first), signal.SIGKILL)  # killing `unshare` alone would leave it
        catcher.kill()
