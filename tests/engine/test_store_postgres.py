"""The store on a real PostgreSQL server, where two clients really run at once (SQLite queues its writers).

Each race is made deterministic: one transaction is held open at the decisive point, the other client is
started in a thread, and the test waits until PostgreSQL reports it blocked on a lock before committing the
first. What used to happen: the loser of an image or name race got a raw IntegrityError (a 500 in the server),
and a merge of a project's settings or labels overwrote the one committed meanwhile.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import text

from segany.engine import store as store_module
from segany.engine.db import Annotator, Image, Project
from segany.engine.masks import encode_mask
from segany.engine.store import ConflictError, Store, StoreError, open_store, read_image_files

# The throw-away PostgreSQL server of the server tests (one fixture for the whole suite, started on first use).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from annotation_fixtures import postgres_url  # noqa: E402, F401

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def races_url(postgres_url: str) -> str:  # noqa: F811
    """A database of this module's own, at head (tests use project and annotator names of their own)."""
    from sqlalchemy import create_engine

    name = f"races_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    open_store(url).close()
    return url


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def two_stores(races_url: str) -> Iterator[tuple[Store, Store]]:
    """Two clients of one database (a process each, as far as PostgreSQL can tell)."""
    a, b = open_store(races_url), open_store(races_url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"im{i}.png"
        PILImage.fromarray(np.full((32, 48, 3), 10 * i, np.uint8)).save(p)
        out.append(p)
    return out


def _race(first: Store, hold: Callable[[Any], None], second: Callable[[], Any]) -> Any:
    """Run ``hold`` in a transaction of ``first``; while it is open, start ``second`` in a thread, wait until
    it is blocked on a lock held by that transaction, commit, and return what ``second`` returned (or raised)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = second()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc

    thread = threading.Thread(target=run)
    with first.transaction() as s:
        hold(s)
        s.flush()
        thread.start()
        _wait_until_blocked(first)
    thread.join(timeout=30)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _wait_until_blocked(store: Store, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with store.engine.connect() as conn:  # a connection of its own, outside the held transaction
        while time.monotonic() < deadline:
            waiting = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = current_database()")).scalar()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second client never blocked on the first one's lock")


def test_same_image_added_by_two_clients_is_added_once(two_stores: tuple[Store, Store], tmp_path: Path) -> None:
    a, b = two_stores
    pid = a.create_project(_name("p"))["id"]
    files = _images(tmp_path / "im", 3)
    f0, h, w, sha0 = read_image_files(files[:1])[0][0]
    # The first client has inserted im0 but not committed; the second adds im0..im2 and must add only two.
    added = _race(a, lambda s: s.add(Image(project_id=pid, path=str(f0), file_name=f0.name, width=w, height=h,
                                           sha256=sha0)),
                  lambda: b.add_images(pid, files))
    assert sorted(d["file_name"] for d in added) == ["im1.png", "im2.png"]
    assert len(a.list_images(pid)) == 3


def test_project_name_race_is_a_conflict(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    twin = _name("twin")
    with pytest.raises(ConflictError, match=f"project '{twin}' already exists"):
        _race(a, lambda s: s.add(Project(name=twin, labels=[], settings={}, stage="manual")),
              lambda: b.create_project(twin))


def test_annotator_name_race_is_a_conflict(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    bob = _name("bob")
    with pytest.raises(ConflictError, match=f"annotator '{bob}' already exists"):
        _race(a, lambda s: s.add(Annotator(name=bob, token_hash=bob, active=True, role="annotator")),
              lambda: b.add_annotator(bob))


def _set_in_first(pid: int, **values: Any) -> Callable[[Any], None]:
    def hold(s: Any) -> None:  # what another update_project or import does, committed while the second works
        p = s.get(Project, pid, with_for_update={"key_share": True})
        for k, v in values.items():
            setattr(p, k, v)
    return hold


def test_settings_merges_keep_each_others_keys(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    name = _name("p")
    pid = a.create_project(name)["id"]
    _race(a, _set_in_first(pid, settings={"current_model": 7}),
          lambda: b.update_project(pid, settings={"auto_redo": {"started": 1}}))
    assert a.get_project(name)["settings"] == {"current_model": 7, "auto_redo": {"started": 1}}


def test_imports_adding_labels_keep_each_others_labels(two_stores: tuple[Store, Store], tmp_path: Path) -> None:
    a, b = two_stores
    name = _name("p")
    pid = a.create_project(name, labels=["cat"])["id"]
    f, h, w, sha = read_image_files(_images(tmp_path / "im", 1))[0][0]
    rle = encode_mask(np.pad(np.ones((4, 4), bool), ((2, h - 6), (3, w - 7))))
    record = {"image_sha256": sha, "key": str(uuid.uuid4()), "rle": rle, "label": "dog", "source": "manual",
              "prompts": {"imported_from": "gt.json"}}
    _race(a, _set_in_first(pid, labels=["cat", "bird"]),
          lambda: b.import_annotations(pid, new_images=[(f, h, w, sha)], labels=["dog"], records=[record]))
    assert a.get_project(name)["labels"] == ["cat", "bird", "dog"]


def test_a_gigapixel_mask_area_is_stored(two_stores: tuple[Store, Store]) -> None:
    """3.6e9 pixels is beyond int4 (2**31 - 1): the areas are BIGINT since migration 0007."""
    store = two_stores[0]
    pid = store.create_project(_name("sky"))["id"]
    with store.transaction() as s:
        im = Image(project_id=pid, path="/nowhere/big.tif", file_name="big.tif", width=60000, height=60000,
                   sha256="f" * 64)
        s.add(im)
        s.flush()
        image_id = im.id
    ann, _ = store.save_annotation(image_id, rle={"size": [60000, 60000], "counts": [0, 60000 * 60000]},
                                   label="sky")
    assert ann["area"] == 3_600_000_000 and store.get_annotation(ann["id"])["area"] == 3_600_000_000
    dv = store.create_dataset_version(pid, "v1")
    with store.transaction(write=False) as s:
        assert s.execute(text("SELECT area FROM dataset_version_items WHERE dataset_version_id = :d"),
                         {"d": dv}).scalar() == 3_600_000_000


def test_read_only_transactions_cannot_write(two_stores: tuple[Store, Store]) -> None:
    store = two_stores[0]
    with store.transaction(write=False) as s:
        assert s.execute(text("SHOW transaction_read_only")).scalar() == "on"
    with pytest.raises(store_module.ReadOnlyTransactionError), store.transaction(write=False) as s:
        s.add(Project(name=_name("q"), labels=[], settings={}, stage="manual"))
    with pytest.raises(Exception, match="read-only transaction"), store.transaction(write=False) as s:
        s.execute(text("UPDATE projects SET stage = 'semi'"))
    with store.transaction() as s:  # the pooled connection is writable again afterwards
        assert s.execute(text("SHOW transaction_read_only")).scalar() == "off"


def test_missing_database_says_how_to_create_it(postgres_url: str) -> None:  # noqa: F811
    url = postgres_url.rsplit("/", 1)[0] + "/no_such_db_here"
    with pytest.raises(StoreError, match=r"'no_such_db_here' does not exist .*`createdb -h 127\.0\.0\.1 -p \d+ "
                                         r"-U segany no_such_db_here`"):
        open_store(url)


def test_claims_use_the_servers_clock(races_url: str) -> None:
    """Heartbeats are the server's now() in UTC (engine.locks.db_utcnow), whatever the session's time zone."""
    from segany.engine import locks

    a = open_store(races_url + "?options=-c%20timezone%3DAsia%2FKolkata")  # +05:30: local time would be off
    b = open_store(races_url)
    try:
        proj = a.create_project(_name("claimed"))
        owner = locks.claim_project(a, proj, "auto")
        with pytest.raises(locks.ProjectBusyError):
            locks.claim_project(b, proj, "auto")
        locks.touch_claim(a, proj["id"], "auto", owner)
        with a.transaction() as s:
            locks.check_claim(s, proj["id"], "auto", owner)
        with b.transaction(write=False) as s:
            age = s.execute(text("SELECT extract(epoch FROM (now() AT TIME ZONE 'UTC') - heartbeat_at) "
                                 "FROM job_locks WHERE project_id = :p"), {"p": proj["id"]}).scalar()
        assert abs(float(age)) < 60
        locks.release_project(a, proj["id"], "auto", owner)
    finally:
        a.close()
        b.close()
