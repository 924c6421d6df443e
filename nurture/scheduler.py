"""When each step is due, and the due-scan that turns due steps into deliveries.

Everything here takes `now`: the schedule is a pure function of the manifest,
the subscriber's time zone and the time the enrollment started, and the
due-scan is one call that tests and `nurture dispatch --now` can make at any
simulated moment. The database is the only clock that matters; the broker only
carries delivery ids, and anything it loses is found again here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache, partial
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from psycopg.rows import args_row
from sqlalchemy import (
    BigInteger,
    and_,
    bindparam,
    cast,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from nurture.config import Settings
from nurture.db import for_psycopg, insert_for, require_aware
from nurture.models import Delivery, DeliveryStatus, Enrollment, EnrollmentStatus
from nurture.sequences import Sequence, Step
from nurture.subscribers import complete_if_done, new_message_id, new_message_ids

log = logging.getLogger(__name__)

Publish = Callable[[list[int]], None]


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """The zone of that name, or UTC for a name that is none (kept: asked once per claim)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _weekday(day: date, skip_weekends: bool) -> date:
    """`day`, or the Monday after it when it is a weekend day we skip."""
    if skip_weekends and day.weekday() >= 5:
        return day + timedelta(days=7 - day.weekday())
    return day


def scheduled_at(
    step: Step,
    *,
    started_at: datetime,
    timezone: str,
    day_seconds: int,
    skip_weekends: bool = False,
) -> datetime:
    """When `step` is meant to go out for an enrollment that started at `started_at`.

    In real time (`day_seconds` 86400) a step with a send time goes out at that
    local time on its day in the subscriber's zone; the wall clock is kept
    across daylight-saving changes, and with `skip_weekends` a Saturday or
    Sunday becomes Monday. With shrunk days, send times and weekends are
    ignored and offsets shrink in proportion.
    """
    if day_seconds != 86400:
        return started_at + timedelta(seconds=step.day * day_seconds)
    tz = zone(timezone)
    local_start = started_at.astimezone(tz)
    planned_day = local_start.date() + timedelta(days=step.day)
    local_day = _weekday(planned_day, skip_weekends)
    if step.send_at is None:
        return started_at + timedelta(days=step.day + (local_day - planned_day).days)
    # A time that does not exist (the spring-forward gap) comes out an hour later.
    return datetime.combine(local_day, step.send_at, tzinfo=tz).astimezone(UTC)


@lru_cache(maxsize=1024)
def _next_slot(earliest: datetime, send_at: time, tz: ZoneInfo, skip_weekends: bool):
    """The first local `send_at` at or after `earliest` (on a weekday, if asked).

    Kept (at most 1024 answers per process): a due-scan moving enrollments on
    asks it with one `earliest`, its `now` plus the minimum gap, for every
    subscriber in a zone whose next step's planned time comes sooner than that.
    """
    day = earliest.astimezone(tz).date()
    while True:
        day = _weekday(day, skip_weekends)
        slot = datetime.combine(day, send_at, tzinfo=tz).astimezone(UTC)
        if slot >= earliest:
            return slot
        day += timedelta(days=1)


def next_due(
    step: Step,
    *,
    started_at: datetime,
    timezone: str,
    previous_send: datetime,
    settings: Settings,
    skip_weekends: bool = False,
) -> datetime:
    """The step's scheduled time, but never sooner than the minimum gap after the last.

    This is the lateness policy: after an outage, or for someone who confirmed
    late in the evening, course emails go out at most one per MIN_GAP_HOURS,
    in order; a step with a send time then waits for the next such local time,
    so it still arrives when the marketer meant it to.
    """
    planned = scheduled_at(
        step,
        started_at=started_at,
        timezone=timezone,
        day_seconds=settings.day_seconds,
        skip_weekends=skip_weekends,
    )
    earliest = previous_send + settings.min_gap
    if planned >= earliest:
        return planned
    if settings.day_seconds != 86400:
        return earliest
    tz = zone(timezone)
    if step.send_at is None:  # keep the time of day, but not on a skipped weekend
        local = earliest.astimezone(tz)
        day = _weekday(local.date(), skip_weekends)
        return datetime.combine(day, local.time(), tzinfo=tz).astimezone(UTC)
    # In UTC: two local times an hour apart in a repeated hour compare equal.
    return _next_slot(earliest.astimezone(UTC), step.send_at, tz, skip_weekends)


def plan(
    enrollment: Enrollment,
    sequence: Sequence,
    settings: Settings,
    now: datetime,
    had: list[str] | tuple[str, ...] = (),
    until: datetime | None = None,
) -> list[tuple[Step, datetime]]:
    """The emails still to come for an enrollment, each with when it will go out.

    Follows the due-scan's own rules (`next_to_send`, `next_due`), assuming each
    email goes out when due; an overdue one goes out at `now`, and local send
    times are in the enrollment's zone. `had` lists the steps the enrollment
    already had; `until` stops the plan there.
    """
    if enrollment.status != "active" or enrollment.next_due_at is None:
        return []
    had = list(had)
    current = enrollment.next_step
    due = max(enrollment.next_due_at, now)
    converted = enrollment.converted_at is not None
    planned: list[tuple[Step, datetime]] = []
    while until is None or due <= until:
        step, following = next_to_send(sequence, current, had, converted)
        if step is None:
            break
        planned.append((step, due))
        had.append(step.key)
        if following is None:
            break
        due = next_due(
            following,
            started_at=enrollment.started_at or now,
            timezone=enrollment.timezone,
            previous_send=due,
            settings=settings,
            skip_weekends=sequence.skip_weekends,
        )
        current = following.key
    return planned


@dataclass
class DispatchResult:
    created: int = 0
    enqueued: int = 0
    released: int = 0
    publish_failed: int = 0


def _new_delivery(settings: Settings, enrollment, step: Step, now, enqueued_at=None) -> dict:
    """The row of a queued delivery of `step` for `enrollment`, due at once."""
    return {
        "subscriber_id": enrollment.subscriber_id,
        "enrollment_id": enrollment.id,
        "sequence": enrollment.sequence,
        "step": step.key,
        "status": DeliveryStatus.QUEUED,
        "message_id": new_message_id(settings),
        "attempts": 0,
        "not_before": now,
        "enqueued_at": enqueued_at,
        "created_at": now,
    }


def _write_delivery(session: Session, settings: Settings, enrollment: _Due, step: Step, now):
    """Write the delivery for `step`; False if the subscriber already had this step.

    A delivery cancelled by an unsubscribe is revived for a returning subscriber;
    one that was sent, failed or is on its way is left alone, so nobody gets a
    step twice.
    """
    values = _new_delivery(settings, enrollment, step, now)
    statement = insert_for(session)(Delivery).values(**values)
    inserted = session.scalar(
        statement.on_conflict_do_nothing(index_elements=["enrollment_id", "step"]).returning(
            Delivery.id
        )
    )
    if inserted is not None:
        return True
    revived = session.execute(
        update(Delivery)
        .where(
            Delivery.enrollment_id == enrollment.id,
            Delivery.step == step.key,
            Delivery.status == DeliveryStatus.CANCELLED,
        )
        .values(
            status=DeliveryStatus.QUEUED,
            message_id=values["message_id"],
            attempts=0,
            not_before=now,
            enqueued_at=None,
            lease_until=None,
            last_error=None,
            created_at=now,
        )
    ).rowcount
    return bool(revived)


@dataclass
class _Due:
    """A due enrollment as the due-scan sees it; what it changes is written back in bulk."""

    id: int
    subscriber_id: int
    sequence: str
    next_step: str | None
    next_due_at: datetime | None
    started_at: datetime | None
    converted_at: datetime | None
    timezone: str


def _due_statement(shared: bool):
    """The due-batch query (`_due_batch`), built once: with the share filter or without."""
    # "Nothing unsent" reads the enrollment's own deliveries (a few at most,
    # found by the unique (enrollment_id, step) index) and only then looks at
    # their status: behind OFFSET 0, PostgreSQL can neither turn the check into
    # an anti-join nor fold the status into how it finds the rows. Both plans
    # lean on statistics that lag behind a burst of new deliveries: the
    # anti-join compared every due row with every unsent delivery, and a probe
    # that also used the status index read every unsent delivery for each due
    # row (88,000 of them, 0.7 s a batch, late in a tick of 100,000). The
    # statuses are given one by one, not as a list SQLAlchemy expands at each
    # run, so that the statement compiles once.
    statuses = [literal(status) for status in sorted(DeliveryStatus.UNSENT)]
    mine = (
        select(Delivery.status)
        .where(Delivery.enrollment_id == Enrollment.id)
        .correlate(Enrollment)
        .offset(0)
        .subquery("mine")
    )
    unsent = select(mine.c.status).where(mine.c.status.in_(statuses)).exists()
    wanted = [
        Enrollment.status == EnrollmentStatus.ACTIVE,
        Enrollment.next_due_at <= bindparam("now", type_=Enrollment.next_due_at.type),
        ~unsent,
    ]
    if shared:
        # Shared out by a hash of the id (PostgreSQL's own integer hash), not by
        # the id itself, whose pattern (every other id in one sequence) could
        # give one loop all the work.
        spread = func.abs(cast(func.hashint4(Enrollment.id), BigInteger))
        wanted.append(spread % bindparam("shares") == bindparam("share"))
    return (
        select(
            Enrollment.id,
            Enrollment.subscriber_id,
            Enrollment.sequence,
            Enrollment.next_step,
            Enrollment.next_due_at,
            Enrollment.started_at,
            Enrollment.converted_at,
            Enrollment.timezone,
        )
        .where(*wanted)
        .order_by(Enrollment.next_due_at)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
    )


_DUE = {shared: _due_statement(shared) for shared in (False, True)}


_TAKE_WRITE_LOCK = text("UPDATE enrollments SET id = id WHERE 0")


def _due_batch(
    session: Session, now: datetime, limit: int, share: tuple[int, int] = (0, 1)
) -> list[_Due]:
    """Due enrollments, oldest first, none of which has an email still on its way.

    Waiting for the previous email (a retry after a 451, a step held by a
    broken template) keeps each subscriber's course in order. `share` (k, n)
    takes only the enrollments whose id hashes to k modulo n (PostgreSQL only),
    so that n claim loops never contend for a row.
    """
    require_aware("as now", now)
    shared = share[1] > 1
    values = {"now": now, "limit": limit, "share": share[0], "shares": share[1]}
    if session.get_bind().dialect.name != "postgresql":
        # SQLite has no row locks: a write that changes nothing takes the database's
        # write lock first, so that another due-scan waits until this batch is
        # committed rather than writing steps for the same enrollments from a stale read.
        session.execute(_TAKE_WRITE_LOCK)
        return [_Due(*row) for row in session.connection().execute(_DUE[shared], values)]
    _pg(session, _CLAIM_PLANNING, {})
    # On psycopg's own cursor, compiled once, each row made straight into a
    # `_Due` and all fetched in one call: SQLAlchemy's statement execution and
    # its rows, unpacked again, were a third of the claim's Python. A connection
    # that died is found by the statement just above, which SQLAlchemy runs;
    # one that dies between the two raises psycopg's error here, and the
    # transaction's rollback then drops it. Nothing was claimed either way.
    statement, constants = for_psycopg(_DUE[shared])
    driver = session.connection().connection.driver_connection
    with driver.cursor(row_factory=args_row(_due_in_utc)) as cursor:
        cursor.execute(statement, {**constants, **values})
        return cursor.fetchall()


#: How the claim's transaction is planned, set for that transaction only.
#: - Each statement is planned for its values, never from a cached generic
#:   plan: psycopg prepares a statement it has run five times, and a generic
#:   plan of the due batch made while the deliveries table looked empty (a
#:   first big tick after an import) read every delivery for each due row.
#: - No sorts: the due batch must walk its index in due order and stop at its
#:   limit. PostgreSQL cannot estimate the share filter (it guesses it keeps
#:   one row in 200, not one in three), so it expected fewer rows than the
#:   limit and chose to read every due row and sort them, in every batch:
#:   100,000 due among 1,000,000 took 39 s. No other statement of the claim
#:   needs a sort (the history is put in order here, not by the server).
_CLAIM_PLANNING = (
    "SELECT set_config('plan_cache_mode', 'force_custom_plan', true),"
    " set_config('enable_sort', 'off', true)"
)


def _due_in_utc(id, subscriber_id, sequence, next_step, next_due_at, started_at, *rest) -> _Due:
    """A due row as read from the server, its times in UTC, where adding days adds real days."""
    started_at = started_at and started_at.astimezone(UTC)
    return _Due(
        id, subscriber_id, sequence, next_step, next_due_at.astimezone(UTC), started_at, *rest
    )


@dataclass
class History:
    """What an enrollment already had: steps (oldest first) and its last email's send time."""

    steps: list[str] | tuple[str, ...]
    last_sent: datetime | None = None


#: The history of an enrollment that has had nothing yet. Shared, so never changed.
NO_HISTORY = History(())


def _history(session: Session, enrollment_ids: list[int]) -> dict[int, History]:
    """For each enrollment that has had any, the steps it has had or has on the way,
    and the last send; the others are left out (their history is NO_HISTORY).

    A cancelled delivery does not count: a returning subscriber gets it after all.
    Most of a tick's enrollments start a course, so only the few with a past
    cost anything here.
    """
    had: dict[int, History] = {}
    if not enrollment_ids:
        return had
    if session.get_bind().dialect.name == "postgresql":
        parameters = {"ids": enrollment_ids, "cancelled": DeliveryStatus.CANCELLED}
        # Oldest first, put in order here: the claim's transaction plans no sorts.
        rows = [row[1:] for row in sorted(_pg(session, _PG_HISTORY, parameters).all())]
    else:
        rows = session.execute(
            select(Delivery.enrollment_id, Delivery.step, Delivery.sent_at)
            .where(
                Delivery.enrollment_id.in_(enrollment_ids),
                Delivery.status != DeliveryStatus.CANCELLED,
            )
            .order_by(Delivery.id)
        )
    for enrollment_id, step, sent_at in rows:
        history = had.get(enrollment_id)
        if history is None:
            history = had[enrollment_id] = History([])
        history.steps.append(step)
        if sent_at is None:
            continue
        # Read as written, PostgreSQL gives the server's time zone; the gap is
        # added to this time, and across a daylight-saving change that is only
        # right in UTC.
        sent_at = sent_at.astimezone(UTC)
        if history.last_sent is None or sent_at > history.last_sent:
            history.last_sent = sent_at
    return had


def next_to_send(
    sequence: Sequence, current: str | None, had: list[str], converted: bool
) -> tuple[Step | None, Step | None]:
    """The step to send now, and the one the enrollment waits for after it (pure).

    Enrollments follow step keys, so a marketer can edit a live sequence:
    - a step inserted before someone's place is skipped for them, unless the
      manifest marks it `backfill = true`, in which case it comes first;
    - if the step someone waits for was removed, they go on after the last
      step they had that still exists, so nobody is stranded;
    - a step they already had is never sent again, however steps move;
    - after a conversion, sales steps are passed over.
    """
    steps = sequence.steps
    keys = [step.key for step in steps]
    if current in keys:
        position = keys.index(current)
    else:
        known = [key for key in had if key in keys]
        position = keys.index(known[-1]) + 1 if known else 0

    def wanted(step: Step) -> bool:
        return step.key not in had and not (step.sales and converted)

    resume = steps[position] if position < len(steps) else None
    for step in steps[:position]:
        if step.backfill and wanted(step):
            return step, resume
    for index in range(position, len(steps)):
        if wanted(steps[index]):
            return steps[index], steps[index + 1] if index + 1 < len(steps) else None
    return None, None


#: Enrollments the due-scan takes per transaction: big enough that a statement
#: serves hundreds of rows, small enough to keep locks and parameter lists short.
SCAN_BATCH = 500

#: `_steps_due_now`'s answer for an enrollment that has to wait.
WAIT = object()


def create_due_deliveries(
    session: Session,
    settings: Settings,
    sequences: Mapping[str, Sequence],
    now: datetime,
    hand_out: Publish | None = None,
    share: tuple[int, int] = (0, 1),
) -> int:
    """Write a delivery row for every due step and move each enrollment on.

    Batches of SCAN_BATCH enrollments, each committed on its own, with one
    INSERT for all of a batch's deliveries; on PostgreSQL the rows are taken
    with SKIP LOCKED, so two dispatchers share the work instead of doubling
    it, and the unique (enrollment, step) constraint backs that up everywhere.
    Cost grows with what is due, not with the number of enrollments.
    `share` (k, n) limits it to one of n shares of the enrollments (`_due_batch`).
    With `hand_out`, each batch's deliveries are written already marked as
    handed over and given to it right after the commit, so a big tick gets its
    first emails moving while it goes on with the rest.
    """
    created = 0
    while True:
        rows = _due_batch(session, now, SCAN_BATCH, share)
        histories = _history(session, [enrollment.id for enrollment in rows])
        due, settled, careful = [], [], []
        for enrollment in rows:
            had = histories.get(enrollment.id, NO_HISTORY)
            steps = _steps_due_now(settings, sequences, enrollment, had, now)
            if steps is WAIT:
                settled.append(enrollment)
            else:
                due.append((enrollment, had.steps, *steps))
        wanted = [(e, step) for e, _, step, _ in due if step is not None]
        written = _insert_deliveries(session, settings, wanted, now, marked=hand_out is not None)
        for enrollment, had, step, following in due:
            sequence = sequences[enrollment.sequence]
            if step is not None and enrollment.id in written:
                _move_on(settings, sequence, enrollment, following, now)
                settled.append(enrollment)
                created += 1
            else:  # nothing left, written meanwhile, or cancelled earlier: one row at a time
                careful.append((enrollment, sequence, had))
        _save(session, settled)
        for enrollment, sequence, had in careful:
            created += _advance(session, settings, sequence, enrollment, had, now)
        session.commit()
        if written and hand_out is not None:
            hand_out(list(written.values()))
        if len(rows) < SCAN_BATCH:
            return created


#: How long an enrollment whose sequence cannot be found waits before it is looked
#: at again: its folder may be away for a deploy, or renamed by mistake and put back.
MISSING_SEQUENCE_RETRY = timedelta(hours=1)
_missing_reported: dict[str, datetime] = {}  # sequence: when this process last said so


def _report_missing(name: str, now: datetime) -> None:
    """Log a missing sequence once per wait, not once per enrollment."""
    last = _missing_reported.get(name)
    if last is not None and last <= now < last + MISSING_SEQUENCE_RETRY:
        return
    _missing_reported[name] = now
    log.error(
        "sequence %s no longer exists (no folder with a valid sequence.toml); its "
        "enrollments wait, and are looked at again every %s",
        name,
        MISSING_SEQUENCE_RETRY,
    )


def _steps_due_now(settings, sequences, enrollment: _Due, history, now):
    """For a due enrollment, the step to write now (None: it has none left) and the one
    after it, or WAIT.

    The minimum gap counts from when the last email was really sent: one that
    went out late, after retries, pushes the next one back too. An enrollment
    that waits (for the gap, or because its sequence is gone) is given its new
    due time here.
    """
    sequence = sequences.get(enrollment.sequence)
    if sequence is None:
        _report_missing(enrollment.sequence, now)
        enrollment.next_due_at = now + MISSING_SEQUENCE_RETRY
        return WAIT
    converted = enrollment.converted_at is not None
    step, following = next_to_send(sequence, enrollment.next_step, history.steps, converted)
    gap = settings.min_gap
    if step is not None and history.last_sent is not None and history.last_sent + gap > now:
        enrollment.next_due_at = next_due(
            step,
            started_at=enrollment.started_at or now,
            timezone=enrollment.timezone,
            previous_send=history.last_sent,
            settings=settings,
            skip_weekends=sequence.skip_weekends,
        )
        return WAIT
    return step, following


def _insert_deliveries(
    session: Session, settings: Settings, wanted, now, *, marked: bool = False
) -> dict[int, int]:
    """Insert a queued delivery for each (enrollment, step); {enrollment id: delivery id}.

    One statement; a pair that exists already (written by another dispatcher,
    or cancelled by an unsubscribe) is skipped here and left to `_advance`.
    `marked` writes them as handed over to the broker at `now`.
    """
    if not wanted:
        return {}
    enqueued_at = now if marked else None
    if session.get_bind().dialect.name == "postgresql":
        # The batch as arrays in one statement: no per-row round trip or parameter set.
        parameters = {
            "subscriber_ids": [enrollment.subscriber_id for enrollment, _ in wanted],
            "enrollment_ids": [enrollment.id for enrollment, _ in wanted],
            "sequences": [enrollment.sequence for enrollment, _ in wanted],
            "steps": [step.key for _, step in wanted],
            "message_ids": new_message_ids(settings, len(wanted)),
            "status": DeliveryStatus.QUEUED,
            "now": now,
            "enqueued_at": enqueued_at,
        }
        written = _pg(session, _PG_INSERT, parameters)
        return {enrollment_id: delivery_id for delivery_id, enrollment_id in written}
    rows = [_new_delivery(settings, e, step, now, enqueued_at) for e, step in wanted]
    statement = sqlite_insert(Delivery.__table__).on_conflict_do_nothing(
        index_elements=["enrollment_id", "step"]
    )
    session.execute(statement, rows)
    mine = [row["message_id"] for row in rows]  # the rows just written, not older ones
    found = session.execute(
        select(Delivery.enrollment_id, Delivery.id).where(Delivery.message_id.in_(mine))
    )
    return {enrollment_id: delivery_id for enrollment_id, delivery_id in found}


def _advance(session, settings, sequence: Sequence, enrollment: _Due, had, now) -> int:
    """Write the step due now one row at a time, and move the enrollment on.

    For the few enrollments the batch insert did not settle: a cancelled step
    is revived, and an enrollment with nothing left completes. A step that is
    there already was written since this batch's history was read, by another
    due-scan (on SQLite, which reads the batch without a row lock), which
    moved the enrollment on too: it is left to that one, rather than the step
    after it being written at once.
    """
    converted = enrollment.converted_at is not None
    step, following = next_to_send(sequence, enrollment.next_step, had, converted)
    if step is not None and not _write_delivery(session, settings, enrollment, step, now):
        return 0
    if step is None:
        enrollment.next_step = enrollment.next_due_at = None
        _save(session, [enrollment])
        complete_if_done(session, enrollment.id, now)
        return 0
    _move_on(settings, sequence, enrollment, following, now)
    _save(session, [enrollment])
    return 1


def _move_on(settings, sequence: Sequence, enrollment: _Due, following: Step | None, now):
    """Point an enrollment whose due step was just written at `following`, the step
    that `next_to_send` gave after it.
    """
    enrollment.next_step = following.key if following else None
    enrollment.next_due_at = (
        next_due(
            following,
            started_at=enrollment.started_at or now,
            timezone=enrollment.timezone,
            previous_send=now,
            settings=settings,
            skip_weekends=sequence.skip_weekends,
        )
        if following
        else None
    )


def _save(session: Session, enrollments: list[_Due]) -> None:
    """Write the enrollments' next step and due time: one statement on PostgreSQL."""
    if not enrollments:
        return
    if session.get_bind().dialect.name == "postgresql":
        _pg(
            session,
            _PG_SAVE,
            {
                "ids": [e.id for e in enrollments],
                "steps": [e.next_step for e in enrollments],
                "dues": [e.next_due_at for e in enrollments],
            },
        )
        return
    session.execute(
        _SAVE,
        [{"b_id": e.id, "b_step": e.next_step, "b_due": e.next_due_at} for e in enrollments],
    )


_enrollments = Enrollment.__table__
_SAVE = (
    update(_enrollments)
    .where(_enrollments.c.id == bindparam("b_id"))
    .values(next_step=bindparam("b_step"), next_due_at=bindparam("b_due"))
)
# PostgreSQL statements that take a whole batch as arrays: one statement and one
# parameter set per batch. They are sent as written (psycopg's %(name)b), so the
# arrays go over in binary: dumping them as text quotes every element, which
# cost more CPU than the rest of the batch's Python code.
_PG_SAVE = """
    UPDATE enrollments SET next_step = batch.next_step, next_due_at = batch.next_due_at
    FROM unnest(CAST(%(ids)b AS integer[]), CAST(%(steps)b AS varchar[]),
                CAST(%(dues)b AS timestamptz[]))
         AS batch(id, next_step, next_due_at)
    WHERE enrollments.id = batch.id
"""
_PG_INSERT = """
    INSERT INTO deliveries (subscriber_id, enrollment_id, sequence, step, message_id,
                            status, attempts, not_before, enqueued_at, created_at)
    SELECT subscriber_id, enrollment_id, sequence, step, message_id,
           %(status)s, 0, %(now)s, CAST(%(enqueued_at)s AS timestamptz), %(now)s
    FROM unnest(CAST(%(subscriber_ids)b AS integer[]), CAST(%(enrollment_ids)b AS integer[]),
                CAST(%(sequences)b AS varchar[]), CAST(%(steps)b AS varchar[]),
                CAST(%(message_ids)b AS varchar[]))
         AS batch(subscriber_id, enrollment_id, sequence, step, message_id)
    ON CONFLICT (enrollment_id, step) DO NOTHING
    RETURNING id, enrollment_id
"""
_PG_HISTORY = """
    SELECT id, enrollment_id, step, sent_at FROM deliveries
    WHERE enrollment_id = ANY(CAST(%(ids)b AS integer[])) AND status <> %(cancelled)s
"""


def _pg(session: Session, statement: str, parameters: dict):
    """Run one of the statements above on the session's connection, as written."""
    return session.connection().exec_driver_sql(statement, parameters)


def release_expired_leases(session: Session, now: datetime) -> int:
    """Deliveries claimed by a worker that died go back to the queue."""
    result = session.execute(
        update(Delivery)
        .where(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until < now)
        .values(status=DeliveryStatus.QUEUED, enqueued_at=None, lease_until=None)
    )
    session.commit()
    return result.rowcount


def enqueue_ready(
    session: Session, settings: Settings, now: datetime, publish: Publish
) -> tuple[int, int]:
    """Hand every ready delivery to the broker; return (enqueued, failed to publish).

    Ready means queued, due, and either never handed over or handed over so
    long ago that the broker must have lost it. A duplicate message is
    harmless: a worker claims a delivery with a conditional update, so only one
    sends it.
    """
    stale = now - timedelta(seconds=settings.requeue_after)
    enqueued = failed = 0
    while True:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.status == DeliveryStatus.QUEUED,
                    Delivery.not_before <= now,
                    or_(Delivery.enqueued_at.is_(None), Delivery.enqueued_at < stale),
                )
                .order_by(Delivery.not_before, Delivery.id)
                .limit(SCAN_BATCH)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            return enqueued, failed
        handed, failed = hand_over(session, ids, now, publish, batch_size=settings.batch_size)
        enqueued += handed
        if failed:
            return enqueued, failed


def hand_over(
    session: Session,
    ids: list[int],
    now: datetime,
    publish: Publish,
    batch_size: int = 0,
    *,
    marked: bool = False,
) -> tuple[int, int]:
    """Mark deliveries as handed to the broker, then publish them in tasks of `batch_size`.

    The marks are committed in one statement before anything is published
    (`marked`: they were written so already). If the broker goes down part
    way, the marks of what was not published are taken back, so the next tick
    tries again at once; the delivery rows themselves stay, so nothing is
    lost. Returns (published, failed).
    """
    if not marked:
        session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(enqueued_at=now))
        session.commit()
    size = batch_size or len(ids)
    published = 0
    try:
        for start in range(0, len(ids), size):
            publish(ids[start : start + size])
            published = min(start + size, len(ids))
    except Exception as error:
        rest = ids[published:]
        log.warning(
            "broker unavailable, %d deliveries wait for the next tick: %s", len(rest), error
        )
        take_back(session, rest, now)
        return published, len(rest)
    return published, 0


def take_back(session: Session, ids: list[int], now: datetime) -> None:
    """Undo a hand-over the broker did not take, so the next due-scan hands them out.

    `now` is when they were marked (the latest mark, for marks written one by
    one); a later hand-over of the same rows is left alone.
    """
    session.execute(
        update(Delivery)
        .where(and_(Delivery.id.in_(ids), Delivery.enqueued_at <= now))
        .values(enqueued_at=None)
    )
    session.commit()


#: Claim loops a due-scan runs side by side on PostgreSQL, each on its own
#: connection and its own share of the enrollments (`_due_batch`): while one
#: loop's batch is in the database, another's is worked out in Python. On two
#: cores two loops claimed 10,000 due steps about 1.6 times as fast as one, and
#: a third, once a claim's database and Python work had both shrunk, a twelfth
#: faster again (a fourth was not; the loops' Python shares one interpreter lock).
CLAIM_LOOPS = 3


def dispatch(
    session: Session,
    settings: Settings,
    sequences: Mapping[str, Sequence],
    *,
    now: datetime,
    publish: Publish,
) -> DispatchResult:
    """One due-scan: release dead claims, write due deliveries, hand them out.

    Deliveries are handed out batch by batch as they are written; once the
    broker refuses one, the rest of this tick only writes rows, which the next
    tick hands out. `publish` must be safe to call from several threads at once
    (one per claim loop).
    """
    result = DispatchResult()
    result.released = release_expired_leases(session, now)
    counting = threading.Lock()

    def claim(loop_session: Session, share: tuple[int, int]) -> int:
        def hand_out(ids: list[int]) -> None:
            if result.publish_failed:  # the broker is down: leave these for the next tick
                take_back(loop_session, ids, now)
                with counting:
                    result.publish_failed += len(ids)
                return
            published, failed = hand_over(
                loop_session, ids, now, publish, settings.batch_size, marked=True
            )
            with counting:
                result.enqueued += published
                result.publish_failed += failed

        return create_due_deliveries(loop_session, settings, sequences, now, hand_out, share)

    engine = session.get_bind()
    loops = CLAIM_LOOPS if engine.dialect.name == "postgresql" else 1  # SQLite: one writer
    with ThreadPoolExecutor(loops - 1) if loops > 1 else nullcontext() as pool:
        others = [
            pool.submit(_in_own_session, engine, partial(claim, share=(k, loops)))
            for k in range(1, loops)
        ]
        try:
            result.created = claim(session, (0, loops))
        except BaseException:
            session.rollback()  # free this loop's rows now, not once the others are done
            for other in others:
                if (error := other.exception()) is not None:
                    log.error("another claim loop failed as well: %r", error)
            raise
        result.created += sum(other.result() for other in others)
    if not result.publish_failed:  # retries come due, messages the broker lost
        enqueued, result.publish_failed = enqueue_ready(session, settings, now, publish)
        result.enqueued += enqueued
    return result


def _in_own_session(engine, work: Callable[[Session], int]) -> int:
    """Run `work` with a session (and so a connection) of its own, for another thread."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            return work(session)
        except BaseException:
            session.rollback()
            raise
