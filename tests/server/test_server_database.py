# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""The server when its database is away (a restart, a failover: 503 and a line saying to retry, not a bare 500)
and labels PostgreSQL cannot store (NUL: 422 naming the character, not a 500 from the database)."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import admin_token, auth, project  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from segany.errors import InputError
from segany.server.app import _uncompressed_rle, create_app


@pytest.fixture
def client(project: Any) -> TestClient:
    return TestClient(create_app(project[0], None), raise_server_exceptions=False)  # no model needed here


def _down(*_args: Any, **_kwargs: Any) -> Any:
    raise OperationalError("SELECT 1", {}, Exception("connection to server at 127.0.0.1 failed: Connection refused"))


def test_database_outage_answers_503(client: TestClient, admin_token: str, project: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = project[0]
    images = client.get("/api/images", headers=auth(admin_token))
    assert images.status_code == 200
    monkeypatch.setattr(store, "list_images", _down)
    r = client.get("/api/images", headers=auth(admin_token))
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    assert r.json()["detail"].startswith("database unavailable; nothing was saved; retry")
    # A token not seen yet is checked against the database before any route runs (in the token middleware).
    monkeypatch.setattr(store, "authenticate", _down)
    r = client.get("/api/images", headers=auth("not-a-cached-token"))
    assert r.status_code == 503 and "database unavailable" in r.json()["detail"], r.text


def test_a_full_disk_is_not_answered_as_retry(client: TestClient, admin_token: str, project: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's full disk is an OperationalError too: it was answered 503 "retry in a few seconds", which only
    loses more work; it is 507 now, saying an administrator must free space (and no Retry-After)."""
    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(project[0], "list_images", full)
    r = client.get("/api/images", headers=auth(admin_token))
    assert r.status_code == 507 and "retry-after" not in r.headers, r.text
    assert r.json()["detail"].startswith("the database's disk is full")


def test_labels_with_control_characters_are_refused(client: TestClient, admin_token: str, project: Any) -> None:
    store, proj = project
    r = client.patch("/api/project", json={"labels": ["person", "new\nline"]}, headers=auth(admin_token))
    assert r.status_code == 422 and "U+000A" in r.text, r.text
    assert store.get_project(proj["name"])["labels"] == ["person", "thing"]
    # A project without declared labels takes any label, so nothing but this check stood before the database.
    assert client.patch("/api/project", json={"labels": []}, headers=auth(admin_token)).status_code == 200
    im = client.get("/api/images", headers=auth(admin_token)).json()[0]
    mask = np.zeros((im["height"], im["width"]), bool)
    mask[20:60, 30:90] = True
    body = {"uuid": str(uuid.uuid4()), "segmentation": _uncompressed_rle(mask), "label": "per\u0000son"}
    r = client.post(f"/api/images/{im['id']}/annotations", json=body, headers=auth(admin_token))
    assert r.status_code == 422 and "control character U+0000" in r.text and "remove it" in r.text, r.text
    assert store.list_annotations() == []


def test_declared_labels_are_stored_as_mask_labels_are(client: TestClient, admin_token: str, project: Any) -> None:
    # " dog" and a 250-character name were stored as sent, while a mask's label is stripped and cut to 200
    # characters before it is compared with them: neither could ever be used.
    store, proj = project
    long = "y" * 250
    r = client.patch("/api/project", json={"labels": [" dog", long, "cat", "dog "]}, headers=auth(admin_token))
    assert r.status_code == 200, r.text
    assert store.get_project(proj["name"])["labels"] == ["dog", "y" * 200, "cat"]
    im = client.get("/api/images", headers=auth(admin_token)).json()[0]
    mask = np.zeros((im["height"], im["width"]), bool)
    mask[20:60, 30:90] = True
    for label in (" dog", "dog", long):
        body = {"uuid": str(uuid.uuid4()), "segmentation": _uncompressed_rle(mask), "label": label}
        r = client.post(f"/api/images/{im['id']}/annotations", json=body, headers=auth(admin_token))
        assert r.status_code == 201, (label, r.text)
    for empty in ([""], ["a", "  "]):
        r = client.patch("/api/project", json={"labels": empty}, headers=auth(admin_token))
        assert r.status_code == 422 and "is empty" in r.text, r.text
    assert store.get_project(proj["name"])["labels"] == ["dog", "y" * 200, "cat"]
    with pytest.raises(InputError, match="is empty"):  # the store refuses it too (CLI, engine)
        store.update_project(proj["id"], labels=["ok", " "])


def test_an_import_does_not_add_a_second_spelling_of_an_old_unstripped_label(project: Any) -> None:
    # A project declared " dog" before labels were normalised; an import's "dog" is that label, not a new one.
    from segany.engine.db import Project

    store, proj = project
    with store.transaction() as s:
        s.get(Project, proj["id"]).labels = [" dog", "cat"]
    im = store.list_images(proj["id"])[0]
    mask = np.zeros((im["height"], im["width"]), bool)
    mask[2:9, 3:12] = True
    from segany.engine.masks import encode_mask

    rec = {"image_sha256": im["sha256"], "key": str(uuid.uuid4()), "rle": encode_mask(mask), "label": "dog",
           "source": "manual", "prompts": {}}
    store.import_annotations(proj["id"], new_images=[], labels=["dog"], records=[rec])
    assert store.get_project(proj["name"])["labels"] == [" dog", "cat"]
    store.import_annotations(proj["id"], new_images=[], labels=["bird"], records=[])  # nothing written: no label
    assert store.get_project(proj["name"])["labels"] == [" dog", "cat"]
    mask[20:30, 20:30] = True
    store.import_annotations(proj["id"], new_images=[], labels=["bird"], records=[
        {**rec, "key": str(uuid.uuid4()), "rle": encode_mask(mask), "label": "bird"}])
    assert store.get_project(proj["name"])["labels"] == [" dog", "cat", "bird"]
