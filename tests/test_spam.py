"""Every email of every shipped sequence scores under 2.0 with SpamAssassin's local rules.

Uses Debian's `spamassassin -L -t` (local tests only, no network), on the exact
message the service would send with production-like settings.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime

import pytest
from conftest import REQUIRE_SERVICES, Stack

from nurture.mailer import build_message
from nurture.preview import preview_email
from nurture.render import RenderedEmail
from nurture.sequences import load_sequences

LIMIT = 2.0
SPAMASSASSIN = shutil.which("spamassassin")


def score(raw: bytes) -> float:
    if SPAMASSASSIN is None:
        message = "spamassassin is not installed (apt-get install spamassassin)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [SPAMASSASSIN, "-L", "-t"], input=raw, capture_output=True, timeout=120, check=True
    )
    report = result.stdout.decode(errors="replace")
    match = re.search(r"Content analysis details:\s+\((-?[\d.]+) points", report)
    assert match, report[-2000:]
    return float(match.group(1))


@pytest.fixture(scope="module")
def production(tmp_path_factory) -> Stack:
    return Stack(
        {
            "NURTURE_ENV": "production",
            "NURTURE_INSTANCE": str(tmp_path_factory.mktemp("instance")),
            "SECRET_KEY": "a-long-production-secret",
            "BASE_URL": "https://www.example.com",
            "DATABASE_URL": "postgresql://nurture@db.example.com/nurture",
            "BROKER_URL": "redis://redis.example.com:6379/0",
            "SMTP_URL": "smtp://smtp.example.com:587?tls=starttls",
            "COURSE_URL": "https://www.example.com/six-month-course",
            "MAIL_FROM": "Course Team <course@example.com>",
            "POSTAL_ADDRESS": "Course Team, 100 Main Street, Springfield, IL 62701, USA",
        }
    )


def all_emails() -> list[tuple[str, str]]:
    from nurture import ROOT

    sequences = load_sequences(ROOT / "templates" / "emails")
    return [("-", "confirmation")] + [
        (name, step.key) for name, sequence in sequences.items() for step in sequence.steps
    ]


@pytest.mark.parametrize(("sequence", "step"), all_emails())
def test_every_email_scores_low(production, sequence, step):
    email = preview_email(production.settings, sequence, step, first_name="Alex")
    points = score(email.data)
    assert points < LIMIT, f"{sequence}/{step} scores {points}"


def test_the_check_tells_spam_apart(production):
    """A spammy email built the same way scores well above the limit, so the test can fail."""
    shouting = "<p style='color:#ffffff;background:#ffffff'>FREE MONEY!!! ACT NOW!!!</p>" * 5
    spam = RenderedEmail(
        subject="FREE!!! Make $$$ FAST - 100% GUARANTEED - ACT NOW!!!",
        preheader="",
        html=f"<html><body>{shouting}<a href='http://bit.ly/x'>CLICK HERE</a></body></html>",
        text="FREE MONEY!!! Viagra. Work from home, earn $5000 a week. CLICK HERE NOW!!!",
    )
    message = build_message(
        spam,
        to_email="alex@example.com",
        to_name="Alex",
        mail_from="Winner <winner@example.com>",
        message_id="<spam@example.com>",
        step_label="spam",
        date=datetime.now(UTC),
    )
    assert score(message.data) >= LIMIT
