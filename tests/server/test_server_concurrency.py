# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""20 clients saving 12 annotations each through a real uvicorn server at once: nothing lost or doubled.

Every fifth save is sent twice (a client retrying after a lost response); the idempotency key
must turn the retry into a read of the row already written.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import httpx
import numpy as np
import pytest
from annotation_fixtures import SAMPLE_FILES, postgres_url, running_server  # noqa: F401

from segany.engine.store import Store, open_store
from segany.server.app import ServerSettings, _uncompressed_rle, create_app

CLIENTS, SAVES = 20, 12  # 20 at once is the point; 12 each (3 retried) keep it to seconds


def _hammer(store: Store) -> None:
    proj = store.create_project(f"conc-{uuid.uuid4().hex[:6]}")
    image = store.add_images(proj["id"], SAMPLE_FILES[:1])[0]
    tokens = [store.add_annotator(f"worker-{proj['id']}-{i}") for i in range(CLIENTS)]
    app = create_app(store, None, ServerSettings(project=proj["name"]))
    h, w = image["height"], image["width"]
    sent: list[list[str]] = [[] for _ in range(CLIENTS)]
    errors: list[str] = []
    barrier = threading.Barrier(CLIENTS)

    def client(i: int, base: str) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tokens[i]}"}, timeout=60) as c:
            barrier.wait()
            for j in range(SAVES):
                m = np.zeros((h, w), bool)
                m[j % h, : (i + 1) * 3] = True
                body = {"uuid": str(uuid.uuid4()), "segmentation": _uncompressed_rle(m), "label": f"c{i}",
                        "seconds_spent": 1.0 + j}
                for attempt in range(2 if j % 5 == 0 else 1):
                    r = c.post(f"/api/images/{image['id']}/annotations", json=body)
                    want = 201 if attempt == 0 else 200
                    if r.status_code != want:
                        errors.append(f"client {i} save {j} try {attempt}: {r.status_code} {r.text[:200]}")
                sent[i].append(body["uuid"])

    with running_server(app) as base:
        threads = [threading.Thread(target=client, args=(i, base)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
    assert not errors, errors[:5]
    stored = store.list_annotations(project_id=proj["id"])
    uuids = [a["uuid"] for a in stored]
    expected = {u for per in sent for u in per}
    assert len(expected) == CLIENTS * SAVES
    assert len(uuids) == len(set(uuids)) == CLIENTS * SAVES  # nothing duplicated
    assert set(uuids) == expected  # nothing lost
    by_label: dict[str, int] = {}
    for a in stored:
        by_label[a["label"]] = by_label.get(a["label"], 0) + 1
    assert by_label == {f"c{i}": SAVES for i in range(CLIENTS)}
    assert len({a["annotator_id"] for a in stored}) == CLIENTS


def test_concurrent_saves_sqlite(tmp_path: Any) -> None:
    store = open_store(tmp_path / "proj", create=True)
    try:
        _hammer(store)
    finally:
        store.close()


@pytest.mark.postgres
def test_concurrent_saves_postgres(postgres_url: str) -> None:  # noqa: F811
    store = open_store(postgres_url)
    try:
        _hammer(store)
        again = open_store(postgres_url)  # migrations are a no-op the second time
        assert again.count_annotations() == CLIENTS * SAVES
        again.close()
    finally:
        store.close()


@pytest.mark.postgres
def test_upgrade_to_reviewers_postgres(postgres_url: str) -> None:  # noqa: F811
    """A PostgreSQL store at migration 0003 with annotations upgrades in place to 0004 (reviewer_id,
    reviewed_at): rows and their annotators stay, the new columns are NULL, the new foreign key holds.
    (The SQLite twin is in tests/engine/test_engine_store.py.)"""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError

    from segany.engine.store import make_engine, migrate

    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"upgrade_{uuid.uuid4().hex[:8]}"  # a fresh database: the session's one is at head already
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    migrate(engine, "0003")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO annotators (name, token_hash, active, role, created_at) "
                          "VALUES ('ann', 'h', true, 'admin', '2025-01-01')"))
        conn.execute(text("INSERT INTO projects (name, stage, labels, settings, created_at) "
                          "VALUES ('demo', 'manual', '[]', '{}', '2025-01-01')"))
        conn.execute(text("INSERT INTO images (project_id, path, file_name, width, height, sha256, created_at) "
                          "VALUES (1, 'x.jpg', 'x.jpg', 4, 4, 'abc', '2025-01-01')"))
        for uid, annotator in (("u1", 1), ("u2", None)):
            conn.execute(text("INSERT INTO annotations (uuid, image_id, label, rle_counts, height, width, area, "
                              "bbox_xywh, source, review_state, prompts, annotator_id, revision, created_at, "
                              "updated_at) VALUES (:u, 1, 'o', '4', 4, 4, 0, '[]', 'semi', 'pending', '{}', :a, 1, "
                              "'2025-01-01', '2025-01-01')"), {"u": uid, "a": annotator})
    engine.dispose()
    store = open_store(url)
    try:
        anns = store.list_annotations()
        assert [(a["uuid"], a["annotator_id"], a["reviewer_id"], a["reviewed_at"]) for a in anns] == [
            ("u1", 1, None, None), ("u2", None, None, None)]
        done = store.update_annotation(anns[1]["id"], review_state="accepted", by=1)
        assert (done["annotator_id"], done["reviewer_id"]) == (1, 1) and done["reviewed_at"]
        with pytest.raises(IntegrityError):
            store.update_annotation(anns[0]["id"], label="x", by=99)  # no annotator 99
    finally:
        store.close()
