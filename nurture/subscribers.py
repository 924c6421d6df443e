"""Signing up, confirming and unsubscribing: the subscriber's side of the story.

Plain functions over a session and a `now`, called by the web routes (and later
by the command line). None of them sends mail: a signup writes the confirmation
as a delivery row and the caller hands its id to the broker after commit.
"""

from __future__ import annotations

import hashlib
import secrets
import unicodedata
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

import psycopg
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import (
    Insert,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from nurture.config import Settings
from nurture.db import for_psycopg, insert_for, require_aware
from nurture.models import (
    CONFIRMATION_STEP,
    Base,
    Consent,
    Delivery,
    DeliveryStatus,
    Enrollment,
    EnrollmentStatus,
    Event,
    Subscriber,
    SubscriberStatus,
    Suppression,
)

DEFAULT_SEQUENCE = "product-vs-project"


def consent_text(sequence_title: str) -> str:
    """The consent sentence shown next to a signup form, and stored with the signup."""
    return (
        f"Yes, send me the free email course \u201c{sequence_title}\u201d: a few short emails "
        "over the coming days. I can unsubscribe at any time."
    )


#: The main course's consent sentence (its signup form is the landing page).
CONSENT_TEXT = consent_text("Product manager or project manager?")
#: Change the version whenever the consent text changes: each consent record keeps both.
CONSENT_VERSION = "2026-11-25"
#: The consent version of people imported as already consenting: their record holds the
#: operator's word for it, not a text of ours they agreed to.
IMPORT_VOUCHED = "import"
RESEND_CONFIRMATION_AFTER = timedelta(minutes=10)
MAX_EMAIL = 254
MAX_NAME = 100


@cache
def known_timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@dataclass(frozen=True)
class SignupRequest:
    email: str
    first_name: str
    timezone: str  # "" when none was given: see validate_signup
    sequence: str
    source: str  # "form", "api" or "import"
    consent_text: str = CONSENT_TEXT
    ip: str = ""
    user_agent: str = ""
    #: The version of the text the person agreed to (`IMPORT_VOUCHED` for people an
    #: operator imported as already consenting, who saw none of ours).
    consent_version: str = CONSENT_VERSION


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


#: Zero-width non-joiner and joiner: invisible, yet part of how names are spelled in
#: Persian, Sinhala and other scripts, and of emoji sequences.
JOINERS = frozenset("\u200c\u200d")


def _name_character(char: str) -> bool:
    """Whether a name may hold this character.

    Printable characters, the two joiners, and any kind of space (a no-break
    or ideographic one becomes a plain space when the name is cleaned). Not
    controls, and not the other invisible format characters: bidi overrides
    and isolates would make a name display as something else, in the admin
    and in the To header alike.
    """
    return char.isprintable() or char in JOINERS or unicodedata.category(char) == "Zs"


def normalize_email(value: str) -> str:
    """An address in the form it is stored in; EmailNotValidError says what is wrong.

    ASCII only (an international domain in its punycode form): the address
    must go into SMTP as is. Lower-cased, so one person is one subscriber.
    Everything that finds a subscriber by an address someone typed goes
    through here, or `f5@bücher.example` would miss `f5@xn--bcher-kva.example`.
    """
    valid = validate_email(value.strip(), check_deliverability=False, allow_smtputf8=False)
    return valid.ascii_email.lower()


def lookup_address(typed: str) -> str:
    """The stored form of an address typed to find a subscriber (the CLI, the timeline).

    As `normalize_email` gives it; one that is not valid is only trimmed and
    lower-cased, and will simply find no one.
    """
    try:
        return normalize_email(typed)
    except EmailNotValidError:
        return typed.strip().lower()


def validate_signup(
    data: Mapping[str, object],
    *,
    sequences: set[str] | frozenset[str],
    strict_timezone: bool,
) -> tuple[dict[str, str], dict[str, str]]:
    """Clean signup fields, or say per field what is wrong.

    Returns (clean values, errors). A form's hidden time zone comes from the
    browser and the visitor cannot fix it, so with `strict_timezone` False an
    unknown one counts as none; the API reports it instead. No time zone is
    "" in the clean values: `signup` gives a new subscriber DEFAULT_TIMEZONE
    and leaves a returning one's zone as it is, rather than reset it because
    a browser sent nothing this time.
    """
    errors: dict[str, str] = {}
    clean: dict[str, str] = {}
    for field in ("email", "first_name", "timezone", "sequence"):
        value = data.get(field)
        if value is not None and not isinstance(value, str):
            errors[field] = "Must be text."

    email = _text(data.get("email"))
    if "email" in errors:
        pass
    elif not email:
        errors["email"] = "Please enter your email address."
    elif len(email) > MAX_EMAIL or any(c in email for c in "\r\n\0"):
        errors["email"] = "That does not look like an email address."
    else:
        try:
            clean["email"] = normalize_email(email)
        except EmailNotValidError as error:
            errors["email"] = str(error)

    name = _text(data.get("first_name"))
    if "first_name" in errors:
        pass
    elif len(name) > MAX_NAME:
        errors["first_name"] = f"Please keep your name under {MAX_NAME} characters."
    elif not all(map(_name_character, name)) or any(c in name for c in "<>{}"):
        errors["first_name"] = "Please use only letters, spaces and ordinary punctuation."
    else:
        clean["first_name"] = " ".join(name.split())

    timezone = _text(data.get("timezone"))
    if "timezone" in errors:
        pass
    elif timezone and timezone in known_timezones():
        clean["timezone"] = timezone
    elif timezone and strict_timezone:
        errors["timezone"] = (
            f"Unknown time zone {timezone[:64]!r}; use an IANA name like Europe/Paris."
        )
    else:
        clean["timezone"] = ""

    sequence = _text(data.get("sequence")) or DEFAULT_SEQUENCE
    if "sequence" in errors:
        pass
    elif sequence not in sequences:
        errors["sequence"] = f"Unknown sequence {sequence[:100]!r}."
    else:
        clean["sequence"] = sequence
    return clean, errors


def email_hash(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


def suppression_of(session: Session, email: str) -> str | None:
    """Why an address must not be mailed, if an erased record says so."""
    return session.scalar(
        select(Suppression.reason).where(Suppression.email_hash == email_hash(email))
    )


def suppress(session: Session, email: str, reason: str, now: datetime) -> None:
    """Keep the address's hash with `reason`; a bounce or complaint outranks an unsubscribe.

    One upsert, so the same address suppressed twice at once (a provider's
    report and an erasure, say) does not fail on the second insert.
    """
    table = Suppression.__table__
    statement = insert_for(session)(table).values(
        email_hash=email_hash(email), reason=reason, created_at=now
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.email_hash],
            set_={"reason": statement.excluded.reason},
            where=table.c.reason.in_(SubscriberStatus.REVERSIBLE),
        )
    )


def lift_reversible(session: Session, email: str) -> None:
    """A new, confirmed signup lifts an unsubscribe or erasure (never a bounce)."""
    session.execute(
        delete(Suppression).where(
            Suppression.email_hash == email_hash(email),
            Suppression.reason.in_(SubscriberStatus.REVERSIBLE),
        )
    )


def new_message_id(settings: Settings) -> str:
    """A Message-ID of 128 random bits."""
    return new_message_ids(settings, 1)[0]


def new_message_ids(settings: Settings, count: int) -> list[str]:
    """`count` Message-IDs of 128 random bits each, from one read of the random source.

    The due-scan writes one per due step, hundreds a batch: read one by one,
    each cost a system call.
    """
    digits = secrets.token_hex(16 * count)
    domain = settings.mail_domain
    return [f"<{digits[start : start + 32]}@{domain}>" for start in range(0, 32 * count, 32)]


@cache
def _insert_statement(table: Table) -> Insert:
    """A table's INSERT ... RETURNING id, built once per process rather than per signup."""
    return insert(table).returning(table.c.id)


def _insert(session: Session, model: type[Base], **values) -> int:
    """Write one row with a plain INSERT and return its id.

    Signups are the busiest writes the service takes and never read their rows
    back, so they skip the ORM's unit of work, which costs more than the SQL.
    """
    return session.scalar(_insert_statement(model.__table__), values)


def _lookup_statement() -> Select:
    """The address's subscriber id and status, and any suppression of it, in one query.

    A suppression matters only when there is no subscriber: it is what an
    erasure keeps of a bounced or complained address.
    """
    subscribers, suppressions = Subscriber.__table__, Suppression.__table__
    of_address = subscribers.c.email == bindparam("email")
    return select(
        select(subscribers.c.id).where(of_address).scalar_subquery().label("id"),
        select(subscribers.c.status).where(of_address).scalar_subquery().label("status"),
        select(suppressions.c.reason)
        .where(suppressions.c.email_hash == bindparam("email_hash"))
        .scalar_subquery()
        .label("suppressed"),
    )


#: Built once: every signup runs it.
_LOOKUP = _lookup_statement()


#: The consent columns `first_signup` takes from `_consent` (as parameters consent_*).
_CONSENT_VALUES = ("source", "consent_text", "consent_version", "ip", "user_agent")


def _first_signup_statement() -> Insert:
    """A first-time signup's five rows as one PostgreSQL statement; the delivery's id.

    The subscriber (pending), their enrollment, the consent, the signup event and
    the confirmation delivery are the same rows `_new_subscriber`, `signup` and
    `_queue_confirmation` write one INSERT at a time, chained by data-modifying
    CTEs: one round trip and one statement for the server instead of six. It
    writes nothing, and returns no row, when the address is already a subscriber
    (ON CONFLICT also waits for a concurrent signup of it to commit, the double
    click) or a bounce or complaint of it was kept at erasure: `signup` then
    takes its general path. PostgreSQL only; SQLite cannot put an INSERT in a CTE.
    Every column a model default would fill is given here, as `_insert` would
    have them; parameter names avoid the column names of `deliveries`, the outer
    INSERT.
    """
    subscribers, suppressions = Subscriber.__table__, Suppression.__table__
    now = bindparam("now", type_=subscribers.c.created_at.type)

    def value(name: str, column) -> object:
        return bindparam(name, type_=column.type)

    kept_suppression = exists().where(
        suppressions.c.email_hash == bindparam("email_hash"),
        and_(*(suppressions.c.reason != reason for reason in sorted(SubscriberStatus.REVERSIBLE))),
    )
    new = (
        pg_insert(subscribers)
        .from_select(
            ["email", "first_name", "timezone", "status", "created_at"],
            select(
                value("signup_email", subscribers.c.email),
                value("first_name", subscribers.c.first_name),
                value("timezone", subscribers.c.timezone),
                literal(SubscriberStatus.PENDING, subscribers.c.status.type),
                now,
            ).where(~kept_suppression),
        )
        .on_conflict_do_nothing(index_elements=[subscribers.c.email])
        .returning(subscribers.c.id)
        .cte("new_subscriber")
    )

    def for_new(model: type[Base], **values) -> Insert:
        """INSERT one row for the new subscriber (none if there is none)."""
        return insert(model.__table__).from_select(
            ["subscriber_id", *values], select(new.c.id, *values.values())
        )

    enrollments, consents, events, deliveries = (
        Enrollment.__table__,
        Consent.__table__,
        Event.__table__,
        Delivery.__table__,
    )
    enrollment = for_new(
        Enrollment,
        sequence=value("sequence_name", enrollments.c.sequence),
        timezone=value("timezone", enrollments.c.timezone),
        status=literal(EnrollmentStatus.PENDING, enrollments.c.status.type),
        created_at=now,
    )
    consent = for_new(
        Consent,
        **{column: value(f"consent_{column}", consents.c[column]) for column in _CONSENT_VALUES},
        created_at=now,
    )
    event = for_new(
        Event, kind=literal("signup", events.c.kind.type), detail=literal(""), created_at=now
    )
    return (
        for_new(
            Delivery,
            step=literal(CONFIRMATION_STEP, deliveries.c.step.type),
            status=literal(DeliveryStatus.QUEUED, deliveries.c.status.type),
            attempts=literal(0),
            message_id=value("new_message_id", deliveries.c.message_id),
            not_before=now,
            created_at=now,
            enqueued_at=value("enqueued", deliveries.c.enqueued_at),
        )
        .returning(deliveries.c.id)
        .add_cte(enrollment.cte("enrollment"), consent.cte("consent"), event.cte("event"))
    )


#: Built and compiled once: every first-time signup on PostgreSQL runs it, as
#: driver SQL. SQLAlchemy's execution of it (its cache lookup, and a bind
#: processor per value) cost more client CPU than the round trip.
_FIRST_SIGNUP = for_psycopg(_first_signup_statement())


def first_signup(
    connection: psycopg.Connection,
    settings: Settings,
    request: SignupRequest,
    *,
    now: datetime,
    enqueued_at: datetime | None = None,
) -> int | None:
    """Write a first-time double opt-in signup in one statement (PostgreSQL only).

    Returns the confirmation's delivery id, or None if nothing was written
    because the address is known (or kept suppressed): then `signup` decides.
    Being one statement it needs no transaction of its own, so on an
    autocommit connection it costs one round trip (`db.run_autocommit`). It
    runs on psycopg's connection, not SQLAlchemy's: it is the hottest statement
    the web runs.
    """
    require_aware("to first_signup", now, enqueued_at)
    consent = _consent(0, request, now)
    statement, constants = _FIRST_SIGNUP
    row = connection.execute(
        statement,
        {
            **constants,
            "signup_email": request.email,
            "email_hash": email_hash(request.email),
            "first_name": request.first_name,
            "timezone": request.timezone or settings.default_timezone,
            "sequence_name": request.sequence,
            "now": now,
            "new_message_id": new_message_id(settings),
            "enqueued": enqueued_at,
            **{f"consent_{column}": consent[column] for column in _CONSENT_VALUES},
        },
    ).fetchone()
    return None if row is None else row[0]


def _queue_confirmation(
    session: Session,
    settings: Settings,
    subscriber_id: int,
    now: datetime,
    enqueued_at: datetime | None = None,
) -> int:
    """Write the confirmation email's delivery row; its id.

    `enqueued_at` is for a caller that has the id published after commit (the
    web's hand-over thread): the row is marked as handed over in the same write.
    """
    return _insert(
        session,
        Delivery,
        subscriber_id=subscriber_id,
        step=CONFIRMATION_STEP,
        message_id=new_message_id(settings),
        not_before=now,
        created_at=now,
        enqueued_at=enqueued_at,
    )


def _confirmed_lately(session: Session, subscriber_id: int, now: datetime) -> bool:
    """True if a confirmation email was written within RESEND_CONFIRMATION_AFTER.

    Within that window the link already sent stays the one that works, and a
    form cannot be used to fill someone's inbox.
    """
    last = session.scalar(
        select(Delivery.created_at)
        .where(Delivery.subscriber_id == subscriber_id, Delivery.step == CONFIRMATION_STEP)
        .order_by(Delivery.created_at.desc())
        .limit(1)
    )
    return last is not None and now - last < RESEND_CONFIRMATION_AFTER


def _ensure_enrollment(
    session: Session, subscriber: Subscriber, sequence: str, now: datetime
) -> Enrollment:
    enrollment = session.scalar(
        select(Enrollment).where(
            Enrollment.subscriber_id == subscriber.id, Enrollment.sequence == sequence
        )
    )
    if enrollment is None:
        enrollment = Enrollment(
            subscriber_id=subscriber.id,
            sequence=sequence,
            timezone=subscriber.timezone,
            created_at=now,
        )
        session.add(enrollment)
        session.flush()
    return enrollment


def set_timezone(session: Session, subscriber: Subscriber, timezone: str) -> None:
    """Move a subscriber, and each of their enrollments, to another time zone.

    The due-scan reads an enrollment's zone from the enrollment itself, so the
    two change together. A next email already planned keeps its time; the ones
    after it are placed in the new zone.
    """
    subscriber.timezone = timezone
    session.execute(
        update(Enrollment)
        .where(Enrollment.subscriber_id == subscriber.id, Enrollment.timezone != timezone)
        .values(timezone=timezone)
    )


def _start(
    session: Session, enrollment: Enrollment, first_step: str, now: datetime, min_gap: timedelta
) -> None:
    """Start (or restart) an enrollment at its first step.

    A returning subscriber resumes at the first step they have not had (the
    due-scan passes over the rest), but never sooner than the minimum gap after
    the last course email they did get.
    """
    last_sent = session.scalar(
        select(func.max(Delivery.sent_at)).where(Delivery.enrollment_id == enrollment.id)
    )
    enrollment.status = EnrollmentStatus.ACTIVE
    enrollment.next_step = first_step
    enrollment.next_due_at = max(now, last_sent + min_gap) if last_sent else now
    enrollment.started_at = now


def _consent(subscriber_id: int, request: SignupRequest, now: datetime, confirmed_at=None) -> dict:
    """The consent record's columns: what the person agreed to, where and when."""
    return {
        "subscriber_id": subscriber_id,
        "source": request.source,
        "consent_text": request.consent_text,
        "consent_version": request.consent_version,
        "ip": request.ip[:45],
        "user_agent": request.user_agent[:512],
        "created_at": now,
        "confirmed_at": confirmed_at,
    }


def signup(
    session: Session,
    settings: Settings,
    request: SignupRequest,
    *,
    first_steps: Mapping[str, str],
    now: datetime,
    publishing: bool = False,
) -> int | None:
    """Record a signup; return the id of a confirmation delivery to enqueue, if any.

    Whatever the address's history, the caller gives the same answer, so the
    form cannot be used to learn who is subscribed. Bounced addresses stay
    suppressed; an unsubscribed address must confirm again. With `publishing`
    the caller has the confirmation published after commit (the web's hand-over
    thread), so its row is written already marked as handed over.
    """

    def look_up() -> tuple[Row, Subscriber | None]:
        found = session.execute(
            _LOOKUP, {"email": request.email, "email_hash": email_hash(request.email)}
        ).one()
        return found, _locked(session, found.id) if found.id is not None else None

    found, subscriber = look_up()
    if subscriber is not None and subscriber.email != request.email:
        # Erased since the look-up (on request, or by the prune while we waited for its
        # lock): the address is no longer that row's. Look again, as a new signup would.
        found, subscriber = look_up()
        if subscriber is not None and subscriber.email != request.email:
            return None
    if subscriber is None:
        if found.suppressed not in (None, *SubscriberStatus.REVERSIBLE):
            return None  # bounced or complained before the record was erased
        subscriber_id = _new_subscriber(session, settings, request, now)
    else:
        subscriber_id = subscriber.id
        if not _signs_up_again(session, settings, request, subscriber, first_steps, now):
            return None
    _insert(session, Consent, **_consent(subscriber_id, request, now))
    _insert(session, Event, subscriber_id=subscriber_id, kind="signup", created_at=now)

    if not settings.double_opt_in:
        confirm(session, subscriber_id, now=now, first_steps=first_steps, min_gap=settings.min_gap)
        return None
    return _queue_confirmation(
        session, settings, subscriber_id, now, enqueued_at=now if publishing else None
    )


def _new_subscriber(
    session: Session, settings: Settings, request: SignupRequest, now: datetime
) -> int:
    """Write a first-time subscriber, pending, with their enrollment; their id."""
    timezone = request.timezone or settings.default_timezone
    subscriber_id = _insert(
        session,
        Subscriber,
        email=request.email,
        first_name=request.first_name,
        timezone=timezone,
        status=SubscriberStatus.PENDING,
        created_at=now,
    )
    _insert(
        session,
        Enrollment,
        subscriber_id=subscriber_id,
        sequence=request.sequence,
        timezone=timezone,
        status=EnrollmentStatus.PENDING,
        created_at=now,
    )
    return subscriber_id


def _signs_up_again(
    session: Session,
    settings: Settings,
    request: SignupRequest,
    subscriber: Subscriber,
    first_steps: Mapping[str, str],
    now: datetime,
) -> bool:
    """A known address signs up again (its row locked); True if it must confirm (again).

    Bounced and complained addresses stay suppressed. A pending one gets at most
    one new confirmation per RESEND_CONFIRMATION_AFTER, so within that window
    the link already sent stays the one that works. A confirmed one joining
    another sequence starts it at once, with its consent recorded too. An
    unsubscribed one coming back must confirm again. A signup without a time
    zone keeps the one stored.
    """
    if subscriber.status in (SubscriberStatus.BOUNCED, SubscriberStatus.COMPLAINED):
        return False
    if subscriber.status == SubscriberStatus.PENDING and _confirmed_lately(
        session, subscriber.id, now
    ):
        return False
    enrollment = _ensure_enrollment(session, subscriber, request.sequence, now)
    if subscriber.status == SubscriberStatus.ACTIVE:
        if enrollment.status == EnrollmentStatus.PENDING:
            _insert(session, Consent, **_consent(subscriber.id, request, now, confirmed_at=now))
            _start(session, enrollment, first_steps[request.sequence], now, settings.min_gap)
        return False
    subscriber.status = SubscriberStatus.PENDING
    subscriber.first_name = request.first_name or subscriber.first_name
    if request.timezone:
        set_timezone(session, subscriber, request.timezone)
    if enrollment.status == EnrollmentStatus.STOPPED:
        enrollment.status = EnrollmentStatus.PENDING
    return True


def _locked(session: Session, subscriber_id: int) -> Subscriber:
    """The subscriber, read afresh with their row locked until commit (FOR UPDATE).

    Repeat signups of one address (a double click, a script, several tabs)
    then take turns: each looks at the ten-minute resend throttle only once
    the one before it has committed its confirmation, so a burst sends one
    email, not one per request. PostgreSQL only; SQLite has one writer at a
    time anyway, and SQLAlchemy leaves FOR UPDATE out there.
    """
    return session.get(Subscriber, subscriber_id, with_for_update=True, populate_existing=True)


def latest_consent(session: Session, subscriber_id: int) -> Consent | None:
    return session.scalar(
        select(Consent)
        .where(Consent.subscriber_id == subscriber_id)
        .order_by(Consent.id.desc())
        .limit(1)
    )


def confirm(
    session: Session,
    subscriber_id: int,
    *,
    now: datetime,
    first_steps: Mapping[str, str],
    consent_id: int | None = None,
    min_gap: timedelta = timedelta(0),
) -> Subscriber | None:
    """Confirm a pending subscriber and start their pending enrollments.

    Returns the subscriber, or None when the link no longer applies: the
    address left, or a newer signup replaced the consent this link was for.
    Confirming twice is harmless.
    """
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None or subscriber.status in SubscriberStatus.SUPPRESSED:
        return None
    consent = latest_consent(session, subscriber_id)
    if consent_id is not None and (consent is None or consent.id != consent_id):
        return None
    if subscriber.status == SubscriberStatus.ACTIVE:
        return subscriber
    subscriber.status = SubscriberStatus.ACTIVE
    subscriber.confirmed_at = now
    lift_reversible(session, subscriber.email)
    if consent is not None:
        consent.confirmed_at = now
    for enrollment in subscriber.enrollments:
        if enrollment.status == EnrollmentStatus.PENDING and enrollment.sequence in first_steps:
            _start(session, enrollment, first_steps[enrollment.sequence], now, min_gap)
    session.add(Event(subscriber_id=subscriber.id, kind="confirm", created_at=now))
    return subscriber


def pending_courses(session: Session, subscriber_id: int) -> list[str]:
    """The sequences of a subscriber's enrollments that wait for confirmation."""
    return list(
        session.scalars(
            select(Enrollment.sequence).where(
                Enrollment.subscriber_id == subscriber_id,
                Enrollment.status == EnrollmentStatus.PENDING,
            )
        )
    )


def _complete_statement():
    """UPDATE the enrollment to completed if it has no step left and nothing unsent.

    Built once: it runs after every email sent.
    """
    deliveries, enrollments = Delivery.__table__, Enrollment.__table__
    unsent = (
        select(deliveries.c.id)
        .where(
            deliveries.c.enrollment_id == bindparam("enrollment_id"),
            deliveries.c.status.in_(DeliveryStatus.UNSENT),
        )
        .exists()
    )
    return (
        update(enrollments)
        .where(
            enrollments.c.id == bindparam("enrollment_id"),
            enrollments.c.status == EnrollmentStatus.ACTIVE,
            enrollments.c.next_step.is_(None),
            ~unsent,
        )
        .values(status=EnrollmentStatus.COMPLETED, completed_at=bindparam("now"))
    )


_COMPLETE = _complete_statement()


def complete_if_done(session: Session, enrollment_id: int | None, now: datetime) -> bool:
    """Complete an active enrollment that has no step left and nothing unsent.

    Called wherever the last piece can fall into place: a send, a cancellation,
    a given-up retry, a conversion that ends the sales steps, the due-scan
    passing over the last step. A sequence never shows as finished while any of
    its deliveries is unsent.
    """
    if enrollment_id is None:
        return False
    session.flush()
    result = session.execute(_COMPLETE, {"enrollment_id": enrollment_id, "now": now})
    return result.rowcount == 1


def last_sent_delivery(session: Session, subscriber_id: int) -> int | None:
    """The course email a subscriber got last: what an unsubscribe or conversion answers."""
    return session.scalar(
        select(Delivery.id)
        .where(
            Delivery.subscriber_id == subscriber_id,
            Delivery.status == DeliveryStatus.SENT,
            Delivery.enrollment_id.is_not(None),
        )
        .order_by(Delivery.sent_at.desc(), Delivery.id.desc())
        .limit(1)
    )


def stop_enrollments(session: Session, subscriber_id: int) -> None:
    """Stop every enrollment of a subscriber who must not be mailed any more."""
    session.execute(
        update(Enrollment)
        .where(
            Enrollment.subscriber_id == subscriber_id,
            Enrollment.status.in_([EnrollmentStatus.PENDING, EnrollmentStatus.ACTIVE]),
        )
        .values(status=EnrollmentStatus.STOPPED, next_due_at=None)
    )


PAUSE = timedelta(days=14)


def pause(session: Session, subscriber_id: int, *, now: datetime, days_scale: float = 1.0) -> bool:
    """Hold a subscriber's course for two weeks instead of unsubscribing.

    An email already queued is taken back and will be the first after the
    pause, so nothing is skipped. True if there was a course to pause.
    """
    paused = False
    enrollments = session.scalars(
        select(Enrollment).where(
            Enrollment.subscriber_id == subscriber_id,
            Enrollment.status == EnrollmentStatus.ACTIVE,
        )
    ).all()
    for enrollment in enrollments:
        queued = session.scalars(
            select(Delivery)
            .where(
                Delivery.enrollment_id == enrollment.id,
                Delivery.status == DeliveryStatus.QUEUED,
            )
            .order_by(Delivery.id)
        ).all()
        for delivery in queued:
            delivery.status = DeliveryStatus.CANCELLED
            delivery.last_error = "paused"
        if queued:
            enrollment.next_step = queued[0].step
        if enrollment.next_step is None:
            continue  # nothing left to send
        enrollment.next_due_at = now + PAUSE * days_scale
        paused = True
    if paused:
        session.add(Event(subscriber_id=subscriber_id, kind="pause", created_at=now))
    return paused


def paused_until(
    session: Session, subscriber_id: int, *, now: datetime, days_scale: float = 1.0
) -> datetime | None:
    """When the subscriber's pause ends, if one is on; None if the course is not paused.

    A pause is on from its `pause` event until two weeks later, unless a
    `resume` came after it.
    """
    last = session.execute(
        select(Event.kind, Event.created_at)
        .where(Event.subscriber_id == subscriber_id, Event.kind.in_(("pause", "resume")))
        .order_by(Event.created_at.desc(), Event.id.desc())
        .limit(1)
    ).first()
    if last is None or last.kind != "pause":
        return None
    ends = last.created_at + PAUSE * days_scale
    return ends if now < ends else None


def resume(session: Session, subscriber_id: int, *, now: datetime, days_scale: float = 1.0) -> bool:
    """End a pause that is on: the next email is due at once (the minimum gap still holds).

    A course that is not paused (the pause ran out, or was ended already) is
    left alone: the subscriber's paused page stays in the browser's history and
    its link never expires, and neither it nor an editor's button must pull the
    next email forward. True if it resumed.
    """
    if paused_until(session, subscriber_id, now=now, days_scale=days_scale) is None:
        return False
    enrollments = session.scalars(
        select(Enrollment).where(
            Enrollment.subscriber_id == subscriber_id,
            Enrollment.status == EnrollmentStatus.ACTIVE,
            Enrollment.next_due_at > now,
        )
    ).all()
    for enrollment in enrollments:
        enrollment.next_due_at = now
    if enrollments:
        session.add(Event(subscriber_id=subscriber_id, kind="resume", created_at=now))
    return bool(enrollments)


def resend_confirmation(
    session: Session, settings: Settings, subscriber_id: int, now: datetime
) -> int | None:
    """Queue the confirmation email again for a pending subscriber; its delivery id."""
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None or subscriber.status != SubscriberStatus.PENDING:
        return None
    return _queue_confirmation(session, settings, subscriber.id, now)


def resend_confirmation_to(
    session: Session, settings: Settings, email: str, *, now: datetime, publishing: bool = False
) -> int | None:
    """The confirmation email again for an address waiting to confirm; its delivery id.

    What the "send me a fresh link" page asks for. It confirms what the person
    already signed up for: their pending enrollments and their latest consent
    (which the new link names) stay as they are, and no enrollment, consent
    or time zone is written, since that page shows no course and no consent
    text. Nothing for an address that is not pending (unknown, confirmed,
    unsubscribed, suppressed), and at most one email per
    RESEND_CONFIRMATION_AFTER, as for a repeat signup. `publishing` as in
    `signup`.
    """
    subscriber = session.scalar(
        select(Subscriber).where(Subscriber.email == email).with_for_update()  # as `_locked`
    )
    if subscriber is None or subscriber.status != SubscriberStatus.PENDING:
        return None
    if _confirmed_lately(session, subscriber.id, now):
        return None
    return _queue_confirmation(
        session, settings, subscriber.id, now, enqueued_at=now if publishing else None
    )


def unsubscribe(session: Session, subscriber_id: int, *, now: datetime, how: str) -> bool:
    """Unsubscribe at once and for good; True if the subscriber exists.

    Stops every enrollment and cancels every delivery not yet sent, so nothing
    queued or in a worker's hands goes out afterwards (the sender checks the
    status again just before the SMTP send).
    """
    subscriber = session.get(Subscriber, subscriber_id)
    if subscriber is None:
        return False
    if subscriber.status in SubscriberStatus.SUPPRESSED:
        # Already never mailed. A bounce, complaint or erasure must stay what it is:
        # an unsubscribe is lifted by a new signup, they are not (or not as such).
        return True
    subscriber.status = SubscriberStatus.UNSUBSCRIBED
    subscriber.unsubscribed_at = now
    _stop_mailing(session, subscriber, "unsubscribe", how, now)
    return True


def _stop_mailing(session: Session, subscriber: Subscriber, kind: str, how: str, now) -> None:
    """Stop every enrollment, cancel every email not yet sent, and record why (an event).

    The event points at the last email sent, so the dashboard counts it on that step.
    """
    subscriber_id = subscriber.id
    stop_enrollments(session, subscriber_id)
    session.execute(
        update(Delivery)
        .where(Delivery.subscriber_id == subscriber_id, Delivery.status == DeliveryStatus.QUEUED)
        .values(status=DeliveryStatus.CANCELLED, last_error=f"{subscriber.status} ({how})")
    )
    session.add(
        Event(
            subscriber_id=subscriber_id,
            delivery_id=last_sent_delivery(session, subscriber_id),
            kind=kind,
            detail=how,
            created_at=now,
        )
    )


#: What a report from outside the SMTP conversation may say of an address, and the
#: event it is recorded as. Both keep the address out for good.
REPORTS = {SubscriberStatus.COMPLAINED: "complaint", SubscriberStatus.BOUNCED: "bounce"}


def suppress_reported(
    session: Session, address: str, reason: str, *, now: datetime, source: str
) -> bool:
    """Keep an address out for good on a complaint or a late bounce; True if it is a subscriber's.

    Complaints (a person pressing "spam", told by the provider's feedback loop)
    and many bounces (a delivery report after the receiving server first took
    the email) arrive after the send, so they come by webhook or by the CLI,
    not in the SMTP conversation. A subscriber is stopped as an unsubscribe
    stops them, but for good: a new signup does not lift it. An address that is
    no subscriber's (never one, or erased) gets a suppression hash instead, so
    no later signup can bring it back. `address` is in its stored form
    (`normalize_email`).
    """
    if reason not in REPORTS:
        raise ValueError(f"a reported address is {' or '.join(REPORTS)}, not {reason!r}")
    subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == address))
    subscriber = _locked(session, subscriber_id) if subscriber_id is not None else None
    if subscriber is None or subscriber.email != address:  # none, or erased since the look-up
        suppress(session, address, reason, now)
        return False
    if subscriber.status not in REPORTS:  # a first bounce or complaint keeps its name
        subscriber.status = reason
    _stop_mailing(session, subscriber, REPORTS[reason], source, now)
    return True


def convert(
    session: Session,
    subscriber_id: int,
    *,
    now: datetime,
    source: str,
    sales_steps: Mapping[str, frozenset[str]],
    delivery_id: int | None = None,
) -> int:
    """Record that the subscriber took the course's goal; return enrollments converted.

    Sales steps not yet sent are cancelled and will be passed over; the rest of
    the course goes on. Converting twice changes nothing.
    """
    enrollments = session.scalars(
        select(Enrollment).where(
            Enrollment.subscriber_id == subscriber_id, Enrollment.converted_at.is_(None)
        )
    ).all()
    for enrollment in enrollments:
        enrollment.converted_at = now
        steps = sales_steps.get(enrollment.sequence, frozenset())
        if steps:
            session.execute(
                update(Delivery)
                .where(
                    Delivery.enrollment_id == enrollment.id,
                    Delivery.step.in_(steps),
                    Delivery.status == DeliveryStatus.QUEUED,
                )
                .values(status=DeliveryStatus.CANCELLED, last_error="converted")
            )
        complete_if_done(session, enrollment.id, now)
    if enrollments:
        session.add(
            Event(
                subscriber_id=subscriber_id,
                delivery_id=delivery_id or last_sent_delivery(session, subscriber_id),
                kind="conversion",
                detail=source,
                created_at=now,
            )
        )
    return len(enrollments)
