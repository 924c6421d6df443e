"""The whole journey through HTTP, a real worker process and a real SMTP server.

signup form → confirmation email → confirm → due-scans at simulated times over
the course's days → every step arrives once, in order, with the contract's
headers and both parts. Once on SQLite with the embedded broker, once on
PostgreSQL and Redis.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import timedelta
from email.message import EmailMessage

import pytest
import redis
from conftest import REDIS_URL, Stack, csrf_token, require
from sqlalchemy import func, select

from nurture import ROOT
from nurture.app import create_app
from nurture.db import session_scope
from nurture.models import Delivery, DeliveryStatus, Enrollment, Subscriber
from nurture.sequences import load_sequences
from nurture.tasks import make_celery, run_dispatch

COURSE = "product-vs-project"


@pytest.fixture(params=["sqlite-embedded", "postgresql-redis"])
def journey_stack(request, tmp_path, smtp) -> Stack:
    if request.param == "sqlite-embedded":
        database = f"sqlite:///{tmp_path / 'nurture.db'}"
        broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    else:
        database = request.getfixturevalue("empty_database_postgres")
        broker = require(REDIS_URL, "Redis")
        redis.Redis.from_url(broker).flushdb()
    stack = Stack(
        {
            "NURTURE_INSTANCE": str(tmp_path / "instance"),
            "DATABASE_URL": database,
            "BROKER_URL": broker,
            "SMTP_URL": smtp.url,
            "SECRET_KEY": "journey-secret",
            "BASE_URL": "http://nurture.test",
            "POSTAL_ADDRESS": "Course Team, 12 Test Street, Testville",
            "COURSE_URL": "https://courses.example.com/six-month",
            "MAIL_FROM": "Course Team <course@nurture.test>",
        }
    )
    # The schema comes from the real migration command, as an operator runs it.
    subprocess.run(
        [sys.executable, "-m", "nurture", "db", "upgrade"],
        cwd=ROOT,
        env=stack.process_env(),
        check=True,
        capture_output=True,
    )
    return stack


@pytest.fixture
def empty_database_postgres(request):
    from conftest import POSTGRES_URL, _fresh_postgres

    url, drop = _fresh_postgres(require(POSTGRES_URL, "PostgreSQL"))
    yield url
    drop()


def wait_until_sent(settings, timeout: float = 30) -> None:
    """Wait for the worker to finish what the due-scan handed it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(settings.database_url) as session:
            unsent = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.status.in_(DeliveryStatus.UNSENT))
            )
        if unsent == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the worker did not send what was due")


def check_parts(message: EmailMessage) -> tuple[str, str]:
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    assert text.strip() and "<html" in html
    assert len(html.encode()) < 100 * 1024
    for header in ("From", "To", "Subject", "Date", "Message-ID", "X-Nurture-Step"):
        assert message[header], f"{header} missing"
    return text, html


def test_signup_to_last_email(journey_stack, smtp, start_worker):
    settings = journey_stack.settings
    start_worker(journey_stack)
    client = create_app(settings).test_client()

    response = client.post(
        "/subscribe",
        data={
            "csrf_token": csrf_token(client),
            "email": "Dana@Example.com",
            "first_name": "Dana",
            "timezone": "America/New_York",
        },
    )
    assert response.status_code == 303
    assert response.headers["Location"].endswith("/thanks")

    (confirmation,) = smtp.wait_for(1)
    assert confirmation["X-Nurture-Step"] == "confirmation"
    assert confirmation["List-Unsubscribe"] is None
    assert confirmation["To"].addresses[0].addr_spec == "dana@example.com"
    text, _ = check_parts(confirmation)
    confirm_path = re.search(r"http://nurture\.test(/confirm/\S+)", text).group(1)
    assert client.get(confirm_path).status_code == 200

    with session_scope(settings.database_url) as session:
        subscriber = session.scalar(select(Subscriber))
        assert subscriber.status == "active"
        started = subscriber.confirmed_at

    celery = make_celery(settings)
    # Hourly due-scans for nine days (beat runs every minute; hourly keeps a 09:00 step
    # from being scanned hours late, which would push each later step a day further).
    for tick in range(0, 9 * 24 + 1):
        run_dispatch(celery, started + timedelta(hours=tick))
        wait_until_sent(settings)

    messages = smtp.wait_for(8)
    assert len(messages) == 8, "one confirmation and seven course emails, no more"
    course = messages[1:]
    steps = [step.key for step in load_sequences(settings.templates_path)[COURSE].steps]
    assert [m["X-Nurture-Step"] for m in course] == [f"{COURSE}/{key}" for key in steps]
    assert len({m["Message-ID"] for m in messages}) == 8
    for message in course:
        text, html = check_parts(message)
        unsubscribe = message["List-Unsubscribe"]
        assert re.fullmatch(r"<http://nurture\.test/unsubscribe/[\w.-]+>", unsubscribe)
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert COURSE in message["List-Id"]
        assert unsubscribe.strip("<>") in text and unsubscribe.strip("<>") in html
        assert settings.postal_address in text and settings.postal_address in html
        assert "Dana" in text

    with session_scope(settings.database_url) as session:
        enrollment = session.scalar(select(Enrollment))
        assert enrollment.status == "completed"
        sent = session.scalars(select(Delivery).order_by(Delivery.sent_at)).all()
        assert [d.status for d in sent] == ["sent"] * 8
        assert {d.message_id for d in sent} == {m["Message-ID"] for m in messages}
