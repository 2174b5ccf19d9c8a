# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""An edit (PATCH /api/annotations/{id}) is safe to send again, on SQLite and PostgreSQL (migration 0008).

An edit carries the revision it began from, and a retry of an edit whose answer was lost (applied, but the page
saw a network error) met the revision its own first try had made: a false 409 "someone edited it". With the
edit's key (``edit_uuid``) the retry is answered with the row as that edit left it, applied once; an edit by
someone else in between, or a new edit of an old revision, is still refused (409).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from annotation_fixtures import SAMPLE_FILES, auth, postgres_url  # noqa: F401
from fastapi.testclient import TestClient

from segany.engine.store import Store, open_store
from segany.server.app import ServerSettings, _uncompressed_rle, create_app


def _retried_edits(store: Store) -> None:
    proj = store.create_project(f"retry-{uuid.uuid4().hex[:6]}", labels=["person", "thing"])
    im = store.add_images(proj["id"], SAMPLE_FILES[:1])[0]
    name = f"alice-{proj['id']}"
    token = store.add_annotator(name)
    alice = store.authenticate(token)["id"]
    h, w = im["height"], im["width"]
    m = np.zeros((h, w), bool)
    m[10:40, 20:60] = True
    ann = store.save_annotation(im["id"], mask=m, label="person", annotator_id=alice, project_id=proj["id"])[0]
    client = TestClient(create_app(store, None, ServerSettings(project=proj["name"])))
    url = f"/api/annotations/{ann['id']}"
    m[40:50, 20:60] = True
    edit = {"uuid": ann["uuid"], "revision": ann["revision"], "edit_uuid": str(uuid.uuid4()), "label": "thing",
            "segmentation": _uncompressed_rle(m), "seconds_spent": 2.5}

    first = client.patch(url, headers=auth(token), json=edit)
    assert first.status_code == 200, first.text
    assert (first.json()["revision"], first.json()["area"]) == (ann["revision"] + 1, int(m.sum()))
    again = client.patch(url, headers=auth(token), json=edit)  # the first answer was lost: sent again
    assert again.status_code == 200, again.text
    assert again.json() == first.json()  # the same result, applied once (seconds_spent counted once)
    assert store.get_annotation(ann["id"]) == first.json() and first.json()["seconds_spent"] == 2.5
    # a new edit of the revision the first began from is stale: a conflict, as before
    stale = client.patch(url, headers=auth(token), json={**edit, "edit_uuid": str(uuid.uuid4()), "label": "person"})
    assert stale.status_code == 409 and "someone edited it" in stale.json()["detail"]
    # once someone else has changed it, a retry of the earlier edit is refused too: theirs is not undone
    store.update_annotation(ann["id"], project_id=proj["id"], label="person", by=alice)
    late = client.patch(url, headers=auth(token), json=edit)
    assert late.status_code == 409, late.text
    now = store.get_annotation(ann["id"])
    assert (now["label"], now["revision"]) == ("person", ann["revision"] + 2)
    # an edit of the current revision goes through, and its retry answers the same
    relabel = {"uuid": ann["uuid"], "revision": now["revision"], "edit_uuid": str(uuid.uuid4()), "label": "thing"}
    done = [client.patch(url, headers=auth(token), json=relabel) for _ in range(2)]
    assert [r.status_code for r in done] == [200, 200] and done[0].json() == done[1].json()
    assert store.get_annotation(ann["id"])["revision"] == now["revision"] + 1
    bad = client.patch(url, headers=auth(token), json={**relabel, "edit_uuid": "not-a-uuid"})
    assert bad.status_code in (400, 422) and "uuid must be a UUID" in bad.text


def test_a_retried_edit_is_applied_once_sqlite(tmp_path: Path) -> None:
    store = open_store(tmp_path / "p", create=True)
    try:
        _retried_edits(store)
    finally:
        store.close()


@pytest.mark.postgres
def test_a_retried_edit_is_applied_once_postgres(postgres_url: str) -> None:  # noqa: F811
    """On PostgreSQL, in a database taken down to 0007 and up again (0008 drops and adds the column there too)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    import segany.engine.store as store_module

    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"edit_retry_{uuid.uuid4().hex[:8]}"  # a fresh database: the session's one is shared
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_module.__file__).with_name("migrations")))
    store = open_store(url)
    try:
        for step in ("downgrade", "upgrade"):
            with store.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                getattr(command, step)(cfg, "0007" if step == "downgrade" else "head")
        _retried_edits(store)
    finally:
        store.close()
