"""Which version of each sequence is live, and what a change would do before it is.

The service records a sequence's manifest each time the due-scan first runs
with a new version of it. `nurture plan` compares the files on disk with that
record: for every active enrollment it plans the next days under both, with the
due-scan's own rules, and reports who would get what, and when, differently.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, time, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from nurture.config import Settings
from nurture.db import insert_for
from nurture.models import Delivery, DeliveryStatus, Enrollment, SequenceVersion, Subscriber
from nurture.scheduler import plan, zone
from nurture.sequences import Sequence, Step


def manifest_of(sequence: Sequence) -> dict:
    return {
        "title": sequence.title,
        "description": sequence.description,
        "skip_weekends": sequence.skip_weekends,
        "steps": [
            {**asdict(step), "send_at": step.send_at.strftime("%H:%M") if step.send_at else None}
            for step in sequence.steps
        ],
    }


def digest_of(sequence: Sequence) -> str:
    """A fingerprint of the manifest and every email file: any edit changes it."""
    hasher = hashlib.sha256(json.dumps(manifest_of(sequence), sort_keys=True).encode())
    for step in sequence.steps:
        path = sequence.path / step.file
        hasher.update(path.read_bytes() if path.is_file() else b"")
    return hasher.hexdigest()


def sequence_from(name: str, manifest: dict) -> Sequence:
    steps = tuple(
        Step(**{**raw, "send_at": time.fromisoformat(raw["send_at"]) if raw["send_at"] else None})
        for raw in manifest["steps"]
    )
    return Sequence(
        name=name,
        title=manifest["title"],
        description=manifest["description"],
        path=Path("."),
        steps=steps,
        skip_weekends=manifest["skip_weekends"],
    )


_recorded: dict[tuple[str, str], str] = {}  # (database, sequence): the digest recorded last


def record_published(session: Session, sequences: dict[str, Sequence], now: datetime) -> None:
    """Remember each sequence's version the first time the due-scan runs with it.

    A version seen before (an edit undone, a branch switched back) is live
    again from `now`: its row moves to the front rather than a second one
    being written. One upsert, so two beats recording it at once both succeed.
    """
    database = str(session.get_bind().url)
    for name, sequence in sequences.items():
        digest = digest_of(sequence)
        if _recorded.get((database, name)) == digest:
            continue
        latest = session.scalar(
            select(SequenceVersion.digest)
            .where(SequenceVersion.sequence == name)
            .order_by(*_NEWEST_FIRST)
            .limit(1)
        )
        if latest != digest:
            statement = insert_for(session)(SequenceVersion).values(
                sequence=name,
                digest=digest,
                manifest=json.dumps(manifest_of(sequence)),
                published_at=now,
            )
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=["sequence", "digest"],
                    set_={"published_at": statement.excluded.published_at},
                )
            )
            session.commit()
        _recorded[database, name] = digest


#: The live version of a sequence is the one published last.
_NEWEST_FIRST = (SequenceVersion.published_at.desc(), SequenceVersion.id.desc())


def published_sequences(session: Session) -> dict[str, tuple[Sequence, datetime]]:
    """The last recorded version of each sequence, and when it went live."""
    oldest_first = (SequenceVersion.published_at, SequenceVersion.id)
    rows = session.scalars(select(SequenceVersion).order_by(*oldest_first)).all()
    latest = {row.sequence: row for row in rows}
    return {
        name: (sequence_from(name, json.loads(row.manifest)), row.published_at)
        for name, row in latest.items()
    }


@dataclass(frozen=True)
class Change:
    email: str
    sequence: str
    timezone: str
    before: list[tuple[str, datetime]]
    after: list[tuple[str, datetime]]


@dataclass(frozen=True)
class PlanDiff:
    days: int
    counts_before: Counter
    counts_after: Counter
    changes: list[Change]


def compare(
    session: Session,
    settings: Settings,
    published: dict[str, Sequence],
    proposed: dict[str, Sequence],
    now: datetime,
    days: int = 7,
) -> PlanDiff:
    """Who gets what in the next `days` days under the published and the proposed sequences."""
    until = now + timedelta(days=days)
    rows = session.execute(
        select(Enrollment, Subscriber.email)
        .join(Subscriber, Subscriber.id == Enrollment.subscriber_id)
        .where(Enrollment.status == "active")
        .order_by(Enrollment.id)
    ).all()
    had: dict[int, list[str]] = {}
    for enrollment_id, step in session.execute(
        select(Delivery.enrollment_id, Delivery.step)
        .where(Delivery.status != DeliveryStatus.CANCELLED, Delivery.enrollment_id.is_not(None))
        .order_by(Delivery.id)
    ):
        had.setdefault(enrollment_id, []).append(step)
    before: Counter = Counter()
    after: Counter = Counter()
    changes = []
    for enrollment, email in rows:
        plans = []
        for sequences, counter in ((published, before), (proposed, after)):
            sequence = sequences.get(enrollment.sequence)
            planned = (
                plan(enrollment, sequence, settings, now, had.get(enrollment.id, []), until)
                if sequence
                else []
            )
            planned = [(step.key, due) for step, due in planned if due <= until]
            counter.update(f"{enrollment.sequence}/{key}" for key, _ in planned)
            plans.append(planned)
        if plans[0] != plans[1]:
            changes.append(
                Change(email, enrollment.sequence, enrollment.timezone, plans[0], plans[1])
            )
    return PlanDiff(days, before, after, changes)


def format_diff(diff: PlanDiff, limit: int = 20) -> str:
    lines = [f"Emails in the next {diff.days} days: published -> proposed"]
    for key in sorted(set(diff.counts_before) | set(diff.counts_after)):
        old, new = diff.counts_before[key], diff.counts_after[key]
        mark = "" if old == new else "   <- changed"
        lines.append(f"  {key:<45} {old:>6} -> {new:<6}{mark}")
    if not diff.changes:
        lines.append("No subscriber's next emails change.")
        return "\n".join(lines)
    lines.append(f"{len(diff.changes)} subscribers would get something different, e.g.:")
    for change in diff.changes[:limit]:
        tz = zone(change.timezone)
        old = ", ".join(f"{k} {d.astimezone(tz):%a %d %b %H:%M}" for k, d in change.before)
        new = ", ".join(f"{k} {d.astimezone(tz):%a %d %b %H:%M}" for k, d in change.after)
        lines.append(f"  {change.email} ({change.sequence}, local time {change.timezone})")
        lines.append(f"    now:      {old or 'nothing'}")
        lines.append(f"    proposed: {new or 'nothing'}")
    return "\n".join(lines)
