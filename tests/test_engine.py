"""The delivery engine: weekends, lateness, the plan, click tracking, conversions.

Everything runs on the real parts: a real database, a real SMTP server
(aiosmtpd), the Flask test client and the real `nurture` console script. Time
is passed in as `now`; nothing sleeps for a schedule.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, date, datetime, time, timedelta
from html.parser import HTMLParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from celery.signals import before_task_publish
from conftest import BOTH_DATABASES
from itsdangerous import URLSafeSerializer
from sqlalchemy import func, select, update

import nurture
from nurture import tasks, tokens
from nurture.app import create_app
from nurture.config import Settings, load_settings
from nurture.db import session_scope
from nurture.delivery import send_batch
from nurture.models import (
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Event,
    Subscriber,
)
from nurture.scheduler import dispatch, next_due, plan, scheduled_at
from nurture.sequences import (
    Sequence,
    SequenceError,
    Step,
    first_steps,
    load_sequence,
    load_sequences,
)
from nurture.subscribers import SignupRequest, confirm, new_message_id, signup

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
SALES_KEYS = ["six-month-course", "last-reminder"]
NON_SALES_KEYS = [key for key in COURSE_KEYS if key not in SALES_KEYS]
BERLIN = ZoneInfo("Europe/Berlin")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")
TOKYO = ZoneInfo("Asia/Tokyo")
PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
T0 = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # a Monday
WEEK_OF_TICKS = 8 * 4 + 1  # every 6 hours for eight days
NURTURE_PACKAGE = Path(nurture.__file__).resolve().parent


def at(*args: int, tz=UTC) -> datetime:
    return datetime(*args, tzinfo=tz)


def pure_settings(tmp_path: Path, **env: str) -> Settings:
    return load_settings({"NURTURE_INSTANCE": str(tmp_path / "instance"), "SECRET_KEY": "k", **env})


def nine(day: int) -> Step:
    return Step(key=f"d{day}", day=day, file="x.md", send_at=time(9, 0))


# --- Helpers on a real database ----------------------------------------------------


class Broker:
    """A publish function that keeps the ids it was given."""

    def __init__(self):
        self.ids: list[int] = []

    def __call__(self, ids: list[int]) -> None:
        self.ids.extend(ids)


def sequences(settings: Settings):
    return load_sequences(settings.templates_path)


def sign_up(settings: Settings, email: str, *, now: datetime, timezone: str = "UTC") -> int:
    """A double opt-in signup; the id of the confirmation delivery it writes."""
    request = SignupRequest(
        email=email, first_name="Alex", timezone=timezone, sequence=SEQUENCE, source="api"
    )
    with session_scope(settings.database_url) as session:
        confirmation_id = signup(
            session, settings, request, first_steps=first_steps(sequences(settings)), now=now
        )
    assert confirmation_id is not None
    return confirmation_id


def enroll(settings: Settings, email: str, *, now: datetime = T0, timezone: str = "UTC") -> int:
    """Sign up, let the confirmation count as sent, confirm; the subscriber id."""
    confirmation_id = sign_up(settings, email, now=now, timezone=timezone)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == confirmation_id)
            .values(status=DeliveryStatus.SENT, sent_at=now)
        )
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        steps = first_steps(sequences(settings))
        assert confirm(session, subscriber_id, now=now, first_steps=steps) is not None
    return subscriber_id


def hand_out(settings: Settings, now: datetime) -> list[int]:
    """One due-scan at `now`; the delivery ids it gave the broker."""
    broker = Broker()
    with session_scope(settings.database_url) as session:
        dispatch(session, settings, sequences(settings), now=now, publish=broker)
    return broker.ids


def send(settings: Settings, ids: list[int], now: datetime):
    with session_scope(settings.database_url) as session:
        return send_batch(session, settings, sequences(settings), ids, clock=lambda: now)


def delivery(settings: Settings, delivery_id: int) -> Delivery:
    with session_scope(settings.database_url) as session:
        return session.get(Delivery, delivery_id)


def course_deliveries(settings: Settings, subscriber_id: int) -> dict[str, Delivery]:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(
            select(Delivery)
            .where(Delivery.subscriber_id == subscriber_id, Delivery.step != "confirmation")
            .order_by(Delivery.id)
        )
        return {row.step: row for row in rows}


def enrollment_of(settings: Settings, subscriber_id: int) -> Enrollment:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Enrollment).where(Enrollment.subscriber_id == subscriber_id))


def events(settings: Settings, kind: str, subscriber_id: int | None = None) -> list[Event]:
    query = select(Event).where(Event.kind == kind).order_by(Event.id)
    if subscriber_id is not None:
        query = query.where(Event.subscriber_id == subscriber_id)
    with session_scope(settings.database_url) as session:
        return list(session.scalars(query))


def deliver_up_to(settings: Settings, subscriber_id: int, key: str, start: datetime):
    """Run the due-scan at each due time until step `key` has a delivery; (id, now).

    Each email before it counts as sent when it is handed out (the row is
    marked, no SMTP), since the due-scan waits for a subscriber's previous
    email to go out before it writes the next.
    """
    now = start
    for _ in COURSE_KEYS:
        hand_out(settings, now)
        rows = course_deliveries(settings, subscriber_id)
        if key in rows:
            return rows[key].id, now
        with session_scope(settings.database_url) as session:
            session.execute(
                update(Delivery)
                .where(
                    Delivery.subscriber_id == subscriber_id,
                    Delivery.status == DeliveryStatus.QUEUED,
                )
                .values(status=DeliveryStatus.SENT, sent_at=now)
            )
        now = enrollment_of(settings, subscriber_id).next_due_at
        assert now is not None, f"the enrollment ended before {key}"
    raise AssertionError(f"no delivery for {key}")


def steps_received(smtp, email: str) -> list[str]:
    return [
        m["X-Nurture-Step"].removeprefix(f"{SEQUENCE}/")
        for m in smtp.messages
        if email in m["To"] and m["X-Nurture-Step"] != "confirmation"
    ]


def parts(message) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",)).get_content()
    page = message.get_body(preferencelist=("html",)).get_content()
    return text, page


class _Hrefs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.hrefs += [value for name, value in attrs if name == "href" and value]


def hrefs(page: str) -> list[str]:
    parser = _Hrefs()
    parser.feed(page)
    return parser.hrefs


def text_urls(text: str) -> list[str]:
    return re.findall(r"https?://[^\s<>()\[\]]+", text)


# --- 1. Weekends (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "started_at", "timezone", "weekday", "weekend"),
    [
        pytest.param(
            nine(2),  # Thursday noon in Berlin + 2 days = Saturday 09:00
            at(2026, 6, 4, 10, 0),
            "Europe/Berlin",
            at(2026, 6, 8, 9, 0, tz=BERLIN),
            at(2026, 6, 6, 9, 0, tz=BERLIN),
            id="berlin-saturday",
        ),
        pytest.param(
            nine(3),  # Thursday + 3 days = Sunday 09:00
            at(2026, 6, 4, 10, 0),
            "Europe/Berlin",
            at(2026, 6, 8, 9, 0, tz=BERLIN),
            at(2026, 6, 7, 9, 0, tz=BERLIN),
            id="berlin-sunday",
        ),
        pytest.param(
            # Saturday 00:30 in Berlin is still Friday 22:30 in UTC.
            Step(key="late", day=2, file="x.md", send_at=time(0, 30)),
            at(2026, 6, 4, 10, 0),
            "Europe/Berlin",
            at(2026, 6, 8, 0, 30, tz=BERLIN),
            at(2026, 6, 5, 22, 30),
            id="berlin-utc-friday-local-saturday",
        ),
        pytest.param(
            # No send time: Friday 23:30 UTC is Saturday 01:30 in Berlin.
            Step(key="untimed", day=1, file="x.md"),
            at(2026, 6, 4, 23, 30),
            "Europe/Berlin",
            at(2026, 6, 8, 1, 30, tz=BERLIN),
            at(2026, 6, 5, 23, 30),
            id="berlin-untimed-utc-friday-local-saturday",
        ),
        pytest.param(
            nine(2),  # Thursday 10:00 in Los Angeles + 2 days = Saturday 09:00 PDT
            at(2026, 6, 4, 17, 0),
            "America/Los_Angeles",
            at(2026, 6, 8, 9, 0, tz=LOS_ANGELES),
            at(2026, 6, 6, 9, 0, tz=LOS_ANGELES),
            id="los-angeles-saturday",
        ),
        pytest.param(
            nine(3),  # ... + 3 days = Sunday 09:00 PDT
            at(2026, 6, 4, 17, 0),
            "America/Los_Angeles",
            at(2026, 6, 8, 9, 0, tz=LOS_ANGELES),
            at(2026, 6, 7, 9, 0, tz=LOS_ANGELES),
            id="los-angeles-sunday",
        ),
    ],
)
def test_skip_weekends_moves_a_weekend_step_to_monday(step, started_at, timezone, weekday, weekend):
    sequence = Sequence(
        name="s", title="s", description="", path=Path("."), steps=(step,), skip_weekends=True
    )
    kwargs = dict(started_at=started_at, timezone=timezone, day_seconds=86400)

    moved = scheduled_at(step, **kwargs, skip_weekends=sequence.skip_weekends)
    assert moved == weekday
    local = moved.astimezone(ZoneInfo(timezone))
    assert local.weekday() == 0  # Monday
    if step.send_at is not None:
        assert local.time() == step.send_at

    # Without skip_weekends the step stays on its weekend day.
    stays = scheduled_at(step, **kwargs)
    assert stays == weekend
    assert stays.astimezone(ZoneInfo(timezone)).weekday() in (5, 6)


def test_a_local_friday_that_is_saturday_in_utc_is_not_moved():
    # Friday 18:00 in Los Angeles is already Saturday 01:00 UTC: a weekday here.
    step = Step(key="evening", day=1, file="x.md", send_at=time(18, 0))
    due = scheduled_at(
        step,
        started_at=at(2026, 6, 4, 17, 0),  # Thursday 10:00 PDT
        timezone="America/Los_Angeles",
        day_seconds=86400,
        skip_weekends=True,
    )
    assert due == at(2026, 6, 6, 1, 0)
    assert due.astimezone(LOS_ANGELES).weekday() == 4


@pytest.mark.parametrize("day_seconds", [60, 3600])
def test_shrunk_days_ignore_weekends(day_seconds):
    started_at = at(2026, 6, 4, 10, 0)  # Thursday
    for step in (nine(2), nine(3)):
        due = scheduled_at(
            step,
            started_at=started_at,
            timezone="Europe/Berlin",
            day_seconds=day_seconds,
            skip_weekends=True,
        )
        assert due == started_at + timedelta(seconds=step.day * day_seconds)


def test_plan_of_a_skip_weekends_sequence_has_no_weekend_sends(tmp_path):
    settings = pure_settings(tmp_path)
    steps = tuple(nine(day) for day in range(1, 7))
    started_at = at(2026, 6, 3, 10, 0)  # Wednesday noon in Berlin

    def planned(skip: bool) -> list[datetime]:
        sequence = Sequence(
            name="s", title="s", description="", path=tmp_path, steps=steps, skip_weekends=skip
        )
        first = scheduled_at(
            steps[0],
            started_at=started_at,
            timezone="Europe/Berlin",
            day_seconds=86400,
            skip_weekends=skip,
        )
        enrollment = Enrollment(
            sequence="s",
            status=EnrollmentStatus.ACTIVE,
            next_step=steps[0].key,
            next_due_at=first,
            started_at=started_at,
            timezone="Europe/Berlin",
        )
        result = plan(enrollment, sequence, settings, now=started_at)
        assert [step.key for step, _ in result] == [step.key for step in steps]
        return [due for _, due in result]

    # Saturday and Sunday both become Monday, and the minimum gap spreads the rest.
    assert planned(skip=True) == [at(2026, 6, day, 9, 0, tz=BERLIN) for day in (4, 5, 8, 9, 10, 11)]
    assert planned(skip=False) == [at(2026, 6, day, 9, 0, tz=BERLIN) for day in range(4, 10)]


def copy_templates(tmp_path: Path) -> Path:
    copy = tmp_path / "emails"
    shutil.copytree(nurture.ROOT / "templates" / "emails", copy)
    return copy


def set_skip_weekends(templates: Path, value: str) -> int:
    """Put `skip_weekends = value` into the course manifest; the line it is on."""
    manifest = templates / SEQUENCE / "sequence.toml"
    lines = manifest.read_text(encoding="utf-8").split("\n")
    index = next(i for i, line in enumerate(lines) if line.startswith("description"))
    lines.insert(index + 1, f"skip_weekends = {value}")
    manifest.write_text("\n".join(lines), encoding="utf-8")
    return index + 2


def test_load_sequence_reads_skip_weekends(tmp_path):
    original = load_sequence(nurture.ROOT / "templates" / "emails" / SEQUENCE)
    assert original.skip_weekends is False

    templates = copy_templates(tmp_path)
    set_skip_weekends(templates, "true")
    sequence = load_sequence(templates / SEQUENCE)
    assert sequence.skip_weekends is True
    assert [step.key for step in sequence.steps] == COURSE_KEYS


def test_load_sequence_refuses_a_skip_weekends_that_is_not_a_boolean(tmp_path):
    templates = copy_templates(tmp_path)
    line = set_skip_weekends(templates, '"yes"')
    with pytest.raises(SequenceError) as caught:
        load_sequence(templates / SEQUENCE)
    assert f"sequence.toml:{line}:" in str(caught.value)
    assert "skip_weekends" in str(caught.value)


# --- 2. Lateness after an outage ---------------------------------------------------


def test_a_pushed_step_waits_for_the_next_send_time_in_tokyo(tmp_path):
    settings = pure_settings(tmp_path)
    started_at = at(2026, 6, 1, 0, 0)  # Monday 09:00 in Tokyo
    step = nine(1)  # planned for Tuesday 09:00 JST, long past after the outage
    kwargs = dict(started_at=started_at, timezone="Asia/Tokyo", settings=settings)

    previous = at(2026, 6, 3, 6, 0)  # Wednesday 15:00 JST; + 20 h is Thursday 11:00 JST
    due = next_due(step, previous_send=previous, **kwargs)
    assert due == at(2026, 6, 5, 9, 0, tz=TOKYO)  # not Thursday 09:00, which is too soon
    assert due >= previous + timedelta(hours=20)
    assert due - timedelta(days=1) < previous + timedelta(hours=20)

    previous = at(2026, 6, 3, 4, 0)  # + 20 h is exactly Thursday 09:00 JST
    assert next_due(step, previous_send=previous, **kwargs) == at(2026, 6, 4, 9, 0, tz=TOKYO)


@pytest.mark.parametrize(
    ("previous", "without_skip"),
    [
        # Friday 10:00 JST + 20 h = Saturday 06:00 JST
        (at(2026, 6, 5, 1, 0), at(2026, 6, 6, 9, 0, tz=TOKYO)),
        # Saturday 14:00 JST + 20 h = Sunday 10:00 JST, after Sunday's send time
        (at(2026, 6, 6, 5, 0), at(2026, 6, 8, 9, 0, tz=TOKYO)),
    ],
)
def test_a_push_onto_the_weekend_goes_to_monday(tmp_path, previous, without_skip):
    settings = pure_settings(tmp_path)
    kwargs = dict(started_at=at(2026, 6, 1, 0, 0), timezone="Asia/Tokyo", previous_send=previous)
    assert next_due(nine(1), settings=settings, **kwargs) == without_skip
    due = next_due(nine(1), settings=settings, skip_weekends=True, **kwargs)
    assert due == at(2026, 6, 8, 9, 0, tz=TOKYO)


def test_a_push_onto_the_weekend_moves_an_untimed_step_too(tmp_path):
    """`skip_weekends`: a step that would land on a Saturday or Sunday moves to Monday."""
    settings = pure_settings(tmp_path)
    step = Step(key="untimed", day=1, file="x.md")
    previous = at(2026, 6, 5, 12, 0)  # Friday 14:00 in Berlin; + 20 h is Saturday 10:00
    due = next_due(
        step,
        started_at=at(2026, 6, 4, 12, 0),
        timezone="Europe/Berlin",
        previous_send=previous,
        settings=settings,
        skip_weekends=True,
    )
    assert due >= previous + timedelta(hours=20)
    assert due.astimezone(BERLIN).date() == date(2026, 6, 8), due.astimezone(BERLIN)


# --- 3. The plan and `nurture timeline` ----------------------------------------------


def test_plan_and_timeline_for_a_subscriber_in_paris(stack, settings, smtp):
    # `nurture timeline` plans from the real clock, so the course starts ahead of it.
    start = (datetime.now(UTC) + timedelta(days=14)).replace(
        hour=10, minute=0, second=0, microsecond=0
    )
    email = "marie@example.com"
    subscriber_id = enroll(settings, email, now=start, timezone="Europe/Paris")
    [welcome_id] = hand_out(settings, start)
    assert send(settings, [welcome_id], start).sent == 1
    assert steps_received(smtp, email) == ["welcome"]

    enrollment = enrollment_of(settings, subscriber_id)
    sequence = sequences(settings)[SEQUENCE]
    assert enrollment.timezone == "Europe/Paris"  # the subscriber's, copied at signup
    planned = plan(enrollment, sequence, settings, now=start + timedelta(minutes=1))
    assert [step.key for step, _ in planned] == COURSE_KEYS[1:]
    times = [due for _, due in planned]
    assert all(later > earlier for earlier, later in zip(times, times[1:], strict=False))
    start_day = start.astimezone(PARIS).date()
    for step, due in planned:
        local = due.astimezone(PARIS)
        assert local.time() == time(9, 0), (step.key, local)
        assert local.date() == start_day + timedelta(days=step.day), (step.key, local)

    result = subprocess.run(
        [sys.executable, "-m", "nurture", "timeline", email.upper()],
        env=stack.process_env(),
        cwd=nurture.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert email in out
    columns = {
        match.start()
        for entry in out.splitlines()
        if (match := re.search(r"\(\d{4}-\d\d-\d\d \d\d:\d\d UTC\)", entry))
    }
    assert len(columns) == 1, f"the UTC column lines up:\n{out}"  # CET and CEST, two steps
    assert re.search(
        rf"sent\s+{SEQUENCE}/welcome\s+.*\b(CET|CEST)\s+\({start:%Y-%m-%d %H:%M} UTC\)", out
    ), out
    shown = re.findall(
        rf"planned\s+{SEQUENCE}/(\S+)\s+\w{{3}} (\d{{4}}-\d\d-\d\d) 09:00 (?:CET|CEST)"
        rf"\s+\((\d{{4}}-\d\d-\d\d \d\d:\d\d) UTC\)",
        out,
    )
    assert [key for key, _, _ in shown] == COURSE_KEYS[1:], out
    for (key, local_day, utc), (step, due) in zip(shown, planned, strict=True):
        assert key == step.key
        assert local_day == f"{due.astimezone(PARIS):%Y-%m-%d}"
        assert utc == f"{due:%Y-%m-%d %H:%M}"


@BOTH_DATABASES
def test_an_enrollment_runs_on_its_subscribers_clock(settings, app):
    """The due-scan reads an enrollment's zone from the enrollment: it is the subscriber's,
    from the signup (on PostgreSQL the web's one-statement path) and after a returning
    signup from another zone."""
    email = "ann@example.com"
    answer = app.test_client().post(
        "/api/v1/subscribers", json={"email": email, "timezone": "Europe/Paris"}
    )
    assert answer.status_code == 202
    with session_scope(settings.database_url) as session:
        ann = session.scalar(select(Subscriber).where(Subscriber.email == email))
        assert [e.timezone for e in ann.enrollments] == ["Europe/Paris"]
        ann_id = ann.id

    # Still unconfirmed a month later, she signs up again from New York (10:00 or 11:00 there).
    later = (datetime.now(UTC) + timedelta(days=30)).replace(
        hour=15, minute=0, second=0, microsecond=0
    )
    sign_up(settings, email, now=later, timezone="America/New_York")
    with session_scope(settings.database_url) as session:
        ann = session.get(Subscriber, ann_id)
        assert ann.timezone == "America/New_York"
        assert [e.timezone for e in ann.enrollments] == ["America/New_York"]
        assert confirm(session, ann_id, now=later, first_steps=first_steps(sequences(settings)))

    hand_out(settings, later)  # the welcome, and the confirmations still waiting
    following = enrollment_of(settings, ann_id)
    assert following.next_step == "product-manager"
    local = following.next_due_at.astimezone(NEW_YORK)
    assert (local.date(), local.time()) == (
        later.astimezone(NEW_YORK).date() + timedelta(days=1),
        time(9, 0),
    )


def test_timeline_of_an_unknown_address_fails_clearly(stack):
    result = subprocess.run(
        [sys.executable, "-m", "nurture", "timeline", "nobody@example.com"],
        env=stack.process_env(),
        cwd=nurture.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "no subscriber has the address nobody@example.com" in result.stderr
    assert "Traceback" not in result.stderr


# --- 4. Click tracking ---------------------------------------------------------------


def test_links_in_a_course_email_are_tracked_and_redirect(settings, smtp, client):
    subscriber_id = enroll(settings, "ann@example.com")
    delivery_id, now = deliver_up_to(settings, subscriber_id, "six-month-course", T0)
    assert send(settings, [delivery_id], now).sent == 1

    [message] = smtp.messages
    assert message["X-Nurture-Step"] == f"{SEQUENCE}/six-month-course"
    unsubscribe_url = message["List-Unsubscribe"][1:-1]
    assert unsubscribe_url.startswith("http://nurture.test/unsubscribe/")  # not rewritten
    text, page = parts(message)

    links = [u for u in hrefs(page) if u.startswith(("http://", "https://"))]
    urls = text_urls(text)
    assert unsubscribe_url in links and unsubscribe_url in urls
    tracked = [u for u in links + urls if u != unsubscribe_url]
    assert tracked, "the course email has no link besides unsubscribing"
    for url in tracked:
        assert url.startswith("http://nurture.test/r/"), url
    # The course link never appears bare, so every click on it is seen.
    assert settings.course_url not in page
    assert settings.course_url not in text

    token = tracked[0].removeprefix("http://nurture.test/r/")
    assert tokens.read_click_token(settings.secret_key, token) == (
        delivery_id,
        settings.course_url,
    )
    response = client.get(f"/r/{token}")
    assert response.status_code == 302
    assert response.headers["Location"] == settings.course_url
    [click] = events(settings, "click", subscriber_id)
    assert click.delivery_id == delivery_id
    assert click.detail == settings.course_url


def test_links_in_emails_sent_before_still_work(settings, client):
    """Tokens are no longer zlib-compressed when written; compressed ones are still read."""
    enroll(settings, "ann@example.com")
    [delivery_id] = hand_out(settings, T0)
    url = "https://example.org/reading?" + "&".join(f"utm_part={i}" for i in range(20))
    earlier = URLSafeSerializer(settings.secret_key, salt="click").dumps([delivery_id, url])
    assert earlier.startswith("."), "a compressed token, as itsdangerous writes for this URL"
    response = client.get(f"/r/{earlier}")
    assert (response.status_code, response.headers["Location"]) == (302, url)

    now = tokens.make_click_token(settings.secret_key, delivery_id, url)
    assert not now.startswith(".")
    reader = URLSafeSerializer(settings.secret_key, salt="click")
    assert reader.loads(now) == [delivery_id, url]


def test_forged_click_tokens_are_refused(settings, client):
    subscriber_id = enroll(settings, "ann@example.com")
    [delivery_id] = hand_out(settings, T0)
    url = "https://example.org/reading"
    good = tokens.make_click_token(settings.secret_key, delivery_id, url)
    payload, _, signature = good.rpartition(".")

    def other(char: str) -> str:
        return "B" if char == "A" else "A"

    forged = {
        "payload changed": other(good[0]) + good[1:],
        "signature changed": f"{payload}.{other(signature[0])}{signature[1:]}",
        "another secret": tokens.make_click_token("another-secret", delivery_id, url),
        "open redirect, wrong key": URLSafeSerializer("guessed-key", salt="click").dumps(
            [delivery_id, "https://evil.example"]
        ),
        "open redirect, another salt": URLSafeSerializer(
            settings.secret_key, salt="unsubscribe"
        ).dumps([delivery_id, "https://evil.example"]),
        "not a web link": tokens.make_click_token(
            settings.secret_key, delivery_id, "javascript:alert(1)"
        ),
    }
    for name, token in forged.items():
        assert token != good
        response = client.get(f"/r/{token}")
        assert response.status_code == 400, name
        assert "Location" not in response.headers, name
        page = response.get_data(as_text=True)
        assert "This link does not work" in page, name
        assert "evil.example" not in page, name
    assert events(settings, "click") == []

    # The genuine token still works.
    response = client.get(f"/r/{good}")
    assert (response.status_code, response.headers["Location"]) == (302, url)
    assert [e.delivery_id for e in events(settings, "click", subscriber_id)] == [delivery_id]


# --- 5. Conversion by click ----------------------------------------------------------


def click(client, settings: Settings, delivery_id: int, url: str) -> None:
    token = tokens.make_click_token(settings.secret_key, delivery_id, url)
    response = client.get(f"/r/{token}")
    assert response.status_code == 302
    assert response.headers["Location"] == url


def simulate_week(settings: Settings, on_tick) -> None:
    """The due-scan and the sender every 6 hours for eight days from T0."""
    for tick in range(WEEK_OF_TICKS):
        now = T0 + timedelta(hours=6 * tick)
        ids = hand_out(settings, now)
        on_tick(now)
        if ids:
            send(settings, ids, now)


@BOTH_DATABASES
def test_a_click_on_the_course_link_converts_and_stops_sales_steps(settings, smtp, client):
    ann = enroll(settings, "ann@example.com")  # converts right after the welcome
    bob = enroll(settings, "bob@example.com")  # converts with the course email queued
    clicked: set[int] = set()

    def on_tick(now):
        rows = course_deliveries(settings, ann)
        if ann not in clicked and rows["welcome"].status == DeliveryStatus.SENT:
            clicked.add(ann)
            click(client, settings, rows["welcome"].id, settings.course_url)
            enrollment = enrollment_of(settings, ann)
            assert enrollment.converted_at is not None
            [conversion] = events(settings, "conversion", ann)
            assert conversion.detail == f"click:{SEQUENCE}/welcome"
            [tracked] = events(settings, "click", ann)
            assert tracked.delivery_id == rows["welcome"].id

        rows = course_deliveries(settings, bob)
        course = rows.get("six-month-course")
        if bob not in clicked and course is not None:
            assert course.status == DeliveryStatus.QUEUED  # handed out, not yet sent
            clicked.add(bob)
            click(client, settings, rows["which-fits"].id, settings.course_url)
            cancelled = delivery(settings, course.id)
            assert cancelled.status == DeliveryStatus.CANCELLED
            assert cancelled.last_error == "converted"
            assert enrollment_of(settings, bob).converted_at is not None

    simulate_week(settings, on_tick)

    assert clicked == {ann, bob}
    for who, email in ((ann, "ann@example.com"), (bob, "bob@example.com")):
        assert steps_received(smtp, email) == NON_SALES_KEYS
        rows = course_deliveries(settings, who)
        assert all(rows[key].status == DeliveryStatus.SENT for key in NON_SALES_KEYS)
        assert "last-reminder" not in rows
        assert len(events(settings, "conversion", who)) == 1
        enrollment = enrollment_of(settings, who)
        assert enrollment.next_step is None
        assert enrollment.status == EnrollmentStatus.COMPLETED, (email, enrollment.status)
        assert enrollment.completed_at is not None
    assert "six-month-course" not in course_deliveries(settings, ann)
    assert course_deliveries(settings, bob)["six-month-course"].status == "cancelled"


def test_a_click_on_another_link_does_not_convert_but_the_course_button_does(
    settings, smtp, client
):
    cy = enroll(settings, "cy@example.com")
    state = {"reading": False, "button": False}

    def on_tick(now):
        rows = course_deliveries(settings, cy)
        if not state["reading"] and rows["welcome"].status == DeliveryStatus.SENT:
            state["reading"] = True
            click(client, settings, rows["welcome"].id, "https://example.org/further-reading")
            assert len(events(settings, "click", cy)) == 1
            assert events(settings, "conversion", cy) == []
            assert enrollment_of(settings, cy).converted_at is None
        course = rows.get("six-month-course")
        if not state["button"] and course is not None and course.status == DeliveryStatus.SENT:
            # Not converted, so the sales email went out; its own button converts.
            state["button"] = True
            [message] = [m for m in smtp.messages if m["Message-ID"] == course.message_id]
            _, page = parts(message)
            buttons = [u for u in hrefs(page) if u.startswith("http://nurture.test/r/")]
            assert buttons
            response = client.get(buttons[0].removeprefix("http://nurture.test"))
            assert response.status_code == 302
            assert response.headers["Location"] == settings.course_url
            assert enrollment_of(settings, cy).converted_at is not None
            [conversion] = events(settings, "conversion", cy)
            assert conversion.detail == f"click:{SEQUENCE}/six-month-course"

    simulate_week(settings, on_tick)

    assert state == {"reading": True, "button": True}
    assert steps_received(smtp, "cy@example.com") == COURSE_KEYS[:-1]
    enrollment = enrollment_of(settings, cy)
    assert enrollment.status == EnrollmentStatus.COMPLETED, enrollment.status


# --- 6. The conversion webhook -------------------------------------------------------


def signed(body: bytes, secret: str = "s3cret") -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Nurture-Signature": f"sha256={digest}", "Content-Type": "application/json"}


def test_the_conversion_webhook(stack, settings, client):
    subscriber_id = enroll(settings, "ann@example.com")
    hooked = create_app(stack.with_env(WEBHOOK_SECRET="s3cret").settings).test_client()
    url = "/api/v1/conversions"
    body = json.dumps({"email": "Ann@Example.com"}).encode()

    def unchanged() -> None:
        assert enrollment_of(settings, subscriber_id).converted_at is None
        assert events(settings, "conversion") == []

    # Without WEBHOOK_SECRET the endpoint does not exist.
    response = client.post(url, data=body, headers=signed(body))
    assert response.status_code == 404
    assert "errors" in response.get_json()
    unchanged()

    plain = {"Content-Type": "application/json"}
    for headers in (
        plain,
        signed(body, secret="wrong"),
        {**signed(json.dumps({"email": "bob@example.com"}).encode())},  # another body's
        {**plain, "X-Nurture-Signature": "sha256="},
    ):
        response = hooked.post(url, data=body, headers=headers)
        assert response.status_code == 401, headers
        assert "signature" in response.get_json()["errors"]
    unchanged()

    no_email = json.dumps({"name": "Ann"}).encode()
    response = hooked.post(url, data=no_email, headers=signed(no_email))
    assert response.status_code == 422
    assert "email" in response.get_json()["errors"]
    unknown = json.dumps({"email": "nobody@example.com"}).encode()
    response = hooked.post(url, data=unknown, headers=signed(unknown))
    assert response.status_code == 404
    assert "email" in response.get_json()["errors"]
    unchanged()

    response = hooked.post(url, data=body, headers=signed(body))
    assert response.status_code == 200
    assert response.get_json() == {"status": "converted", "enrollments": 1}
    converted_at = enrollment_of(settings, subscriber_id).converted_at
    assert converted_at is not None
    [conversion] = events(settings, "conversion", subscriber_id)
    assert conversion.detail == "webhook"

    response = hooked.post(url, data=body, headers=signed(body))
    assert response.status_code == 200
    assert response.get_json() == {"status": "converted", "enrollments": 0}
    assert enrollment_of(settings, subscriber_id).converted_at == converted_at
    assert len(events(settings, "conversion", subscriber_id)) == 1


@pytest.mark.parametrize(
    "raw",
    [
        '{"email": "ann@example.com"',
        '["ann@example.com"]',
        '{"email": ' + "[" * 1000 + "]" * 1000 + "}",  # deeper than the parser recurses
    ],
    ids=["malformed", "array", "nested-too-deep"],
)
def test_the_conversion_webhook_refuses_a_body_that_is_not_a_json_object(stack, raw, caplog):
    hooked = create_app(stack.with_env(WEBHOOK_SECRET="s3cret").settings).test_client()
    body = raw.encode()

    response = hooked.post("/api/v1/conversions", data=body, headers=signed(body))

    assert response.status_code == 400
    assert response.get_json() == {"errors": {"body": 'Send a JSON object, e.g. {"email": ...}.'}}
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@BOTH_DATABASES
def test_the_conversion_webhook_refuses_control_characters_in_the_email(stack, caplog):
    hooked = create_app(stack.with_env(WEBHOOK_SECRET="s3cret").settings).test_client()
    body = json.dumps({"email": "a\u0000b@example.com"}).encode()

    response = hooked.post("/api/v1/conversions", data=body, headers=signed(body))

    assert response.status_code == 422
    assert "email" in response.get_json()["errors"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_the_conversion_webhook_finds_an_international_domain(stack, settings, client):
    """Signup stores the domain's ASCII form; the webhook looks it up the same way."""
    assert (
        client.post("/api/v1/subscribers", json={"email": "f5@b\u00fccher.example"}).status_code
        == 202
    )
    with session_scope(settings.database_url) as session:
        stored = session.scalar(select(Subscriber.email))
    assert stored == "f5@xn--bcher-kva.example"
    hooked = create_app(stack.with_env(WEBHOOK_SECRET="s3cret").settings).test_client()

    for typed in ("f5@b\u00fccher.example", " F5@B\u00dcCHER.example ", stored):
        body = json.dumps({"email": typed}).encode()
        response = hooked.post("/api/v1/conversions", data=body, headers=signed(body))
        assert response.status_code == 200, (typed, response.get_json())
    assert len(events(settings, "conversion")) == 1

    body = json.dumps({"email": "not an address"}).encode()
    response = hooked.post("/api/v1/conversions", data=body, headers=signed(body))
    assert response.status_code == 422
    assert "email" in response.get_json()["errors"]


# --- 7. No countdown or ETA ----------------------------------------------------------


def test_published_tasks_carry_no_countdown_or_eta(settings, client):
    published: list[tuple[str, dict]] = []

    def capture(sender=None, headers=None, **_kwargs):
        published.append((sender, dict(headers or {})))

    celery_app = tasks.make_celery(settings)
    tasks.prepare_broker(celery_app)
    enroll(settings, "ann@example.com", now=T0)
    before_task_publish.connect(capture, weak=False)
    try:
        response = client.post("/api/v1/subscribers", json={"email": "bob@example.com"})
        assert response.status_code == 202
        client.application.extensions["nurture"].handover.close()  # its thread published
        result = tasks.run_dispatch(tasks.make_celery(settings), T0 + timedelta(minutes=1))
        assert result.created == 1
        # What beat sends every DISPATCH_INTERVAL_SECONDS, with beat's own options.
        entry = celery_app.conf.beat_schedule["dispatch"]
        assert not {"countdown", "eta"} & set(entry.get("options", {}))
        celery_app.send_task(entry["task"], **entry.get("options", {}))
    finally:
        before_task_publish.disconnect(capture)
    checked_at = datetime.now(UTC)

    names = [name for name, _ in published]
    assert names.count("nurture.send_batch") == 2, names  # the confirmation and the welcome
    assert "nurture.dispatch" in names
    for name, headers in published:
        assert headers.get("eta") is None, (name, headers)
        assert headers.get("countdown") is None, (name, headers)
        if headers.get("expires"):
            expires = datetime.fromisoformat(headers["expires"])
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)
            assert expires - checked_at <= timedelta(seconds=settings.dispatch_interval), name


DELAY_KEYWORDS = frozenset({"countdown", "eta"})


def delay_uses(source: str, filename: str) -> list[str]:
    """Every place in `source` that asks Celery to hold a task back."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in DELAY_KEYWORDS:
                    found.append(f"{filename}:{keyword.lineno}: {keyword.arg}=")
        elif isinstance(node, ast.Dict):  # options={...}, **{...}, a beat schedule entry
            for key in node.keys:
                if isinstance(key, ast.Constant) and key.value in DELAY_KEYWORDS:
                    found.append(f"{filename}:{key.lineno}: {key.value!r} option")
    return found


def test_no_module_schedules_a_task_with_countdown_or_eta():
    # The check itself finds what it is looking for.
    bad = "t.apply_async(args=[1], countdown=5)\nt.send_task('x', **{'eta': when})\n"
    assert len(delay_uses(bad, "bad.py")) == 2
    assert delay_uses("t.apply_async(args=[1], expires=60)\n", "ok.py") == []

    modules = sorted(NURTURE_PACKAGE.rglob("*.py"))
    assert NURTURE_PACKAGE / "tasks.py" in modules
    problems = [
        problem
        for path in modules
        for problem in delay_uses(path.read_text(encoding="utf-8"), str(path))
    ]
    assert problems == []


# --- 8. A broken template at send time -----------------------------------------------


@BOTH_DATABASES
def test_a_broken_template_holds_its_delivery_and_the_batch_goes_on(stack, smtp, tmp_path):
    templates = copy_templates(tmp_path)
    welcome = templates / SEQUENCE / "01-welcome.md"
    source = welcome.read_text(encoding="utf-8")
    assert source.split("\n")[6].startswith("Thanks for confirming.")
    welcome.write_text(
        source.replace("Thanks for confirming.", "{{ coupon_code }} Thanks for confirming.", 1),
        encoding="utf-8",
    )
    settings = stack.with_env(NURTURE_TEMPLATES=str(templates)).settings

    ann = enroll(settings, "ann@example.com")
    confirmation_id = sign_up(settings, "bob@example.com", now=T0)
    ids = hand_out(settings, T0)
    [welcome_id] = [i for i in ids if i != confirmation_id]
    assert confirmation_id in ids

    result = send(settings, [welcome_id, confirmation_id], T0)
    assert (result.sent, result.retry, result.failed) == (1, 1, 0)

    [message] = smtp.messages
    assert message["X-Nurture-Step"] == "confirmation"
    assert "bob@example.com" in message["To"]
    assert delivery(settings, confirmation_id).status == DeliveryStatus.SENT

    held = delivery(settings, welcome_id)
    assert held.status == DeliveryStatus.QUEUED
    assert held.last_error.startswith("template error:"), held.last_error
    assert "01-welcome.md:7" in held.last_error
    assert "coupon_code" in held.last_error
    assert held.enqueued_at is None
    assert held.not_before > T0
    assert enrollment_of(settings, ann).status == EnrollmentStatus.ACTIVE

    # Mended, it goes out on a later tick with the Message-ID it always had.
    welcome.write_text(source, encoding="utf-8")
    later = T0 + timedelta(hours=1)
    assert hand_out(settings, later) == [welcome_id]
    assert send(settings, [welcome_id], later).sent == 1
    assert smtp.messages[-1]["Message-ID"] == held.message_id
    assert delivery(settings, welcome_id).last_error is None


# --- 9. The retry horizon ------------------------------------------------------------


def send_up_to_the_sales_emails(settings: Settings, subscriber_id: int) -> int:
    """Hand out and send each course email in turn; the id of the first sales email.

    That one is handed out, not sent.
    """
    now = T0
    for key in NON_SALES_KEYS:
        [delivery_id] = hand_out(settings, now)
        assert delivery(settings, delivery_id).step == key
        assert send(settings, [delivery_id], now).sent == 1
        now = enrollment_of(settings, subscriber_id).next_due_at
    [delivery_id] = hand_out(settings, now)
    assert delivery(settings, delivery_id).step == SALES_KEYS[0]
    return delivery_id


@BOTH_DATABASES
def test_the_retry_horizon_gives_up_and_completes_only_when_nothing_is_unsent(settings, smtp):
    subscriber_id = enroll(settings, "ann@example.com")
    before_last = send_up_to_the_sales_emails(settings, subscriber_id)
    created = delivery(settings, before_last).created_at
    last_due = enrollment_of(settings, subscriber_id).next_due_at
    assert enrollment_of(settings, subscriber_id).next_step == "last-reminder"

    horizon = timedelta(hours=settings.retry_horizon_hours)
    smtp.handler.refuse_with = "451 4.3.0 Try later"

    # Inside the horizon a 451 is retried, and the course waits for it.
    inside = created + horizon - timedelta(minutes=1)
    assert inside > last_due
    assert hand_out(settings, inside) == [before_last]  # long since handed out; nothing new
    assert send(settings, [before_last], inside).retry == 1
    row = delivery(settings, before_last)
    assert row.status == DeliveryStatus.QUEUED
    assert "451" in row.last_error and not row.last_error.startswith("gave up:")
    assert "last-reminder" not in course_deliveries(settings, subscriber_id)

    # Past it, the delivery fails for good and says why.
    past = created + horizon + timedelta(minutes=1)
    assert hand_out(settings, past) == [before_last]
    gave_up = send(settings, [before_last], past)
    row = delivery(settings, before_last)
    assert row.status == DeliveryStatus.FAILED
    assert row.last_error.startswith("gave up:"), row.last_error
    assert "451" in row.last_error
    assert row.sent_at is None
    # A course email is still to come, so the enrollment is not done.
    enrollment = enrollment_of(settings, subscriber_id)
    assert enrollment.status == EnrollmentStatus.ACTIVE
    assert enrollment.completed_at is None

    smtp.handler.refuse_with = None
    later = past + timedelta(hours=1)
    [last] = hand_out(settings, later)  # the failed one never again; the course goes on
    assert delivery(settings, last).step == "last-reminder"
    # Written but not yet sent: still not done.
    enrollment = enrollment_of(settings, subscriber_id)
    assert (enrollment.next_step, enrollment.status) == (None, EnrollmentStatus.ACTIVE)
    assert send(settings, [last], later).sent == 1
    enrollment = enrollment_of(settings, subscriber_id)
    assert enrollment.status == EnrollmentStatus.COMPLETED
    assert enrollment.completed_at == later
    assert steps_received(smtp, "ann@example.com") == [
        key for key in COURSE_KEYS if key != "six-month-course"
    ]
    with session_scope(settings.database_url) as session:
        unsent = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.status.in_(DeliveryStatus.UNSENT))
        )
    assert unsent == 0
    # The batch's own count says what happened (it is what the worker logs).
    assert (gave_up.failed, gave_up.retry) == (1, 0), gave_up


@BOTH_DATABASES
def test_a_given_up_email_does_not_complete_while_another_is_unsent(settings, smtp):
    """Two course emails unsent at once, as the due-scan wrote them before it
    waited for each to go out (data from before an upgrade)."""
    subscriber_id = enroll(settings, "ann@example.com")
    before_last = send_up_to_the_sales_emails(settings, subscriber_id)
    enrollment = enrollment_of(settings, subscriber_id)
    created = enrollment.next_due_at
    with session_scope(settings.database_url) as session:
        last_row = Delivery(
            subscriber_id=subscriber_id,
            enrollment_id=enrollment.id,
            sequence=SEQUENCE,
            step="last-reminder",
            status=DeliveryStatus.QUEUED,
            message_id=new_message_id(settings),
            attempts=0,
            not_before=created,
            created_at=created,
        )
        session.add(last_row)
        session.flush()
        last = last_row.id
        session.execute(
            update(Enrollment)
            .where(Enrollment.id == enrollment.id)
            .values(next_step=None, next_due_at=None)
        )

    horizon = timedelta(hours=settings.retry_horizon_hours)
    smtp.handler.refuse_with = "451 4.3.0 Try later"
    past = created + horizon + timedelta(minutes=1)
    assert hand_out(settings, past) == sorted([before_last, last])
    gave_up = send(settings, [last], past)
    assert (gave_up.failed, gave_up.retry) == (1, 0), gave_up
    row = delivery(settings, last)
    assert row.status == DeliveryStatus.FAILED
    assert row.last_error.startswith("gave up:"), row.last_error
    # The course email before it is still unsent, so the enrollment is not done.
    enrollment = enrollment_of(settings, subscriber_id)
    assert enrollment.status == EnrollmentStatus.ACTIVE
    assert enrollment.completed_at is None

    smtp.handler.refuse_with = None
    later = past + timedelta(hours=1)
    assert hand_out(settings, later) == [before_last]  # the failed one never again
    assert send(settings, [before_last], later).sent == 1
    enrollment = enrollment_of(settings, subscriber_id)
    assert enrollment.status == EnrollmentStatus.COMPLETED
    assert enrollment.completed_at == later
    assert steps_received(smtp, "ann@example.com") == COURSE_KEYS[:-1]


def test_workers_and_beat_keep_trying_a_broker_that_is_gone(settings):
    """Celery gives up after 100 reconnects (about 47 minutes) and exits: a broker
    down for an hour at night would leave no worker or beat running. Ours retry
    for as long as it takes, logging each try; publishing still gives up fast."""
    conf = tasks.make_celery(settings).conf
    assert conf.broker_connection_max_retries is None
    assert conf.broker_connection_retry_on_startup is True
    assert conf.task_publish_retry_policy["max_retries"] == 2
