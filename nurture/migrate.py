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


#: What undoing each revision drops for good, when it drops more than an empty column
#: or something the next upgrade rebuilds (0008's time zones are copied again).
DOWNGRADE_LOSES = {
    "0011": "which admin sessions signing out ended (their cookies work again until they expire)",
    "0010": "when each failed delivery failed (deliveries.failed_at); the dashboard "
    "then counts those failures by when they were written",
    "0005": "every admin account's role (upgrading again makes every account an admin) "
    "and the periodic jobs' heartbeats",
    "0004": "the sequence versions the due-scan recorded (`nurture plan`'s baseline, the "
    "dashboard's history of removed steps and sequences)",
    "0003": "the suppression list: the hashes that keep erased bounced, complained and "
    "unsubscribed addresses from being mailed again, and each consent's version",
    "0002": "when each enrollment converted: sales steps would go out again to people "
    "who took the course",
    "0001": "every table and all its data",
}


def data_lost(database_url: str, revision: str) -> list[tuple[str, str]]:
    """(revision, what it drops) for each lossy revision a downgrade to `revision` undoes."""
    scripts = ScriptDirectory.from_config(alembic_config(database_url))
    at = current(database_url)
    if at == "none":
        return []
    steps = int(revision[1:]) if revision[:1] == "-" and revision[1:].isdigit() else None
    stop = None if revision == "base" or steps is not None else scripts.get_revision(revision)
    undone = []
    script = scripts.get_revision(at)
    while script is not None and script is not stop and (steps is None or len(undone) < steps):
        undone.append(script.revision)
        script = scripts.get_revision(script.down_revision) if script.down_revision else None
    return [(rev, DOWNGRADE_LOSES[rev]) for rev in undone if rev in DOWNGRADE_LOSES]


def downgrade(database_url: str, revision: str) -> None:
    config = alembic_config(database_url)
    _known(config, database_url)
    command.downgrade(config, revision)


def revision(database_url: str, message: str) -> None:
    """Write a new migration compared against the models (for developers)."""
    command.revision(alembic_config(database_url), message=message, autogenerate=True)
