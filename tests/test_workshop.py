"""The marketers' workshop: lint, the sandbox, previews, live edits, `nurture plan`, held emails.

Everything runs on the real parts: copies of the shipped templates edited on disk, a real
database (SQLite, and PostgreSQL where marked), the real due-scan and sender talking to a
real SMTP server (aiosmtpd), the Flask test client and the real `nurture` command. Time is
passed in as `now`; nothing sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from html import unescape
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest
from conftest import BOTH_DATABASES, csrf_token
from sqlalchemy import create_engine, select

import nurture
from nurture import publishing
from nurture.app import create_app
from nurture.db import session_scope
from nurture.delivery import send_batch
from nurture.lint import lint_templates
from nurture.models import (
    CONFIRMATION_STEP,
    Base,
    Consent,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    SequenceVersion,
    Subscriber,
    utcnow,
)
from nurture.preview import parts, preview_message
from nurture.publishing import compare, format_diff, published_sequences, record_published
from nurture.render import Renderer, RenderError
from nurture.scheduler import dispatch
from nurture.sequences import _loaded as current_sequences_cache
from nurture.sequences import current_sequences, first_steps, load_sequences, manifest_errors
from nurture.subscribers import SignupRequest, confirm, consent_text, signup
from nurture.tokens import make_confirm_token
from nurture.users import add_user

ROOT = nurture.ROOT
SHIPPED = ROOT / "templates" / "emails"
PVP = "product-vs-project"
CSC = "career-switch-checklist"
PVP_KEYS = [
    "welcome",
    "product-manager",
    "project-manager",
    "overlap",
    "which-fits",
    "six-month-course",
    "last-reminder",
]
CSC_KEYS = ["welcome", "build-evidence", "make-the-move"]
ALL_EMAILS = [(PVP, key) for key in PVP_KEYS] + [(CSC, key) for key in CSC_KEYS]
COURSE_URL = "https://courses.example.com/six-month"
ADMIN = "marketer@example.com"
PASSWORD = "correct horse battery"
API = "/api/v1/subscribers"
TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)  # a Monday, safely in the past
OVERLAP = "product-vs-project/04-overlap.md"


# --- helpers: template copies ---------------------------------------------------------


def copy_templates(tmp_path: Path, name: str = "emails") -> Path:
    folder = tmp_path / name
    shutil.copytree(SHIPPED, folder)
    return folder


def replace_in(path: Path, old: str, new: str) -> None:
    source = path.read_text(encoding="utf-8")
    assert old in source, f"{old!r} is not in {path}"
    path.write_text(source.replace(old, new, 1), encoding="utf-8")


def set_line(path: Path, number: int, new: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = new
    path.write_text("\n".join(lines), encoding="utf-8")


def line_of(path: Path, needle: str, occurrence: int = 1) -> int:
    lines = path.read_text(encoding="utf-8").split("\n")
    found = [n for n, line in enumerate(lines, 1) if needle in line]
    return found[occurrence - 1]


def run_nurture(stack, *args: str) -> subprocess.CompletedProcess:
    """The real console script, as `python -m nurture`, for this stack."""
    return subprocess.run(
        [sys.executable, "-m", "nurture", *args],
        capture_output=True,
        text=True,
        env=stack.process_env(),
        cwd=ROOT,
        timeout=60,
    )


# --- helpers: subscribers, the due-scan and the sender --------------------------------


def enroll(
    settings,
    email: str,
    *,
    now: datetime,
    sequence: str = PVP,
    timezone: str = "UTC",
    first_name: str = "Alex",
) -> int:
    """Sign up with double opt-in, the confirmation gone out, confirmed at `now`."""
    sequences = load_sequences(settings.templates_path)
    request = SignupRequest(
        email=email,
        first_name=first_name,
        timezone=timezone,
        sequence=sequence,
        source="api",
        consent_text=consent_text(sequences[sequence].title),
    )
    steps = first_steps(sequences)
    with session_scope(settings.database_url) as session:
        confirmation_id = signup(session, settings, request, first_steps=steps, now=now)
        assert confirmation_id is not None
        confirmation = session.get(Delivery, confirmation_id)
        confirmation.status, confirmation.sent_at = DeliveryStatus.SENT, now
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        assert confirm(session, subscriber_id, now=now, first_steps=steps) is not None
    return subscriber_id


def tick(settings, now: datetime) -> list[int]:
    """One due-scan as of `now`, with the files on disk; the ids handed to workers."""
    ids: list[int] = []
    with session_scope(settings.database_url) as session:
        dispatch(
            session, settings, load_sequences(settings.templates_path), now=now, publish=ids.extend
        )
    return ids


def send(settings, ids: list[int], now: datetime):
    """What a worker does with `ids`, as of `now`, over real SMTP."""
    with session_scope(settings.database_url) as session:
        sequences = load_sequences(settings.templates_path)
        return send_batch(session, settings, sequences, ids, clock=lambda: now)


def advance(settings, now: datetime):
    return send(settings, tick(settings, now), now)


def due_times(settings) -> list[datetime]:
    with session_scope(settings.database_url) as session:
        return sorted(
            session.scalars(
                select(Enrollment.next_due_at).where(
                    Enrollment.status == EnrollmentStatus.ACTIVE,
                    Enrollment.next_due_at.is_not(None),
                )
            )
        )


def run_until(
    settings, until: datetime | None = None, *, after: datetime | None = None, limit: int = 60
) -> None:
    """Tick at each due time (up to `until`, never before `after`) and send what is handed out."""
    for _ in range(limit):
        due = [d for d in due_times(settings) if until is None or d <= until]
        if not due:
            return
        after = max(due[0], after) if after else due[0]
        advance(settings, after)
    raise AssertionError(f"still due after {limit} ticks: {due_times(settings)}")


def enrollment_of(settings, subscriber_id: int, sequence: str = PVP) -> Enrollment:
    with session_scope(settings.database_url) as session:
        return session.scalar(
            select(Enrollment).where(
                Enrollment.subscriber_id == subscriber_id, Enrollment.sequence == sequence
            )
        )


def deliveries_of(settings, subscriber_id: int) -> list[Delivery]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(Delivery)
                .where(Delivery.subscriber_id == subscriber_id, Delivery.step != "confirmation")
                .order_by(Delivery.id)
            )
        )


def messages_to(smtp, email: str, label: str | None = None):
    """Course emails (not confirmations) received for `email`, or those of one `label`."""
    found = []
    for message in smtp.messages:
        if email not in str(message["To"]) or message["X-Nurture-Step"] == CONFIRMATION_STEP:
            continue
        if label is None or message["X-Nurture-Step"] == label:
            found.append(message)
    return found


def received(smtp, email: str, sequence: str = PVP) -> list[str]:
    """The steps of `sequence` that `email` received, in order."""
    prefix = f"{sequence}/"
    return [
        m["X-Nurture-Step"].removeprefix(prefix)
        for m in messages_to(smtp, email)
        if m["X-Nurture-Step"].startswith(prefix)
    ]


def text_part(message) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


def html_part(message) -> str:
    return message.get_body(preferencelist=("html",)).get_content()


def link_in(message, route: str) -> str:
    links = set(re.findall(rf"https?://[^\s\"'<>()]+{route}[\w.-]+", text_part(message)))
    assert len(links) == 1, links
    return links.pop()


def signed_in(app, settings, role: str = "admin", email: str = ADMIN):
    """An account (as `nurture users add` makes it) and a client signed in to it."""
    with session_scope(settings.database_url) as session:
        add_user(session, email, PASSWORD, role)
    client = app.test_client()
    login = {"csrf_token": csrf_token(client, "/admin/login"), "email": email, "password": PASSWORD}
    assert client.post("/admin/login", data=login).status_code == 303
    return client


def page(response) -> str:
    return response.get_data(as_text=True)


# === 1. Lint ============================================================================


def _syntax_error(copy: Path):
    set_line(copy / OVERLAP, 12, "Hello {{ first_name ) }}")
    return copy / OVERLAP, 12, "unexpected ')'"


def _undefined_name(copy: Path):
    set_line(copy / OVERLAP, 30, "{{ first_name }}, one more thing, {{ nickname }}.")
    return copy / OVERLAP, 30, "'nickname' is undefined"


def _unknown_snippet(copy: Path):
    set_line(copy / OVERLAP, 20, '{% include "_snippets/nope.md" %}')
    return copy / OVERLAP, 20, "_snippets/nope.md"


def _missing_subject(copy: Path):
    replace_in(
        copy / OVERLAP, "subject: Day 3: where the two roles meet, and where they part\n", ""
    )
    return copy / OVERLAP, 1, "the front matter has no subject"


def _missing_preheader(copy: Path):
    path = copy / OVERLAP
    set_line(path, 3, "")
    return path, 1, "the front matter has no preheader"


def _html_too_big(copy: Path):
    set_line(copy / OVERLAP, 20, "A very long paragraph. " * 5000)
    return copy / OVERLAP, None, "the HTML is over 100 KB after inlining"


def _relative_link(copy: Path):
    set_line(copy / OVERLAP, 20, "Read [the example](/path) first.")
    return copy / OVERLAP, 20, "link '/path' is not an absolute http(s) URL"


def _mailto_link(copy: Path):
    set_line(copy / OVERLAP, 20, "Questions? [Write to us](mailto:team@example.com).")
    return copy / OVERLAP, 20, "link 'mailto:team@example.com' is not an absolute http(s) URL"


def _javascript_link(copy: Path):
    set_line(copy / OVERLAP, 20, "[Click here](javascript:alert(1)) for a surprise.")
    return copy / OVERLAP, 20, "link 'javascript:alert(1)' is not an absolute http(s) URL"


def _duplicate_key(copy: Path):
    manifest = copy / PVP / "sequence.toml"
    replace_in(manifest, 'key = "overlap"', 'key = "product-manager"')
    second = line_of(manifest, '"product-manager"', occurrence=2)
    return manifest, second, "step key 'product-manager' is used twice"


def _missing_key(copy: Path):
    manifest = copy / PVP / "sequence.toml"
    replace_in(manifest, 'key = "overlap"\n', "")
    # Nothing names the step any more; the message counts it ("step 4") instead.
    return manifest, None, "step 4: `key` must be lowercase letters, digits and dashes"


def _day_going_backwards(copy: Path):
    manifest = copy / PVP / "sequence.toml"
    replace_in(manifest, 'key = "overlap"\nday = 3', 'key = "overlap"\nday = 1')
    line = line_of(manifest, 'key = "overlap"')
    return manifest, line, "step 'overlap' has a day before the step above"


def _layout_without_unsubscribe(copy: Path):
    replace_in(copy / "_layout.html", "{{ unsubscribe_url }}", "")
    return copy / "_layout.html", 1, "course emails must show the unsubscribe link"


LINT_ERRORS = {
    "jinja-syntax-error": _syntax_error,
    "undefined-name": _undefined_name,
    "unknown-snippet": _unknown_snippet,
    "missing-subject": _missing_subject,
    "missing-preheader": _missing_preheader,
    "html-over-100kb": _html_too_big,
    "relative-link": _relative_link,
    "mailto-link": _mailto_link,
    "javascript-link": _javascript_link,
    "duplicate-step-key": _duplicate_key,
    "missing-step-key": _missing_key,
    "day-going-backwards": _day_going_backwards,
    "layout-without-unsubscribe-url": _layout_without_unsubscribe,
}


@pytest.mark.parametrize("case", list(LINT_ERRORS))
def test_lint_names_the_file_and_line_of_each_problem(stack, tmp_path, case):
    copy = copy_templates(tmp_path)
    path, line, expected = LINT_ERRORS[case](copy)

    problems = lint_templates(stack.with_env(NURTURE_TEMPLATES=str(copy)).settings)

    messages = [str(p) for p in problems]
    assert problems, "lint found nothing"
    assert not [p for p in problems if p.warning], messages
    where = f"{path}:{line}: " if line is not None else f"{path}:"
    assert any(m.startswith(where) and expected in m for m in messages), (where, messages)
    # The marketer is sent to the one file that is wrong, and to no other.
    assert all(m.startswith(f"{path}:") for m in messages), messages


def test_lint_warns_about_a_long_subject_and_still_passes(stack, tmp_path):
    copy = copy_templates(tmp_path)
    subject = "Day 3: where the two roles meet, where they part, and what all of that means for you"
    assert len(subject) > 78
    set_line(copy / OVERLAP, 2, f"subject: {subject}")
    edited = stack.with_env(NURTURE_TEMPLATES=str(copy))

    problems = lint_templates(edited.settings)

    expected = (
        f"{copy / OVERLAP}:2: the subject has {len(subject)} characters; "
        "inboxes cut it off after about 78"
    )
    assert [(p.message, p.warning) for p in problems] == [(expected, True)]
    assert str(problems[0]) == f"{expected} (warning)"
    cli = run_nurture(edited, "lint")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"{expected} (warning)" in cli.stdout.splitlines()
    assert "all emails render" in cli.stdout
    # The preview says so too, where the marketer is looking.
    admin = signed_in(create_app(edited.settings), edited.settings)
    shown = page(admin.get(f"/admin/preview/{PVP}/overlap"))
    assert f"This subject has {len(subject)} characters" in shown
    assert "This subject has" not in page(admin.get(f"/admin/preview/{PVP}/welcome"))


def test_a_link_to_this_machine_is_an_error_only_in_production(stack, tmp_path):
    copy = copy_templates(tmp_path)
    set_line(copy / OVERLAP, 20, "Try it on [your own machine](http://localhost/x).")
    development = stack.with_env(NURTURE_TEMPLATES=str(copy))
    production = development.with_env(
        NURTURE_ENV="production",
        SECRET_KEY="a-production-secret-key",
        POSTAL_ADDRESS="Course Team, 12 Test Street, Testville",
        BASE_URL="https://courses.example.org",
    )

    assert lint_templates(development.settings) == []
    problems = lint_templates(production.settings)

    assert [str(p) for p in problems] == [
        f"{copy / OVERLAP}:20: link 'http://localhost/x' points at this machine"
    ]


def test_cli_lint_prints_file_line_message_and_exits_1_on_errors(stack, tmp_path):
    copy = copy_templates(tmp_path)
    set_line(
        copy / PVP / "02-product-manager.md", 12, "Its roots {% if %} are in brand management."
    )
    set_line(copy / CSC / "02-build-evidence.md", 9, "### 1. Pick {{ one_small }} project")
    set_line(copy / OVERLAP, 20, "Read [the example](/path) first.")
    broken = stack.with_env(NURTURE_TEMPLATES=str(copy))

    cli = run_nurture(broken, "lint")

    assert cli.returncode == 1, cli.stdout + cli.stderr
    lines = cli.stdout.splitlines()
    assert "Traceback" not in cli.stdout + cli.stderr
    assert "all emails render" not in cli.stdout
    expected = [
        rf"{re.escape(str(copy / PVP / '02-product-manager.md'))}:12: .+",
        rf"{re.escape(str(copy / CSC / '02-build-evidence.md'))}:9: 'one_small' is undefined",
        rf"{re.escape(str(copy / OVERLAP))}:20: link '/path' is not an absolute http\(s\) URL",
    ]
    for pattern in expected:
        assert [line for line in lines if re.fullmatch(pattern, line)], (pattern, lines)
    assert len(lines) == 3, lines


def test_cli_lint_passes_the_shipped_templates(stack):
    assert lint_templates(stack.settings) == []
    cli = run_nurture(stack, "lint")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.strip() == "all emails render"


# === 2. The sandbox =====================================================================

SANDBOX_PAYLOADS = {
    f"{PVP}/02-product-manager.md": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    f"{PVP}/03-project-manager.md": "{{ cycler.__init__.__globals__ }}",
    f"{PVP}/04-overlap.md": "{{ self._TemplateReference__context }}",
    f"{PVP}/05-which-fits.md": "{{ config }}",
    f"{CSC}/02-build-evidence.md": '{{ lipsum.__globals__["os"] }}',
}
PAYLOAD_LINE = 7
INTERNALS = ("subclasses", "<class", "<function", "<module", "<built-in", "os.environ")


def assert_no_internals(text: str, *secrets: str) -> None:
    for needle in (*INTERNALS, *secrets):
        assert needle not in text, f"{needle!r} leaked: {text[:2000]}"


def test_sandbox_refuses_escapes_and_leaks_nothing(stack, tmp_path):
    copy = copy_templates(tmp_path)
    for name, payload in SANDBOX_PAYLOADS.items():
        set_line(copy / name, PAYLOAD_LINE, payload)
    sandboxed = stack.with_env(NURTURE_TEMPLATES=str(copy))
    settings = sandboxed.settings
    secrets = (settings.secret_key, os.environ.get("PATH", "PATH-unset"), str(os.getpid()))
    outputs: list[str] = []

    problems = [str(p) for p in lint_templates(settings)]
    outputs += problems
    for name in SANDBOX_PAYLOADS:
        where = f"{copy / name}:{PAYLOAD_LINE}: "
        assert [p for p in problems if p.startswith(where)], (where, problems)

    renderer = Renderer(copy, postal_address=settings.postal_address, course_url=COURSE_URL)
    for name in SANDBOX_PAYLOADS:
        for first_name in ("Alex", ""):
            with pytest.raises(RenderError) as caught:
                renderer.render(
                    name, {"first_name": first_name}, unsubscribe_url="https://x.test/u/1"
                )
            assert str(caught.value).startswith(f"{copy / name}:{PAYLOAD_LINE}: ")
            outputs.append(str(caught.value))

    cli = run_nurture(sandboxed, "lint")
    assert cli.returncode == 1
    outputs += [cli.stdout, cli.stderr]

    admin = signed_in(create_app(settings), settings)
    for name in SANDBOX_PAYLOADS:
        sequence, file = name.split("/")
        step = next(s.key for s in load_sequences(copy)[sequence].steps if s.file == file)
        response = admin.get(f"/admin/preview/{sequence}/{step}")
        assert response.status_code == 422
        assert f"{name}:{PAYLOAD_LINE}:" in page(response)  # within the templates folder
        assert str(copy) not in page(response)
        outputs.append(page(response))

    for output in outputs:
        assert_no_internals(output, *secrets)


# === 3. Every email, both parts =========================================================

HREF = re.compile(r'<a\b[^>]*\bhref="([^"]*)"', re.IGNORECASE)
MARKUP = [
    (re.compile(r"</?[a-zA-Z][^>\n]*>"), "an HTML tag"),
    (re.compile(r"&(?:[a-zA-Z]+|#\d+);"), "an HTML entity"),
    (re.compile(r"\*\*|__"), "bold markers"),
    (re.compile(r"\]\(|\{\.|\{\{|\{%"), "Markdown or Jinja syntax"),
    (re.compile(r"(?m)^#+ "), "a Markdown heading"),
    (re.compile(r"\\[\\`*_{}\[\]()#+\-.!|]"), "a Markdown escape"),
]


@pytest.mark.parametrize(("sequence", "step"), ALL_EMAILS, ids=[f"{s}/{k}" for s, k in ALL_EMAILS])
def test_every_email_renders_with_and_without_a_name(settings, sequence, step):
    for first_name, greeting in (("Alex", "Hi Alex,"), ("", "Hi there,")):
        message = preview_message(settings, sequence, step, first_name=first_name)
        text, html = parts(message)
        assert message["X-Nurture-Step"] == f"{sequence}/{step}"
        assert greeting in text and greeting in html, (first_name, text[:200])
        unsubscribe = message["List-Unsubscribe"].strip("<>")
        content_links = [u for u in HREF.findall(html) if u != unsubscribe]
        assert len(content_links) <= 1, content_links
        assert all(u == COURSE_URL for u in content_links), content_links
        body = text.rpartition("\n-- \n")[0]
        assert len(re.findall(r"https?://", body)) == len(content_links), body
        for pattern, what in MARKUP:
            found = pattern.search(text)
            assert found is None, f"{what} in the text part: {found.group(0)!r}"


HELPERS_EMAIL = """---
subject: A word from a mentor
preheader: A quote, a button and the course card.
---
Hi {{ first_name or "there" }},

{{ quote("The fastest way to learn the job is to do a small piece of it.", "A mentor") }}

{{ button("Book a call", course_url) }}

{% include "_snippets/course-card.md" %}

Talk soon,
The course team
"""


def test_button_quote_and_snippet_render_in_html_and_read_naturally_in_text(stack, tmp_path):
    copy = copy_templates(tmp_path)
    (copy / OVERLAP).write_text(HELPERS_EMAIL, encoding="utf-8")
    settings = stack.with_env(NURTURE_TEMPLATES=str(copy)).settings

    message = preview_message(settings, PVP, "overlap")
    text, html = parts(message)

    buttons = re.findall(r"<a\b[^>]*>(?:Book a call|See the course and how to join)</a>", html)
    assert len(buttons) == 2, buttons
    for tag in buttons:
        assert 'class="button"' in tag
        assert f'href="{COURSE_URL}"' in tag
        assert re.search(r'style="[^"]*background-color: ?#1d5c8c', tag), tag
    quote_html = re.search(r"<blockquote\b[^>]*>(.*?)</blockquote>", html, re.S)
    assert quote_html, html
    assert "The fastest way to learn the job is to do a small piece of it." in quote_html.group(1)
    assert "— A mentor" in unescape(quote_html.group(1))  # non-ASCII goes as &#8212;
    assert re.search(r"<h3\b[^>]*>The six-month course</h3>", html)

    lines = text.splitlines()
    assert "> The fastest way to learn the job is to do a small piece of it." in lines
    assert "> — A mentor" in lines
    assert f"Book a call: {COURSE_URL}" in lines
    assert "THE SIX-MONTH COURSE" in lines
    assert f"See the course and how to join: {COURSE_URL}" in lines
    assert "- Get one-on-one mentoring along the way." in lines
    for pattern, what in MARKUP:
        found = pattern.search(text)
        assert found is None, f"{what} in the text part: {found.group(0)!r}"


# === 4. Safe edits to a live sequence ===================================================


def live_course(stack, tmp_path):
    """A copy of the templates and three subscribers at different places in the course.

    By T0: Alice (started three days ago) waits for which-fits, Bob (two days ago) for
    overlap, Carol (in Tokyo, just now) for product-manager.
    """
    copy = copy_templates(tmp_path)
    settings = stack.with_env(NURTURE_TEMPLATES=str(copy)).settings
    people = {
        "alice": enroll(settings, "alice@example.com", now=T0 - timedelta(days=3)),
        "bob": enroll(settings, "bob@example.com", now=T0 - timedelta(days=2)),
        "carol": enroll(settings, "carol@example.com", now=T0, timezone="Asia/Tokyo"),
    }
    run_until(settings, T0)
    places = {who: enrollment_of(settings, sid).next_step for who, sid in people.items()}
    assert places == {"alice": "which-fits", "bob": "overlap", "carol": "product-manager"}
    return copy, settings, people


def assert_nothing_twice(smtp, *emails: str) -> None:
    for email in emails:
        steps = received(smtp, email)
        assert len(steps) == len(set(steps)), (email, steps)


@BOTH_DATABASES
def test_editing_a_sent_email_changes_future_sends_only(stack, smtp, tmp_path):
    copy, settings, people = live_course(stack, tmp_path)
    [alice_pm] = messages_to(smtp, "alice@example.com", f"{PVP}/product-manager")
    pm_line = "Today is about the product manager: the person who answers for whether"
    fits_line = "Neither role is a step up from the other."
    replace_in(copy / PVP / "02-product-manager.md", pm_line, f"(Revised.) {pm_line}")
    replace_in(copy / PVP / "05-which-fits.md", fits_line, f"(Revised too.) {fits_line}")

    run_until(settings)

    for email in ("alice@example.com", "bob@example.com", "carol@example.com"):
        assert received(smtp, email) == PVP_KEYS, email
    assert "(Revised.)" not in text_part(alice_pm)
    [bob_pm] = messages_to(smtp, "bob@example.com", f"{PVP}/product-manager")
    assert "(Revised.)" not in text_part(bob_pm)
    [carol_pm] = messages_to(smtp, "carol@example.com", f"{PVP}/product-manager")
    assert "(Revised.) Today is about the product manager" in text_part(carol_pm)
    assert "(Revised.) Today is about the product manager" in html_part(carol_pm)
    for email in ("alice@example.com", "bob@example.com", "carol@example.com"):
        [fits] = messages_to(smtp, email, f"{PVP}/which-fits")
        assert "(Revised too.) Neither role" in text_part(fits), email
    # Later due-scans find nothing more to send.
    assert advance(settings, T0 + timedelta(days=30)).sent == 0
    assert_nothing_twice(smtp, "alice@example.com", "bob@example.com", "carol@example.com")


NEW_STEP = """
[[steps]]
key = "interview-tips"
day = 3
send_at = "09:00"
file = "08-interview-tips.md"
"""
NEW_EMAIL = """---
subject: Bonus: five questions interviewers ask
preheader: What hiring managers ask product and project managers, and how to prepare.
---
Hi {{ first_name or "there" }},

Here are five questions interviewers ask, and how to prepare for each.
"""


def insert_interview_tips(copy: Path, backfill: bool) -> None:
    (copy / PVP / "08-interview-tips.md").write_text(NEW_EMAIL, encoding="utf-8")
    block = NEW_STEP + ("backfill = true\n" if backfill else "")
    manifest = copy / PVP / "sequence.toml"
    replace_in(
        manifest, 'file = "03-project-manager.md"\n', f'file = "03-project-manager.md"\n{block}'
    )
    keys = [s.key for s in load_sequences(copy)[PVP].steps]
    assert keys == [*PVP_KEYS[:3], "interview-tips", *PVP_KEYS[3:]]


@BOTH_DATABASES
@pytest.mark.parametrize("backfill", [False, True], ids=["plain", "backfill"])
def test_inserting_a_step_reaches_only_those_who_have_not_passed_it(
    stack, smtp, tmp_path, backfill
):
    copy, settings, people = live_course(stack, tmp_path)
    waiting = {who: enrollment_of(settings, sid).next_due_at for who, sid in people.items()}
    insert_interview_tips(copy, backfill)

    run_until(settings)

    with_tips = [*PVP_KEYS[:3], "interview-tips", *PVP_KEYS[3:]]
    # Carol had not reached the new step: she gets it in its place.
    assert received(smtp, "carol@example.com") == with_tips
    if backfill:
        # Alice and Bob are past it: with backfill it is their very next email, sent when
        # their next email was due, and then the course goes on where they were.
        assert received(smtp, "alice@example.com") == [
            *PVP_KEYS[:4],
            "interview-tips",
            *PVP_KEYS[4:],
        ]
        assert received(smtp, "bob@example.com") == with_tips
        for who in ("alice", "bob"):
            tips = [d for d in deliveries_of(settings, people[who]) if d.step == "interview-tips"]
            assert [d.sent_at for d in tips] == [waiting[who]], who
    else:
        assert received(smtp, "alice@example.com") == PVP_KEYS
        assert received(smtp, "bob@example.com") == PVP_KEYS
    assert_nothing_twice(smtp, "alice@example.com", "bob@example.com", "carol@example.com")
    for sid in people.values():
        assert enrollment_of(settings, sid).status == EnrollmentStatus.COMPLETED


@BOTH_DATABASES
def test_removing_the_step_someone_waits_for_moves_them_on(stack, smtp, tmp_path):
    copy, settings, people = live_course(stack, tmp_path)
    bob_due = enrollment_of(settings, people["bob"]).next_due_at
    replace_in(
        copy / PVP / "sequence.toml",
        '[[steps]]\nkey = "overlap"\nday = 3\nsend_at = "09:00"\nfile = "04-overlap.md"\n\n',
        "",
    )

    advance(settings, bob_due)

    # Bob waited for overlap; he gets the step after it at the time he was due.
    assert received(smtp, "bob@example.com")[-1] == "which-fits"
    [which_fits] = [d for d in deliveries_of(settings, people["bob"]) if d.step == "which-fits"]
    assert which_fits.sent_at == bob_due

    run_until(settings)

    without = [k for k in PVP_KEYS if k != "overlap"]
    assert received(smtp, "alice@example.com") == PVP_KEYS  # had it already
    assert received(smtp, "bob@example.com") == without
    assert received(smtp, "carol@example.com") == without
    for sid in people.values():
        assert enrollment_of(settings, sid).status == EnrollmentStatus.COMPLETED
    assert_nothing_twice(smtp, "alice@example.com", "bob@example.com", "carol@example.com")


@BOTH_DATABASES
def test_swapping_two_steps_never_sends_a_step_again(stack, smtp, tmp_path):
    copy, settings, people = live_course(stack, tmp_path)
    before = {email: received(smtp, email) for email in ("alice@example.com", "bob@example.com")}
    manifest = copy / PVP / "sequence.toml"
    overlap = 'key = "overlap"\nday = 3\nsend_at = "09:00"\nfile = "04-overlap.md"'
    which_fits = 'key = "which-fits"\nday = 4\nsend_at = "09:00"\nfile = "05-which-fits.md"'
    replace_in(manifest, overlap, "@@FIRST@@")
    replace_in(manifest, which_fits, "@@SECOND@@")
    replace_in(manifest, "@@FIRST@@", which_fits.replace("day = 4", "day = 3"))
    replace_in(manifest, "@@SECOND@@", overlap.replace("day = 3", "day = 4"))
    swapped = [*PVP_KEYS[:3], "which-fits", "overlap", *PVP_KEYS[5:]]
    assert [s.key for s in load_sequences(copy)[PVP].steps] == swapped

    run_until(settings)

    # Alice had overlap and waited for which-fits: she gets which-fits, never overlap again.
    assert before["alice@example.com"] == PVP_KEYS[:4]
    assert received(smtp, "alice@example.com") == PVP_KEYS
    # Bob waited for overlap; which-fits now comes before his place, like a new step.
    assert before["bob@example.com"] == PVP_KEYS[:3]
    assert received(smtp, "bob@example.com") == [*PVP_KEYS[:4], *PVP_KEYS[5:]]
    # Carol had not reached either: she gets the new order.
    assert received(smtp, "carol@example.com") == swapped
    assert_nothing_twice(smtp, "alice@example.com", "bob@example.com", "carol@example.com")
    for sid in people.values():
        assert enrollment_of(settings, sid).status == EnrollmentStatus.COMPLETED


@BOTH_DATABASES
def test_the_second_sequence_can_be_joined_by_form_and_api(app, client, settings, smtp):
    form_page = client.get(f"/join/{CSC}")
    assert form_page.status_code == 200
    html = page(form_page)
    assert f'<input type="hidden" name="sequence" value="{CSC}">' in html
    assert "\u201cCareer switch checklist\u201d" in html
    assert consent_text("Career switch checklist") in html

    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    form = {
        "csrf_token": token,
        "email": "sam@example.com",
        "first_name": "Sam",
        "timezone": "Europe/Paris",
        "sequence": CSC,
    }
    assert client.post("/subscribe", data=form).status_code == 303
    api = client.post(API, json={"email": "ria@example.com", "sequence": CSC})
    assert api.status_code == 202

    def confirm_by_email(email: str) -> int:
        with session_scope(settings.database_url) as session:
            subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
            [pending] = session.scalars(
                select(Delivery).where(
                    Delivery.subscriber_id == subscriber_id, Delivery.step == CONFIRMATION_STEP
                )
            ).all()
        assert send(settings, [pending.id], utcnow()).sent == 1
        [message] = [
            m
            for m in smtp.messages
            if email in str(m["To"]) and m["X-Nurture-Step"] == CONFIRMATION_STEP
        ]
        path = link_in(message, "/confirm/").split("nurture.test", 1)[1]
        assert app.test_client().get(path).status_code == 200
        return subscriber_id

    sam = confirm_by_email("sam@example.com")
    ria = confirm_by_email("ria@example.com")
    # Sam, already subscribed, joins the other course through the API.
    assert client.post(API, json={"email": "sam@example.com", "sequence": PVP}).status_code == 202

    with session_scope(settings.database_url) as session:
        enrolled = {
            (e.subscriber_id, e.sequence): e.status for e in session.scalars(select(Enrollment))
        }
        consents = {
            sid: [
                c.consent_text
                for c in session.scalars(select(Consent).where(Consent.subscriber_id == sid))
            ]
            for sid in (sam, ria)
        }
    assert enrolled == {(sam, CSC): "active", (sam, PVP): "active", (ria, CSC): "active"}
    assert consents[ria] == [consent_text("Career switch checklist")]
    # Consent evidence: Sam agreed to each course's own sentence, once each.
    assert sorted(consents[sam]) == sorted(
        [
            consent_text("Career switch checklist"),
            consent_text("Product manager or project manager?"),
        ]
    )

    run_until(settings)

    assert received(smtp, "sam@example.com", CSC) == CSC_KEYS
    assert received(smtp, "sam@example.com", PVP) == PVP_KEYS
    assert received(smtp, "ria@example.com", CSC) == CSC_KEYS
    assert received(smtp, "ria@example.com", PVP) == []
    [sam_csc_welcome] = messages_to(smtp, "sam@example.com", f"{CSC}/welcome")
    assert sam_csc_welcome["List-Id"].startswith("Career switch checklist <")
    assert "Hi Sam," in text_part(sam_csc_welcome)
    assert "\u201cCareer switch checklist\u201d" in unescape(html_part(sam_csc_welcome))


# === 5. nurture plan ====================================================================


def plan_setup(stack, tmp_path):
    """The published templates, and Alice (Tokyo), Bob (New York) and Carol (Paris) in them.

    By T0 Alice waits for overlap (the minimum gap pushed her course back a day), Bob for
    product-manager, Carol for build-evidence.
    """
    published = copy_templates(tmp_path, "published")
    # A process remembers the versions it recorded, whatever the database (see
    # test_each_database_records_the_version_it_runs); a version of this test's own keeps
    # it independent of tests that ran the shipped templates before it.
    for sequence in (PVP, CSC):
        with (published / sequence / "01-welcome.md").open("a", encoding="utf-8") as file:
            file.write(f"{{# published by {uuid.uuid4().hex} #}}\n")
    settings = stack.with_env(NURTURE_TEMPLATES=str(published)).settings
    enroll(settings, "alice@example.com", now=T0 - timedelta(days=3), timezone="Asia/Tokyo")
    enroll(settings, "bob@example.com", now=T0 - timedelta(hours=1), timezone="America/New_York")
    enroll(
        settings,
        "carol@example.com",
        now=T0 - timedelta(hours=1),
        timezone="Europe/Paris",
        sequence=CSC,
    )
    run_until(settings, T0)
    with session_scope(settings.database_url) as session:
        record_published(session, load_sequences(published), T0)
    return published, settings


def test_plan_compares_an_inserted_backfill_step_with_the_published_version(stack, smtp, tmp_path):
    published, settings = plan_setup(stack, tmp_path)
    proposed = copy_templates(tmp_path, "proposed")
    insert_interview_tips(proposed, backfill=True)

    with session_scope(settings.database_url) as session:
        live = {name: seq for name, (seq, _) in published_sequences(session).items()}
        assert sorted(live) == [CSC, PVP]
        diff = compare(session, settings, live, load_sequences(proposed), T0, days=9)
        unchanged = compare(session, settings, live, load_sequences(published), T0, days=9)

    assert diff.counts_before[f"{PVP}/interview-tips"] == 0
    assert diff.counts_after[f"{PVP}/interview-tips"] == 2
    assert [c.email for c in diff.changes] == ["alice@example.com", "bob@example.com"]
    text = format_diff(diff)
    lines = text.splitlines()
    assert re.search(rf"^  {PVP}/interview-tips\s+0 -> 2\s+<- changed$", text, re.M), text
    assert re.search(rf"^  {CSC}/build-evidence\s+1 -> 1\s*$", text, re.M), text
    alice = lines.index(f"  alice@example.com ({PVP}, local time Asia/Tokyo)")
    assert lines[alice + 1 : alice + 3] == [
        "    now:      overlap Tue 03 Jun 09:00, which-fits Wed 04 Jun 09:00, "
        "six-month-course Thu 05 Jun 09:00, last-reminder Fri 06 Jun 09:00",
        "    proposed: interview-tips Tue 03 Jun 09:00, overlap Wed 04 Jun 09:00, "
        "which-fits Thu 05 Jun 09:00, six-month-course Fri 06 Jun 09:00, "
        "last-reminder Sat 07 Jun 09:00",
    ]
    bob = lines.index(f"  bob@example.com ({PVP}, local time America/New_York)")
    assert lines[bob + 2] == (
        "    proposed: product-manager Tue 03 Jun 09:00, project-manager Wed 04 Jun 09:00, "
        "interview-tips Thu 05 Jun 09:00, overlap Fri 06 Jun 09:00, which-fits Sat 07 Jun 09:00, "
        "six-month-course Sun 08 Jun 09:00, last-reminder Mon 09 Jun 09:00"
    )
    assert "carol@example.com" not in text
    assert unchanged.changes == []
    assert format_diff(unchanged).endswith("No subscriber's next emails change.")
    assert "<- changed" not in format_diff(unchanged)

    # The command, on the real clock: every remaining email is overdue and goes out from now.
    cli = run_nurture(stack.with_env(NURTURE_TEMPLATES=str(proposed)), "plan", "--days", "9")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    out = cli.stdout
    assert f"{PVP}: published 2025-06-02 10:00 UTC" in out
    assert re.search(rf"^  {PVP}/interview-tips\s+0 -> 2\s+<- changed$", out, re.M), out
    assert "2 subscribers would get something different" in out
    assert f"  alice@example.com ({PVP}, local time Asia/Tokyo)" in out
    assert f"  bob@example.com ({PVP}, local time America/New_York)" in out
    assert "carol@example.com" not in out
    stamp = r"\w{3} \d{2} \w{3} \d{2}:\d{2}"
    assert re.search(rf"^    proposed: interview-tips {stamp}, overlap {stamp}", out, re.M)

    same = run_nurture(stack.with_env(NURTURE_TEMPLATES=str(published)), "plan", "--days", "9")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "No subscriber's next emails change." in same.stdout
    assert "<- changed" not in same.stdout


def test_each_database_records_the_version_it_runs(stack, tmp_path):
    """A second (say, restored) database gets the running version recorded too."""
    sequences = load_sequences(SHIPPED)
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    Base.metadata.create_all(create_engine(other_url))
    for url in (stack.settings.database_url, other_url):
        with session_scope(url) as session:
            record_published(session, sequences, T0)
    for url in (stack.settings.database_url, other_url):
        with session_scope(url) as session:
            assert sorted(published_sequences(session)) == [CSC, PVP], url


@BOTH_DATABASES
def test_undoing_an_edit_makes_the_earlier_version_live_again(stack, tmp_path):
    """A, B, then A again (an undo, a branch switched back), in one process and in new
    ones: each due-scan records the version it runs, and none fails for it."""
    copy = copy_templates(tmp_path)
    settings = stack.with_env(NURTURE_TEMPLATES=str(copy)).settings
    welcome = copy / PVP / "01-welcome.md"
    original = welcome.read_text(encoding="utf-8")
    edited = original.replace("\n\n", "\n\nA new paragraph.\n\n", 1)

    def publish(text: str, at: datetime, *, new_process: bool) -> tuple[str, str, datetime]:
        """Record the files as a due-scan would; (their digest, the live one, since when)."""
        welcome.write_text(text, encoding="utf-8")
        if new_process:
            publishing._recorded.clear()
        sequences = load_sequences(copy)
        with session_scope(settings.database_url) as session:
            record_published(session, sequences, at)
            live = session.execute(
                select(SequenceVersion.digest, SequenceVersion.published_at)
                .where(SequenceVersion.sequence == PVP)
                .order_by(SequenceVersion.published_at.desc(), SequenceVersion.id.desc())
                .limit(1)
            ).one()
            assert published_sequences(session)[PVP][1] == live.published_at
        return publishing.digest_of(sequences[PVP]), live.digest, live.published_at

    for new_process, start in ((False, T0), (True, T0 + timedelta(hours=1))):
        for n, text in enumerate((original, edited, original, edited)):
            at = start + timedelta(minutes=n)
            files, live, since = publish(text, at, new_process=new_process)
            assert (live, since) == (files, at)

    # A due-scan in a new process, after another undo.
    welcome.write_text(original, encoding="utf-8")
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurture",
            "dispatch",
            "--now",
            (T0 + timedelta(hours=2)).isoformat(),
        ],
        cwd=ROOT,
        env=stack.with_env(NURTURE_TEMPLATES=str(copy)).process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert "failed" not in ran.stderr


# === 6. Admin ===========================================================================


@pytest.fixture
def workshop(stack, tmp_path):
    """A templates copy, its settings, and a signed-in admin client on it."""
    copy = copy_templates(tmp_path, "admin-emails")
    settings = stack.with_env(NURTURE_TEMPLATES=str(copy)).settings
    return copy, settings, signed_in(create_app(settings), settings)


ROW = re.compile(
    r"<td>(\w{3} \d{2} \w{3}) \(day (\d+)\)</td>\s*<td>(\d\d:\d\d) (\w+)</td>\s*<td>([a-z0-9-]+)"
)


@pytest.mark.parametrize("sequence", [PVP, CSC])
def test_calendar_lists_every_step_in_order_in_local_time(workshop, sequence):
    copy, settings, admin = workshop
    steps = load_sequences(copy)[sequence].steps

    before = utcnow().astimezone(TOKYO).date()
    response = admin.get(f"/admin/sequences/{sequence}?timezone=Asia/Tokyo")
    after = utcnow().astimezone(TOKYO).date()

    assert response.status_code == 200
    html = page(response)
    rows = ROW.findall(html)
    assert [key for *_, key in rows] == [s.key for s in steps]
    assert [int(day) for _, day, *_ in rows] == [s.day for s in steps]
    assert all(zone == "JST" for _, _, _, zone, _ in rows)
    assert [clock for _, _, clock, _, _ in rows] == ["08:00"] + ["09:00"] * (len(steps) - 1)
    for today in {before, after}:
        dates = [(today + timedelta(days=s.day)).strftime("%a %d %b") for s in steps]
        if [date for date, *_ in rows] == dates:
            break
    else:
        raise AssertionError(f"dates {[date for date, *_ in rows]} do not start today")
    for step in steps:
        assert preview_message(settings, sequence, step.key)["Subject"] in html


def test_a_calendar_asked_for_an_unknown_time_zone_says_so(workshop):
    """A misspelt zone was shown under its own name with UTC times: now the page says
    it knows no such zone, and which one the times are in."""
    _, settings, admin = workshop

    html = unescape(page(admin.get(f"/admin/sequences/{PVP}?timezone=Europe/Berlinn")))

    assert "There is no time zone called “Europe/Berlinn”" in html
    assert f"For a subscriber in {settings.default_timezone} who confirms" in html
    assert "For a subscriber in Europe/Berlinn" not in html
    known = unescape(page(admin.get(f"/admin/sequences/{PVP}?timezone=Europe/Berlin")))
    assert "There is no time zone" not in known
    assert all(zone in ("CET", "CEST") for *_, zone, _ in ROW.findall(known))


def test_preview_shows_html_and_text_with_and_without_a_name(workshop):
    _, _, admin = workshop

    named = admin.get(f"/admin/preview/{CSC}/build-evidence")
    nameless = admin.get(f"/admin/preview/{CSC}/build-evidence?first_name=")

    assert named.status_code == nameless.status_code == 200
    html = page(named)
    assert "<h1>Career switch checklist, part 2: build evidence</h1>" in html
    assert re.search(r'<iframe[^>]+srcdoc="[^"]*&lt;html', html, re.IGNORECASE)
    text = re.search(r"<pre>(.*?)</pre>", html, re.S).group(1)
    assert "Hi Alex," in text and "<p>" not in text and "&lt;p&gt;" not in text
    assert "Hi there," in page(nameless)
    assert "Hi Alex" not in page(nameless)


def test_eml_download_is_the_message_as_it_goes_out(workshop):
    _, _, admin = workshop

    response = admin.get(f"/admin/preview/{PVP}/overlap.eml")

    assert response.status_code == 200
    assert response.mimetype == "message/rfc822"
    assert f"filename={PVP}-overlap.eml" in response.headers["Content-Disposition"]
    message = message_from_bytes(response.data, policy=policy.default)
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["X-Nurture-Step"] == f"{PVP}/overlap"
    assert message["Subject"] == "Day 3: where the two roles meet, and where they part"
    assert "Hi Alex," in text_part(message)


def test_preview_stamp_changes_when_the_email_file_changes(workshop):
    copy, _, admin = workshop
    url = f"/admin/preview/{PVP}/overlap/stamp"
    assert f'var url = "{url}"' in page(admin.get(f"/admin/preview/{PVP}/overlap")), "polled"
    first = admin.get(url).get_json()["stamp"]
    assert admin.get(url).get_json()["stamp"] == first

    later = int(first) + 5 * 10**9
    os.utime(copy / OVERLAP, ns=(later, later))

    assert admin.get(url).get_json()["stamp"] == str(later)
    # Another email's file is not behind this preview.
    os.utime(copy / PVP / "05-which-fits.md", ns=(later + 10**9, later + 10**9))
    assert admin.get(url).get_json()["stamp"] == str(later)


def test_send_test_delivers_to_the_signed_in_marketer(workshop, smtp):
    _, _, admin = workshop
    preview = f"/admin/preview/{CSC}/make-the-move"

    refused = admin.post(f"{preview}/send-test")
    assert refused.status_code == 400
    assert smtp.messages == []

    response = admin.post(f"{preview}/send-test", data={"csrf_token": csrf_token(admin, preview)})

    assert response.status_code == 303
    location = urlsplit(response.headers["Location"])
    assert (location.path, parse_qs(location.query)) == (preview, {"sent": [ADMIN]})
    [message] = smtp.messages
    assert message["To"] == ADMIN
    assert message["Subject"] == "[Test] Career switch checklist, part 3: make the move"
    assert message["X-Nurture-Test"] == "1"
    assert message["X-Nurture-Step"] == f"{CSC}/make-the-move"
    followed = admin.get(response.headers["Location"])
    assert f"A test was sent to {ADMIN}." in page(followed)


def test_a_broken_template_shows_a_422_page_naming_file_and_line(workshop, smtp):
    copy, _, admin = workshop
    set_line(copy / OVERLAP, 30, "{{ first_name }}, see {{ nickname }}.")
    where = f"{OVERLAP}:30: "  # within the templates folder, as the marketer knows it
    preview = f"/admin/preview/{PVP}/overlap"

    for path in (preview, f"{preview}?first_name=", f"{preview}.eml"):
        response = admin.get(path)
        assert response.status_code == 422, path
        assert where in page(response), path
        assert str(copy) not in page(response), path
        assert "&#39;nickname&#39; is undefined" in page(response), path
    stamp = f"/admin/preview/{PVP}/overlap/stamp"
    assert stamp in page(admin.get(preview)), "the page reloads itself once the file is fixed"

    token = csrf_token(admin, f"/admin/preview/{PVP}/welcome")
    response = admin.post(f"{preview}/send-test", data={"csrf_token": token})
    assert response.status_code == 422
    assert where in page(response)
    assert smtp.messages == []

    calendar = admin.get(f"/admin/sequences/{PVP}")
    assert calendar.status_code != 500
    assert where in page(calendar) and str(copy) not in page(calendar)


# === 7. nurture send-test ===============================================================


def test_cli_send_test_delivers_a_marked_copy(stack, smtp):
    result = run_nurture(stack, "send-test", PVP, "overlap", "--to", "you@example.com")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"sent {PVP}/overlap to you@example.com"
    [message] = smtp.messages
    assert message["To"] == "you@example.com"
    assert message["Subject"] == "[Test] Day 3: where the two roles meet, and where they part"
    assert message["X-Nurture-Test"] == "1"
    assert message["X-Nurture-Step"] == f"{PVP}/overlap"
    assert message.get_content_type() == "multipart/alternative"
    assert "Today they meet." in text_part(message)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((PVP, "no-such-step", "--to", "you@example.com"), f"{PVP} has no step 'no-such-step'"),
        (("no-such-sequence", "welcome", "--to", "you@example.com"), "no sequence 'no-such-seq"),
        ((PVP, "overlap", "--to", "not-an-address"), "must have an @-sign"),
    ],
    ids=["unknown-step", "unknown-sequence", "bad-address"],
)
def test_cli_send_test_refuses_clearly(stack, smtp, args, expected):
    result = run_nurture(stack, "send-test", *args)

    assert result.returncode != 0
    assert result.stderr.startswith("Error: "), result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert smtp.messages == []


def test_held_emails_can_be_tried_at_once_once_the_file_is_fixed(stack, smtp, tmp_path):
    """A marketer who fixed the file need not wait out each held email's backoff (up to
    an hour): the dashboard's button makes them due now, once each, and viewers
    do not get it."""
    copy = copy_templates(tmp_path)
    settings = stack.with_env(NURTURE_TEMPLATES=str(copy)).settings
    app = create_app(settings)
    admin = signed_in(app, settings)
    now = utcnow()
    alice = enroll(settings, "alice@example.com", now=now)
    welcome = copy / PVP / "01-welcome.md"
    original = welcome.read_text(encoding="utf-8")
    set_line(welcome, 7, "Thanks for confirming, {{ nickname }}.")
    assert send(settings, tick(settings, now), now).retry == 1
    [held] = deliveries_of(settings, alice)
    assert held.not_before > utcnow(), "waits out its backoff"
    assert "Try the held emails now" in page(admin.get("/admin/"))

    welcome.write_text(original, encoding="utf-8")
    token = csrf_token(admin, "/admin/")
    response = admin.post("/admin/held/retry", data={"csrf_token": token})
    assert response.status_code == 303
    notice = unescape(page(admin.get(response.headers["Location"])))
    assert "1 held email will be tried at the next due-scan" in notice

    later = utcnow()
    assert send(settings, tick(settings, later), later).sent == 1
    assert received(smtp, "alice@example.com") == ["welcome"]
    again = admin.post("/admin/held/retry", data={"csrf_token": token})
    assert "0 held emails" in unescape(page(admin.get(again.headers["Location"])))

    viewer = signed_in(app, settings, "viewer", "viewer@example.com")
    own = {"csrf_token": csrf_token(viewer, "/admin/")}
    assert viewer.post("/admin/held/retry", data=own).status_code == 403


# === 7b. A manifest that does not load =================================================


def test_a_manifest_that_does_not_load_stops_nothing_else(stack, smtp, tmp_path):
    """A file name misspelt in one sequence.toml. A running process goes on with the
    course as it last loaded it, the pages, the API and the other course as before,
    while /healthz and the dashboard name the file and line. A process started
    after the typo leaves that course out (closed to signups, its emails waiting)
    rather than failing, and takes it up again once the file is fixed."""
    copy = copy_templates(tmp_path)
    settings = stack.with_env(NURTURE_TEMPLATES=str(copy)).settings
    app = create_app(settings)
    web, admin = app.test_client(), signed_in(app, settings)
    enroll(settings, "alice@example.com", now=T0)
    enroll(settings, "bob@example.com", now=T0, sequence=CSC)
    assert web.get("/").status_code == 200  # this process has loaded both courses

    def advance_live(now: datetime):
        """A due-scan and a worker's batch, with the sequences a live process serves."""
        ids: list[int] = []
        with session_scope(settings.database_url) as session:
            dispatch(session, settings, current_sequences(copy), now=now, publish=ids.extend)
        with session_scope(settings.database_url) as session:
            return send_batch(session, settings, current_sequences(copy), ids, clock=lambda: now)

    manifest = copy / PVP / "sequence.toml"
    replace_in(manifest, '"04-overlap.md"', '"04-overlaps.md"')
    line = line_of(manifest, '"overlap"')  # the step's key line, as lint says it
    problem = f"{PVP}/sequence.toml:{line}: step 4: file '04-overlaps.md' does not exist"

    assert web.get("/").status_code == 200
    assert web.get(f"/join/{CSC}").status_code == 200
    assert web.post("/api/v1/subscribers", json={"email": "cy@example.com"}).status_code == 202
    health = web.get("/healthz").get_json()
    assert (health["status"], health["templates"]) == ("degraded", f"error: {problem}")
    dashboard = unescape(page(admin.get("/admin/")))
    assert "Emails held back" in dashboard and problem in dashboard
    assert "the course goes on as it was before the last change to it" in dashboard
    assert str(copy) not in dashboard + str(health), "files named as the marketer knows them"
    assert advance_live(T0).sent == 2  # both welcomes
    assert received(smtp, "alice@example.com") == ["welcome"]
    # This process still serves the course as it was: a confirmation goes through.
    assert web.post("/api/v1/subscribers", json={"email": "eve@example.com"}).status_code == 202
    with session_scope(settings.database_url) as session:
        eve = session.scalar(select(Subscriber).where(Subscriber.email == "eve@example.com"))
        eve_link = f"/confirm/{make_confirm_token(settings.secret_key, eve.id, eve.consents[0].id)}"
    assert web.get(eve_link).status_code == 200
    assert subscriber_status(settings, "eve@example.com") == "active"

    current_sequences_cache.clear()  # as in a process started after the typo
    assert web.get("/").status_code == 404  # "this course is no longer open", not a 500
    assert web.get(f"/join/{CSC}").status_code == 200
    refused = web.post("/api/v1/subscribers", json={"email": "dee@example.com"})
    assert refused.status_code == 422 and "sequence" in refused.get_json()["errors"]
    assert web.get("/healthz").get_json()["templates"] == f"error: {problem}"
    assert "its course is closed to signups and its emails wait" in page(admin.get("/admin/"))
    # Cy signed up before the typo: confirming now would start no course, so it waits.
    with session_scope(settings.database_url) as session:
        cy = session.scalar(select(Subscriber).where(Subscriber.email == "cy@example.com"))
        cy_link = f"/confirm/{make_confirm_token(settings.secret_key, cy.id, cy.consents[0].id)}"
    early = web.get(cy_link)
    assert early.status_code == 503 and "open it again in a few minutes" in page(early)
    assert subscriber_status(settings, "cy@example.com") == "pending"
    day_two = T0 + timedelta(days=2, hours=1)
    advance_live(day_two)
    assert received(smtp, "alice@example.com") == ["welcome"], "waits for the file"
    assert received(smtp, "bob@example.com", CSC) == ["welcome", "build-evidence"]

    replace_in(manifest, '"04-overlaps.md"', '"04-overlap.md"')
    assert web.get("/healthz").get_json()["templates"] == "ok"
    assert "Emails held back" not in page(admin.get("/admin/"))
    advance_live(day_two + timedelta(hours=2))  # past the hour a missing course waits
    assert received(smtp, "alice@example.com") == ["welcome", "product-manager"]
    assert web.get(cy_link).status_code == 200  # the same link, once the course is back
    assert subscriber_status(settings, "cy@example.com") == "active"
    with session_scope(settings.database_url) as session:
        cy = session.scalar(select(Subscriber).where(Subscriber.email == "cy@example.com"))
        assert [e.status for e in cy.enrollments] == ["active"]


def subscriber_status(settings, email: str) -> str:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Subscriber.status).where(Subscriber.email == email))


def test_a_manifest_naming_a_file_made_after_it_loads_once_the_file_is_there(stack, tmp_path):
    """A marketer saves sequence.toml with a new step, then creates its file: a
    process that looked in between sees the step as soon as the file exists."""
    copy = copy_templates(tmp_path)
    manifest = copy / CSC / "sequence.toml"
    manifest.write_text(
        manifest.read_text(encoding="utf-8")
        + '\n[[steps]]\nkey = "bonus"\nday = 9\nfile = "09-bonus.md"\n',
        encoding="utf-8",
    )
    assert "09-bonus.md" in manifest_errors(copy)[CSC]
    assert CSC not in current_sequences(copy)  # never loaded here: left out meanwhile

    bonus = copy / CSC / "09-bonus.md"
    bonus.write_text("---\nsubject: A bonus\npreheader: One more\n---\nHi.\n", encoding="utf-8")

    assert manifest_errors(copy) == {}
    assert current_sequences(copy)[CSC].steps[-1].key == "bonus"


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        (b'title = "Caf\xe9"\n', "the file is not UTF-8"),
        (b"steps = [1]\n", "each step is a [[steps]] table"),
    ],
    ids=["latin-1", "step-not-a-table"],
)
def test_a_manifest_that_cannot_even_be_read_stops_nothing_else(stack, tmp_path, broken, problem):
    """Not only a TOML or step mistake: bytes that are not UTF-8, or a step that is not a
    table, make a clear error for that course, not a 500 for every page."""
    copy = copy_templates(tmp_path)
    settings = stack.with_env(NURTURE_TEMPLATES=str(copy)).settings
    web = create_app(settings).test_client()
    (copy / PVP / "sequence.toml").write_bytes(broken)

    health = web.get("/healthz")
    assert health.status_code == 200
    assert health.get_json()["status"] == "degraded"
    assert problem in health.get_json()["templates"]
    assert web.get(f"/join/{CSC}").status_code == 200
    signup = {"email": "x@example.com", "sequence": CSC}
    assert web.post("/api/v1/subscribers", json=signup).status_code == 202
    lint = [str(p) for p in lint_templates(settings)]
    assert any(problem in found for found in lint), lint


# === 8. A template error at send time ===================================================


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        ("Thanks for confirming, {{ nickname }}.", "'nickname' is undefined"),
        # Expressions that fail as Python, not as Jinja: held and reported all the same.
        ("Thanks for confirming, {{ 1 / 0 }}.", "ZeroDivisionError: division by zero"),
        ("{% for i in range(10 ** 9) %}{% endfor %}", "OverflowError: Range too big."),
    ],
    ids=["undefined", "division-by-zero", "huge-range"],
)
def test_a_broken_step_is_held_reported_and_sent_once_fixed(stack, smtp, tmp_path, broken, problem):
    copy = copy_templates(tmp_path)
    live = stack.with_env(NURTURE_TEMPLATES=str(copy))
    settings = live.settings
    alice = enroll(settings, "alice@example.com", now=T0)
    bob = enroll(settings, "bob@example.com", now=T0, sequence=CSC)
    welcome = copy / PVP / "01-welcome.md"
    original = welcome.read_text(encoding="utf-8")
    set_line(welcome, 7, broken)
    lint = [str(found) for found in lint_templates(settings)]
    assert any(found.startswith(f"{welcome}:7: {problem}") for found in lint), lint
    app = create_app(settings)
    health, admin = app.test_client(), signed_in(app, settings)

    ids = tick(settings, T0)
    assert len(ids) == 2
    result = send(settings, ids, T0)

    assert (result.sent, result.retry) == (1, 1)
    assert received(smtp, "bob@example.com", CSC) == ["welcome"]  # same batch, other sequence
    [held] = deliveries_of(settings, alice)
    assert (held.step, held.status) == ("welcome", DeliveryStatus.QUEUED)
    assert held.last_error.startswith(f"template error: {welcome}:7: {problem}")
    assert held.not_before > T0
    body = health.get("/healthz")
    assert body.status_code == 200
    assert body.get_json()["status"] == "degraded"
    assert body.get_json()["templates"].startswith(f"error: {PVP}/welcome is held: ")
    shown = body.get_json()["templates"]
    assert f"template error: {PVP}/01-welcome.md:7: {problem}" in shown, shown
    assert str(copy) not in shown, "a public page names no server path"
    dashboard = unescape(page(admin.get("/admin/")))
    assert f"{PVP}/welcome</b>: 1 email is" in dashboard, "the marketer sees it too"
    assert f"template error: {PVP}/01-welcome.md:7: {problem}" in dashboard
    assert "within 72 hours of when it was written" in dashboard

    # Still broken at Alice's next due time: retried and held again, and nothing overtakes it.
    pm_due = enrollment_of(settings, alice).next_due_at
    retry = advance(settings, pm_due)
    assert (retry.sent, retry.retry) == (0, 1)
    [held] = deliveries_of(settings, alice)
    assert (held.status, held.attempts) == (DeliveryStatus.QUEUED, 2)
    assert messages_to(smtp, "alice@example.com") == []

    welcome.write_text(original, encoding="utf-8")
    fixed_at = pm_due + timedelta(minutes=3)  # past the second backoff (at most 2 minutes)
    assert advance(settings, fixed_at).sent == 1

    assert received(smtp, "alice@example.com") == ["welcome"]
    [sent] = deliveries_of(settings, alice)
    assert (sent.status, sent.sent_at, sent.last_error) == ("sent", fixed_at, None)
    assert health.get("/healthz").get_json()["status"] == "ok"
    assert health.get("/healthz").get_json()["templates"] == "ok"
    assert "Emails held back" not in page(admin.get("/admin/"))

    run_until(settings, after=fixed_at)
    assert received(smtp, "alice@example.com") == PVP_KEYS
    assert received(smtp, "bob@example.com", CSC) == CSC_KEYS
    # The held email went out late; the next one still keeps the minimum gap after it.
    [_, product_manager, *_] = deliveries_of(settings, alice)
    gap = timedelta(hours=settings.min_gap_hours)
    assert product_manager.sent_at - fixed_at >= gap, product_manager.sent_at
    assert enrollment_of(settings, bob, CSC).status == EnrollmentStatus.COMPLETED
