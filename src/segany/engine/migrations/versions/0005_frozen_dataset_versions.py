"""Dataset versions hold an immutable snapshot of their masks; stage-3 done markers count redo generations.

Before this, a dataset version was only a list of links to live ``annotations`` rows: relabelling a row
changed every version holding it, and deleting it cascaded out of the versions, so a model's
``trained_on_id`` stopped describing what it was trained on. ``dataset_version_items`` copies what a
version contains (image id, sha256 and path, RLE, label, source, annotation uuid) when it is frozen; later
edits of the live rows do not touch it. Versions frozen before the upgrade get a snapshot of what their
links still point at (a row deleted before the upgrade is gone and cannot be recovered).

``image_runs.generation`` numbers the times stage 3 wrote an image, so the machine uuids of a redo differ
from those of the masks people kept from an earlier run.

Revision ID: 0005
Revises: 0004
Create Date: 2025-01-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_version_items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("dataset_version_id", sa.Integer(), sa.ForeignKey("dataset_versions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("annotation_uuid", sa.String(36), nullable=False),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="SET NULL"), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_path", sa.Text(), nullable=False),
        sa.Column("file_name", sa.String(500), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("rle_counts", sa.Text(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("area", sa.Integer(), nullable=False),
        sa.Column("bbox_xywh", sa.JSON(), nullable=False),
        sa.UniqueConstraint("dataset_version_id", "annotation_uuid", name="uq_dataset_version_items_dv_uuid"),
    )
    op.create_index("ix_dataset_version_items_dataset_version_id", "dataset_version_items", ["dataset_version_id"])
    op.execute(
        "INSERT INTO dataset_version_items (dataset_version_id, annotation_uuid, image_id, image_sha256, image_path, "
        "file_name, label, source, rle_counts, height, width, area, bbox_xywh) "
        "SELECT l.dataset_version_id, a.uuid, i.id, i.sha256, i.path, i.file_name, a.label, a.source, a.rle_counts, "
        "a.height, a.width, a.area, a.bbox_xywh FROM dataset_version_annotations l "
        "JOIN annotations a ON a.id = l.annotation_id JOIN images i ON i.id = a.image_id")
    op.create_table(
        "job_locks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("project_id", "kind", name="uq_job_locks_project_kind"),
    )
    # Plain ADD COLUMN (see 0003/0004); existing markers are generation 1.
    op.execute("ALTER TABLE image_runs ADD COLUMN generation INTEGER NOT NULL DEFAULT 1")


def downgrade() -> None:
    op.execute("ALTER TABLE image_runs DROP COLUMN generation")
    op.drop_table("job_locks")
    op.drop_index("ix_dataset_version_items_dataset_version_id", table_name="dataset_version_items")
    op.drop_table("dataset_version_items")
