"""Wake enrollments held by a sequence that was missing for a while

A due-scan that could not find an enrollment's sequence (its folder away for a
deploy, renamed and put back) used to clear the enrollment's due time, and
nothing set it again: the course stopped for good. The due-scan now looks
again an hour later; this gives the enrollments it held their due time back,
so their next email goes out at the next due-scan, or waits again if their
sequence is still missing. No other writer leaves an active enrollment with a
step to send and no due time.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

enrollments = sa.table(
    "enrollments",
    sa.column("status", sa.String),
    sa.column("next_step", sa.String),
    sa.column("next_due_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    now = datetime.now(UTC)
    if op.get_bind().dialect.name == "sqlite":  # stored without a zone, in UTC
        now = now.replace(tzinfo=None)
    op.execute(
        enrollments.update()
        .where(
            enrollments.c.status == "active",
            enrollments.c.next_step.is_not(None),
            enrollments.c.next_due_at.is_(None),
        )
        .values(next_due_at=now)
    )


def downgrade() -> None:
    """Nothing to undo: the due times given back are what the code before would have set."""
