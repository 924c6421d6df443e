"""deliveries.enrollment_id without a foreign key

PostgreSQL checks a foreign key with a query of its own for every row
inserted, and the due-scan inserts a delivery for every email: the check was
more than half of the cost of writing them. Enrollments are never deleted, and
the due-scan writes a delivery only for an enrollment it holds locked
(docs/decisions.md). The unique (enrollment_id, step) constraint stays.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's foreign keys have no names: batch mode names them by this pattern
# when it reflects the table, so the one to drop can be named.
NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def _key() -> str:
    """The key's name: PostgreSQL's own, or the one NAMING gives SQLite's."""
    if op.get_bind().dialect.name == "postgresql":
        return "deliveries_enrollment_id_fkey"
    return "fk_deliveries_enrollment_id_enrollments"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", naming_convention=NAMING) as batch_op:
        batch_op.drop_constraint(_key(), type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.create_foreign_key(_key(), "enrollments", ["enrollment_id"], ["id"])
