"""Per-image done markers for engine jobs (stage 3 automatic masks).

A row says "job ``kind`` finished on this image with this model and wrote ``num_masks`` masks". It is
written in the same transaction as the image's masks, so a job killed at any point either has both or
neither, and a resumed job skips exactly the images that have a marker.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model_version_id", sa.Integer(), sa.ForeignKey("model_versions.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("num_masks", sa.Integer(), nullable=False),
        sa.Column("settings_hash", sa.String(64), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("image_id", "kind", name="uq_image_runs_image_kind"),
    )


def downgrade() -> None:
    op.drop_table("image_runs")
