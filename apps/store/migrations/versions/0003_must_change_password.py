"""users.must_change_password: a one-time password (the first-start admin's) must be changed before use

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Add as nullable, fill (existing accounts chose their passwords), then require it (SQLite: batch copy).
    with op.batch_alter_table("users") as batch_op:
        batch_op.add_column(sa.Column("must_change_password", sa.Boolean(), nullable=True))
    op.execute(sa.text("UPDATE users SET must_change_password = :no").bindparams(no=False))
    with op.batch_alter_table("users") as batch_op:
        batch_op.alter_column("must_change_password", existing_type=sa.Boolean(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("must_change_password")
