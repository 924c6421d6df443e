"""deliveries.subscriber_id without a foreign key of its own

Checking that key locks the subscriber's row for every email written, a write
to a page the due-scan otherwise only reads. Subscribers are never deleted,
and a course email's subscriber is held by its enrollment's key
(docs/decisions.md). The index on the column stays.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's foreign keys have no names: batch mode names them by this pattern
# when it reflects the table, so the one to drop can be named.
NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def _key() -> str:
    """The key's name: PostgreSQL's own, or the one NAMING gives SQLite's."""
    if op.get_bind().dialect.name == "postgresql":
        return "deliveries_subscriber_id_fkey"
    return "fk_deliveries_subscriber_id_subscribers"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", naming_convention=NAMING) as batch_op:
        batch_op.drop_constraint(_key(), type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.create_foreign_key(_key(), "subscribers", ["subscriber_id"], ["id"])
