"""Schema migrations with Alembic, driven from `nurture db ...`."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from nurture import ROOT


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def current(database_url: str) -> str:
    """The revision the database is at ("none" for an empty one)."""
    from alembic.runtime.migration import MigrationContext

    from nurture.db import get_engine

    with get_engine(database_url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision() or "none"


def _known(config: Config, database_url: str) -> None:
    """Refuse, in one line, a database migrated by a newer version than this one."""
    at = current(database_url)
    scripts = ScriptDirectory.from_config(config)
    if at != "none" and at not in {script.revision for script in scripts.walk_revisions()}:
        raise CommandError(
            f"the database is at revision {at}, which this version of nurture does not "
            f"know (it knows up to {scripts.get_current_head()}): it was migrated by a "
            "newer version; run that one's `nurture db downgrade` first to go back"
        )


def upgrade(database_url: str, revision: str = "head") -> None:
    config = alembic_config(database_url)
    _known(config, database_url)
    command.upgrade(config, revision)


def downgrade(database_url: str, revision: str) -> None:
    config = alembic_config(database_url)
    _known(config, database_url)
    command.downgrade(config, revision)


def revision(database_url: str, message: str) -> None:
    """Write a new migration compared against the models (for developers)."""
    command.revision(alembic_config(database_url), message=message, autogenerate=True)
