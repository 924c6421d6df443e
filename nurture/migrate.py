"""Schema migrations with Alembic, driven from `nurture db ...`."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from nurture import ROOT


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def revision(database_url: str, message: str) -> None:
    """Write a new migration compared against the models (for developers)."""
    command.revision(alembic_config(database_url), message=message, autogenerate=True)
