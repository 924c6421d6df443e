"""`nurture db upgrade` builds the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import BOTH_DATABASES, Stack
from sqlalchemy import insert, inspect, select, text

from nurture import ROOT, migrate
from nurture.db import get_engine, session_scope
from nurture.models import Base, Delivery, Enrollment, Event, Subscriber


@BOTH_DATABASES
def test_upgrade_matches_the_models(empty_database):
    migrate.upgrade(empty_database)
    engine = get_engine(empty_database)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == [], "the models changed without a migration"
    indexes = {i["name"] for i in inspect(engine).get_indexes("enrollments")}
    assert "ix_enrollments_status_next_due_at" in indexes
    uniques = inspect(engine).get_unique_constraints("deliveries")
    assert any(set(u["column_names"]) == {"enrollment_id", "step"} for u in uniques)
    # Writing an email runs no key check (0006, 0007).
    assert inspect(engine).get_foreign_keys("deliveries") == []


def _delivery_keys(url: str) -> list[str]:
    return sorted(
        k["referred_table"] for k in inspect(get_engine(url)).get_foreign_keys("deliveries")
    )


def _sent_mail(url: str) -> list[tuple]:
    """Each delivery with its subscriber's address and the kinds of its events."""
    with get_engine(url).connect() as connection:
        return connection.execute(
            text(
                "SELECT d.id, s.email, d.step, d.status, e.kind FROM deliveries d "
                "JOIN subscribers s ON s.id = d.subscriber_id "
                "JOIN events e ON e.delivery_id = d.id ORDER BY d.id, e.id"
            )
        ).all()


@BOTH_DATABASES
@pytest.mark.parametrize(
    "start, revision, keys_before, keys_after",
    [
        ("0005", "0006", ["enrollments", "subscribers"], ["enrollments"]),
        ("0006", "0007", ["enrollments"], []),
    ],
    ids=["subscriber key", "enrollment key"],
)
def test_a_key_goes_and_comes_back_with_sent_mail_in_place(
    empty_database, start, revision, keys_before, keys_after
):
    """0006 and 0007 rebuild deliveries on SQLite, whose rows other tables' keys point at."""
    migrate.upgrade(empty_database, start)
    with session_scope(empty_database) as session:
        ann = Subscriber(email="ann@example.com", status="active")
        session.add(ann)
        session.flush()
        # Only the columns this older schema has (later ones, like the time zone, wait).
        course_id = session.execute(
            insert(Enrollment.__table__).values(subscriber_id=ann.id, sequence="product-vs-project")
        ).inserted_primary_key[0]
        now = datetime.now(UTC)
        mail = [
            session.execute(
                insert(Delivery.__table__).values(
                    subscriber_id=ann.id,
                    enrollment_id=enrollment_id,
                    step=step,
                    message_id=f"<{n}@x>",
                    status="queued",
                    attempts=0,
                    not_before=now,
                    created_at=now,
                )
            ).inserted_primary_key[0]
            for n, (enrollment_id, step) in enumerate(
                [(None, "confirmation"), (course_id, "welcome")], start=1
            )
        ]
        session.add_all(
            [Event(subscriber_id=ann.id, delivery_id=d, kind="open") for d in mail]
            + [Event(subscriber_id=ann.id, delivery_id=mail[1], kind="click")]
        )
    before = _sent_mail(empty_database)
    assert len(before) == 3
    assert _delivery_keys(empty_database) == keys_before

    migrate.upgrade(empty_database, revision)
    assert _delivery_keys(empty_database) == keys_after
    assert _sent_mail(empty_database) == before
    migrate.downgrade(empty_database, start)
    assert _delivery_keys(empty_database) == keys_before
    assert _sent_mail(empty_database) == before
    migrate.upgrade(empty_database)
    assert _sent_mail(empty_database) == before
    if empty_database.startswith("sqlite"):  # the migration turned them off for itself only
        with get_engine(empty_database).connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@BOTH_DATABASES
def test_enrollments_held_by_a_missing_sequence_are_due_again(empty_database):
    """0009 gives back the due time a missing sequence used to clear, and nothing else."""
    migrate.upgrade(empty_database, "0008")
    rows = [  # status, next step, due
        ("active", "product-manager", None),  # held: wakes
        ("active", "overlap", datetime(2030, 1, 1, tzinfo=UTC)),  # due later: kept
        ("completed", None, None),
        ("stopped", "overlap", None),
        ("pending", "welcome", None),
    ]
    with session_scope(empty_database) as session:
        person = Subscriber(email="ann@example.com", status="active", timezone="UTC")
        session.add(person)
        session.flush()
        for n, (status, step, due) in enumerate(rows):
            session.add(
                Enrollment(
                    subscriber_id=person.id,
                    sequence=f"s{n}",
                    timezone="UTC",
                    status=status,
                    next_step=step,
                    next_due_at=due,
                )
            )
    before = datetime.now(UTC)
    migrate.upgrade(empty_database, "0009")
    with session_scope(empty_database) as session:
        due = session.scalars(select(Enrollment.next_due_at).order_by(Enrollment.id)).all()
    assert before - timedelta(seconds=1) <= due[0] <= datetime.now(UTC)
    assert due[1:] == [datetime(2030, 1, 1, tzinfo=UTC), None, None, None]
    migrate.downgrade(empty_database, "0008")


@BOTH_DATABASES
def test_enrollments_take_their_subscribers_time_zones(empty_database):
    """0008 copies each subscriber's zone onto their enrollments, which the due-scan reads."""
    migrate.upgrade(empty_database, "0007")
    with session_scope(empty_database) as session:
        for email, zone in [("ann@example.com", "Asia/Tokyo"), ("bo@example.com", "UTC")]:
            person = Subscriber(email=email, status="active", timezone=zone)
            session.add(person)
            session.flush()
            for sequence in ("product-vs-project", "career-switch-checklist"):
                session.execute(
                    insert(Enrollment.__table__).values(subscriber_id=person.id, sequence=sequence)
                )

    def zones() -> list[tuple]:
        with get_engine(empty_database).connect() as connection:
            return connection.execute(
                text(
                    "SELECT s.email, e.sequence, e.timezone FROM enrollments e "
                    "JOIN subscribers s ON s.id = e.subscriber_id ORDER BY e.id"
                )
            ).all()

    migrate.upgrade(empty_database, "0008")
    assert zones() == [
        ("ann@example.com", "product-vs-project", "Asia/Tokyo"),
        ("ann@example.com", "career-switch-checklist", "Asia/Tokyo"),
        ("bo@example.com", "product-vs-project", "UTC"),
        ("bo@example.com", "career-switch-checklist", "UTC"),
    ]
    column = {c["name"]: c for c in inspect(get_engine(empty_database)).get_columns("enrollments")}
    assert column["timezone"]["nullable"] is False
    migrate.downgrade(empty_database, "0007")
    columns = inspect(get_engine(empty_database)).get_columns("enrollments")
    assert "timezone" not in {c["name"] for c in columns}


@BOTH_DATABASES
def test_downgrade_and_upgrade_again(empty_database):
    migrate.upgrade(empty_database)
    migrate.downgrade(empty_database, "base")
    assert set(inspect(get_engine(empty_database)).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(empty_database)
    assert "deliveries" in inspect(get_engine(empty_database)).get_table_names()


def test_cli_upgrade_is_idempotent(tmp_path):
    stack = Stack(
        {
            "NURTURE_INSTANCE": str(tmp_path),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        }
    )
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "nurture", "db", "upgrade"],
            cwd=ROOT,
            env=stack.process_env(),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
    tables = inspect(get_engine(stack.settings.database_url)).get_table_names()
    assert {"subscribers", "consents", "enrollments", "deliveries", "events", "users"} <= set(
        tables
    )


def test_cli_downgrade_says_what_it_drops_and_asks_first(tmp_path):
    """Undoing 0005 makes every account an admin when upgraded again, 0003 forgets the
    suppression list: the command says so, and goes on only when told to."""
    stack = Stack(
        {"NURTURE_INSTANCE": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    )
    url = stack.settings.database_url
    migrate.upgrade(url)

    def nurture(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "nurture", "db", "downgrade", *args],
            cwd=ROOT,
            env=stack.process_env(),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    refused = nurture("0002")
    assert refused.returncode != 0
    assert "undoing 0005 drops every admin account's role" in refused.stderr
    assert "undoing 0003 drops the suppression list" in refused.stderr
    assert "0010" in refused.stderr and "0011" in refused.stderr
    assert "0002 drops" not in refused.stderr
    assert migrate.current(url) == "0011", "nothing changed without a yes"

    assert nurture("0009", "--yes").returncode == 0
    assert migrate.current(url) == "0009"
    quiet = nurture("0008")  # 0009 drops nothing
    assert (quiet.returncode, quiet.stderr) == (0, "")
    assert migrate.current(url) == "0008"
