# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""An edit (PATCH /api/annotations/{id}) is safe to send again, on SQLite and PostgreSQL (migration 0008).

An edit carries the revision it began from, and a retry of an edit whose answer was lost (applied, but the page
saw a network error) met the revision its own first try had made: a false 409 "someone edited it". With the
edit's key (``edit_uuid``) the retry is answered with the row as that edit left it, applied once; an edit by
someone else in between, or a new edit of an old revision, is still refused (409), and so is the key sent again
with another edit (409 naming what differs, where it was answered with the first edit's row and dropped).
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


def _one_annotation(store: Store) -> tuple[dict, dict, int, str, np.ndarray, TestClient]:
    """A new project with one 'person' annotation of alice's: (project, annotation, alice, her token, its mask,
    a client of the project's server)."""
    proj = store.create_project(f"retry-{uuid.uuid4().hex[:6]}", labels=["person", "thing"])
    im = store.add_images(proj["id"], SAMPLE_FILES[:1])[0]
    name = f"alice-{proj['id']}"
    token = store.add_annotator(name)
    alice = store.authenticate(token)["id"]
    m = np.zeros((im["height"], im["width"]), bool)
    m[10:40, 20:60] = True
    ann = store.save_annotation(im["id"], mask=m, label="person", annotator_id=alice, project_id=proj["id"])[0]
    return proj, ann, alice, token, m, TestClient(create_app(store, None, ServerSettings(project=proj["name"])))


def _retried_edits(store: Store) -> None:
    proj, ann, alice, token, m, client = _one_annotation(store)
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
    assert bad.status_code in (400, 422) and "edit_uuid must be a UUID" in bad.text  # the field, by its name


def _reused_keys(store: Store) -> None:
    """An edit_uuid sent again with a body that is not its edit's is refused, naming what differs; the row stays
    as that edit left it. A true retry (only the time spent differs: the page sends the time until each try, and
    the key in capitals) is still answered 200, applied once."""
    _, ann, _, token, m, client = _one_annotation(store)
    url = f"/api/annotations/{ann['id']}"
    grown = m.copy()
    grown[40:50, 20:60] = True
    key = str(uuid.uuid4())
    edit = {"uuid": ann["uuid"], "revision": ann["revision"], "edit_uuid": key, "label": "thing",
            "segmentation": _uncompressed_rle(grown), "review_state": "pending", "prompts": {"points": [[30, 20]]},
            "seconds_spent": 2.5}
    first = client.patch(url, headers=auth(token), json=edit)
    assert first.status_code == 200, first.text
    others = {"label": {"label": "person"}, "segmentation": {"segmentation": _uncompressed_rle(m)},
              "review_state": {"review_state": "rejected"}, "prompts": {"prompts": {"points": [[31, 20]]}},
              "revision": {"revision": first.json()["revision"]}}  # (a new edit of the revision the first made)
    for field, change in others.items():
        r = client.patch(url, headers=auth(token), json={**edit, **change})
        assert r.status_code == 409, (field, r.text)
        detail = r.json()["detail"]
        assert (f"edit_uuid {key} was already used for another change to annotation {ann['id']} (this edit "
                f"differs from it in {field}); send a new edit_uuid for each new edit") in detail, detail
    assert store.get_annotation(ann["id"]) == first.json()  # none of them changed anything
    again = client.patch(url, headers=auth(token), json={**edit, "edit_uuid": key.upper(), "seconds_spent": 4.0})
    assert again.status_code == 200 and again.json() == first.json(), again.text
    assert store.get_annotation(ann["id"])["seconds_spent"] == 2.5


def test_an_edit_key_sent_with_another_edit_is_refused_sqlite(tmp_path: Path) -> None:
    """The reviewer's case (label 'dog' sent with the key of a 'cat' edit was answered 200 with the 'cat' row, the
    'dog' edit dropped without a word), for each field a PATCH sets."""
    store = open_store(tmp_path / "p", create=True)
    try:
        _reused_keys(store)
    finally:
        store.close()


def test_a_retried_edit_is_applied_once_sqlite(tmp_path: Path) -> None:
    store = open_store(tmp_path / "p", create=True)
    try:
        _retried_edits(store)
    finally:
        store.close()


@pytest.mark.postgres
def test_a_retried_edit_is_applied_once_postgres(postgres_url: str) -> None:  # noqa: F811
    """On PostgreSQL, in a database taken down to 0007 and up again (0008 drops and adds the column there too),
    dropped at the end, passed or failed (the server lives for the whole session)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    import segany.engine.store as store_module

    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"edit_retry_{uuid.uuid4().hex[:8]}"  # a fresh database: the session's one is shared
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_module.__file__).with_name("migrations")))
    try:
        store = open_store(url)
        try:
            for step in ("downgrade", "upgrade"):
                with store.engine.begin() as conn:
                    cfg.attributes["connection"] = conn
                    getattr(command, step)(cfg, "0007" if step == "downgrade" else "head")
            _retried_edits(store)
            _reused_keys(store)
        finally:
            store.close()
    finally:  # (FORCE: a connection a failure left open does not keep it)
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
