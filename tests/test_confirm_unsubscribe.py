"""Confirmation links and unsubscribe links (GET is harmless, POST is RFC 8058 one-click)."""

from __future__ import annotations

import dataclasses
import re
import time
from datetime import timedelta

import pytest
from conftest import BOTH_DATABASES
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import func, select, update

from nurture.app import create_app
from nurture.db import session_scope
from nurture.models import (
    CONFIRMATION_STEP,
    Consent,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Event,
    Subscriber,
    SubscriberStatus,
    utcnow,
)
from nurture.scheduler import create_due_deliveries
from nurture.sequences import current_sequences
from nurture.subscribers import latest_consent
from nurture.tokens import make_confirm_token, make_unsubscribe_token

SEQUENCE = "product-vs-project"
ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"


# --- helpers -----------------------------------------------------------------------


def signup(client, settings, email: str) -> tuple[int, int]:
    """Sign up through the API; return (subscriber id, id of the newest consent)."""
    assert client.post("/api/v1/subscribers", json={"email": email}).status_code == 202
    with session_scope(settings.database_url) as session:
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        return subscriber_id, latest_consent(session, subscriber_id).id


def confirm_token(settings, subscriber_id: int, consent_id: int) -> str:
    return make_confirm_token(settings.secret_key, subscriber_id, consent_id)


def unsubscribe_token(settings, subscriber_id: int) -> str:
    return make_unsubscribe_token(settings.secret_key, subscriber_id)


def active_subscriber(client, settings, email: str) -> int:
    """A confirmed subscriber whose welcome email is written and queued."""
    subscriber_id, consent_id = signup(client, settings, email)
    token = confirm_token(settings, subscriber_id, consent_id)
    assert client.get(f"/confirm/{token}").status_code == 200
    with session_scope(settings.database_url) as session:
        sequences = current_sequences(settings.templates_path)
        now = session.get(Subscriber, subscriber_id).confirmed_at
        create_due_deliveries(session, settings, sequences, now)
    return subscriber_id


def snapshot(settings, subscriber_id: int) -> dict:
    """Everything an unsubscribe or a confirmation could change, for comparisons."""
    with session_scope(settings.database_url) as session:
        sub = session.get(Subscriber, subscriber_id)
        return {
            "subscriber": (sub.status, sub.confirmed_at, sub.unsubscribed_at),
            "consents": sorted(
                session.execute(
                    select(Consent.id, Consent.confirmed_at).where(
                        Consent.subscriber_id == subscriber_id
                    )
                ).all()
            ),
            "enrollments": sorted(
                session.execute(
                    select(Enrollment.sequence, Enrollment.status, Enrollment.next_step).where(
                        Enrollment.subscriber_id == subscriber_id
                    )
                ).all()
            ),
            "deliveries": sorted(
                session.execute(
                    select(Delivery.step, Delivery.status).where(
                        Delivery.subscriber_id == subscriber_id
                    )
                ).all()
            ),
            "events": sorted(
                session.scalars(select(Event.kind).where(Event.subscriber_id == subscriber_id))
            ),
        }


def events(settings, subscriber_id: int, kind: str) -> list[Event]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(Event).where(Event.subscriber_id == subscriber_id, Event.kind == kind)
            )
        )


def tamper(token: str) -> str:
    """Change the first character of the signature (the last one may be padding bits only)."""
    head, _, signature = token.rpartition(".")
    return f"{head}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


def expired_confirm_token(secret: str, subscriber_id: int, consent_id: int, age: int) -> str:
    class OldSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - age

    serializer = URLSafeTimedSerializer(secret, salt="confirm", signer=OldSigner)
    return serializer.dumps([subscriber_id, consent_id])


def one_click(app, token: str, body: str = ONE_CLICK):
    """POST as a mail provider does: a fresh client, no cookies, no CSRF token."""
    return app.test_client().post(f"/unsubscribe/{token}", data=body, content_type=FORM)


# --- confirmation ------------------------------------------------------------------


@BOTH_DATABASES
def test_confirm_link_activates_subscriber_and_enrollment(client, settings):
    subscriber_id, consent_id = signup(client, settings, "ann@example.com")
    token = confirm_token(settings, subscriber_id, consent_id)

    response = client.get(f"/confirm/{token}")

    assert response.status_code == 200
    assert "You are in" in response.get_data(as_text=True)
    with session_scope(settings.database_url) as session:
        sub = session.get(Subscriber, subscriber_id)
        consent = session.get(Consent, consent_id)
        enrollments = list(
            session.scalars(select(Enrollment).where(Enrollment.subscriber_id == subscriber_id))
        )
        assert sub.status == SubscriberStatus.ACTIVE
        assert sub.confirmed_at is not None
        assert consent.confirmed_at is not None
        assert len(enrollments) == 1
        enrollment = enrollments[0]
        assert enrollment.sequence == SEQUENCE
        assert enrollment.status == EnrollmentStatus.ACTIVE
        assert enrollment.next_step == "welcome"
        assert enrollment.next_due_at is not None
    assert len(events(settings, subscriber_id, "confirm")) == 1

    before = snapshot(settings, subscriber_id)
    again = client.get(f"/confirm/{token}")

    assert again.status_code == 200
    assert snapshot(settings, subscriber_id) == before  # still one enrollment, one confirm


def test_the_confirmed_page_promises_no_one_course_s_schedule(client, settings):
    """A three-email course's subscriber is not told of "a week" of daily emails."""
    email = "cs0@example.com"
    body = {"email": email, "sequence": "career-switch-checklist"}
    assert client.post("/api/v1/subscribers", json=body).status_code == 202
    with session_scope(settings.database_url) as session:
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        consent_id = latest_consent(session, subscriber_id).id

    page = client.get(f"/confirm/{confirm_token(settings, subscriber_id, consent_id)}")

    assert page.status_code == 200
    assert "week" not in page.get_data(as_text=True)


def bad_confirm_tokens(settings, subscriber_id: int, consent_id: int) -> dict[str, str]:
    good = confirm_token(settings, subscriber_id, consent_id)
    return {
        "tampered": tamper(good),
        "truncated": good[: len(good) // 2],
        "garbage": "not-a-token",
        "other-secret": make_confirm_token("another-secret", subscriber_id, consent_id),
        "unsubscribe-token": unsubscribe_token(settings, subscriber_id),
        "expired": expired_confirm_token(
            settings.secret_key, subscriber_id, consent_id, settings.confirm_max_age + 60
        ),
    }


@BOTH_DATABASES
def test_bad_confirm_links_get_a_friendly_page_and_change_nothing(client, settings):
    subscriber_id, consent_id = signup(client, settings, "ann@example.com")
    before = snapshot(settings, subscriber_id)

    for kind, token in bad_confirm_tokens(settings, subscriber_id, consent_id).items():
        response = client.get(f"/confirm/{token}")
        page = response.get_data(as_text=True)
        assert response.status_code in (400, 410), kind
        assert response.mimetype == "text/html", kind
        assert "This link" in page, kind
        assert "Traceback" not in page, kind
        if kind == "expired":
            assert response.status_code == 410
            assert "expired" in page
        assert snapshot(settings, subscriber_id) == before, kind


def test_short_confirm_max_age_expires_links(settings):
    strict = dataclasses.replace(settings, confirm_max_age=60)
    client = create_app(strict).test_client()
    subscriber_id, consent_id = signup(client, settings, "ann@example.com")
    two_minutes_old = expired_confirm_token(settings.secret_key, subscriber_id, consent_id, 120)

    assert client.get(f"/confirm/{two_minutes_old}").status_code == 410
    assert snapshot(settings, subscriber_id)["subscriber"][0] == SubscriberStatus.PENDING
    fresh = confirm_token(settings, subscriber_id, consent_id)
    assert client.get(f"/confirm/{fresh}").status_code == 200


@BOTH_DATABASES
def test_confirm_link_of_an_older_signup_does_not_confirm(client, settings):
    subscriber_id, old_consent = signup(client, settings, "ann@example.com")
    with session_scope(settings.database_url) as session:  # the last email went out long ago
        session.execute(
            update(Delivery)
            .where(Delivery.subscriber_id == subscriber_id)
            .values(created_at=utcnow() - timedelta(minutes=11))
        )
    same_id, new_consent = signup(client, settings, "ann@example.com")
    assert same_id == subscriber_id and new_consent != old_consent
    before = snapshot(settings, subscriber_id)

    response = client.get(f"/confirm/{confirm_token(settings, subscriber_id, old_consent)}")

    assert response.status_code == 400
    assert snapshot(settings, subscriber_id) == before
    fresh = client.get(f"/confirm/{confirm_token(settings, subscriber_id, new_consent)}")
    assert fresh.status_code == 200
    assert snapshot(settings, subscriber_id)["subscriber"][0] == SubscriberStatus.ACTIVE


def test_signing_up_twice_within_minutes_keeps_the_first_link_working(client, settings):
    subscriber_id, consent_id = signup(client, settings, "ann@example.com")
    assert signup(client, settings, "ann@example.com") == (subscriber_id, consent_id)
    token = confirm_token(settings, subscriber_id, consent_id)
    assert client.get(f"/confirm/{token}").status_code == 200


def test_confirm_link_for_a_subscriber_who_left_does_not_resubscribe(app, client, settings):
    subscriber_id, consent_id = signup(client, settings, "ann@example.com")
    token = confirm_token(settings, subscriber_id, consent_id)
    assert client.get(f"/confirm/{token}").status_code == 200
    assert one_click(app, unsubscribe_token(settings, subscriber_id)).status_code == 200

    response = client.get(f"/confirm/{token}")

    assert response.status_code == 400
    assert snapshot(settings, subscriber_id)["subscriber"][0] == SubscriberStatus.UNSUBSCRIBED


# --- the "send me a fresh link" form -----------------------------------------------


def age_confirmations(settings, subscriber_id: int, minutes: int = 11) -> None:
    """Let the subscriber's confirmation emails be older than the resend throttle."""
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.subscriber_id == subscriber_id)
            .values(created_at=utcnow() - timedelta(minutes=minutes))
        )


def fresh_link_form(client, token: str) -> tuple[str, dict[str, str]]:
    """The form on the page a bad confirmation link shows: its action and hidden fields."""
    page = client.get(f"/confirm/{token}").get_data(as_text=True)
    action = re.search(r'<form method="post" action="([^"]+)"', page).group(1)
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
    return action, hidden


def ask_for_a_fresh_link(client, email: str, token: str = "not-a-token"):
    """Fill in the page's form as the visitor would: only the address."""
    action, hidden = fresh_link_form(client, token)
    return client.post(action, data={**hidden, "email": email})


def timezones(settings, subscriber_id: int) -> tuple[str, list[str]]:
    with session_scope(settings.database_url) as session:
        zone = session.get(Subscriber, subscriber_id).timezone
        zones = session.scalars(
            select(Enrollment.timezone).where(Enrollment.subscriber_id == subscriber_id)
        )
        return zone, list(zones)


@BOTH_DATABASES
def test_a_fresh_link_confirms_what_the_person_asked_for_and_nothing_else(client, settings):
    email = "cs1@example.com"
    answer = client.post(
        "/api/v1/subscribers",
        json={
            "email": email,
            "first_name": "Kenji",
            "timezone": "Asia/Tokyo",
            "sequence": "career-switch-checklist",
        },
    )
    assert answer.status_code == 202
    with session_scope(settings.database_url) as session:
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        consent_id = latest_consent(session, subscriber_id).id
    age_confirmations(settings, subscriber_id)
    before = snapshot(settings, subscriber_id)

    response = ask_for_a_fresh_link(client, email)

    assert response.status_code == 303
    assert response.headers["Location"].endswith("/thanks")
    after = snapshot(settings, subscriber_id)
    assert after["deliveries"] == sorted(
        [*before["deliveries"], (CONFIRMATION_STEP, DeliveryStatus.QUEUED)]
    )
    assert {key: after[key] for key in after if key != "deliveries"} == {
        key: before[key] for key in before if key != "deliveries"
    }, "no new consent, enrollment or event"
    assert timezones(settings, subscriber_id) == ("Asia/Tokyo", ["Asia/Tokyo"])

    again = ask_for_a_fresh_link(client, email)  # within ten minutes of the last one

    assert again.status_code == 303
    assert snapshot(settings, subscriber_id) == after
    token = confirm_token(settings, subscriber_id, consent_id)  # what the fresh email links to
    assert client.get(f"/confirm/{token}").status_code == 200
    assert snapshot(settings, subscriber_id)["enrollments"] == [
        ("career-switch-checklist", EnrollmentStatus.ACTIVE, "welcome")
    ]


@BOTH_DATABASES
def test_a_fresh_link_changes_nothing_for_anyone_not_waiting_to_confirm(client, settings):
    """Confirmed, unsubscribed and unknown addresses: nothing written, the same answer."""
    confirmed = active_subscriber(client, settings, "ann@example.com")
    gone = active_subscriber(client, settings, "bob@example.com")
    assert one_click(client.application, unsubscribe_token(settings, gone)).status_code == 200
    pending, consent_id = signup(client, settings, "cy@example.com")
    age_confirmations(settings, confirmed)
    age_confirmations(settings, gone)
    age_confirmations(settings, pending)
    before = {sub: snapshot(settings, sub) for sub in (confirmed, gone)}
    older_link = expired_confirm_token(settings.secret_key, confirmed, 1, 8 * 86400)

    answers = {
        (response.status_code, response.headers.get("Location"), response.get_data())
        for response in (
            ask_for_a_fresh_link(client, "ann@example.com", older_link),
            ask_for_a_fresh_link(client, "BOB@example.com"),
            ask_for_a_fresh_link(client, "nobody@example.com"),
            ask_for_a_fresh_link(client, "cy@example.com"),
        )
    }

    assert len(answers) == 1, answers
    assert {sub: snapshot(settings, sub) for sub in (confirmed, gone)} == before
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(Subscriber.id).where(Subscriber.email.like("nobody%"))) is None
        confirmations = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.subscriber_id == pending, Delivery.step == CONFIRMATION_STEP)
        )
    assert confirmations == 2, "only the one waiting to confirm got an email"


def test_the_fresh_link_form_checks_its_address_token_and_rate(stack, settings):
    client = create_app(stack.with_env(SIGNUP_RATE_LIMIT="2 per minute").settings).test_client()
    action, hidden = fresh_link_form(client, "not-a-token")

    invalid = client.post(action, data={**hidden, "email": "not-an-email"})
    page = invalid.get_data(as_text=True)
    assert invalid.status_code == 422
    assert re.search(r'<span class="error" id="email-error">[^<]+</span>', page)
    assert 'value="not-an-email"' in page
    assert client.post(action, data={"email": "ann@example.com"}).status_code == 400  # no CSRF
    assert client.post(action, data={**hidden, "email": "ann@example.com"}).status_code == 303
    assert client.post(action, data={**hidden, "email": "ann@example.com"}).status_code == 429
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Subscriber)) == 0


# --- unsubscribe -------------------------------------------------------------------


def test_unsubscribe_get_shows_a_button_and_changes_nothing(client, settings):
    subscriber_id = active_subscriber(client, settings, "ann@example.com")
    before = snapshot(settings, subscriber_id)
    token = unsubscribe_token(settings, subscriber_id)

    response = client.get(f"/unsubscribe/{token}")

    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert f'<form method="post" action="/unsubscribe/{token}">' in page
    assert 'name="action" value="unsubscribe"' in page and 'value="pause"' in page
    assert "<button" in page
    assert snapshot(settings, subscriber_id) == before
    assert before["subscriber"][0] == SubscriberStatus.ACTIVE


@BOTH_DATABASES
def test_one_click_unsubscribe_stops_everything_and_is_idempotent(app, client, settings):
    subscriber_id = active_subscriber(client, settings, "ann@example.com")
    other_id = active_subscriber(client, settings, "bob@example.com")
    other_before = snapshot(settings, other_id)
    before = snapshot(settings, subscriber_id)
    assert (CONFIRMATION_STEP, DeliveryStatus.QUEUED) in before["deliveries"]
    assert ("welcome", DeliveryStatus.QUEUED) in before["deliveries"]
    token = unsubscribe_token(settings, subscriber_id)

    response = one_click(app, token)

    assert response.status_code == 200
    assert "You are unsubscribed" in response.get_data(as_text=True)
    after = snapshot(settings, subscriber_id)
    status, _, unsubscribed_at = after["subscriber"]
    assert status == SubscriberStatus.UNSUBSCRIBED
    assert unsubscribed_at is not None
    assert {status for _, status, _ in after["enrollments"]} == {EnrollmentStatus.STOPPED}
    assert sorted(after["deliveries"]) == sorted(
        (step, DeliveryStatus.CANCELLED) for step, _ in before["deliveries"]
    )
    unsubscribes = events(settings, subscriber_id, "unsubscribe")
    assert [event.detail for event in unsubscribes] == ["one-click"]
    with session_scope(settings.database_url) as session:
        due = session.scalars(
            select(Enrollment.next_due_at).where(Enrollment.subscriber_id == subscriber_id)
        ).all()
    assert due == [None]

    again = one_click(app, token)

    assert 200 <= again.status_code < 300
    assert snapshot(settings, subscriber_id) == after
    assert snapshot(settings, other_id) == other_before


def test_unsubscribe_button_works(client, settings):
    subscriber_id = active_subscriber(client, settings, "ann@example.com")
    token = unsubscribe_token(settings, subscriber_id)

    response = client.post(f"/unsubscribe/{token}", data={"action": "unsubscribe"})

    assert response.status_code == 200
    assert snapshot(settings, subscriber_id)["subscriber"][0] == SubscriberStatus.UNSUBSCRIBED
    assert [e.detail for e in events(settings, subscriber_id, "unsubscribe")] == ["page"]


@pytest.mark.parametrize(
    "body",
    ["", "List-Unsubscribe=Two-Click", "confirm=no", "unsubscribe=yes"],
    ids=["empty", "wrong-one-click", "confirm-no", "other-field"],
)
def test_unsubscribe_post_without_the_right_body_changes_nothing(app, client, settings, body):
    subscriber_id = active_subscriber(client, settings, "ann@example.com")
    before = snapshot(settings, subscriber_id)

    response = one_click(app, unsubscribe_token(settings, subscriber_id), body)

    assert response.status_code == 400
    assert "Please choose one of the buttons" in response.get_data(as_text=True)
    assert snapshot(settings, subscriber_id) == before


def test_bad_unsubscribe_tokens_change_nothing_for_anyone(app, client, settings):
    ann = active_subscriber(client, settings, "ann@example.com")
    bob = active_subscriber(client, settings, "bob@example.com")
    before = {ann: snapshot(settings, ann), bob: snapshot(settings, bob)}
    with session_scope(settings.database_url) as session:
        consent_id = latest_consent(session, ann).id
    bad = {
        "tampered": tamper(unsubscribe_token(settings, ann)),
        "truncated": unsubscribe_token(settings, bob)[:-4],
        "other-secret": make_unsubscribe_token("another-secret", ann),
        "confirm-token": confirm_token(settings, ann, consent_id),
        "garbage": "x",
    }

    for kind, token in bad.items():
        page = app.test_client().get(f"/unsubscribe/{token}")
        assert page.status_code == 400, kind
        assert "does not work" in page.get_data(as_text=True), kind
        for body in (ONE_CLICK, "confirm=yes"):
            assert one_click(app, token, body).status_code == 400, (kind, body)

    assert {ann: snapshot(settings, ann), bob: snapshot(settings, bob)} == before


@BOTH_DATABASES
def test_signup_after_unsubscribe_needs_a_new_confirmation(app, client, settings):
    subscriber_id = active_subscriber(client, settings, "ann@example.com")
    assert one_click(app, unsubscribe_token(settings, subscriber_id)).status_code == 200

    same_id, new_consent = signup(client, settings, "ann@example.com")

    assert same_id == subscriber_id
    after = snapshot(settings, subscriber_id)
    assert after["subscriber"][0] == SubscriberStatus.PENDING
    assert (CONFIRMATION_STEP, DeliveryStatus.QUEUED) in after["deliveries"]
    assert ("welcome", DeliveryStatus.QUEUED) not in after["deliveries"]
    with session_scope(settings.database_url) as session:
        enrollment_status = session.scalar(
            select(Enrollment.status).where(Enrollment.subscriber_id == subscriber_id)
        )
        confirmations = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.subscriber_id == subscriber_id, Delivery.step == CONFIRMATION_STEP)
        )
    assert enrollment_status == EnrollmentStatus.PENDING
    assert confirmations == 2
    token = confirm_token(settings, subscriber_id, new_consent)
    assert client.get(f"/confirm/{token}").status_code == 200
    assert snapshot(settings, subscriber_id)["subscriber"][0] == SubscriberStatus.ACTIVE


@BOTH_DATABASES
def test_a_returning_subscriber_resumes_without_repeats(client, settings, smtp):
    from nurture.delivery import send_batch
    from nurture.scheduler import dispatch

    sent_ids: list[int] = []

    def run(now):
        with session_scope(settings.database_url) as session:
            sequences = current_sequences(settings.templates_path)
            ids: list[int] = []
            dispatch(session, settings, sequences, now=now, publish=ids.extend)
            send_batch(session, settings, sequences, ids)
            sent_ids.extend(ids)

    subscriber_id = active_subscriber(client, settings, "ann@example.com")
    start = utcnow()
    run(start)  # the welcome goes out
    assert [m["X-Nurture-Step"] for m in smtp.messages] == [f"{SEQUENCE}/welcome"]
    one_click(client.application, unsubscribe_token(settings, subscriber_id))

    later = start + timedelta(days=2)
    run(later)  # nothing for someone who left
    assert len(smtp.messages) == 1

    new_id, consent_id = signup(client, settings, "ann@example.com")
    assert new_id == subscriber_id
    assert (
        client.get(f"/confirm/{confirm_token(settings, subscriber_id, consent_id)}").status_code
        == 200
    )
    run(utcnow() + timedelta(minutes=1))
    assert len(smtp.messages) == 1, "not sooner than the minimum gap after the welcome"
    run(start + timedelta(hours=21))
    steps = [m["X-Nurture-Step"] for m in smtp.messages]
    assert steps == [f"{SEQUENCE}/welcome", f"{SEQUENCE}/product-manager"], (
        "the course resumes at the first step not yet received"
    )
