"""A report, a signup or the prune that meets an erasure of the same row, and the prune's reach."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text, update
from test_compliance import (
    CONFIRMATION_STEP,
    SEQUENCE,
    deliveries,
    places_holding,
    signed_up,
    subscriber,
    subscriber_id_of,
)

from nurture import privacy, subscribers
from nurture.db import session_scope
from nurture.delivery import send_batch
from nurture.models import Delivery, SubscriberStatus, utcnow
from nurture.privacy import erase, prune_unconfirmed
from nurture.sequences import current_sequences, first_steps
from nurture.subscribers import SignupRequest, signup, suppress_reported, suppression_of

POSTGRES = pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)


@POSTGRES
def test_a_complaint_that_meets_an_erasure_keeps_the_address_out(settings, monkeypatch):
    """The report looks the address up, an erasure commits, then the report locks the row."""
    email = "erased.meanwhile@example.com"
    subscriber_id = signed_up(settings, email, utcnow())
    locked = subscribers._locked

    def erased_first(session, wanted):
        with session_scope(settings.database_url) as other:
            assert erase(other, wanted, now=utcnow())
        return locked(session, wanted)

    monkeypatch.setattr(subscribers, "_locked", erased_first)
    with session_scope(settings.database_url) as session:
        suppress_reported(session, email, "complained", now=utcnow(), source="webhook")
    monkeypatch.setattr(subscribers, "_locked", locked)

    assert subscriber(settings, subscriber_id).status == SubscriberStatus.ERASED
    with session_scope(settings.database_url) as session:
        assert suppression_of(session, email) == SubscriberStatus.COMPLAINED


def waits_for_a_lock(settings, timeout: float = 10.0) -> bool:
    """True once a session of this database waits for a row lock (within `timeout`)."""
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(settings.database_url) as session:
            if session.scalar(waiting):
                return True
        time.sleep(0.01)
    return False


@POSTGRES
def test_a_signup_again_while_the_prune_erases_the_old_row_is_not_lost(settings, monkeypatch):
    t0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    email = "tries.again@example.com"
    old = signed_up(settings, email, t0)
    now = t0 + timedelta(days=31)
    erased, go = threading.Event(), threading.Event()
    original = privacy.erase

    def slow_erase(*args, **kwargs):
        done = original(*args, **kwargs)
        erased.set()
        go.wait(10)
        return done

    monkeypatch.setattr(privacy, "erase", slow_erase)

    def prune():
        with session_scope(settings.database_url) as session:
            prune_unconfirmed(session, now=now, keep=timedelta(days=30))

    def sign_up_again():
        request = SignupRequest(email, "Pat", "UTC", SEQUENCE, "form")
        starts = first_steps(current_sequences(settings.templates_path))
        with session_scope(settings.database_url) as session:
            signup(session, settings, request, first_steps=starts, now=now)

    pruner = threading.Thread(target=prune)
    pruner.start()
    assert erased.wait(10)
    signer = threading.Thread(target=sign_up_again)
    signer.start()
    # Go on only once the signup waits for the prune's lock on the old row: the race itself.
    assert waits_for_a_lock(settings), "the signup never met the prune's lock"
    go.set()
    pruner.join(10)
    signer.join(10)

    assert subscriber(settings, old).status == SubscriberStatus.ERASED
    again = subscriber_id_of(settings, email)
    assert again is not None, "the signup made during the prune was dropped"
    assert len(deliveries(settings, again, CONFIRMATION_STEP)) == 1


def test_a_signup_whose_confirmation_bounced_is_erased_too(settings, smtp):
    """A typo's confirmation bounces: a signup never confirmed all the same, kept out by hash."""
    t0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    email = "typo@exmaple.com"
    never = signed_up(settings, email, t0)
    [confirmation] = deliveries(settings, never, CONFIRMATION_STEP)
    smtp.handler.refuse_recipients_with = "550 5.1.1 <typo@exmaple.com>: no such user"
    with session_scope(settings.database_url) as session:
        sequences = current_sequences(settings.templates_path)
        session.execute(update(Delivery).values(enqueued_at=t0))  # handed to a worker
        session.commit()
        result = send_batch(session, settings, sequences, [confirmation.id], clock=lambda: t0)
    assert result.failed == 1, result
    assert subscriber(settings, never).status == SubscriberStatus.BOUNCED

    with session_scope(settings.database_url) as session:
        keep = timedelta(days=30)
        assert prune_unconfirmed(session, now=t0 + keep + timedelta(minutes=1), keep=keep) == 1

    assert subscriber(settings, never).status == SubscriberStatus.ERASED
    assert places_holding(settings, "typo@exmaple", "Pat", "198.51.100.7") == []
    with session_scope(settings.database_url) as session:
        assert suppression_of(session, email) == SubscriberStatus.BOUNCED


@POSTGRES
def test_two_reports_of_one_address_at_once_both_succeed(settings):
    """A provider's webhook and an operator's CLI report the same address together."""
    email = "reported.twice@example.com"
    errors: list[Exception] = []

    def second_report() -> None:
        try:
            with session_scope(settings.database_url) as session:
                suppress_reported(session, email, "bounced", now=utcnow(), source="cli")
        except Exception as error:  # the assertion below names it
            errors.append(error)

    with session_scope(settings.database_url) as first:
        assert not suppress_reported(first, email, "complained", now=utcnow(), source="webhook")
        other = threading.Thread(target=second_report)
        other.start()
        assert waits_for_a_lock(settings), "the second report never met the first's row"
    other.join(10)

    assert errors == []
    with session_scope(settings.database_url) as session:
        assert suppression_of(session, email) == SubscriberStatus.COMPLAINED, "the first kept"
