"""The annotation store: one object over a SQLite file or a PostgreSQL server.

``open_store(target)`` takes a project folder (its ``segany.db`` SQLite file is created there), a
``.db`` file, or any SQLAlchemy URL (``postgresql+psycopg://user@host:port/db``), applies the
packaged Alembic migrations up to head, and returns a :class:`Store`.

Every public call is one transaction, marked as a read or a write (:meth:`Store.transaction`). SQLite runs
in WAL mode with a busy timeout; a write takes the write lock at ``BEGIN`` (``BEGIN IMMEDIATE``), so
concurrent writers queue instead of failing half-way, while a read starts deferred and reads its snapshot
without waiting for a writer. A read transaction cannot write (SQLite ``query_only``, PostgreSQL ``READ
ONLY``, and a check before the ORM flushes), so no read can turn into a write that deadlocks on SQLite's lock
upgrade. On PostgreSQL an edit or delete reads its annotation ``FOR UPDATE`` and a merge of a project's labels
or settings reads the project row ``FOR NO KEY UPDATE``, so a revision or role check cannot pass for two
requests at once and no merge overwrites another. Inserts that may race on a unique key (an image's content,
a project's or annotator's name) skip or report the row another client committed first instead of failing
with a database error. Annotation saves carry a client-made UUID: a save retried after a lost response finds
the row it already wrote instead of writing a second one.

Each process keeps a pool of at most ``SEGANY_DB_POOL_SIZE`` (default 5) PostgreSQL connections plus
``SEGANY_DB_MAX_OVERFLOW`` (default 5) opened under load and closed again, so a server, a few engine jobs and
the CLI stay well below the server's ``max_connections`` (100 by default).

Methods return plain dicts (JSON-ready) so nothing outside a transaction touches a live ORM row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import uuid as uuid_lib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, delete, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction, sessionmaker

from segany.data.walk import walk_files
from segany.engine import db
from segany.engine.db import (
    Annotation,
    Annotator,
    DatasetVersion,
    DatasetVersionItem,
    DeletedAnnotation,
    Image,
    ModelVersion,
    Project,
)
from segany.engine.masks import encode_mask, normalize_rle, rle_area_bbox
from segany.errors import InputError, SeganyError
from segany.hashing import file_digest

log = logging.getLogger(__name__)

DB_FILENAME = "segany.db"
MEDIA_DIRNAME = "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_PG_MIGRATION_LOCK = 0x5E6A_0001
_PG_IMAGES_LOCK = 0x5E6A_0002  # with a project id: that project's image inserts (Store._insert_images)


class StoreError(SeganyError):
    """The store could not do what was asked (unknown project, missing row, conflicting write)."""


class NotFoundError(StoreError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConflictError(StoreError):
    """A write conflicts with what is stored (e.g. an idempotency key reused for another image)."""


class ReadOnlyTransactionError(StoreError):
    """Something tried to write inside a transaction opened with ``write=False`` (a bug in the caller: open it
    with :meth:`Store.transaction` as a write)."""


class InvalidAnnotationError(InputError):
    """An annotation a dataset must not hold: an empty mask, or a label the project does not declare (the
    server answers 422)."""


EMPTY_MASK_MESSAGE = ("the mask is empty (no pixel set), so it annotates nothing; send a mask with at least one "
                      "pixel, or delete the annotation instead")


# C0 and C1 control characters (NUL, tab, newline, escape, DEL, ...) and lone UTF-16 surrogates (JSON's "\ud800").
# PostgreSQL's text cannot hold NUL and no encoder writes a lone surrogate, so either made the database call fail
# (a 500 in the server) after SQLite had taken it; the others would break the one-name-per-line files exports
# write (YOLO's names, a CSV) or show as nothing in the app.
_NOT_PLAIN_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def plain_text_problem(value: str) -> str | None:
    """Why ``value`` cannot be a label or a name (a control character or a lone surrogate, named), or None."""
    m = _NOT_PLAIN_TEXT.search(value)
    if m is None:
        return None
    ch = m.group()
    kind = "a lone UTF-16 surrogate" if "\ud800" <= ch <= "\udfff" else "the control character"
    return (f"contains {kind} U+{ord(ch):04X} at position {m.start()}; labels and names are plain text on one "
            "line: remove it (no NUL, tab, newline or other control characters)")


def label_name(label: str) -> str:
    """The label as stored: stripped, at most 200 characters, "object" when empty. One rule for every write
    and for comparing a retried request with the row it wrote."""
    return label.strip()[:200] or "object"


def declared_names(labels: Iterable[str]) -> set[str]:
    """A project's declared labels as a mask's label is compared with them (:func:`label_name`); a label stored
    before labels were normalised (" dog") answers to its stripped name."""
    return {label_name(d) for d in labels if d.strip()}


def check_plain_text(what: str, value: str) -> str:
    """``value`` if it is plain text, else :class:`InputError` naming ``what``, the character and the fix."""
    problem = plain_text_problem(value)
    if problem is not None:
        raise InputError(f"{what} {value[:80]!r} {problem}")
    return value


def resolve_target(target: str | os.PathLike[str]) -> tuple[str, Path | None]:
    """Map a CLI target to (SQLAlchemy URL, project folder or None)."""
    t = str(target)
    if not t.strip():
        # Path("") is the current folder: an empty argument (an unset shell variable) would silently make or
        # open a project wherever the command happens to run.
        raise StoreError("the project target is empty; pass a project folder, a .db file or a database URL "
                         "(postgresql://USER@HOST[:PORT]/DB)")
    if "://" in t:
        # postgres:// is what Heroku, Render and many .env files write; SQLAlchemy knows only postgresql://.
        for scheme in ("postgresql://", "postgres://"):
            if t.startswith(scheme):  # default to the psycopg 3 driver we depend on
                t = "postgresql+psycopg://" + t[len(scheme):]
        return t, None
    p = Path(t).expanduser().resolve()
    if p.suffix in (".db", ".sqlite", ".sqlite3"):
        return f"sqlite:///{p}", p.parent
    return f"sqlite:///{p / DB_FILENAME}", p


# Marks the connections of read-only transactions (Store.transaction(write=False)).
_READ_ONLY = "segany_read_only"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads then writes can fail with SQLITE_BUSY without waiting when
        # another writer got in between; taking the write lock up front makes writers queue on busy_timeout.
        # A read-only transaction needs no lock: under WAL it reads its snapshot while a writer works, and
        # query_only makes any write in it fail at once instead of upgrading its lock (the SQLITE_BUSY case).
        read_only = bool(conn.get_execution_options().get(_READ_ONLY))
        if conn.info.get(_READ_ONLY, False) != read_only:  # conn.info lives as long as the pooled connection
            conn.exec_driver_sql(f"PRAGMA query_only={int(read_only)}")
            conn.info[_READ_ONLY] = read_only
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


DEFAULT_POOL_SIZE = 5
DEFAULT_MAX_OVERFLOW = 5


def _env_count(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise StoreError(f"{name} must be a whole number of connections (0 or more), got {raw!r}; "
                         f"unset it for the default of {default}")
    return int(raw)


def make_engine(url: str, *, pool_size: int | None = None, max_overflow: int | None = None) -> Engine:
    """An engine for ``url``. PostgreSQL connections are pooled per process: ``pool_size`` kept open
    (default ``SEGANY_DB_POOL_SIZE`` or 5) plus ``max_overflow`` more under load (``SEGANY_DB_MAX_OVERFLOW`` or
    5); a request that finds all in use waits up to 60 s for one."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _configure_sqlite(engine)
        return engine
    if url.startswith("postgresql"):
        size = _env_count("SEGANY_DB_POOL_SIZE", DEFAULT_POOL_SIZE) if pool_size is None else pool_size
        overflow = (_env_count("SEGANY_DB_MAX_OVERFLOW", DEFAULT_MAX_OVERFLOW) if max_overflow is None
                    else max_overflow)
        if size + overflow < 1:
            raise StoreError("SEGANY_DB_POOL_SIZE + SEGANY_DB_MAX_OVERFLOW must allow at least one connection")
        return create_engine(url, pool_size=size, max_overflow=overflow, pool_pre_ping=True, pool_timeout=60)
    return create_engine(url)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Apply the packaged Alembic migrations up to ``revision`` (safe to call from many processes at once)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


# ----------------------------------------------------------------------------------------------- dicts
def project_dict(p: Project) -> dict[str, Any]:
    return {"id": p.id, "name": p.name, "stage": p.stage, "labels": list(p.labels or []),
            "media_dir": p.media_dir, "settings": dict(p.settings or {})}


def image_dict(im: Image) -> dict[str, Any]:
    return {"id": im.id, "project_id": im.project_id, "file_name": im.file_name, "path": im.path,
            "width": im.width, "height": im.height, "sha256": im.sha256}


def annotation_dict(a: Annotation) -> dict[str, Any]:
    return {
        "id": a.id, "uuid": a.uuid, "image_id": a.image_id, "label": a.label,
        "segmentation": {"size": [a.height, a.width], "counts": a.rle_counts},
        "area": a.area, "bbox": list(a.bbox_xywh), "source": a.source, "review_state": a.review_state,
        "model_version_id": a.model_version_id, "prompts": a.prompts or {}, "annotator_id": a.annotator_id,
        "reviewer_id": a.reviewer_id, "reviewed_at": a.reviewed_at.isoformat() if a.reviewed_at else None,
        "seconds_spent": a.seconds_spent, "predicted_iou": a.predicted_iou, "stability_score": a.stability_score,
        "revision": a.revision,
        "created_at": a.created_at.isoformat() if a.created_at else None,
        "updated_at": a.updated_at.isoformat() if a.updated_at else None,
    }


def _annotator_dict(a: Annotator) -> dict[str, Any]:
    return {"id": a.id, "name": a.name, "active": a.active, "role": a.role}


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`segany.engine.db.ROLES`, else :class:`InputError` listing them."""
    if role not in db.ROLES:
        raise InputError(f"role must be one of {', '.join(db.ROLES)}, got {role!r} (annotator: own masks and "
                         "machine proposals; reviewer: also anyone's; admin: also the project)")
    return role


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _refuse_flush(session: Session, _flush: UOWTransaction, _instances: object) -> None:
    if session.new or session.deleted or any(session.is_modified(o) for o in session.dirty):
        raise ReadOnlyTransactionError("an ORM change was flushed inside a read-only transaction; open it with "
                                       "store.transaction() (a write) instead of transaction(write=False)")


def _refuse_dml(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        raise ReadOnlyTransactionError("an insert, update or delete ran inside a read-only transaction; open it "
                                       "with store.transaction() (a write) instead of transaction(write=False)")


def check_labels(labels: Iterable[str]) -> list[str]:
    """``labels`` as a list of distinct names stored as an annotation's label is (:func:`label_name`), each
    checked by :func:`check_plain_text`; an empty one is refused.

    Why the same rule: a mask's label is compared with the declared ones after :func:`label_name`, so a
    declared " dog" or a 250-character name could never be used.
    """
    out = []
    for label in labels:
        if not isinstance(label, str):
            raise InputError(f"labels must be strings, got {type(label).__name__} {label!r}")
        check_plain_text("label", label)
        if not label.strip():
            raise InputError(f"label {label!r} is empty: give each label a name, or leave it out")
        out.append(label_name(label))
    return list(dict.fromkeys(out))


# FOR NO KEY UPDATE on PostgreSQL (nothing on SQLite, whose writers already run one at a time): it excludes other
# read-modify-writes of the project row but not the FOR KEY SHARE lock that inserting an image (a foreign key to
# the project) takes, so a long import that holds it does not stop uploads to the project.
_LOCK_PROJECT = {"key_share": True}
# FOR KEY SHARE on PostgreSQL: what a foreign key to the row takes, read up front so that a concurrent delete of the
# row finishes first (the row is then gone) or waits for this transaction, instead of failing its insert.
_KEEP_ROW = {"read": True, "key_share": True}

# Records an import decides per round of queries: its IN lists stay under old SQLite's 999 parameters.
_IMPORT_BATCH = 400
_ROWS_PER_INSERT = 100  # rows per multi-row INSERT: 700 parameters, under old SQLite's limit of 999


def _insert_skipping_conflicts(s: Session, table: Any, keys: Sequence[str]) -> Any:
    """``INSERT INTO table ... ON CONFLICT (keys) DO NOTHING`` in the session's dialect (SQLite or PostgreSQL)."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=list(keys))
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing(index_elements=list(keys))


# Keys an import writes into an annotation's prompts (segany.engine.exports); edits never drop them.
_IMPORT_MARKERS = ("imported_from", "import_digest")


class Store:
    """Transactions over the data-engine tables. Thread-safe: each call uses its own session."""

    def __init__(self, engine: Engine, project_dir: Path | None = None) -> None:
        self.engine = engine
        self.project_dir = project_dir
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        read_only: dict[str, Any] = {_READ_ONLY: True}
        if engine.dialect.name == "postgresql":
            read_only["postgresql_readonly"] = True  # BEGIN READ ONLY; reset when the connection is returned
        self._read_sessions = sessionmaker(engine.execution_options(**read_only), expire_on_commit=False)
        event.listen(self._read_sessions, "before_flush", _refuse_flush)
        event.listen(self._read_sessions, "do_orm_execute", _refuse_dml)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception.

        ``write=False`` opens a read-only one. On SQLite it starts deferred, so it reads while a long write
        (an import, a removal) runs instead of queueing behind it; a write transaction (the default) takes
        the write lock at ``BEGIN``. Anything that writes inside a read-only transaction raises
        :class:`ReadOnlyTransactionError` (ORM changes and insert/update/delete statements) or the database's
        read-only error (raw SQL), so pass ``write=False`` only where nothing is written.
        """
        with (self._sessions if write else self._read_sessions)() as session, session.begin():
            yield session

    # ------------------------------------------------------------------------------------ projects
    def create_project(self, name: str, *, media_dir: str | os.PathLike[str] | None = None,
                       labels: Iterable[str] = (), stage: str = "manual") -> dict[str, Any]:
        _check_choice("stage", stage, db.STAGES)
        if not name or len(name) > 200:
            raise InputError(f"project name must be 1-200 characters, got {name!r}")
        check_plain_text("project name", name)
        labels = check_labels(labels)
        taken = ConflictError(f"project {name!r} already exists; pick another --name")
        try:
            with self.transaction() as s:
                if s.scalar(select(Project.id).where(Project.name == name)) is not None:
                    raise taken
                p = Project(name=name, media_dir=str(media_dir) if media_dir else None, labels=labels,
                            stage=stage, settings={})
                s.add(p)
                s.flush()
                return project_dict(p)
        except IntegrityError as exc:  # another client created it between our check and our insert
            if self._exists(select(Project.id).where(Project.name == name)):
                raise taken from exc
            raise

    def _exists(self, query: Any) -> bool:
        with self.transaction(write=False) as s:
            return s.scalar(query.limit(1)) is not None

    def list_projects(self) -> list[dict[str, Any]]:
        with self.transaction(write=False) as s:
            return [project_dict(p) for p in s.scalars(select(Project).order_by(Project.id))]

    def get_project(self, name: str | None = None) -> dict[str, Any]:
        """The project called ``name``; without a name, the only (or first) project."""
        with self.transaction(write=False) as s:
            if name is None:
                p = s.scalar(select(Project).order_by(Project.id).limit(1))
                if p is None:
                    raise NotFoundError("the store has no project yet; run `segany project create DIR` first")
            else:
                p = s.scalar(select(Project).where(Project.name == check_plain_text("project name", name)))
                if p is None:
                    known = ", ".join(s.scalars(select(Project.name))) or "none"
                    raise NotFoundError(f"no project named {name!r} (known: {known})")
            return project_dict(p)

    def update_project(self, project_id: int, *, labels: Sequence[str] | None = None, stage: str | None = None,
                       settings: dict[str, Any] | None = None) -> dict[str, Any]:
        if labels is not None:
            labels = check_labels(labels)
        with self.transaction() as s:
            # Locked (PostgreSQL) before the merge reads settings: two merges at once (retrain's current_model,
            # auto's redo marker) would each write back the settings they read, losing the other's key.
            p = s.get(Project, project_id, with_for_update=_LOCK_PROJECT)
            if p is None:
                raise NotFoundError(f"no project with id {project_id}")
            if labels is not None:
                p.labels = list(dict.fromkeys(labels))
            if stage is not None:
                p.stage = _check_choice("stage", stage, db.STAGES)
            if settings is not None:
                p.settings = {**(p.settings or {}), **settings}
            return project_dict(p)

    # -------------------------------------------------------------------------------------- images
    def add_images(self, project_id: int, paths: Iterable[str | os.PathLike[str]], *,
                   skip_invalid: bool = False) -> list[dict[str, Any]]:
        """Register image files (folders are searched for images); an image already present is skipped.

        Files are referenced where they are, by absolute path; sizes and checksums are read now. Every file is
        read before anything is written, so one bad file adds nothing and the error lists all bad files; with
        ``skip_invalid`` the good ones are added (see :meth:`add_images_report` for the skipped ones).
        """
        return self.add_images_report(project_id, paths, skip_invalid=skip_invalid)[0]

    def add_images_report(self, project_id: int, paths: Iterable[str | os.PathLike[str]], *,
                          skip_invalid: bool = False) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
        """:meth:`add_images`, also returning the files skipped as unreadable, each with the reason."""
        files = collect_image_files(paths)
        rows, bad = read_image_files(files)
        if bad and not skip_invalid:
            # A lone bad file (an upload) gets no hint about a flag that would add nothing.
            fix = ("fix or remove them, or pass --skip-invalid to add the others" if rows
                   else "pass JPEG, PNG, TIFF, BMP or WebP files")
            raise InputError(bad_images_message(bad, fix))
        with self.transaction() as s:
            return self._insert_images(s, project_id, rows), bad

    @staticmethod
    def _insert_images(s: Session, project_id: int, rows: Sequence[ImageRow]) -> list[dict[str, Any]]:
        """Add ``rows`` to the project inside the caller's transaction, skipping content it already holds.

        Content another client adds at the same moment (two uploads of one file, the CLI and the server) is
        skipped too: the insert is ``ON CONFLICT DO NOTHING`` on (project, sha256), so the later transaction
        adds nothing for it instead of failing on the unique key. On PostgreSQL the project's image inserts also
        take turns (a transaction-scoped advisory lock): two transactions adding overlapping sets in different
        orders would otherwise each wait for a row the other inserted, a deadlock. Ids follow ``rows``' order.
        """
        if s.get(Project, project_id) is None:
            raise NotFoundError(f"no project with id {project_id}")
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k, :p)"), {"k": _PG_IMAGES_LOCK, "p": project_id})
        seen = set(s.scalars(select(Image.sha256).where(Image.project_id == project_id)))
        fresh: list[ImageRow] = []
        for f, h, w, digest in rows:
            if digest in seen:
                log.info("skipping %s: same content already in the project", f)
                continue
            seen.add(digest)
            fresh.append((f, h, w, digest))
        now = db.utcnow()
        ids: dict[str, int] = {}
        for start in range(0, len(fresh), _ROWS_PER_INSERT):
            values = [{"project_id": project_id, "path": str(f), "file_name": f.name, "width": w, "height": h,
                       "sha256": digest, "created_at": now}
                      for f, h, w, digest in fresh[start:start + _ROWS_PER_INSERT]]
            stmt = _insert_skipping_conflicts(s, Image.__table__, ("project_id", "sha256"))
            ids.update((sha, i) for i, sha in s.execute(stmt.values(values).returning(Image.id, Image.sha256)))
        out = []
        for f, h, w, digest in fresh:
            if digest not in ids:
                log.info("skipping %s: another client added the same content just now", f)
                continue
            out.append(image_dict(Image(id=ids[digest], project_id=project_id, path=str(f), file_name=f.name,
                                        width=w, height=h, sha256=digest)))
        return out

    def remove_images(self, project_id: int, which: Sequence[str]) -> list[dict[str, Any]]:
        """Unregister images named by id, registered path or file name, with their annotations; returns them.

        The files stay where they are. Frozen dataset versions keep their snapshots of these masks (a model's
        training data stays described). Every name must match exactly one image, checked before anything is
        deleted, so a typo removes nothing.
        """
        with self.transaction() as s:
            images = list(s.scalars(select(Image).where(Image.project_id == project_id)))
            chosen: dict[int, Image] = {}
            for w in which:
                as_path = str(Path(w).expanduser().resolve())
                hits = [im for im in images if str(im.id) == w or im.path == as_path or im.file_name == w]
                if len(hits) != 1:
                    why = "matches no image" if not hits else f"matches {len(hits)} images (pass the id or path)"
                    raise InputError(f"{w!r} {why} in this project; `segany project stats` or the app lists them")
                chosen[hits[0].id] = hits[0]
            out = [image_dict(im) for im in chosen.values()]
            # The images are locked first, in id order, before the cascade locks their annotations: an import
            # or a stage-3 write locks images before annotations in that order too, so no two wait on each other.
            s.execute(select(Image.id).where(Image.id.in_(list(chosen))).order_by(Image.id).with_for_update())
            for im in chosen.values():
                s.delete(im)  # annotations go with it (ORM cascade); done markers by the foreign key
            return out

    def list_images(self, project_id: int) -> list[dict[str, Any]]:
        """Images in id order, each with counts of accepted and pending annotations."""
        with self.transaction(write=False) as s:
            counts: dict[tuple[int, str], int] = {}
            q = (select(Annotation.image_id, Annotation.review_state, func.count())
                 .join(Image, Image.id == Annotation.image_id)
                 .where(Image.project_id == project_id)
                 .group_by(Annotation.image_id, Annotation.review_state))
            for image_id, state, n in s.execute(q):
                counts[(image_id, state)] = n
            out = []
            for im in s.scalars(select(Image).where(Image.project_id == project_id).order_by(Image.id)):
                d = image_dict(im)
                d["accepted"] = counts.get((im.id, "accepted"), 0)
                d["pending"] = counts.get((im.id, "pending"), 0)
                out.append(d)
            return out

    def get_image(self, project_id: int, image_id: int) -> dict[str, Any]:
        with self.transaction(write=False) as s:
            im = s.get(Image, image_id)
            if im is None or im.project_id != project_id:
                raise NotFoundError(f"no image with id {image_id} in this project")
            return image_dict(im)

    # ---------------------------------------------------------------------------------- annotators
    def add_annotator(self, name: str, role: str = "annotator") -> str:
        """Create an annotator with ``role`` (see :data:`segany.engine.db.ROLES`) and return their bearer token
        (shown once; only its hash is stored)."""
        if not name or len(name) > 200:
            raise InputError(f"annotator name must be 1-200 characters, got {name!r}")
        check_plain_text("annotator name", name)
        if name != name.strip():  # "alice " beside "alice": two rows that print alike, set-role finds one
            raise InputError(f"annotator name {name!r} starts or ends with spaces; write it without them")
        check_role(role)
        token = secrets.token_urlsafe(32)
        taken = ConflictError(f"annotator {name!r} already exists; use another name or `--rotate`")
        try:
            with self.transaction() as s:
                if s.scalar(select(Annotator.id).where(Annotator.name == name)) is not None:
                    raise taken
                alike = [n for n in s.scalars(select(Annotator.name)) if n.casefold() == name.casefold()]
                if alike:
                    raise ConflictError(f"annotator {alike[0]!r} already exists, {name!r} differs only by case; "
                                        f"use that name (`--rotate` gives a new token) or a clearly different one")
                s.add(Annotator(name=name, token_hash=hash_token(token), active=True, role=role))
        except IntegrityError as exc:  # another client added the name between our check and our insert
            if self._exists(select(Annotator.id).where(Annotator.name == name)):
                raise taken from exc
            raise
        return token

    def rotate_token(self, name: str) -> str:
        token = secrets.token_urlsafe(32)
        with self.transaction() as s:
            a = self._annotator_named(s, name)
            a.token_hash = hash_token(token)
        return token

    def set_role(self, name: str, role: str) -> dict[str, Any]:
        """Give the annotator called ``name`` the role ``role``; returns them as :meth:`list_annotators` does."""
        check_role(role)
        with self.transaction() as s:
            a = self._annotator_named(s, name)
            a.role = role
            return _annotator_dict(a)

    @staticmethod
    def _annotator_named(s: Session, name: str) -> Annotator:
        a = s.scalar(select(Annotator).where(Annotator.name == check_plain_text("annotator name", name)))
        if a is None:
            known = ", ".join(s.scalars(select(Annotator.name).order_by(Annotator.id))) or "none"
            raise NotFoundError(f"no annotator named {name!r} (known: {known}); create one with "
                                "`segany project add-annotator DIR NAME`")
        return a

    def authenticate(self, token: str) -> dict[str, Any] | None:
        """The active annotator owning ``token`` (id, name, role), or None."""
        if not token:
            return None
        with self.transaction(write=False) as s:
            a = s.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token), Annotator.active))
            return None if a is None else {"id": a.id, "name": a.name, "role": a.role}

    def list_annotators(self) -> list[dict[str, Any]]:
        with self.transaction(write=False) as s:
            return [_annotator_dict(a) for a in s.scalars(select(Annotator).order_by(Annotator.id))]

    # ------------------------------------------------------------------------------ model versions
    def register_model_version(self, name: str, model_type: str, checkpoint_path: str | None = None, *,
                               checkpoint_sha256: str | None = None, parent_id: int | None = None,
                               trained_on_id: int | None = None, meta: dict[str, Any] | None = None) -> int:
        """Id of the model version called ``name``, created on first use."""
        for _ in range(2):  # a concurrent first registration may win the unique name; then read it
            try:
                with self.transaction() as s:
                    mv = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
                    if mv is None:
                        mv = ModelVersion(name=name, model_type=model_type, checkpoint_path=checkpoint_path,
                                          checkpoint_sha256=checkpoint_sha256, parent_id=parent_id,
                                          trained_on_id=trained_on_id, meta=dict(meta or {}))
                        s.add(mv)
                        s.flush()
                    return mv.id
            except IntegrityError:
                continue
        raise StoreError(f"could not register model version {name!r}")

    def list_model_versions(self) -> list[dict[str, Any]]:
        with self.transaction(write=False) as s:
            return [{"id": m.id, "name": m.name, "model_type": m.model_type, "checkpoint_path": m.checkpoint_path,
                     "parent_id": m.parent_id, "trained_on_id": m.trained_on_id, "meta": m.meta}
                    for m in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]

    # --------------------------------------------------------------------------------- annotations
    def save_annotation(
        self,
        image_id: int,
        *,
        mask: np.ndarray | None = None,
        rle: dict[str, Any] | None = None,
        uuid: str | None = None,
        label: str = "object",
        source: str = "manual",
        review_state: str | None = None,
        model_version_id: int | None = None,
        prompts: dict[str, Any] | None = None,
        annotator_id: int | None = None,
        seconds_spent: float | None = None,
        predicted_iou: float | None = None,
        stability_score: float | None = None,
        project_id: int | None = None,
        declared_label: bool = False,
        same_save: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Store one mask (a bool array or any COCO RLE); returns (annotation, created).

        ``uuid`` is the idempotency key: saving the same uuid again returns the stored row and
        ``created=False`` without writing. Reusing a uuid for another image raises :class:`ConflictError`, and so
        does, with ``same_save``, a replay that is not a retry of this save: another annotator's row, or another
        mask or label (compared as :func:`_differs_from_edit` compares an edit's retry), which answered with the
        stored row would drop this save without a word. Without it (the engine's machine uuids) the stored row
        is answered whatever this call sends.

        ``declared_label`` refuses a label the project does not declare (:class:`InvalidAnnotationError`
        naming the declared ones, so a typo does not become a new class in every export; a project without
        declared labels takes any label). It is checked after the replay: a retry is answered with its stored
        row although its label would be refused now (a model proposal's label, allowed when the server still
        remembered proposing it), and before the size and empty-mask checks, so a new save with an undeclared
        label is told so before those. (A malformed RLE or a bad ``seconds_spent`` is refused before the
        transaction, so before the label.)
        """
        _check_choice("source", source, db.SOURCES)
        if review_state is None:
            review_state = "pending" if source in ("semi", "auto") and annotator_id is None else "accepted"
        _check_choice("review_state", review_state, db.REVIEW_STATES)
        key = _check_uuid(uuid) if uuid else str(uuid_lib.uuid4())
        if (mask is None) == (rle is None):
            raise InputError("give exactly one of mask (H, W) array or rle")
        enc = encode_mask(mask) if mask is not None else normalize_rle(rle)  # type: ignore[arg-type]
        area, bbox = rle_area_bbox(enc)
        seconds_spent = check_seconds(seconds_spent)
        predicted_iou = check_finite("predicted_iou", predicted_iou)
        stability_score = check_finite("stability_score", stability_score)
        check_finite_json("prompts", prompts)
        label = check_plain_text("label", label_name(label or "object"))
        retry = _SaveRetry(enc, label, annotator_id) if same_save else None
        try:
            with self.transaction() as s:
                # The image first: a replayed uuid must not answer for an image outside the caller's project.
                # Read FOR KEY SHARE (PostgreSQL), so a removal of the image either waits for this save or has
                # finished (no image: 404); the insert below then cannot fail on its foreign key (it was a 500).
                im = s.get(Image, image_id, with_for_update=_KEEP_ROW)
                if im is None or (project_id is not None and im.project_id != project_id):
                    raise NotFoundError(f"no image with id {image_id} in this project")
                existing = s.scalar(select(Annotation).where(Annotation.uuid == key))
                if existing is not None:
                    return self._replay(s, existing, im, retry), False
                if declared_label:
                    self._refuse_undeclared(list(s.get(Project, im.project_id).labels or []), label)
                if tuple(enc["size"]) != (im.height, im.width):
                    raise InputError(f"mask size {enc['size']} does not match image {image_id}'s "
                                     f"[height, width] = [{im.height}, {im.width}]")
                if area == 0:  # after the size check: a mask for another image is that mistake, not this one
                    raise InvalidAnnotationError(EMPTY_MASK_MESSAGE)
                a = Annotation(
                    uuid=key, image_id=image_id, label=label, rle_counts=enc["counts"], height=im.height,
                    width=im.width, area=area, bbox_xywh=bbox, source=source, review_state=review_state,
                    model_version_id=model_version_id, prompts=dict(prompts or {}), annotator_id=annotator_id,
                    seconds_spent=seconds_spent, predicted_iou=predicted_iou, stability_score=stability_score,
                    revision=1,
                )
                s.add(a)
                s.flush()
                return annotation_dict(a), True
        except IntegrityError:
            # Another request with the same key committed between our read and our insert (or the image was
            # removed meanwhile, where the lock above is not taken).
            prior = self._stored_save(project_id, image_id, key, retry)
            if prior is None:
                raise
            return prior, False

    def _stored_save(self, project_id: int | None, image_id: int, key: str,
                     retry: _SaveRetry | None) -> dict[str, Any] | None:
        """The row stored under ``key`` on this project's image ``image_id`` (any project's with ``project_id``
        None), None when nothing is; a key on another image, or (``retry``) another save's, is a
        :class:`ConflictError`, as in a replay."""
        with self.transaction(write=False) as s:
            im = s.get(Image, image_id)
            if im is None or (project_id is not None and im.project_id != project_id):
                raise NotFoundError(f"no image with id {image_id} in this project")
            existing = s.scalar(select(Annotation).where(Annotation.uuid == key))
            return None if existing is None else self._replay(s, existing, im, retry)

    @staticmethod
    def _replay(s: Session, existing: Annotation, image: Image, retry: _SaveRetry | None = None) -> dict[str, Any]:
        """The stored row for a repeated uuid, if it is on ``image``; a uuid used on another image is a conflict,
        whose message names that image only when it is in the same project (ids elsewhere are not the caller's).
        ``retry``: also a conflict unless the row is that save's (see :meth:`save_annotation`'s ``same_save``)."""
        if existing.image_id != image.id:
            other = s.get(Image, existing.image_id)
            where = (f"image {existing.image_id}" if other is not None and other.project_id == image.project_id
                     else "another image")
            raise ConflictError(f"annotation uuid {existing.uuid} was already used on {where}; "
                                "generate a new uuid for each new annotation")
        if retry is not None:
            differs = _differs_from_edit(existing, mask=None, rle=retry.rle, label=retry.label, review_state=None,
                                         annotator_id=None, prompts=None, expected_revision=None)
            if existing.annotator_id != retry.annotator_id:  # someone else's row (a machine's: None)
                differs.append("annotator_id")
            if differs:
                raise ConflictError(f"annotation uuid {existing.uuid} already names another annotation (this save "
                                    f"differs from it in {', '.join(differs)}); generate a new uuid for each new "
                                    "annotation")
        return annotation_dict(existing)

    def import_annotations(self, project_id: int, *, new_images: Sequence[ImageRow], labels: Sequence[str],
                           records: Sequence[dict[str, Any]], restore_deleted: bool = False) -> dict[str, int]:
        """Add images, labels and annotations from a file in ONE transaction: a failure leaves nothing behind.

        Each record has ``image_sha256`` (the image, by content), ``key`` (a uuid derived by the caller from the
        project, the image's content and the record's id in its file), ``rle`` (compressed), ``label``,
        ``source``, ``prompts``, ``seconds_spent`` and ``predicted_iou`` (and optionally ``legacy_key``, the key an
        older import gave it, looked up on the same image when ``key`` is not found). A record is *unchanged* when its
        key is already stored as it is; a *duplicate* when its key is not stored but an annotation with the same mask
        and label is on that image (a file exported from a project and imported back, or a file holding one mask
        twice): it is not added again; *updated* when its key is stored with another mask or label (the file was
        edited); *kept_deleted* when it is not stored
        and its ``key`` or ``legacy_key`` names an annotation deleted in the project since an earlier import (see
        :meth:`delete_annotation`): it stays deleted, unless ``restore_deleted``, which imports it as if it were
        new and forgets the deletion; else *created*.

        Returns counts: ``images_added``, ``created``, ``updated``, ``unchanged``, ``duplicate``, ``kept_deleted``.
        """
        counts = {"images_added": 0, "created": 0, "updated": 0, "unchanged": 0, "duplicate": 0, "kept_deleted": 0}
        for r in records:  # before the transaction: a bad record writes nothing
            try:
                check_finite("predicted_iou", r.get("predicted_iou"))
                check_seconds(r.get("seconds_spent"))
                check_finite_json("prompts", r.get("prompts"))
                check_plain_text("label", r["label"])
            except InputError as exc:
                raise InputError(f"import record {r.get('key')}: {exc}") from exc
        labels = check_labels(labels)
        with self.transaction() as s:
            # Locked (PostgreSQL) before its labels are read: two imports adding labels at once would each write
            # back the list they read. It also runs one import of a project at a time.
            p = s.get(Project, project_id, with_for_update=_LOCK_PROJECT)
            if p is None:
                raise NotFoundError(f"no project with id {project_id}")
            counts["images_added"] = len(self._insert_images(s, project_id, new_images))
            # FOR KEY SHARE (PostgreSQL): an image removed while this import runs either goes first (and is not
            # found here: the record is refused by name) or waits for it; without the lock the annotation insert
            # met the removal's committed delete as a raw foreign-key violation.
            # In id order, as a removal deletes, so the two cannot lock in crossed orders (a deadlock).
            by_sha = {im.sha256: im for im in s.scalars(select(Image).where(Image.project_id == project_id)
                                                        .order_by(Image.id)
                                                        .with_for_update(read=True, key_share=True))}
            deleted = {u: i for i, u in s.execute(select(DeletedAnnotation.id, DeletedAnnotation.uuid)
                                                  .where(DeletedAnnotation.project_id == project_id))}
            written: set[str] = set()
            for start in range(0, len(records), _IMPORT_BATCH):
                batch = records[start:start + _IMPORT_BATCH]
                for r, kind in zip(batch, self._import_batch(s, by_sha, batch, deleted, restore_deleted),
                                   strict=True):
                    counts[kind] += 1
                    if kind in ("created", "updated"):
                        written.add(label_name(r["label"]))
            # Only labels a written annotation carries: an import that added nothing declares nothing. A label
            # declared before labels were normalised (" dog") already is "dog": not added a second time.
            have = declared_names(p.labels or [])
            new = [n for n in labels if n in written and n not in have]
            if new:
                p.labels = list(dict.fromkeys([*(p.labels or []), *new]))
        return counts

    @staticmethod
    def _import_batch(s: Session, by_sha: dict[str, Image], batch: Sequence[dict[str, Any]],
                      deleted: dict[str, int], restore_deleted: bool) -> list[str]:
        """Create, update, leave or keep deleted each imported annotation of ``batch``; returns which, in order.

        Three queries for the whole batch (stored rows by key, rows holding the same masks, restored deletions)
        and one flush, instead of three statements per record: on a PostgreSQL server each is a round trip.
        Records are still decided one after another, as if each were written before the next is read: a key
        or a mask repeated inside the file finds the row made for its first occurrence.

        ``deleted`` maps the project's recorded deletions (uuid → row id); a restored one is removed from it."""
        images = []
        for r in batch:
            im = by_sha.get(r["image_sha256"])
            if im is None:  # the caller maps every record to an image it holds or adds
                raise StoreError(f"image with sha256 {r['image_sha256'][:12]}... is not in the project (removed "
                                 "while importing?); nothing was imported: rerun the import")
            rle = r["rle"]
            if tuple(rle["size"]) != (im.height, im.width):
                raise InputError(f"a mask of size {rle['size']} does not match image {im.file_name!r} "
                                 f"[height, width] = [{im.height}, {im.width}]; fix the file")
            images.append(im)
        keys = {r["key"] for r in batch} | {r["legacy_key"] for r in batch if r.get("legacy_key")}
        # Locked (PostgreSQL): an edit in the app between this read and the update below would be lost.
        by_uuid = {a.uuid: a for a in s.scalars(select(Annotation).where(Annotation.uuid.in_(keys))
                                                 .order_by(Annotation.id).with_for_update())}
        # Who holds each (image, mask, label) now: the stored rows that share a mask with the batch, kept up to
        # date below as records create and update rows (an id, or the key of a row not flushed yet).
        holders: dict[tuple[int, str, str], set[int | str]] = {}
        wanted = {(im.id, r["rle"]["counts"]) for r, im in zip(batch, images, strict=True)}
        q = (select(Annotation.id, Annotation.image_id, Annotation.rle_counts, Annotation.label)
             .where(Annotation.image_id.in_({iid for iid, _ in wanted}),
                    Annotation.rle_counts.in_({c for _, c in wanted})))
        for aid, iid, counts_, label in s.execute(q):
            if (iid, counts_) in wanted:
                holders.setdefault((iid, counts_, label), set()).add(aid)
        restored: list[int] = []
        kinds: list[str] = []
        for r, im in zip(batch, images, strict=True):
            rle = r["rle"]
            existing = by_uuid.get(r["key"])
            if existing is None and r.get("legacy_key"):  # an earlier import of this file under its old key
                old = by_uuid.get(r["legacy_key"])
                existing = old if old is not None and old.image_id == im.id else None
            if existing is not None and existing.image_id != im.id:
                raise ConflictError(f"import key {r['key']} already names an annotation on another image; "
                                    "report this")
            if existing is None:
                gone = [u for u in (r["key"], r.get("legacy_key")) if u and u in deleted]
                if gone and not restore_deleted:
                    kinds.append("kept_deleted")
                    continue
                restored.extend(deleted.pop(u) for u in gone)  # the deletion is forgotten: a later re-import keeps it
                content = (im.id, rle["counts"], r["label"])
                if holders.get(content):
                    kinds.append("duplicate")
                    continue
                area, bbox = rle_area_bbox(rle)
                made = Annotation(uuid=r["key"], image_id=im.id, label=r["label"], rle_counts=rle["counts"],
                                  height=im.height, width=im.width, area=area, bbox_xywh=bbox,
                                  source=r["source"], review_state="accepted", prompts=dict(r.get("prompts") or {}),
                                  seconds_spent=r.get("seconds_spent"), predicted_iou=r.get("predicted_iou"),
                                  revision=1)
                s.add(made)
                by_uuid[made.uuid] = made
                holders.setdefault(content, set()).add(made.uuid)
                kinds.append("created")
                continue
            digest = (r.get("prompts") or {}).get("import_digest")
            # The file says what it said at the last import: keep the stored row, which may have been edited in
            # the app since (a re-import must not undo a reviewer's fix).
            if (digest is not None and (existing.prompts or {}).get("import_digest") == digest) or \
                    (existing.rle_counts == rle["counts"] and existing.label == r["label"]):
                kinds.append("unchanged")
                continue
            me = existing.id if existing.id is not None else existing.uuid
            holders.get((existing.image_id, existing.rle_counts, existing.label), set()).discard(me)
            existing.prompts = {**(existing.prompts or {}), **(r.get("prompts") or {})}
            existing.rle_counts = rle["counts"]
            existing.area, existing.bbox_xywh = rle_area_bbox(rle)
            existing.label = r["label"]
            existing.revision += 1
            existing.last_edit_uuid = None  # (a retried app edit of the version before this is stale now)
            existing.updated_at = db.utcnow()
            holders.setdefault((im.id, rle["counts"], r["label"]), set()).add(me)
            kinds.append("updated")
        if restored:
            s.execute(delete(DeletedAnnotation).where(DeletedAnnotation.id.in_(restored)))
        s.flush()
        return kinds

    @staticmethod
    def _refuse_undeclared(labels: Sequence[str], label: str) -> None:
        name = label_name(label)
        if labels and name not in declared_names(labels):
            raise InvalidAnnotationError(f"label {name!r} is not one of this project's labels "
                                         f"({', '.join(labels)}); pick one of them, or an admin adds it to the "
                                         "project's labels")

    def get_annotation(self, annotation_id: int, project_id: int | None = None) -> dict[str, Any]:
        with self.transaction(write=False) as s:
            return annotation_dict(self._get_ann(s, annotation_id, project_id))

    @staticmethod
    def _get_ann(s: Session, annotation_id: int, project_id: int | None, *, lock: bool = False) -> Annotation:
        """The annotation ``annotation_id`` (in ``project_id`` if given); ``lock`` for a read-check-write.

        ``lock`` reads the row ``FOR UPDATE``: on PostgreSQL two transactions that both read revision 1 (or an
        open proposal) would otherwise both pass the revision and role checks and the later write would undo
        the earlier one. The second now waits for the first to commit and then sees its write. SQLite has no
        row locks and needs none: ``BEGIN IMMEDIATE`` already runs writers one at a time.
        """
        a = s.get(Annotation, annotation_id, with_for_update=lock)
        if a is None or (project_id is not None and a.image.project_id != project_id):
            raise NotFoundError(f"no annotation with id {annotation_id} in this project")
        return a

    @staticmethod
    def _check_uuid(a: Annotation, annotation_id: int, uuid: str | None) -> None:
        # Ids are reused after a delete (SQLite), so a client that still shows a deleted annotation could
        # otherwise edit or delete the new one that got its id; the uuid names the one it means.
        if uuid is not None and a.uuid != uuid:
            raise ConflictError(f"annotation {annotation_id} is not the one you had (uuid {uuid}): that one was "
                                f"deleted or replaced; reload the image")

    def update_annotation(self, annotation_id: int, *, project_id: int | None = None,
                          mask: np.ndarray | None = None, rle: dict[str, Any] | None = None,
                          label: str | None = None, review_state: str | None = None,
                          annotator_id: int | None = None, seconds_spent: float | None = None,
                          prompts: dict[str, Any] | None = None, expected_revision: int | None = None,
                          expected_uuid: str | None = None, by: int | None = None,
                          check: Callable[[dict[str, Any]], None] | None = None,
                          declared_label: bool = False, edit_uuid: str | None = None) -> dict[str, Any]:
        """Edit a stored annotation; ``declared_label`` refuses a new label the project does not declare (as
        :meth:`save_annotation`'s, after the conflict checks so a stale edit still reads as a conflict); ``expected_revision`` makes the edit fail if someone else edited first,
        ``expected_uuid`` (:class:`ConflictError`) if the id now names another annotation. ``check`` gets the
        annotation as stored, in the same transaction, and raises to refuse the edit (the server's role checks:
        no one can take a proposal between the check and the write).

        ``by`` is the annotator making the change; who gets credit is decided here, in the same transaction
        as the check, so it follows the row as stored:

        * accepting an annotation nobody owns (a machine proposal) makes ``by`` its annotator: they vouch
          for the mask. Rejecting one does not: nobody drew it, and the rejecter is not blamed for it.
        * accepting or rejecting anything, or changing anything of another person's annotation (mask, label,
          prompts), records ``by`` as ``reviewer_id`` with ``reviewed_at``; ``annotator_id`` stays who drew it.
          The annotator's own edits leave the last review as it was (``reviewed_at < updated_at`` shows the
          mask changed after it).
        * ``seconds_spent`` is the annotator's time on the mask, so it only grows when ``by`` is (now) the
          annotator; a reviewer's time on someone else's mask is not added to it.

        ``annotator_id`` reassigns the annotation outright (before ``by`` is applied).

        ``edit_uuid`` is the client's idempotency key of this edit, kept with the revision it makes: the same key
        again while that is still the annotation's last change (a retry after a lost answer) is answered with the
        row as stored, after the uuid and ``check`` checks (no ``check`` for a replay of ``by``'s own review: see
        the comment there), and changes nothing. Any change stores its own key or none, so once someone else has
        changed the annotation a retry is checked like any edit (409 if stale).
        The key sent with another edit (a field it sets is not as that edit left it, or another ``expected_revision``)
        is a :class:`ConflictError` naming the fields, not answered with the first edit's row (that would drop this
        one without a word); ``seconds_spent`` is not compared: a client sends the time until each try."""
        if mask is not None and rle is not None:
            raise InputError("give at most one of mask and rle")
        if review_state is not None:
            _check_choice("review_state", review_state, db.REVIEW_STATES)
        if label is not None:
            check_plain_text("label", label.strip())
        seconds_spent = check_seconds(seconds_spent)
        check_finite_json("prompts", prompts)
        edit_key = _check_uuid(edit_uuid, "edit_uuid") if edit_uuid is not None else None
        with self.transaction() as s:
            a = self._get_ann(s, annotation_id, project_id, lock=True)
            self._check_uuid(a, annotation_id, expected_uuid)
            replay = edit_key is not None and a.last_edit_uuid == edit_key
            # A replay of ``by``'s own review (the keyed change made this revision and recorded ``by`` as its
            # reviewer, then: an accept, a reject, an edit of another's mask) is not checked again: it passed the
            # check when it was applied and changes nothing now, while the row it made may no longer be ``by``'s
            # to review (an annotator's rejected proposal is nobody's open proposal any more), which made the
            # retry of an applied reject a false 403.
            own_review = replay and by is not None and a.reviewer_id == by and a.reviewed_at == a.updated_at
            if check is not None and not own_review:
                check(annotation_dict(a))
            if replay:
                # The row is what the keyed edit made (any later change replaces or clears the key), so a retry
                # sets each field to what it holds; anything else is another edit under a reused key.
                differs = _differs_from_edit(a, mask=mask, rle=rle, label=label, review_state=review_state,
                                             annotator_id=annotator_id, prompts=prompts,
                                             expected_revision=expected_revision)
                if differs:
                    # Worded for what this request is (the server's accept and reject send a review state and at
                    # most a label): "another edit" read oddly for a review. The earlier use is "another change":
                    # the row does not say whether it was an accept, a reject or an edit.
                    what = "edit"
                    if mask is None and rle is None and prompts is None and annotator_id is None:
                        what = {"accepted": "accept", "rejected": "reject"}.get(review_state or "", "edit")
                    raise ConflictError(
                        f"edit_uuid {edit_key} was already used for another change to annotation {annotation_id} "
                        f"(this {what} differs from it in {', '.join(differs)}); send a new edit_uuid for each new "
                        f"{what}, and the same one only to retry that {what} unchanged")
                return annotation_dict(a)  # this edit, applied already: answered again, not applied twice
            if expected_revision is not None and a.revision != expected_revision:
                raise ConflictError(f"annotation {annotation_id} is at revision {a.revision}, not "
                                    f"{expected_revision}: someone edited it; reload and edit again")
            if mask is not None or rle is not None:
                enc = encode_mask(mask) if mask is not None else normalize_rle(rle)  # type: ignore[arg-type]
                if tuple(enc["size"]) != (a.height, a.width):
                    raise InputError(f"mask size {enc['size']} does not match [{a.height}, {a.width}]")
                area, bbox = rle_area_bbox(enc)
                if area == 0:
                    raise InvalidAnnotationError(EMPTY_MASK_MESSAGE)
                a.rle_counts = enc["counts"]
                a.area, a.bbox_xywh = area, bbox
            if label is not None:
                if declared_label:
                    self._refuse_undeclared(list(s.get(Project, a.image.project_id).labels or []), label)
                a.label = label_name(label)
            if review_state is not None:
                a.review_state = review_state
            if annotator_id is not None:
                a.annotator_id = annotator_id
            now = db.utcnow()
            if by is not None:
                if a.annotator_id is None and review_state == "accepted":
                    a.annotator_id = by
                if review_state is not None or a.annotator_id != by:
                    a.reviewer_id, a.reviewed_at = by, now
            if seconds_spent is not None and (by is None or a.annotator_id == by):
                a.seconds_spent = (a.seconds_spent or 0.0) + float(seconds_spent)
            if prompts is not None:
                # The import markers stay whatever a client sends: they are how a re-import of the file finds
                # this row (keeping a reviewer's edit) and how a deletion is remembered (delete_annotation).
                kept = {k: v for k, v in (a.prompts or {}).items() if k in _IMPORT_MARKERS}
                a.prompts = {**dict(prompts), **kept}
            a.revision += 1
            a.last_edit_uuid = edit_key
            a.updated_at = now
            s.flush()
            return annotation_dict(a)

    def delete_annotation(self, annotation_id: int, project_id: int | None = None, *,
                          expected_uuid: str | None = None,
                          check: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Delete one annotation; with ``expected_uuid``, only if the id still names that annotation; ``check``
        as in :meth:`update_annotation`.

        An imported annotation (``prompts.imported_from``) leaves its uuid in ``deleted_annotations``, in the same
        transaction, so a re-import of its file does not bring it back (:meth:`import_annotations`)."""
        with self.transaction() as s:
            a = self._get_ann(s, annotation_id, project_id, lock=True)
            self._check_uuid(a, annotation_id, expected_uuid)
            if check is not None:
                check(annotation_dict(a))
            if isinstance(a.prompts, dict) and a.prompts.get("imported_from"):
                owner = a.image.project_id
                if s.scalar(select(DeletedAnnotation.id).where(DeletedAnnotation.project_id == owner,
                                                               DeletedAnnotation.uuid == a.uuid)) is None:
                    s.add(DeletedAnnotation(project_id=owner, uuid=a.uuid, deleted_at=db.utcnow()))
            s.delete(a)

    def list_annotations(self, *, project_id: int | None = None, image_id: int | None = None,
                         states: Sequence[str] | None = None, sources: Sequence[str] | None = None
                         ) -> list[dict[str, Any]]:
        q = select(Annotation).join(Image, Image.id == Annotation.image_id).order_by(Annotation.id)
        if project_id is not None:
            q = q.where(Image.project_id == project_id)
        if image_id is not None:
            q = q.where(Annotation.image_id == image_id)
        if states:
            q = q.where(Annotation.review_state.in_(list(states)))
        if sources:
            q = q.where(Annotation.source.in_(list(sources)))
        with self.transaction(write=False) as s:
            return [annotation_dict(a) for a in s.scalars(q)]

    def count_annotations(self, project_id: int | None = None) -> int:
        q = select(func.count(Annotation.id))
        if project_id is not None:
            q = q.join(Image, Image.id == Annotation.image_id).where(Image.project_id == project_id)
        with self.transaction(write=False) as s:
            return int(s.scalar(q) or 0)

    # ---------------------------------------------------------------------------- dataset versions
    def create_dataset_version(self, project_id: int, name: str, *, states: Sequence[str] = ("accepted",),
                               meta: dict[str, Any] | None = None) -> int:
        """Freeze the project's annotations in ``states`` under ``name`` (for training or export)."""
        with self.transaction() as s:
            rows = list(s.execute(select(Annotation, Image).join(Image, Image.id == Annotation.image_id)
                                  .where(Image.project_id == project_id, Annotation.review_state.in_(list(states)),
                                         Annotation.area > 0)))
            dv = DatasetVersion(project_id=project_id, name=name, meta={**(meta or {}), "states": list(states)})
            dv.annotations = [a for a, _ in rows]
            dv.items = DatasetVersionItem.snapshot(rows)  # frozen: later edits cannot reach it
            s.add(dv)
            s.flush()
            return dv.id

    def dataset_version_annotation_ids(self, dataset_version_id: int) -> list[int]:
        with self.transaction(write=False) as s:
            dv = s.get(DatasetVersion, dataset_version_id)
            if dv is None:
                raise NotFoundError(f"no dataset version with id {dataset_version_id}")
            return sorted(a.id for a in dv.annotations)


ImageRow = tuple[Path, int, int, str]  # file, height, width, sha256


def collect_image_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The image files named by ``paths`` (folders searched recursively by suffix), absolute."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser().resolve()
        if p.is_dir():
            files.extend(f for f in walk_files(p) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{str(raw)!r} is neither an image file nor a folder")
    return files


def read_image_files(files: Sequence[Path]) -> tuple[list[ImageRow], list[tuple[Path, str]]]:
    """Size and checksum of every file that opens as an image, and (file, reason) for every one that does not,
    so a caller can name all bad files at once instead of stopping at the first."""
    from segany.data.images import load_image  # reads EXIF orientation like the model will

    rows: list[ImageRow] = []
    bad: list[tuple[Path, str]] = []
    for f in files:
        try:
            if f.stat().st_size == 0:
                raise InputError("empty file")
            arr = load_image(f)
        except InputError as exc:
            bad.append((f, _reason(exc, f)))
            continue
        rows.append((f, arr.shape[0], arr.shape[1], file_sha256(f)))
    return rows, bad


def _reason(exc: Exception, f: Path) -> str:
    """The loader's message without the file name and the generic fix, which the summary gives once."""
    text = str(exc).replace(repr(str(f)), "").split("; pass a")[0].strip()
    return text.removeprefix("could not read  as an image ").strip("() ") or "not an image"


def bad_images_message(bad: Sequence[tuple[Path, str]], fix: str) -> str:
    """One line naming every unreadable file (the first 20) and ``fix``."""
    shown = "; ".join(f"{f} ({why})" for f, why in bad[:20]) + (f"; ... {len(bad) - 20} more" if len(bad) > 20 else "")
    return f"{len(bad)} file(s) are not readable images, so nothing was added: {shown}; {fix}"


def check_seconds(seconds_spent: Any, name: str = "seconds_spent") -> float | None:
    """``seconds_spent`` as a float in [0, 1e6), or None; :class:`InputError` for anything else (NaN included)."""
    value = check_finite(name, seconds_spent)
    if value is not None and not (0 <= value < 1e6):
        raise InputError(f"{name} must be between 0 and 1e6, got {seconds_spent}")
    return value


def check_finite(name: str, value: Any) -> float | None:
    """``value`` as a float, or None; :class:`InputError` for NaN, ±Infinity or a non-number.

    SQLite would store NaN as text the JSON and float readers choke on, and PostgreSQL's JSON refuses it with
    a database error, so a non-finite score or prompt is refused before it reaches either.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise InputError(f"{name} must be a finite number, got {value!r}; send a real value or leave it out")
    return f


def first_non_finite(value: Any, root: str = "") -> tuple[str, Any] | None:
    """The first NaN or infinite number inside a JSON-like value (dicts, lists, numbers), in document order:
    ``(where, number)`` with ``where`` like ``prompts.x[2]`` (``root`` names the value itself), or None.

    Iterative, so a deeply nested value cannot exhaust the interpreter's recursion limit. Shared by the store
    and the server's request bodies (:class:`segany.server.schemas.Body`).
    """
    stack: list[tuple[str, Any]] = [(root, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in reversed(list(v.items())))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, Real) and not isinstance(v, (bool, int)) and not math.isfinite(float(v)):
            return where, v
    return None


def check_finite_json(name: str, value: Any) -> None:
    """Refuse NaN or ±Infinity anywhere inside a JSON-like value, naming where."""
    found = first_non_finite(value, name)
    if found is not None:
        where, v = found
        raise InputError(f"{where} is {v!r}, not a finite number; JSON has no NaN or Infinity, so send a "
                         "real value or leave it out")


@dataclass(frozen=True)
class _SaveRetry:
    """What a save sends that its retry must send again: the mask (canonical RLE), label (as stored) and author."""

    rle: dict[str, Any]
    label: str
    annotator_id: int | None


def _differs_from_edit(a: Annotation, *, mask: np.ndarray | None, rle: dict[str, Any] | None, label: str | None,
                       review_state: str | None, annotator_id: int | None, prompts: dict[str, Any] | None,
                       expected_revision: int | None) -> list[str]:
    """The fields an edit request sets otherwise than the edit that made ``a``'s revision left them (written as
    :meth:`Store.update_annotation` writes them); empty for a true retry of that edit."""
    differs: list[str] = []
    if mask is not None or rle is not None:
        enc = encode_mask(mask) if mask is not None else normalize_rle(rle)  # type: ignore[arg-type]
        if list(enc["size"]) != [a.height, a.width] or enc["counts"] != a.rle_counts:
            differs.append("segmentation")
    if label is not None and label_name(label) != a.label:
        differs.append("label")
    if review_state is not None and review_state != a.review_state:
        differs.append("review_state")
    if annotator_id is not None and annotator_id != a.annotator_id:
        differs.append("annotator_id")
    if prompts is not None:
        kept = {k: v for k, v in (a.prompts or {}).items() if k in _IMPORT_MARKERS}
        # (through JSON, as stored: a tuple the caller passed is the list the row holds)
        if json.loads(json.dumps({**dict(prompts), **kept})) != (a.prompts or {}):
            differs.append("prompts")
    if expected_revision is not None and expected_revision != a.revision - 1:  # (the edit made revision + 1)
        differs.append("revision")
    return differs


def _check_uuid(value: str, field: str = "uuid") -> str:
    try:
        return str(uuid_lib.UUID(str(value)))
    except ValueError as exc:
        raise InputError(f"{field} must be a UUID string like {uuid_lib.uuid4()}, got {value!r}") from exc


def open_store(target: str | os.PathLike[str], *, create: bool = False, pool_size: int | None = None,
               max_overflow: int | None = None) -> Store:
    """Open (and migrate to head) the store at a project folder, a ``.db`` file or a database URL.

    Args:
        target: project folder, SQLite file, or SQLAlchemy URL (``postgresql://…`` or ``postgres://…`` use
            psycopg 3).
        create: make the project folder if it does not exist; otherwise a missing folder is an error.
        pool_size, max_overflow: PostgreSQL connections this process keeps open and may open on top under
            load (default: ``SEGANY_DB_POOL_SIZE`` and ``SEGANY_DB_MAX_OVERFLOW``, else 5 and 5).
    """
    url, project_dir = resolve_target(target)
    if url.startswith("sqlite"):
        _check_sqlite_version()
    if project_dir is not None:
        db_file = Path(url.removeprefix("sqlite:///"))
        _check_sqlite_target(str(target), db_file, create)
        if not db_file.exists() and not create:
            raise StoreError(f"{str(target)!r} is not a segany project (no {db_file.name}); create it with "
                             f"`segany project create {target}`")
        db_file.parent.mkdir(parents=True, exist_ok=True)
    else:
        _check_url(url)
    try:
        engine = make_engine(url, pool_size=pool_size, max_overflow=max_overflow)
    except (ImportError, NoSuchModuleError) as exc:  # the URL names a DBAPI driver that is not installed
        raise StoreError(f"the database driver for {_safe_url(url)} is not installed ({exc}); use "
                         "postgresql://... (psycopg 3, installed with segany) or pip install the driver") from exc
    try:
        migrate(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise _unreachable(str(target), url, project_dir, exc) from exc
    return Store(engine, project_dir)


SUPPORTED_BACKENDS = ("sqlite", "postgresql")


def _safe_url(url: str) -> str:
    """``url`` for messages: the password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "the database URL"


def _check_url(url: str) -> None:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError("the target is not a valid database URL; write it as "
                         "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB or pass a project folder") from exc
    if "@" in (parsed.host or ""):
        # The password ends at its first '@', so the rest of it became the host name. Nothing of the URL is
        # repeated here: any part of it may be part of the password.
        raise StoreError("the database URL has more than one '@' before its host, so its user or password holds "
                         "an unencoded '@'; percent-encode special characters in the password (@ -> %40), "
                         "and likewise : -> %3A, / -> %2F, # -> %23, % -> %25 (urllib.parse.quote(PASSWORD, "
                         "safe='') in Python prints it encoded)")
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise StoreError(f"database URL scheme {parsed.drivername!r} is not supported; use a project folder, "
                         "a .db file, sqlite:///PATH or postgresql://USER@HOST[:PORT]/DB")


def _check_sqlite_target(target: str, db_file: Path, create: bool) -> None:
    """A project folder (or .db file's folder) that is a file, or a .db path that is a folder, fails here,
    before anything is created."""
    for parent in (db_file.parent, *db_file.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"{str(parent)!r} is a file, not a folder, so {target!r} cannot be a project "
                                 "there; pass a new folder path or an existing project folder")
            break
    if db_file.exists() and not db_file.is_file():
        raise StoreError(f"{str(db_file)!r} is a folder, not a SQLite database file; pass the project folder "
                         "that holds it or another .db path")


SQLITE_MIN = (3, 35)  # INSERT ... RETURNING (adding images); Python 3.10+ builds mostly ship newer


def _check_sqlite_version() -> None:
    """Refuse, before anything is made, a SQLite too old for the store: the first image added would fail with a
    SQL compile error otherwise (an old distribution's Python, such as Ubuntu 20.04's SQLite 3.31)."""
    import sqlite3

    if tuple(sqlite3.sqlite_version_info[:2]) < SQLITE_MIN:
        raise StoreError(f"the project store needs SQLite {SQLITE_MIN[0]}.{SQLITE_MIN[1]} or newer and this Python "
                         f"has {sqlite3.sqlite_version}; use a Python built with a newer SQLite (python.org, conda, "
                         "a newer distribution) or keep the store on PostgreSQL (postgresql://USER@HOST/DB)")


def _unreachable(target: str, url: str, project_dir: Path | None, exc: DBAPIError) -> StoreError:
    detail = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if project_dir is not None:
        return StoreError(f"{url.removeprefix('sqlite:///')!r} could not be opened as a SQLite database "
                          f"({detail}); is it a segany store? Pass a project folder made by `segany project create`")
    missing = _missing_database(exc, make_url(url).database)
    if missing is not None:
        u = make_url(url)
        flags = " ".join(f for f in (f"-h {u.host}" if u.host else "", f"-p {u.port}" if u.port else "",
                                     f"-U {u.username}" if u.username else "") if f)
        return StoreError(f"the database {missing!r} does not exist on the server at {_safe_url(url)}; create it "
                          f"with `createdb {flags + ' ' if flags else ''}{missing}` (or CREATE DATABASE in psql, as a "
                          "user allowed to create databases), then run the command again")
    return StoreError(f"could not reach the database at {_safe_url(url)} ({detail}); check the host, port, user "
                      "and password, and that the server is running")


def _missing_database(exc: DBAPIError, url_database: str | None) -> str | None:
    """The database name when ``exc`` says it does not exist (SQLSTATE 3D000), else None.

    A failed connection carries no SQLSTATE in psycopg (the server's FATAL ends the handshake), so the server's
    message is read too; it is English unless the server was set up with another lc_messages, and then the
    name is the URL's (``url_database``)."""
    orig = getattr(exc, "orig", None)
    text_ = str(orig or exc)
    m = re.search(r'database "(.+?)" does not exist', text_)
    if getattr(orig, "sqlstate", None) == "3D000" or m:
        return m.group(1) if m else (url_database or "named in the URL")
    return None


def paths_open_would_create(target: str | os.PathLike[str]) -> list[Path]:
    """The files and folders ``open_store(target, create=True)`` would make now (the database file and its
    WAL companions, the first missing folder), so a command that fails later can remove them again."""
    url, project_dir = resolve_target(target)
    if project_dir is None:
        return []
    db_file = Path(url.removeprefix("sqlite:///"))
    made = [db_file.with_name(db_file.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
    made = [f for f in made if not f.exists()]
    top = db_file.parent
    while not top.parent.exists():
        top = top.parent
    return made + ([top] if not top.exists() else [])


def remove_paths(paths: Iterable[Path]) -> None:
    """Remove what :func:`paths_open_would_create` listed (call after the store is closed)."""
    import shutil

    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink()
