"""Initial data-engine schema: projects, images, annotators, model and dataset versions, annotations.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("media_dir", sa.Text(), nullable=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("stage IN ('manual', 'semi', 'auto')", name="ck_projects_stage"),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("file_name", sa.String(500), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("project_id", "sha256", name="uq_images_project_sha256"),
    )
    op.create_index("ix_images_project_id", "images", ["project_id"])
    op.create_index("ix_images_sha256", "images", ["sha256"])
    op.create_table(
        "annotators",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("project_id", "name", name="uq_dataset_versions_project_name"),
    )
    op.create_index("ix_dataset_versions_project_id", "dataset_versions", ["project_id"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("model_type", sa.String(100), nullable=False),
        sa.Column("checkpoint_path", sa.Text(), nullable=True),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("model_versions.id", ondelete="SET NULL"), nullable=True),
        sa.Column("trained_on_id", sa.Integer(), sa.ForeignKey("dataset_versions.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "annotations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("rle_counts", sa.Text(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("area", sa.Integer(), nullable=False),
        sa.Column("bbox_xywh", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("review_state", sa.String(16), nullable=False),
        sa.Column("model_version_id", sa.Integer(), sa.ForeignKey("model_versions.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("prompts", sa.JSON(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), sa.ForeignKey("annotators.id", ondelete="SET NULL"), nullable=True),
        sa.Column("seconds_spent", sa.Float(), nullable=True),
        sa.Column("predicted_iou", sa.Float(), nullable=True),
        sa.Column("stability_score", sa.Float(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("source IN ('manual', 'semi', 'auto')", name="ck_annotations_source"),
        sa.CheckConstraint("review_state IN ('accepted', 'pending', 'rejected')", name="ck_annotations_review_state"),
    )
    op.create_index("ix_annotations_image_state", "annotations", ["image_id", "review_state"])
    op.create_table(
        "dataset_version_annotations",
        sa.Column("dataset_version_id", sa.Integer(), sa.ForeignKey("dataset_versions.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("annotation_id", sa.Integer(), sa.ForeignKey("annotations.id", ondelete="CASCADE"),
                  primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("dataset_version_annotations")
    op.drop_index("ix_annotations_image_state", table_name="annotations")
    op.drop_table("annotations")
    op.drop_table("model_versions")
    op.drop_index("ix_dataset_versions_project_id", table_name="dataset_versions")
    op.drop_table("dataset_versions")
    op.drop_table("annotators")
    op.drop_index("ix_images_sha256", table_name="images")
    op.drop_index("ix_images_project_id", table_name="images")
    op.drop_table("images")
    op.drop_table("projects")
