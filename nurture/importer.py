"""Importing and exporting subscribers as CSV.

An import checks the whole file before it writes anything (encoding, header),
then takes the rows one by one: invalid and suppressed addresses, duplicates and
addresses already on the list are skipped and reported with their line
numbers. Imported people still confirm by email, unless the operator vouches
for their consent (`confirmed`, with a note that is kept as consent evidence).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from nurture.config import Settings
from nurture.models import Enrollment, Subscriber, SubscriberStatus
from nurture.sequences import Sequence, first_steps
from nurture.subscribers import (
    DEFAULT_SEQUENCE,
    IMPORT_VOUCHED,
    SignupRequest,
    consent_text,
    signup,
    suppression_of,
    validate_signup,
)

COLUMNS = ("email", "first_name", "timezone", "consent_source")
EXPORT_COLUMNS = (
    "email",
    "first_name",
    "timezone",
    "status",
    "signed_up_at",
    "confirmed_at",
    "sequences",
)
MAX_BYTES = 50 * 1024 * 1024
BATCH = 500


class CSVError(ValueError):
    """The file as a whole cannot be imported; nothing was written."""


@dataclass
class ImportReport:
    imported: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # line, email, reason
    confirmation_ids: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"imported {self.imported}, skipped {len(self.skipped)}"]
        out += [
            f"line {line}: {email or '(no email)'}: {reason}"
            for line, email, reason in self.skipped
        ]
        return out


def read_rows(data: bytes) -> tuple[list[str], list[dict[str, str]]]:
    """Decode and parse the whole file, or say why it cannot be imported."""
    if len(data) > MAX_BYTES:
        raise CSVError(f"the file is over {MAX_BYTES // 1024 // 1024} MB; split it")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise CSVError(f"line {line}: the file is not UTF-8; save it as UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip().lower() for name in (reader.fieldnames or [])]
    if "email" not in header:
        raise CSVError(
            f"line 1: the header must name an 'email' column (columns: {', '.join(COLUMNS)})"
        )
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise CSVError(f"line 1: unknown column(s) {', '.join(unknown)}; use {', '.join(COLUMNS)}")
    reader.fieldnames = header
    try:
        rows = [{k: (v or "") for k, v in row.items() if k} for row in reader]
    except csv.Error as error:
        raise CSVError(f"line {reader.line_num}: {error}") from None
    return header, rows


def import_subscribers(
    session: Session,
    settings: Settings,
    sequences: dict[str, Sequence],
    data: bytes,
    *,
    now: datetime,
    sequence: str = DEFAULT_SEQUENCE,
    confirmed: bool = False,
    consent_note: str = "",
    progress: Callable[[int], None] = lambda _n: None,
) -> ImportReport:
    """Import a CSV; returns the report. Raises CSVError before writing anything."""
    if confirmed and not consent_note.strip():
        raise CSVError("--confirmed needs a consent note saying how these people agreed")
    if not consent_note.strip().isprintable():
        raise CSVError("the consent note must be one line of text, without control characters")
    if sequence not in sequences:
        raise CSVError(f"unknown sequence {sequence!r}")
    _, rows = read_rows(data)
    report = ImportReport()
    seen: set[str] = set()
    starts = first_steps(sequences)
    for index, row in enumerate(rows):
        line = index + 2  # the header is line 1
        raw_email = row.get("email", "").strip()
        clean, errors = validate_signup(
            {**row, "sequence": sequence},
            sequences=frozenset(sequences),
            strict_timezone=True,
        )
        errors.update(_consent_source_errors(row))
        if errors:
            field_, message = next(iter(errors.items()))
            report.skipped.append((line, raw_email, f"{field_}: {message}"))
        elif clean["email"] in seen:
            report.skipped.append((line, raw_email, "duplicate of an earlier line"))
        else:
            seen.add(clean["email"])
            reason = _why_not(session, clean["email"])
            if reason:
                report.skipped.append((line, raw_email, reason))
            else:
                title = sequences[sequence].title
                pending = _import_one(
                    session, settings, clean, row, title, starts, now, confirmed, consent_note
                )
                report.imported += 1
                if pending is not None:
                    report.confirmation_ids.append(pending)
        if (index + 1) % BATCH == 0:
            session.commit()
            session.expunge_all()  # keep the unit of work small: flushes stay cheap
            progress(BATCH)
    session.commit()
    progress(len(rows) % BATCH)
    return report


def _consent_source_errors(row: dict[str, str]) -> dict[str, str]:
    """The row's consent source goes into the consent text: one line, no control characters.

    Checked with the other fields, so such a row is skipped and reported
    rather than refused by the database (PostgreSQL takes no NUL byte in
    text) after the rows before it were committed.
    """
    if row.get("consent_source", "").strip().isprintable():
        return {}
    return {"consent_source": "Please use one line of text, without control characters."}


def _why_not(session: Session, email: str) -> str | None:
    status = session.scalar(select(Subscriber.status).where(Subscriber.email == email))
    if status in SubscriberStatus.SUPPRESSED:
        return f"suppressed ({status})"
    if status is not None:
        return "already on the list"
    suppressed = suppression_of(session, email)
    return f"suppressed ({suppressed})" if suppressed else None


def _import_one(session, settings, clean, row, title, starts, now, confirmed, note) -> int | None:
    """Sign one person up; the id of their confirmation email to hand over, if any.

    Someone who will confirm by email agrees to the course's consent text, as a
    form signup does. Someone imported as already consenting saw none of our
    text: their record holds the operator's word for it (the note, and the row's
    source) under the version `IMPORT_VOUCHED`, so it never reads as a form's.
    """
    source = row.get("consent_source", "").strip()[:200]
    request = SignupRequest(
        email=clean["email"],
        first_name=clean.get("first_name", ""),
        timezone=clean["timezone"],
        sequence=clean["sequence"],
        source="import",
    )
    if confirmed:
        said = f"Imported as already consenting, on the operator's word: {note.strip()}"
        vouched = replace(
            request,
            consent_text=said + (f" (source: {source})" if source else ""),
            consent_version=IMPORT_VOUCHED,
        )
        return signup(session, _without_opt_in(settings), vouched, first_steps=starts, now=now)
    text = consent_text(title)
    if source or note.strip():
        text += f" [imported: {' / '.join(p for p in (source, note.strip()) if p)}]"
    return signup(
        session, settings, replace(request, consent_text=text), first_steps=starts, now=now
    )


def _without_opt_in(settings: Settings) -> Settings:
    return replace(settings, double_opt_in=False)


#: What makes a spreadsheet read a cell as a formula (OWASP's list for CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str) -> str:
    """A cell a spreadsheet shows as text and never runs as a formula.

    A first name is whatever someone typed into a public form, and
    `=HYPERLINK(...)` opened in Excel or LibreOffice would be a live link (or
    worse) in the admin's hands. OWASP's advice: a leading apostrophe, which
    spreadsheets take as "this is text" and do not show.
    """
    return f"'{value}" if value.startswith(FORMULA_STARTS) else value


def export_rows(session: Session) -> Iterator[list[str]]:
    """Every subscriber as CSV rows, header first; every text cell made safe by `_cell`."""
    yield list(EXPORT_COLUMNS)
    enrolled: dict[int, list[str]] = {}
    for subscriber_id, sequence in session.execute(
        select(Enrollment.subscriber_id, Enrollment.sequence).order_by(Enrollment.id)
    ):
        enrolled.setdefault(subscriber_id, []).append(sequence)
    for s in session.scalars(select(Subscriber).order_by(Subscriber.id)).yield_per(1000):
        yield [
            _cell(s.email),
            _cell(s.first_name),
            _cell(s.timezone),
            _cell(s.status),
            s.created_at.isoformat(),
            s.confirmed_at.isoformat() if s.confirmed_at else "",
            _cell(" ".join(enrolled.get(s.id, []))),
        ]


def export_csv(session: Session) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(export_rows(session))
    return out.getvalue()
