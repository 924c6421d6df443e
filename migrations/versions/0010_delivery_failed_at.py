"""deliveries.failed_at: when a delivery failed for good

The dashboard counts failures in a date range. Without this it could only go by
when the email was written, which a failure after days of retries lands days
early. Rows that failed before this migration keep no time (NULL); the
dashboard counts those by when they were written, as before. Adding a column
without a default rewrites nothing.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.drop_column("failed_at")
