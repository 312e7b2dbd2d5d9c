"""reports.site: each report version carries its study's site

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Add as nullable, fill from the study, then require it (SQLite: batch move-and-copy for the last step).
    with op.batch_alter_table("reports") as batch_op:
        batch_op.add_column(sa.Column("site", sa.String(length=64), nullable=True))
    op.execute("UPDATE reports SET site = (SELECT studies.site FROM studies WHERE studies.id = reports.study_id)")
    with op.batch_alter_table("reports") as batch_op:
        batch_op.alter_column("site", existing_type=sa.String(length=64), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch_op:
        batch_op.drop_column("site")
