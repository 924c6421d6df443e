"""users.session_epoch: signing out ends every session of the account

An admin session is a signed cookie, so it cannot be deleted on the server.
Each session carries a MAC of the account's password hash and this number;
signing out adds one to it, so every cookie made before (a copied one
included) stops working. A column with a constant default rewrites nothing on
PostgreSQL.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.add_column(
            sa.Column("session_epoch", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("session_epoch")
