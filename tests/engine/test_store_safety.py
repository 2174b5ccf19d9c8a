"""Store behaviour that needs no PostgreSQL server: read-only transactions on SQLite, labels and names that are
not plain text, database URL mistakes, the connection pool's size, and an import's round trips.

(The same store under real concurrency on PostgreSQL: test_store_postgres.py.)
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import event, text

from segany.engine import store as store_module
from segany.engine.db import Project
from segany.engine.masks import encode_mask
from segany.engine.store import Store, StoreError, open_store, read_image_files, resolve_target
from segany.errors import InputError


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = open_store(tmp_path / "p", create=True)
    yield s
    s.close()


def test_reads_do_not_wait_for_a_long_write(store: Store, tmp_path: Path) -> None:
    """A read (the server's GETs and token checks) used to BEGIN IMMEDIATE too, so it queued behind every
    write and failed with 'database is locked' after the 30 s busy timeout; under WAL it reads its snapshot."""
    store.create_project("p")
    reader = open_store(tmp_path / "p")  # another process, as far as SQLite can tell
    holding, release = threading.Event(), threading.Event()

    def long_write() -> None:
        with store.transaction() as s:
            s.execute(text("UPDATE projects SET stage = 'semi'"))
            holding.set()
            release.wait(30)

    writer = threading.Thread(target=long_write)
    writer.start()
    try:
        assert holding.wait(10)
        seen: list[str] = []
        read = threading.Thread(target=lambda: seen.extend(p["stage"] for p in reader.list_projects()))
        read.start()
        read.join(timeout=5)
        assert seen == ["manual"], "a read waited for the write (or saw it before its commit)"
    finally:
        release.set()
        writer.join()
        reader.close()
    assert [p["stage"] for p in store.list_projects()] == ["semi"]


def test_a_read_only_transaction_refuses_writes(store: Store) -> None:
    """A write inside a deferred SQLite transaction could hit SQLITE_BUSY on its lock upgrade; it fails at once
    and says why instead (and the connection is writable again for the next write)."""
    with pytest.raises(store_module.ReadOnlyTransactionError, match="read-only"), \
            store.transaction(write=False) as s:
        s.add(Project(name="x", labels=[], settings={}, stage="manual"))
    with pytest.raises(store_module.ReadOnlyTransactionError), store.transaction(write=False) as s:
        s.execute(Project.__table__.delete())
    with pytest.raises(Exception, match="readonly database"), store.transaction(write=False) as s:
        s.execute(text("INSERT INTO projects (name, stage, labels, settings, created_at) "
                       "VALUES ('y', 'manual', '[]', '{}', '2025-01-01')"))
    assert store.create_project("z")["name"] == "z" and [p["name"] for p in store.list_projects()] == ["z"]


@pytest.mark.parametrize("bad", ["ca\x00t", "two\nlines", "tab\there", "esc\x1b[0m", "\ud800"])
def test_labels_and_names_must_be_plain_text(store: Store, tmp_path: Path, bad: str) -> None:
    """PostgreSQL cannot store NUL (the save failed with a 500) and nothing encodes a lone surrogate; newlines
    and other control characters break exports' one-name-per-line files. Each is refused, naming the character."""
    fragment = r"U\+D800" if bad == "\ud800" else r"control character U\+00"
    p = store.create_project("p", labels=["cat"])
    for call in (lambda: store.create_project(bad), lambda: store.create_project("q", labels=[bad]),
                 lambda: store.update_project(p["id"], labels=["cat", bad]),
                 lambda: store.add_annotator(bad), lambda: store.rotate_token(bad), lambda: store.get_project(bad)):
        with pytest.raises(InputError, match=fragment):
            call()
    img = tmp_path / "im.png"
    PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    image = store.add_images(p["id"], [img])[0]
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    with pytest.raises(InputError, match=fragment):
        store.save_annotation(image["id"], mask=mask, label=bad)
    ann, _ = store.save_annotation(image["id"], mask=mask, label="cat")
    with pytest.raises(InputError, match=fragment):
        store.update_annotation(ann["id"], label=bad)
    row = read_image_files([img])[0][0]
    record = {"image_sha256": row[3], "key": str(uuid.uuid4()), "rle": encode_mask(mask), "label": bad,
              "source": "manual", "prompts": {}}
    with pytest.raises(InputError, match=fragment):
        store.import_annotations(p["id"], new_images=[], labels=[], records=[record])
    assert [a["label"] for a in store.list_annotations()] == ["cat"]
    assert store.get_project("p")["labels"] == ["cat"]


def test_url_mistakes(tmp_path: Path) -> None:
    assert resolve_target("postgres://u@h/db")[0] == "postgresql+psycopg://u@h/db"  # Heroku's spelling
    with pytest.raises(StoreError) as info:
        open_store("postgresql://segany:s3cr@t9x@127.0.0.1:1/x")
    message = str(info.value)
    assert "percent-encode special characters in the password (@ -> %40)" in message
    assert "s3cr" not in message and "t9x" not in message


def test_pool_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process used to keep up to 40 connections (10 + 30 overflow): a server and a few jobs exhausted
    PostgreSQL's default max_connections of 100."""
    url = "postgresql+psycopg://u@127.0.0.1:1/db"  # engines connect lazily: nothing is reached here
    monkeypatch.delenv("SEGANY_DB_POOL_SIZE", raising=False)
    monkeypatch.delenv("SEGANY_DB_MAX_OVERFLOW", raising=False)
    pool = store_module.make_engine(url).pool
    assert (pool.size(), pool._max_overflow) == (5, 5)  # type: ignore[attr-defined]
    monkeypatch.setenv("SEGANY_DB_POOL_SIZE", "2")
    monkeypatch.setenv("SEGANY_DB_MAX_OVERFLOW", "0")
    pool = store_module.make_engine(url).pool
    assert (pool.size(), pool._max_overflow) == (2, 0)  # type: ignore[attr-defined]
    assert store_module.make_engine(url, pool_size=3, max_overflow=1).pool.size() == 3
    monkeypatch.setenv("SEGANY_DB_POOL_SIZE", "lots")
    with pytest.raises(StoreError, match="SEGANY_DB_POOL_SIZE must be a whole number"):
        store_module.make_engine(url)


def test_import_queries_per_batch_not_per_record(store: Store, tmp_path: Path) -> None:
    """An import of N new records issued three statements per record (a round trip each on a PostgreSQL server);
    now a few per batch of records. Counted on SQLite, whose ORM still inserts one row per statement."""
    p = store.create_project("p")
    files = []
    for i in range(3):
        files.append(tmp_path / f"im{i}.png")
        PILImage.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(files[-1])
    rows = read_image_files(files)[0]
    records = []
    for k in range(150):
        mask = np.zeros((16, 16), bool)
        mask[k % 16, : 1 + k // 16] = True
        records.append({"image_sha256": rows[k % 3][3], "key": str(uuid.uuid4()), "rle": encode_mask(mask),
                        "label": "obj", "source": "manual", "prompts": {"imported_from": "gt.json"}})
    records.append({**records[0], "key": str(uuid.uuid4())})  # the same mask twice in one file
    selects: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    counts = store.import_annotations(p["id"], new_images=rows, labels=["obj"], records=records)
    assert (counts["images_added"], counts["created"], counts["duplicate"]) == (3, 150, 1)
    assert len(selects) <= 10, f"{len(selects)} SELECTs for {len(records)} records"
    selects.clear()
    again = store.import_annotations(p["id"], new_images=[], labels=["obj"], records=records)
    assert (again["unchanged"], again["duplicate"]) == (150, 1) and len(selects) <= 10


def test_a_missing_database_in_another_language_is_named_from_the_url() -> None:
    """A server with non-English messages still says SQLSTATE 3D000: the createdb line named the database
    "named in the URL" (a command that would fail); it takes the name from the URL now."""
    from sqlalchemy.exc import OperationalError

    from segany.engine.store import _unreachable

    class Localized(Exception):
        sqlstate = "3D000"

    exc = OperationalError("connect", {}, Localized('FATAL:  la base de données « annot » n\'existe pas'))
    message = str(_unreachable("postgresql://u@h:5432/annot", "postgresql+psycopg://u@h:5432/annot", None, exc))
    assert "`createdb -h h -p 5432 -U u annot`" in message, message


def test_sqlite_without_returning_is_refused_by_name(tmp_path, monkeypatch) -> None:
    """Adding images needs SQLite 3.35 (INSERT ... RETURNING): an older system SQLite failed at the first image
    with a SQL compile error; the store now refuses to open, naming the version and the way out."""
    import sqlite3

    from segany.engine.store import StoreError, open_store

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(StoreError, match=r"SQLite 3\.35 or newer.*has 3\.31\.1.*PostgreSQL"):
        open_store(tmp_path / "p", create=True)
    assert not (tmp_path / "p").exists()
