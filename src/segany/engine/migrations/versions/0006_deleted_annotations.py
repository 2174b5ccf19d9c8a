"""A record of deleted imported annotations: ``deleted_annotations`` (project, uuid, when).

A COCO import keys each annotation by a uuid derived from the project, the image's content and the
annotation's id in the file, so re-importing the same file is idempotent. The store kept no record of
deletions, so a re-import also re-created every imported annotation someone had deleted in the project since
(a reviewer's removal of a bad ground-truth mask was undone by the next import). Deleting an imported
annotation now leaves its uuid here, and an import skips those unless asked to restore them.

Annotations deleted before the upgrade left no trace and are not recorded: a re-import still brings those back
once (delete them again and they stay deleted).

Revision ID: 0006
Revises: 0005
Create Date: 2025-01-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deleted_annotations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("deleted_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("project_id", "uuid", name="uq_deleted_annotations_project_uuid"),
    )


def downgrade() -> None:
    op.drop_table("deleted_annotations")
