"""Schema of the data-engine store (SAM §4 "Segment Anything Data Engine").

Tables: projects, images, annotations, annotators, model versions, dataset versions and deleted imports. The
schema is created and evolved only through the packaged Alembic migrations
(``segany/engine/migrations``); these classes describe it for the ORM and must match the latest
migration (``tests/engine/test_engine_store.py`` checks that they do).

Design notes for the stages that build on this store:

* ``Annotation.source`` says which engine stage made a mask: ``manual`` (stage 1, assisted-manual),
  ``semi`` (stage 2, pre-filled by the model and reviewed) or ``auto`` (stage 3, fully automatic).
* ``Annotation.review_state`` is ``accepted``, ``pending`` (waiting for a person) or ``rejected``;
  rejected rows are kept so retraining can learn what the model got wrong.
* ``Annotation.model_version_id`` names the model that proposed or assisted the mask, and
  ``ModelVersion.parent_id``/``trained_on_id`` record the retraining lineage
  (model → dataset version it was trained on → previous model).
* ``DatasetVersion`` freezes a set of annotations for training or export, so a model version can point at
  exactly the data it saw. Its content is the immutable snapshot ``dataset_version_items`` (migration 0005:
  image sha256/path, RLE, label, source, annotation uuid, copied when frozen); later edits or deletes of the
  live annotations leave it unchanged. ``dataset_version_annotations`` only links to live rows that still exist.
* ``Annotation.uuid`` is the client's idempotency key: a retried save finds the row it already made.
* ``Annotation.last_edit_uuid`` is the idempotency key of the edit (``PATCH``) that made the current revision
  (migration 0008): a retried edit whose first answer was lost finds it and is answered as it was, not refused
  as stale. Any later change replaces or clears it.
* ``Annotator.role`` is ``annotator`` (the default), ``reviewer`` or ``admin`` (migration 0003 made every
  annotator that existed before roles an ``admin``, so an upgrade locks nobody out).
* ``Annotation.annotator_id`` is who made the mask (or, for a machine proposal, the person who accepted it:
  they vouched for it); ``reviewer_id``/``reviewed_at`` are the last person who accepted or rejected it, or
  changed someone else's annotation, and when (migration 0004; NULL for rows reviewed before it). A review
  never changes ``annotator_id``, so per-annotator figures and provenance credit whoever drew the mask.
* ``Annotation.area`` and ``DatasetVersionItem.area`` are 64-bit (migration 0007; :data:`AREA`).
* ``DeletedAnnotation`` records the uuid of each imported annotation (``prompts.imported_from``) deleted in the
  project (migration 0006), so a re-import of its file leaves it deleted. Other uuids are random or per run and
  never come back, so only imported ones are recorded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SOURCES = ("manual", "semi", "auto")
REVIEW_STATES = ("accepted", "pending", "rejected")
STAGES = ("manual", "semi", "auto")
# Who may do what on the annotation server (segany.server.permissions): an annotator makes and edits their own
# masks and reviews machine proposals; a reviewer also reviews and deletes anyone's; an admin also runs the project.
ROLES = ("annotator", "reviewer", "admin")


# A mask's pixel count: 64-bit (migration 0007), as a gigapixel image's mask can exceed 2**31 - 1 pixels (a
# 60,000 x 60,000 sky is 3.6e9). SQLite's INTEGER already holds 64 bits, so its tables keep that type; only
# PostgreSQL's int4 columns were altered.
AREA = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Folder where uploaded images are written; None for a project whose images are only registered by path.
    media_dir: Mapped[str | None] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(16), default="manual")
    labels: Mapped[list[Any]] = mapped_column(JSON, default=list)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="project", cascade="all, delete-orphan")

    __table_args__ = (CheckConstraint("stage IN ('manual', 'semi', 'auto')", name="ck_projects_stage"),)


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    file_name: Mapped[str] = mapped_column(String(500))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    project: Mapped[Project] = relationship(back_populates="images")
    annotations: Mapped[list[Annotation]] = relationship(back_populates="image", cascade="all, delete-orphan")

    __table_args__ = (UniqueConstraint("project_id", "sha256", name="uq_images_project_sha256"),)


class Annotator(Base):
    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # sha256 of a random 256-bit token: the token itself is shown once and never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    role: Mapped[str] = mapped_column(String(16), default="annotator", server_default="annotator")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (CheckConstraint("role IN ('annotator', 'reviewer', 'admin')", name="ck_annotators_role"),)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_type: Mapped[str] = mapped_column(String(100))
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    trained_on_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_versions.id", ondelete="SET NULL"))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


dataset_version_annotations = Table(
    "dataset_version_annotations",
    Base.metadata,
    Column("dataset_version_id", ForeignKey("dataset_versions.id", ondelete="CASCADE"), primary_key=True),
    Column("annotation_id", ForeignKey("annotations.id", ondelete="CASCADE"), primary_key=True),
)


class DatasetVersion(Base):
    __tablename__ = "dataset_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    annotations: Mapped[list[Annotation]] = relationship(secondary=dataset_version_annotations)
    items: Mapped[list[DatasetVersionItem]] = relationship(cascade="all, delete-orphan",
                                                           order_by="DatasetVersionItem.id")

    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_dataset_versions_project_name"),)


class DatasetVersionItem(Base):
    """One mask of a frozen dataset version, copied from its annotation when the version was frozen."""

    __tablename__ = "dataset_version_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id", ondelete="CASCADE"),
                                                    index=True)
    annotation_uuid: Mapped[str] = mapped_column(String(36))
    # SET NULL: the snapshot outlives a deleted image (its sha256 and path say which file it was).
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_path: Mapped[str] = mapped_column(Text)
    file_name: Mapped[str] = mapped_column(String(500))
    label: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16))
    rle_counts: Mapped[str] = mapped_column(Text)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    area: Mapped[int] = mapped_column(AREA)
    bbox_xywh: Mapped[list[Any]] = mapped_column(JSON)

    __table_args__ = (UniqueConstraint("dataset_version_id", "annotation_uuid",
                                       name="uq_dataset_version_items_dv_uuid"),)

    @classmethod
    def copy_of(cls, a: Annotation, im: Image) -> DatasetVersionItem:
        """A copy of annotation ``a`` on image ``im`` that later edits or deletes of ``a`` cannot reach."""
        return cls(annotation_uuid=a.uuid, image_id=im.id, image_sha256=im.sha256, image_path=im.path,
                   file_name=im.file_name, label=a.label, source=a.source, rle_counts=a.rle_counts, height=a.height,
                   width=a.width, area=a.area, bbox_xywh=list(a.bbox_xywh or []))

    @classmethod
    def snapshot(cls, rows: Iterable[tuple[Annotation, Image]]) -> list[DatasetVersionItem]:
        """Copies of the (annotation, image) ``rows`` of a version being frozen, in (image id, uuid) order.

        The snapshot's row order is the order its export numbers images and masks in
        (:func:`segany.engine.versions.snapshot_items`), and it stays so when images are removed later.
        """
        return [cls.copy_of(a, im) for a, im in sorted(rows, key=lambda r: (r[1].id, r[0].uuid))]


class ImageRun(Base):
    """Done marker of an engine job on one image (``kind`` = ``auto``), written with the image's masks."""

    __tablename__ = "image_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    num_masks: Mapped[int] = mapped_column(Integer)
    settings_hash: Mapped[str | None] = mapped_column(String(64))
    seconds: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # How many times the job wrote this image (migration 0005): part of stage 3's machine uuids, so a redo's
    # masks never reuse the ids of masks people kept from an earlier generation.
    generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    __table_args__ = (UniqueConstraint("image_id", "kind", name="uq_image_runs_image_kind"),)


class JobLock(Base):
    """A claim on a project by a running engine job (migration 0005): one ``engine auto`` run at a time.

    ``owner`` is ``host:pid``; a claim whose process is gone (same host) or whose heartbeat is old is stale and
    may be taken over, so a killed run never locks the project for good.
    """

    __tablename__ = "job_locks"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(200))
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("project_id", "kind", name="uq_job_locks_project_kind"),)


class DeletedAnnotation(Base):
    """An imported annotation that was deleted in the project (migration 0006), by its uuid.

    An import keys its annotations by uuids derived from the project, the image and the file's ids, so a
    re-import of the same file would otherwise recreate what someone deleted; the import skips a record whose
    uuid is here unless asked to restore it, which removes the row.
    """

    __tablename__ = "deleted_annotations"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    uuid: Mapped[str] = mapped_column(String(36))
    deleted_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("project_id", "uuid", name="uq_deleted_annotations_project_uuid"),)


class Annotation(Base):
    __tablename__ = "annotations"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(200), default="object")
    # COCO compressed RLE: counts string and the mask's (height, width).
    rle_counts: Mapped[str] = mapped_column(Text)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    area: Mapped[int] = mapped_column(AREA)
    bbox_xywh: Mapped[list[Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16), default="manual")
    review_state: Mapped[str] = mapped_column(String(16), default="accepted")
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    prompts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    annotator_id: Mapped[int | None] = mapped_column(ForeignKey("annotators.id", ondelete="SET NULL"))
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("annotators.id", ondelete="SET NULL"))
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    seconds_spent: Mapped[float | None] = mapped_column(Float)
    predicted_iou: Mapped[float | None] = mapped_column(Float)
    stability_score: Mapped[float | None] = mapped_column(Float)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    # The client's key of the edit that made this revision (migration 0008; NULL: the last change carried none).
    last_edit_uuid: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    image: Mapped[Image] = relationship(back_populates="annotations")
    annotator: Mapped[Annotator | None] = relationship(foreign_keys=[annotator_id])
    reviewer: Mapped[Annotator | None] = relationship(foreign_keys=[reviewer_id])
    model_version: Mapped[ModelVersion | None] = relationship()

    __table_args__ = (
        CheckConstraint("source IN ('manual', 'semi', 'auto')", name="ck_annotations_source"),
        CheckConstraint("review_state IN ('accepted', 'pending', 'rejected')", name="ck_annotations_review_state"),
        Index("ix_annotations_image_state", "image_id", "review_state"),
    )
