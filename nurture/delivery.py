"""Sending a batch of deliveries over one SMTP connection.

The batch's deliveries are claimed with one conditional update (so a
duplicate broker message, a second worker or a retry cannot send one twice)
and their course emails composed together; then each in turn: check the
subscriber may still be mailed, send, and commit `sent` at once. A temporary
failure puts the delivery back with a backoff; a permanent one fails it and
suppresses the address. The only window for a duplicate is between the
SMTP server's 250 and our commit, and the Message-ID is the same on a retry.
A batch the database cuts short settles what it still holds on a new
connection (`_give_back`), so its unsent emails wait for the next due-scan
rather than for their lease.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import psycopg
from psycopg.rows import args_row
from sqlalchemy import Connection, Integer, any_, bindparam, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from nurture import tokens
from nurture.config import Settings
from nurture.db import for_psycopg, require_aware
from nurture.dkim import dkim_signer
from nurture.mailer import (
    OutgoingEmail,
    PermanentFailure,
    ServerUnreachable,
    SessionRefused,
    SMTPConnection,
    TemporaryFailure,
    build_message,
    parse_smtp_url,
)
from nurture.models import (
    CONFIRMATION_STEP,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Event,
    Subscriber,
    SubscriberStatus,
    utcnow,
)
from nurture.render import Renderer, RenderError, add_open_pixel, rewrite_links
from nurture.sequences import Sequence
from nurture.subscribers import complete_if_done, latest_consent, stop_enrollments, suppress
from nurture.throttle import Throttle

log = logging.getLogger(__name__)

BACKOFF_MAX = 3600  # seconds: retries are at least hourly


@dataclass
class BatchResult:
    sent: int = 0
    retry: int = 0
    failed: int = 0
    skipped: int = 0


def backoff(attempts: int, base: int) -> timedelta:
    """Exponential backoff with jitter: base, 2 x base, 4 x base ... an hour at most.

    The jitter (half to all of the step) spreads retries of a batch that failed
    together, so they do not hit a recovering server at the same moment.
    """
    ceiling = min(BACKOFF_MAX, base * 2 ** max(0, attempts - 1))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))


class Claimed(NamedTuple):
    """A delivery this worker holds, with what it needs to send it.

    `email` and `first_name` are the recipient's as the claim read them, to
    compose the email ahead (`_compose_ahead`); the check before sending reads
    them again.
    """

    id: int
    subscriber_id: int
    enrollment_id: int | None
    sequence: str | None
    step: str
    message_id: str
    attempts: int
    created_at: datetime
    lease_until: datetime
    email: str | None
    first_name: str | None


def _claim_statement(ids_match):
    """Claim the matching deliveries; what a worker reads of them (the fields of Claimed)."""
    deliveries, subscribers = Delivery.__table__, Subscriber.__table__
    handed_out = deliveries.c.enqueued_at.is_not(None)
    queued = (deliveries.c.status == DeliveryStatus.QUEUED) & handed_out
    lapsed = deliveries.c.lease_until < bindparam("now")
    claim_lapsed = (deliveries.c.status == DeliveryStatus.SENDING) & lapsed

    def recipients(column):
        """The recipient's `column`, read with the claim."""
        match = subscribers.c.id == deliveries.c.subscriber_id
        return select(column).where(match).scalar_subquery().label(column.name)

    return (
        update(deliveries)
        .where(ids_match, queued | claim_lapsed)
        .values(
            status=DeliveryStatus.SENDING,
            lease_until=bindparam("until"),
            attempts=deliveries.c.attempts + 1,
        )
        .returning(
            *(deliveries.c[field] for field in Claimed._fields[:-2]),
            recipients(subscribers.c.email),
            recipients(subscribers.c.first_name),
        )
    )


def _one_of_ids(column) -> dict:
    """`column` is one of the ids bound as `ids`, by dialect: PostgreSQL takes them as
    one array, so the statement's SQL is the same on every call; elsewhere a list."""
    return {
        "postgresql": column == any_(bindparam("ids", type_=ARRAY(Integer))),
        "sqlite": column.in_(bindparam("ids", expanding=True)),
    }


#: The batch's claim, a Core statement with the same SQL on every call. Built through
#: the ORM (its bulk UPDATE) or with a parameter per id, the claim cost 3.5 ms of CPU
#: per batch of 50 against 1.4 ms like this; run as driver SQL on PostgreSQL, and
#: reading the recipients' names with it, less again (`claim_many`).
_CLAIM = {
    dialect: _claim_statement(match)
    for dialect, match in _one_of_ids(Delivery.__table__.c.id).items()
}


def claim_many(
    session: Session, delivery_ids: list[int], now: datetime, lease: timedelta
) -> list[Claimed]:
    """Take deliveries for this worker; return the ones that are ours, in the given order.

    Only a queued delivery that the dispatcher has handed out (enqueued_at set)
    or one whose previous claim has lapsed can be taken. It is one conditional
    UPDATE for the whole batch, so of two workers holding the same ids each
    delivery goes to exactly one of them.
    """
    if not delivery_ids:
        return []
    require_aware("as now", now)
    dialect = session.get_bind().dialect.name
    values = {"ids": delivery_ids, "now": now, "until": now + lease}
    if dialect == "postgresql":
        sql, constants = for_psycopg(_CLAIM[dialect])
        rows = session.connection().exec_driver_sql(sql, {**constants, **values}).all()
        claimed = [_claimed_in_utc(*row) for row in rows]
    else:
        claimed = [Claimed(*row) for row in session.connection().execute(_CLAIM[dialect], values)]
    session.commit()
    order = {delivery_id: index for index, delivery_id in enumerate(delivery_ids)}
    return sorted(claimed, key=lambda claimed: order[claimed.id])


def _claimed_in_utc(*row) -> Claimed:
    """A claimed row as read from the server, its times in UTC, where subtracting is exact."""
    claimed = Claimed(*row)
    return claimed._replace(
        created_at=claimed.created_at.astimezone(UTC),
        lease_until=claimed.lease_until.astimezone(UTC),
    )


def claim(session: Session, delivery_id: int, now: datetime, lease: timedelta) -> Claimed | None:
    """Take one delivery for this worker, or None if it is not ours to send."""
    claimed = claim_many(session, [delivery_id], now, lease)
    return claimed[0] if claimed else None


def _renew(
    session: Session, claimed: list[Claimed], now: datetime, lease: timedelta
) -> list[Claimed]:
    """Extend the claim on the deliveries still to send; return those still ours.

    A batch on a slow server can outlast its lease; renewing it before it
    runs out keeps the sweep from handing these to another worker meanwhile.
    """
    ours = {
        row.id
        for row in session.execute(
            update(Delivery)
            .where(
                Delivery.id.in_([d.id for d in claimed]),
                Delivery.status == DeliveryStatus.SENDING,
                Delivery.lease_until == claimed[0].lease_until,
            )
            .values(lease_until=now + lease)
            .returning(Delivery.id)
        )
    }
    session.commit()
    return [d._replace(lease_until=now + lease) for d in claimed if d.id in ours]


def _finish(session: Session, delivery, now, *, complete: bool = True, **values) -> None:
    """Record how a claimed delivery ended, and complete its enrollment if that was the last.

    One transaction: the delivery's row, then (unless it goes back to the
    queue) the enrollment, if nothing of it is left to send. The statements
    are built once per shape: this runs for every email sent.
    """
    if values.get("status") == DeliveryStatus.FAILED:
        values["failed_at"] = now  # the dashboard counts a failure on its day
    session.execute(_finish_statement(frozenset(values)), {"delivery_id": delivery.id, **values})
    if complete and values.get("status") != DeliveryStatus.QUEUED:
        complete_if_done(session, delivery.enrollment_id, now)
    session.commit()


@functools.cache
def _finish_statement(columns: frozenset[str]):
    deliveries = Delivery.__table__
    return (
        update(deliveries)
        .where(
            deliveries.c.id == bindparam("delivery_id"),
            deliveries.c.status == DeliveryStatus.SENDING,
        )
        .values(lease_until=None, **{column: bindparam(column) for column in columns})
    )


class Composer:
    """Renders and addresses the email for a delivery."""

    def __init__(self, settings: Settings, sequences: Mapping[str, Sequence]):
        self.settings = settings
        self.sequences = sequences
        self.renderer = Renderer(
            settings.templates_path,
            postal_address=settings.postal_address,
            course_url=settings.course_url,
        )
        self.signer = dkim_signer(settings)
        self.throttle = Throttle.from_settings(settings)

    def open_url(self, delivery_id: int) -> str:
        token = tokens.make_open_token(self.settings.secret_key, delivery_id)
        return f"{self.settings.base_url}/o/{token}"

    def click_url(self, delivery_id: int, url: str) -> str:
        token = tokens.make_click_token(self.settings.secret_key, delivery_id, url)
        return f"{self.settings.base_url}/r/{token}"

    def unsubscribe_url(self, subscriber_id: int) -> str:
        token = tokens.make_unsubscribe_token(self.settings.secret_key, subscriber_id)
        return f"{self.settings.base_url}/unsubscribe/{token}"

    def compose(self, session: Session, delivery: Delivery, subscriber: Subscriber, now):
        if delivery.step == CONFIRMATION_STEP:
            consent = latest_consent(session, subscriber.id)
            return self.confirmation(
                subscriber, consent.id if consent else 0, delivery.message_id, now
            )
        return self.course_step(
            delivery.sequence or "",
            delivery.step,
            subscriber,
            delivery.message_id,
            now,
            delivery_id=delivery.id,
        )

    def confirmation(self, subscriber: Subscriber, consent_id: int, message_id: str, now):
        """The opt-in email, which carries nothing the signup form was given but the address.

        Whoever fills in the form chooses the name, and the confirmation goes to an
        address that has not yet said yes: a name like "WIN $500 at https://..."
        would have us mail their words to anyone. So the template gets no first
        name (`{{ first_name or "there" }}` greets "there") and the To header no
        display name; the course, once confirmed, uses the name.
        """
        token = tokens.make_confirm_token(self.settings.secret_key, subscriber.id, consent_id)
        rendered = self.renderer.render(
            "confirmation.md",
            {"first_name": "", "confirm_days": self.settings.confirm_max_age // 86400},
            links={"confirm_url": f"{self.settings.base_url}/confirm/{token}"},
        )
        return self._message(
            rendered, subscriber, message_id, now, to_name="", step_label=CONFIRMATION_STEP
        )

    def _message(
        self, rendered, subscriber: Subscriber, message_id: str, now, to_name=None, **headers
    ):
        return build_message(
            rendered,
            to_email=subscriber.email,
            to_name=subscriber.first_name if to_name is None else to_name,
            mail_from=self.settings.mail_from,
            message_id=message_id,
            date=now,
            **headers,
        )

    def course_step(
        self,
        sequence_name: str,
        step_key: str,
        subscriber: Subscriber,
        message_id: str,
        now: datetime,
        *,
        delivery_id: int | None = None,
    ):
        """A course email; with a `delivery_id` its links are tracked through /r/."""
        sequence = self.sequences.get(sequence_name)
        if sequence is None:
            raise RenderError(
                f"there is no sequence {sequence_name!r} (no folder with a valid sequence.toml)"
            )
        step = sequence.step(step_key)
        if step is None:
            raise RenderError(f"sequence {sequence_name} has no step {step_key!r}")
        unsubscribe_url = self.unsubscribe_url(subscriber.id)
        rendered = self.renderer.render(
            f"{sequence.name}/{step.file}",
            {"first_name": subscriber.first_name},
            unsubscribe_url=unsubscribe_url,
            list_title=sequence.title,
        )
        if delivery_id is not None:
            rendered = rewrite_links(
                rendered,
                lambda url: self.click_url(delivery_id, url),
                keep=frozenset({unsubscribe_url}),
            )
            if self.settings.track_opens:
                rendered = add_open_pixel(rendered, self.open_url(delivery_id))
        return self._message(
            rendered,
            subscriber,
            message_id,
            now,
            step_label=f"{sequence.name}/{step.key}",
            list_id=f"{sequence.title} <{sequence.name}.{self.settings.mail_domain}>",
            unsubscribe_url=unsubscribe_url,
            unsubscribe_mailto=self.settings.unsubscribe_mailto or None,
        )


_composers: dict[tuple[int, int], Composer] = {}
_composers_lock = threading.Lock()


def composer_for(settings: Settings, sequences: Mapping[str, Sequence]) -> Composer:
    """One Composer per settings and sequences: its compiled templates serve every batch.

    `current_sequences` returns a new mapping when a manifest changes, and the
    template loader reloads changed files, so edits still show at once.
    """
    key = (id(settings), id(sequences))
    composer = _composers.get(key)  # one lookup: another thread may clear it meanwhile
    if composer is None:
        with _composers_lock:  # threads of one worker share one (and its throttle)
            composer = _composers.get(key)
            if composer is None:
                composer = Composer(settings, sequences)
                _composers.clear()  # an edited sequence replaces the old one
                _composers[key] = composer
    return composer


#: What the last check before sending reads of the subscriber and the enrollment.
_subscribers, _enrollments = Subscriber.__table__, Enrollment.__table__
_RECIPIENT = (
    select(
        _subscribers.c.id,
        _subscribers.c.email,
        _subscribers.c.first_name,
        _subscribers.c.status,
        _enrollments.c.status.label("enrollment_status"),
        _enrollments.c.converted_at,
        _enrollments.c.next_step,
    )
    .select_from(_subscribers)
    .outerjoin(_enrollments, _enrollments.c.id == bindparam("for_enrollment"))
    .where(_subscribers.c.id == bindparam("for_subscriber"))
)


class _Recipient(NamedTuple):
    """A row of _RECIPIENT, as psycopg gives it: made straight from the values, where
    a named-tuple row factory would read the columns' names again for every email."""

    id: int
    email: str
    first_name: str
    status: str
    enrollment_status: str | None
    converted_at: datetime | None
    next_step: str | None


#: The "sent" mark of an email, as its own statement and as part of the next check.
_SENT = frozenset({"status", "sent_at", "last_error"})
_MARK_SENT = _finish_statement(_SENT)
_RECIPIENT_AFTER_SENT = _RECIPIENT.add_cte(_MARK_SENT.cte("marked_sent"))


class _SentMarks:
    """Commits each sent email's mark with the next statement on the batch's connection.

    The mark must be committed as soon as the server has taken the email:
    that is the only window for a duplicate. The next thing a batch does is
    check the next recipient, so on PostgreSQL the mark rides in that very
    statement (a data-modifying WITH runs even when nothing reads it), still
    committed on its own, before the next email goes out: one round trip per
    email instead of two. Elsewhere it is a statement of its own, as before.

    On PostgreSQL these statements also go straight to psycopg's cursor,
    compiled once. SQLAlchemy's execution of a statement (its context, bind
    and result processing) cost more CPU than the round trip itself: 0.17 ms
    of a send's 0.85 ms in one process. Rows come back as named tuples, and
    values must be what the driver takes as they are (aware datetimes).

    So the last mark is in flight with a statement that may fail, and a mark
    whose statement failed may or may not have been committed. What is sure is
    what the server took: `taken` notes every such email, and a batch the
    database cuts short marks those sent rather than give them back
    (`_give_back`).
    """

    def __init__(self, connection: Connection, taken: dict[int, datetime]):
        self.connection = connection
        self.cursor = None
        if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg":
            driver = connection.connection.driver_connection
            self.cursor = driver.cursor(row_factory=args_row(_Recipient))
        self.pending: dict | None = None
        self.taken = taken

    def took(self, delivery_id: int, now: datetime) -> None:
        """The SMTP server has taken this email: whatever becomes of its mark, it has gone,
        and a batch the database cuts short must not give it back (`_give_back`)."""
        self.taken[delivery_id] = now

    def add(self, delivery_id: int, now: datetime) -> None:
        require_aware("for sent_at", now)
        self.flush()
        self.pending = {
            "delivery_id": delivery_id,
            "status": DeliveryStatus.SENT,
            "sent_at": now,
            "last_error": None,
        }

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._execute(_MARK_SENT, pending)

    def recipient(self, delivery):
        """The check before sending `delivery` (see `_may_send`), with any pending mark."""
        # Named unlike any column of deliveries: an UPDATE given a parameter
        # named after one of its columns sets that column too.
        values = {
            "for_subscriber": delivery.subscriber_id,
            "for_enrollment": delivery.enrollment_id,
        }
        if self.pending is not None and self.cursor is not None:
            pending, self.pending = self.pending, None
            return self._execute(_RECIPIENT_AFTER_SENT, {**values, **pending}, row=True)
        self.flush()
        return self._execute(_RECIPIENT, values, row=True)

    def _execute(self, statement, values: dict, *, row: bool = False):
        if self.cursor is None:
            result = self.connection.execute(statement, values)
            return result.first() if row else None
        sql, constants = for_psycopg(statement)
        self.cursor.execute(sql, {**constants, **values})
        return self.cursor.fetchone() if row else None

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.close()


def _may_send(marks: _SentMarks, delivery, sequences: Mapping[str, Sequence]):
    """The recipient, or the reason this delivery must not go out any more.

    Checked just before the SMTP send (one query), so an unsubscribe, a bounce
    or a conversion that happened after the delivery was queued still counts.
    """
    recipient = marks.recipient(delivery)
    if recipient is None or recipient.status in SubscriberStatus.SUPPRESSED:
        return None, f"subscriber is {recipient.status if recipient else 'gone'}"
    if delivery.step == CONFIRMATION_STEP:
        if recipient.status != SubscriberStatus.PENDING:
            return None, "already confirmed"
        return recipient, None
    if recipient.status != SubscriberStatus.ACTIVE:
        return None, f"subscriber is {recipient.status}"
    if recipient.enrollment_status in (None, EnrollmentStatus.STOPPED):
        return None, "enrollment stopped"
    sequence = sequences.get(delivery.sequence or "")
    step = sequence.step(delivery.step) if sequence else None
    if sequence is not None and step is None:
        # Removed from a sequence that is there: the due-scan moves them on to the
        # next step. (A sequence missing as a whole may be mid-deploy: its emails wait.)
        return None, "step removed from the sequence"
    if step is not None and step.sales and recipient.converted_at is not None:
        return None, "converted: sales steps stop"
    return recipient, None


def send_batch(
    session: Session,
    settings: Settings,
    sequences: Mapping[str, Sequence],
    delivery_ids: Iterable[int],
    *,
    clock: Callable[[], datetime] = utcnow,
    connection: SMTPConnection | None = None,
) -> BatchResult:
    """Send the given deliveries over one SMTP connection.

    The batch is claimed in one statement and its emails composed together
    (`_compose_ahead`); each email's outcome is committed as soon as the SMTP
    server has answered for it. A database error ends the batch, as before,
    once what it still holds is settled (`_give_back`).
    """
    result = BatchResult()
    composer = composer_for(settings, sequences)
    smtp = connection or SMTPConnection(parse_smtp_url(settings.smtp_url))
    lease = timedelta(seconds=settings.lease_seconds)
    ids = list(delivery_ids)
    claimed_at = clock()
    claimed = claim_many(session, list(dict.fromkeys(ids)), claimed_at, lease)
    result.skipped += len(ids) - len(claimed)
    ahead = _compose_ahead(session, composer, claimed, claimed_at)
    held = _Held([delivery.id for delivery in claimed], [claimed_at + lease])
    try:
        with smtp, _own_commits(session) as quick:
            marks = _SentMarks(quick, held.taken)
            try:
                while claimed:
                    now = clock()
                    if now >= claimed[0].lease_until - lease / 2:
                        marks.flush()
                        held.leases.append(now + lease)  # first: it may commit and lose its reply
                        kept = _renew(session, claimed, now, lease)
                        result.skipped += len(claimed) - len(kept)
                        claimed = kept
                        continue
                    delivery = claimed.pop(0)
                    composed = ahead.pop(delivery.id, None)
                    outcome = _send_one(
                        session, marks, settings, composer, smtp, delivery, now, composed
                    )
                    if outcome == "unreachable":
                        # No point trying the rest now: they wait for a later tick.
                        reason = f"{SMTP_DOWN}unreachable or refusing our session (see the log)"
                        _defer(session, settings, claimed, now, reason)
                        result.retry += 1 + len(claimed)
                        claimed = []
                    else:
                        setattr(result, outcome, getattr(result, outcome) + 1)
            finally:
                try:
                    marks.flush()
                finally:
                    marks.close()
    except DATABASE_ERRORS:
        _give_back(session, held)
        raise
    return result


def _defer(session: Session, settings: Settings, claimed: list, now, reason: str) -> None:
    """Give claimed deliveries back for a later tick, without counting an attempt."""
    if not claimed:
        return
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_([d.id for d in claimed]), Delivery.status == DeliveryStatus.SENDING)
        .values(
            status=DeliveryStatus.QUEUED,
            enqueued_at=None,
            lease_until=None,
            attempts=Delivery.attempts - 1,
            not_before=now + backoff(1, settings.retry_base_seconds),
            last_error=reason,
        )
    )
    session.commit()


#: How `last_error` starts for an email put back because the SMTP server could not be
#: reached or refused our session: an outage, which /metrics counts apart from one
#: recipient's deferral (a greylisting, a full mailbox) or the send rate's wait.
SMTP_DOWN = "SMTP server down: "
#: How `last_error` starts for an email held because its template does not render.
TEMPLATE_ERROR = "template error: "

#: Errors of the database: through SQLAlchemy, or straight from psycopg's cursor,
#: which runs the per-email statements on PostgreSQL (`_SentMarks`).
DATABASE_ERRORS = (DBAPIError, psycopg.Error)


@dataclass
class _Held:
    """What a batch holds, for `_give_back`: its claims, every lease it set on them (the
    claim's, then each renewal's), and the emails the SMTP server took, with when."""

    ids: list[int]
    leases: list[datetime]
    taken: dict[int, datetime] = field(default_factory=dict)


def _give_back(session: Session, held: _Held) -> None:
    """Settle what a batch the database cut short still holds, on a connection of its own.

    A restart or failover ends every connection the batch had, so whatever the
    session had open is rolled back and the pool hands out a new connection
    (pinged first). Then, in one transaction: an email the SMTP server took is
    marked sent, for its mark may have gone with the connection (it rides with
    the next email's check), and given back it would go out twice; the others
    go back to the queue, unclaimed and with no attempt counted, so the next
    due-scan hands them out, instead of their waiting out the lease. Only claims
    still under a lease this batch set are touched: one that ran out and was
    taken by another worker is that worker's. If the database cannot be reached
    yet, nothing changes and the leases decide, as for a worker that died.
    """
    if not held.ids:
        return
    with contextlib.suppress(*DATABASE_ERRORS):
        session.rollback()  # fails on a dead connection, and drops it
    try:
        marked = _mark_taken(session, held)
        given_back = _requeue_untaken(session, held)
        session.commit()
    except DATABASE_ERRORS as error:
        log.error(
            "the database failed mid-batch and could not give back the %d deliveries the "
            "batch held (%s); each waits for its lease to run out",
            len(held.ids),
            error,
        )
        return
    log.warning(
        "the database failed mid-batch: %d deliveries not sent are back in the queue for "
        "the next due-scan, %d sent whose mark was lost are marked now",
        given_back,
        marked,
    )


def _still_held(held: _Held) -> tuple:
    """The conditions for a delivery this batch still holds: claimed, under one of its leases."""
    return Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until.in_(held.leases)


def _mark_taken(session: Session, held: _Held) -> int:
    """Mark sent what the SMTP server took and is not marked yet; how many."""
    unmarked = session.execute(
        select(Delivery.id, Delivery.enrollment_id).where(
            Delivery.id.in_(list(held.taken)), *_still_held(held)
        )
    ).all()
    for delivery_id, enrollment_id in unmarked:
        sent_at = held.taken[delivery_id]
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, *_still_held(held))
            .values(status=DeliveryStatus.SENT, sent_at=sent_at, last_error=None, lease_until=None)
        )
        complete_if_done(session, enrollment_id, sent_at)
    return len(unmarked)


def _requeue_untaken(session: Session, held: _Held) -> int:
    """Put back in the queue, for the next due-scan, what the SMTP server did not take."""
    untaken = [delivery_id for delivery_id in held.ids if delivery_id not in held.taken]
    return session.execute(
        update(Delivery)
        .where(Delivery.id.in_(untaken), *_still_held(held))
        .values(
            status=DeliveryStatus.QUEUED,
            enqueued_at=None,
            lease_until=None,
            attempts=Delivery.attempts - 1,
            last_error="given back: the database failed mid-batch",
        )
    ).rowcount


@contextmanager
def _own_commits(session: Session) -> Iterator[Connection]:
    """A connection on which each statement commits on its own.

    Every email needs the check before sending and the mark after (one
    statement on PostgreSQL, see `_SentMarks`). Neither needs a transaction
    around it, and alone each costs one round trip instead of three (BEGIN,
    the statement, COMMIT). Everything that writes more than one row at once
    goes through the session, in a transaction.

    Those statements run on psycopg's own cursor, whose errors SQLAlchemy does
    not see: a connection they find dead is dropped here, as SQLAlchemy drops
    one its own statements find dead, rather than handed back to the pool to
    fail its reset there.
    """
    with session.get_bind().connect() as connection:
        try:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")
        except psycopg.Error as error:
            if connection.dialect.is_disconnect(error, _driver(connection), None):
                connection.invalidate()
            raise


def _driver(connection: Connection):
    """The connection's psycopg connection, or None if SQLAlchemy has already dropped it."""
    return None if connection.invalidated else connection.connection.driver_connection


@dataclass(frozen=True)
class _Composed:
    """An email composed before its turn: for whom (address and name), and when."""

    recipient: tuple[str, str]
    at: datetime
    email: OutgoingEmail

    def fits(self, subscriber, now: datetime) -> bool:
        """Whether it can go as it is: the same address and name, and its Date still fresh."""
        return (
            self.recipient == (subscriber.email, subscriber.first_name)
            and now - self.at <= COMPOSED_FRESH
        )


class _Person(NamedTuple):
    """A recipient as the claim read them: what composing needs."""

    id: int
    email: str
    first_name: str


#: How long an email composed ahead may wait for its turn (on a slow SMTP server);
#: past that it is composed again, so that its Date header is not stale.
COMPOSED_FRESH = timedelta(seconds=60)


def _compose_ahead(
    session: Session, composer: Composer, claimed: list[Claimed], now: datetime
) -> dict[int, _Composed]:
    """The batch's course emails, composed one after another before the first is sent.

    Composing is the largest part of an email's CPU. Done in one run, with the
    templates and the code still in the processor's caches, rather than
    between one email's SQL and SMTP and the next's, it cut the CPU of a send
    by about a sixth in one process (0.52-0.59 ms to 0.43-0.48), and the
    workers sent a fifth more per second.

    Addresses and names come with the claim. The check just before each send
    still decides whether an email goes, and one whose recipient changed
    meanwhile, or that waited past COMPOSED_FRESH, is composed again then.
    An email that cannot be composed, whatever the error, is left to its
    send, which fails or reports it in its turn as before: the emails before
    it in the batch still go. A template edit made after the claim reaches
    the next batch. A confirmation is composed at its send, as its consent
    may change up to then.
    """
    composed = {}
    with composer.renderer.one_version():
        for delivery in claimed:
            if delivery.step == CONFIRMATION_STEP or delivery.email is None:
                continue
            person = _Person(delivery.subscriber_id, delivery.email, delivery.first_name)
            try:
                email = composer.compose(session, delivery, person, now)
            except Exception as error:  # reported by the send, in its turn, as before
                log.debug("delivery %s left to compose at its send: %r", delivery.id, error)
                continue
            composed[delivery.id] = _Composed((person.email, person.first_name), now, email)
    return composed


#: Seconds of waiting for a send-rate slot after which the check before sending is
#: made again: a wait is a sleep of 20 ms or more, taking a slot without one a
#: Redis round trip.
THROTTLE_RECHECK = 0.01


def _send_one(
    session,
    marks: _SentMarks,
    settings: Settings,
    composer: Composer,
    smtp,
    delivery,
    now,
    composed: _Composed | None = None,
) -> str:
    """Send one claimed delivery; return sent, retry, unreachable, failed or skipped.

    `composed` is its email if it was composed ahead; it is used if it still fits.
    """
    subscriber, reason = _may_send(marks, delivery, composer.sequences)
    if subscriber is None:
        _finish(session, delivery, now, status=DeliveryStatus.CANCELLED, last_error=reason)
        return "skipped"
    try:
        if composed is not None and composed.fits(subscriber, now):
            message = composed.email
        else:
            message = composer.compose(session, delivery, subscriber, now)
    except RenderError as error:
        log.error("delivery %s held, its template is broken: %s", delivery.id, error)
        return _retry_or_fail(session, settings, delivery, now, f"{TEMPLATE_ERROR}{error}")
    except ValueError as error:  # an address or header the email package refuses
        log.error("delivery %s cannot be written as an email: %s", delivery.id, error)
        _finish(
            session, delivery, now, status=DeliveryStatus.FAILED, last_error=f"invalid: {error}"
        )
        return "failed"
    asked = time.monotonic()
    if not composer.throttle.acquire(subscriber.email):
        # Over the provider's rate: back in the queue without counting an attempt.
        _finish(
            session,
            delivery,
            now,
            status=DeliveryStatus.QUEUED,
            enqueued_at=None,
            attempts=delivery.attempts - 1,
            not_before=now + timedelta(seconds=settings.dispatch_interval),
            last_error="rate limited",
        )
        return "retry"
    if time.monotonic() - asked > THROTTLE_RECHECK:
        # It waited for a slot (up to MAX_WAIT): an unsubscribe may have come meanwhile.
        # (The check stays before the wait: it carries the last email's sent mark, which
        # must not wait uncommitted for a slot.)
        subscriber, reason = _may_send(marks, delivery, composer.sequences)
        if subscriber is None:
            _finish(session, delivery, now, status=DeliveryStatus.CANCELLED, last_error=reason)
            return "skipped"
    try:
        smtp.send(message, signer=composer.signer)
    except PermanentFailure as error:
        log.warning("delivery %s refused for good: %s", delivery.id, error)
        _finish(
            session,
            delivery,
            now,
            complete=False,
            status=DeliveryStatus.FAILED,
            last_error=str(error),
        )
        _suppress_bounced(session, subscriber, now, str(error), delivery.id)
        return "failed"
    except SessionRefused as error:
        log.error(
            "the SMTP server refuses our session, not the recipients: %s; no email goes out "
            "until SMTP_URL (user, password, tls) or MAIL_FROM fits the server",
            error,
        )
        _retry_or_fail(session, settings, delivery, now, f"{SMTP_DOWN}session refused: {error}")
        return "unreachable"
    except ServerUnreachable as error:
        log.error("the SMTP server cannot be reached (%s); the batch waits for a later tick", error)
        _retry_or_fail(session, settings, delivery, now, f"{SMTP_DOWN}{error}")
        return "unreachable"
    except TemporaryFailure as error:
        log.warning("delivery %s deferred: %s", delivery.id, error)
        return _retry_or_fail(session, settings, delivery, now, str(error))
    marks.took(delivery.id, now)
    # Only an enrollment with no step left can complete. Its next step cannot
    # become empty meanwhile: only the due-scan empties it, and the due-scan
    # leaves alone an enrollment with an email on its way, like this one.
    if delivery.enrollment_id is not None and subscriber.next_step is None:
        # With the enrollment's completion, in one transaction.
        _finish(session, delivery, now, status=DeliveryStatus.SENT, sent_at=now, last_error=None)
    else:
        marks.add(delivery.id, now)
    return "sent"


def _retry_or_fail(session, settings: Settings, delivery, now, reason: str) -> str:
    """Back off and try again, until the retry horizon; then fail with the reason.

    Returns the outcome: "retry" or "failed".
    """
    if now - delivery.created_at > timedelta(hours=settings.retry_horizon_hours):
        _finish(
            session, delivery, now, status=DeliveryStatus.FAILED, last_error=f"gave up: {reason}"
        )
        return "failed"
    _finish(
        session,
        delivery,
        now,
        status=DeliveryStatus.QUEUED,
        enqueued_at=None,
        not_before=now + backoff(delivery.attempts, settings.retry_base_seconds),
        last_error=reason,
    )
    return "retry"


def _suppress_bounced(session, subscriber, now, reason: str, delivery_id: int) -> None:
    """Mark the recipient bounced, unless they were erased while the email was on its way.

    An erasure cannot call back an email the SMTP server already has; its refusal
    quotes the address ("550 5.1.1 <ann@...>"). Then the erased row stays erased,
    the reason is kept nowhere, and the bounce outranks the erasure in the
    suppression hash instead.
    """
    subscriber_id = subscriber.id
    bounced = session.execute(
        update(Subscriber)
        .where(Subscriber.id == subscriber_id, Subscriber.status != SubscriberStatus.ERASED)
        .values(status=SubscriberStatus.BOUNCED)
        .returning(Subscriber.id)
    ).first()
    if bounced is None:
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(last_error=""))
        suppress(session, subscriber.email, SubscriberStatus.BOUNCED, now)
        reason = ""
    stop_enrollments(session, subscriber_id)
    session.add(
        Event(
            subscriber_id=subscriber_id,
            delivery_id=delivery_id,
            kind="bounce",
            detail=reason[:500],
            created_at=now,
        )
    )
    session.commit()
