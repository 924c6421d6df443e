"""Races found in review: a report or a signup that meets an erasure of the same row."""

from __future__ import annotations

import pytest
from test_compliance import (
    signed_up,
    subscriber,
)

from nurture import subscribers
from nurture.db import session_scope
from nurture.models import SubscriberStatus, utcnow
from nurture.privacy import erase
from nurture.subscribers import suppress_reported, suppression_of

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
