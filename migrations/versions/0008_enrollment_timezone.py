"""enrollments.timezone: the subscriber's time zone, on the enrollment

The due-scan needs each due enrollment's time zone to place its next email at
the marketer's local send time. Read from the subscriber, it cost a join that
visited one subscriber row (and page) per due enrollment, about a tenth of a
due-scan's time; kept on the enrollment, the scan reads one table
(docs/decisions.md). The copy is filled from the subscribers here, and changes
with the subscriber's own from then on.

It rewrites every enrollment while holding the table: stop web, worker and beat
for it (they cannot write an enrollment meanwhile, and code from before it
writes none without a zone), and `VACUUM ANALYZE enrollments` afterwards.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("enrollments") as batch_op:
        batch_op.add_column(sa.Column("timezone", sa.String(64), nullable=True))
    if op.get_bind().dialect.name == "postgresql":  # one join rather than a lookup per row
        op.execute(
            "UPDATE enrollments SET timezone = subscribers.timezone FROM subscribers "
            "WHERE subscribers.id = enrollments.subscriber_id"
        )
    else:
        op.execute(
            "UPDATE enrollments SET timezone = "
            "(SELECT subscribers.timezone FROM subscribers "
            "WHERE subscribers.id = enrollments.subscriber_id)"
        )
    with op.batch_alter_table("enrollments") as batch_op:
        batch_op.alter_column("timezone", existing_type=sa.String(64), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("enrollments") as batch_op:
        batch_op.drop_column("timezone")
