"""Alembic environment: the database URL comes from nurture's settings."""

from alembic import context

from nurture.db import get_engine, is_sqlite
from nurture.models import Base

config = context.config


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = get_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=is_sqlite(url),  # SQLite alters tables by copying them
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("nurture migrates online only: run `nurture db upgrade`")
run_migrations_online()
