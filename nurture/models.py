"""The tables: subscribers and their consent, enrollments, deliveries, events, users.

All times are stored in UTC and come back timezone-aware, on SQLite and
PostgreSQL alike.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


#: The largest id a row can have: the ids are INTEGER columns, 32 bits on PostgreSQL.
MAX_ROW_ID = 2**31 - 1


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class SubscriberStatus:
    PENDING = "pending"  # signed up, not confirmed
    ACTIVE = "active"  # confirmed
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"  # marked our mail as spam
    ERASED = "erased"  # personal data removed on request
    #: Statuses that must never be mailed again.
    SUPPRESSED = frozenset({UNSUBSCRIBED, BOUNCED, COMPLAINED, ERASED})
    #: Of those, the ones a new signup (with a new confirmation) may lift.
    REVERSIBLE = frozenset({UNSUBSCRIBED, ERASED})


class Subscriber(Base):
    __tablename__ = "subscribers"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    first_name: Mapped[str] = mapped_column(String(100), default="")
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    status: Mapped[str] = mapped_column(String(20), default=SubscriberStatus.PENDING, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    consents: Mapped[list[Consent]] = relationship(back_populates="subscriber")
    enrollments: Mapped[list[Enrollment]] = relationship(back_populates="subscriber")


class Consent(Base):
    """Evidence of a signup: what the person agreed to, where and when."""

    __tablename__ = "consents"

    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id"), index=True)
    source: Mapped[str] = mapped_column(String(20))  # "form", "api", "import"
    consent_text: Mapped[str] = mapped_column(Text)
    consent_version: Mapped[str] = mapped_column(String(40), default="")
    ip: Mapped[str] = mapped_column(String(45), default="")
    user_agent: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    subscriber: Mapped[Subscriber] = relationship(back_populates="consents")


class EnrollmentStatus:
    PENDING = "pending"  # waiting for the subscriber to confirm
    ACTIVE = "active"  # steps left to send
    COMPLETED = "completed"  # every step sent
    STOPPED = "stopped"  # unsubscribed or bounced


class Enrollment(Base):
    """A subscriber's place in one sequence: which step comes next, and when."""

    __tablename__ = "enrollments"
    __table_args__ = (
        UniqueConstraint("subscriber_id", "sequence"),
        Index("ix_enrollments_status_next_due_at", "status", "next_due_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id"))
    sequence: Mapped[str] = mapped_column(String(100))
    #: The subscriber's time zone, which the schedule's local send times are in.
    #: A copy, changed together with the subscriber's (`subscribers.set_timezone`),
    #: so that the due-scan reads one table: joining the subscriber for it cost
    #: a tenth of a due-scan's time.
    timezone: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=EnrollmentStatus.PENDING)
    next_step: Mapped[str | None] = mapped_column(String(100))
    next_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Set when the subscriber took the course's goal; sales steps stop then.
    converted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    subscriber: Mapped[Subscriber] = relationship(back_populates="enrollments")


class DeliveryStatus:
    QUEUED = "queued"  # written, waiting for a worker
    SENDING = "sending"  # claimed by a worker until lease_until
    SENT = "sent"
    FAILED = "failed"  # permanent failure, reason in last_error
    CANCELLED = "cancelled"  # the subscriber left before it went out
    UNSENT = frozenset({QUEUED, SENDING})


CONFIRMATION_STEP = "confirmation"


class Delivery(Base):
    """One email to one subscriber, written before it is sent.

    Unique per enrollment and step, so no step can be sent twice. The
    Message-ID is fixed here, so a retried send carries the same one.

    `subscriber_id` and `enrollment_id` have no foreign keys: PostgreSQL
    checks one with a query of its own for every row written, and the
    due-scan writes one for every email. Checking the subscriber's also locked
    its row, a write to a page the due-scan otherwise only reads. Nothing
    deletes a subscriber (erasure blanks the row in place) or an enrollment,
    and the due-scan writes a delivery only for an enrollment it holds locked
    (docs/decisions.md, "Deliveries carry no foreign keys").
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("enrollment_id", "step"),
        Index("ix_deliveries_status_not_before", "status", "not_before"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(index=True)
    enrollment_id: Mapped[int | None]
    sequence: Mapped[str | None] = mapped_column(String(100))
    step: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default=DeliveryStatus.QUEUED)
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # NULL before 0010


class Event(Base):
    """Something a subscriber did or that happened to their mail, for the stats."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_kind_created_at", "kind", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int | None] = mapped_column(ForeignKey("subscribers.id"), index=True)
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Suppression(Base):
    """An address that must not be mailed, kept as a hash so it survives erasure."""

    __tablename__ = "suppressions"

    email_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(20))  # a SubscriberStatus
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SequenceVersion(Base):
    """A sequence as the service last ran it, so a change can be compared before it goes live."""

    __tablename__ = "sequence_versions"
    __table_args__ = (UniqueConstraint("sequence", "digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sequence: Mapped[str] = mapped_column(String(100), index=True)
    digest: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)  # JSON: title, skip_weekends, steps
    published_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class User(Base):
    """A marketer or operator who may sign in to /admin."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    #: "admin" manages users and data; "editor" previews and sends tests; "viewer" reads.
    role: Mapped[str] = mapped_column(String(20), default="admin")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Raised by signing out: every session made before it stops working (`users.session_key`).
    session_epoch: Mapped[int] = mapped_column(default=0, server_default="0")


class Heartbeat(Base):
    """The last run of a periodic job, for /metrics and for the operator on call."""

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
