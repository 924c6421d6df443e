"""Alembic environment: the database URL comes from nurture's settings."""

from alembic import context

from nurture.db import get_engine, is_sqlite
from nurture.models import Base

config = context.config


def _sqlite_foreign_keys(connection, on: bool) -> None:
    """Switch SQLite's key checks; it ignores the switch inside a transaction."""
    connection.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    connection.commit()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    sqlite = is_sqlite(url)
    engine = get_engine(url)
    with engine.connect() as connection:
        if sqlite:
            # Batch mode rebuilds a table as a copy and drops the original; with
            # keys checked, dropping a table that other rows point at fails.
            _sqlite_foreign_keys(connection, on=False)
        try:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=sqlite,  # SQLite alters tables by copying them
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise SystemExit(f"the migration left rows without their keys: {broken}")
        finally:
            if sqlite:  # the connection goes back to the pool, checked as before
                _sqlite_foreign_keys(connection, on=True)


if context.is_offline_mode():
    raise SystemExit("nurture migrates online only: run `nurture db upgrade`")
run_migrations_online()
