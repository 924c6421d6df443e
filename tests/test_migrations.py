"""`nurture db upgrade` builds the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import BOTH_DATABASES, Stack
from sqlalchemy import inspect

from nurture import ROOT, migrate
from nurture.db import get_engine
from nurture.models import Base


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
    # Writing an email locks no subscriber row (0006); its enrollment's key stays.
    keys = inspect(engine).get_foreign_keys("deliveries")
    assert [(k["constrained_columns"], k["referred_table"]) for k in keys] == [
        (["enrollment_id"], "enrollments")
    ]


@BOTH_DATABASES
def test_the_subscriber_key_comes_back_on_downgrade(empty_database):
    migrate.upgrade(empty_database)
    migrate.downgrade(empty_database, "0005")
    keys = inspect(get_engine(empty_database)).get_foreign_keys("deliveries")
    assert sorted(k["referred_table"] for k in keys) == ["enrollments", "subscribers"]
    migrate.upgrade(empty_database)
    keys = inspect(get_engine(empty_database)).get_foreign_keys("deliveries")
    assert [k["referred_table"] for k in keys] == ["enrollments"]


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
