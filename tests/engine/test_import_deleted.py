"""A COCO re-import leaves annotations deleted in the project deleted: deleting an imported annotation records
its uuid (``deleted_annotations``, migration 0006), the import counts it as ``kept_deleted``, and
``--restore-deleted`` brings it back and forgets the deletion."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from engine_fixtures import make_images, seed_store_at
from sqlalchemy import select, text
from test_engine_import_content import _anns, _coco, _import

from segany.cli.main import main
from segany.engine import exports
from segany.engine.db import DeletedAnnotation
from segany.engine.store import Store, open_store
from segany.errors import InputError

LEFT_DELETED = "annotations deleted in the project since an earlier import were left deleted " \
               "(--restore-deleted brings them back)"


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    """A project folder with three registered images and a COCO file of three annotations on two of them."""
    images = make_images(tmp_path / "imgs", 3)
    root = tmp_path / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["project", "add-images", str(root), str(tmp_path / "imgs")]) == 0
    return root, _coco(tmp_path / "gt.json", images)


def _tombstones(store: Store) -> list[str]:
    with store.transaction() as s:
        return sorted(s.scalars(select(DeletedAnnotation.uuid)))


def test_reimport_leaves_deleted_annotations_deleted(project: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from fastapi.testclient import TestClient

    from segany.server.app import create_app

    root, src = project
    assert "imported 3 annotations, updated 0, unchanged 0" in _import(root, src, capsys)
    store = open_store(root)
    try:
        first, second, third = store.list_annotations()
        store.delete_annotation(first["id"])  # the library (and CLI) path
        admin = store.add_annotator("adam", role="admin")
        client = TestClient(create_app(store, None))  # the app's path: DELETE /api/annotations/{id}
        r = client.delete(f"/api/annotations/{second['id']}?uuid={second['uuid']}",
                          headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 204
        assert _tombstones(store) == sorted([first["uuid"], second["uuid"]])
    finally:
        store.close()

    out = _import(root, src, capsys)
    assert f"imported 0 annotations, updated 0, unchanged 1, skipped 0; 2 {LEFT_DELETED}" in out
    assert "new in the file" not in out
    assert [a["uuid"] for a in _anns(root)] == [third["uuid"]]

    out = _import(root, src, capsys, "--restore-deleted")
    assert out.startswith("imported 2 annotations, updated 0, unchanged 1, skipped 0") and LEFT_DELETED not in out
    assert sorted(a["uuid"] for a in _anns(root)) == sorted([first["uuid"], second["uuid"], third["uuid"]])
    store = open_store(root)
    try:
        assert _tombstones(store) == []  # restored: the deletion is forgotten
    finally:
        store.close()
    out = _import(root, src, capsys)  # a further plain re-import leaves them as they are
    assert out.startswith("imported 0 annotations, updated 0, unchanged 3, skipped 0") and LEFT_DELETED not in out


def test_only_imported_annotations_leave_a_record(project: tuple[Path, Path]) -> None:
    root, src = project
    store = open_store(root)
    try:
        pid = store.get_project()["id"]
        assert exports.import_coco(store, pid, src) == 3
        im = store.list_images(pid)[0]
        manual, _ = store.save_annotation(im["id"], rle=_coco_rle(src, 0), prompts={"points": [[12, 8]]})
        semi, _ = store.save_annotation(im["id"], rle=_coco_rle(src, 1), source="semi", label="bag")
        store.delete_annotation(manual["id"])
        store.delete_annotation(semi["id"])
        assert _tombstones(store) == []  # random uuids never come back: nothing to record
        imported = store.list_annotations(project_id=pid)[0]
        store.delete_annotation(imported["id"], pid, expected_uuid=imported["uuid"])
        assert _tombstones(store) == [imported["uuid"]]
        r = exports.import_coco_summary(store, pid, src)
        assert (r.created, r.unchanged, r.kept_deleted, r.reimport) == (0, 2, 1, True)
        assert exports.import_coco(store, pid, src, restore_deleted=True) == 1
        assert _tombstones(store) == [] and len(store.list_annotations(project_id=pid)) == 3
    finally:
        store.close()


def _coco_rle(src: Path, i: int) -> dict[str, Any]:
    import json

    return json.loads(src.read_text())["annotations"][i]["segmentation"]


def _record(im: dict[str, Any], rle: dict[str, Any], key: str, legacy_key: str | None = None) -> dict[str, Any]:
    return {"image_sha256": im["sha256"], "key": key, "legacy_key": legacy_key, "rle": rle, "label": "person",
            "source": "manual", "prompts": {"imported_from": "/data/gt.json"}}


def test_store_keeps_legacy_keys_deleted_and_restores_in_one_transaction(project: tuple[Path, Path]) -> None:
    root, src = project
    store = open_store(root)
    try:
        pid = store.get_project()["id"]
        im = store.list_images(pid)[0]
        key, legacy = str(uuid.uuid4()), str(uuid.uuid4())
        old, _ = store.save_annotation(im["id"], rle=_coco_rle(src, 0), uuid=legacy, label="person",
                                       prompts={"imported_from": "/data/gt.json"})  # an older import's key
        store.delete_annotation(old["id"])
        assert _tombstones(store) == [legacy]
        rec = _record(im, _coco_rle(src, 0), key, legacy)
        counts = store.import_annotations(pid, new_images=[], labels=[], records=[rec])
        assert counts == {"images_added": 0, "created": 0, "updated": 0, "unchanged": 0, "duplicate": 0,
                          "kept_deleted": 1}
        bad = _record(im, {"size": [1, 1], "counts": "01"}, str(uuid.uuid4()))  # wrong size: fails the import
        with pytest.raises(InputError, match="does not match image"):
            store.import_annotations(pid, new_images=[], labels=[], records=[rec, bad], restore_deleted=True)
        assert _tombstones(store) == [legacy] and store.count_annotations(pid) == 0  # nothing half-done
        counts = store.import_annotations(pid, new_images=[], labels=[], records=[rec], restore_deleted=True)
        assert (counts["created"], counts["kept_deleted"]) == (1, 0)
        assert _tombstones(store) == [] and [a["uuid"] for a in store.list_annotations()] == [key]
    finally:
        store.close()


def _alembic(engine: Any, action: str, revision: str) -> None:
    """Run an Alembic ``upgrade`` or ``downgrade`` on the store's packaged migrations."""
    from alembic import command
    from alembic.config import Config

    import segany.engine.store as store_module

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_module.__file__).with_name("migrations")))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def test_upgrade_from_0005_and_downgrade(tmp_path: Path) -> None:
    """A store at 0005 with an imported annotation upgrades to 0006 (its rows stay; deleting records the uuid),
    and downgrades to 0005 again (the table goes, the annotations stay)."""
    imported = '{"imported_from": "/data/gt.json"}'
    seed_store_at(tmp_path / "p", "0005", {"u1": imported, "u2": imported})
    store = open_store(tmp_path / "p")
    try:
        with store.transaction() as s:
            assert s.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0008"  # head
        store.delete_annotation(1)
        assert _tombstones(store) == ["u1"] and [a["uuid"] for a in store.list_annotations()] == ["u2"]
        _alembic(store.engine, "downgrade", "0005")
        with store.transaction() as s:
            tables = set(s.scalars(text("SELECT name FROM sqlite_master WHERE type = 'table'")))
            assert "deleted_annotations" not in tables and "annotations" in tables
            assert s.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005"
        _alembic(store.engine, "upgrade", "head")  # 0006 again (and the later ones, which the ORM reads)
        assert _tombstones(store) == [] and [a["uuid"] for a in store.list_annotations()] == ["u2"]
    finally:
        store.close()


def test_an_edit_with_new_prompts_keeps_the_import_markers(project: tuple[Path, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A client that PATCHes prompts must not strip what ties the row to its file: without the markers a
    re-import would overwrite a reviewer's fix and a deletion would not be remembered."""
    import numpy as np

    root, src = project
    _import(root, src, capsys)
    store = open_store(root)
    try:
        first = store.list_annotations()[0]
        fixed = np.zeros(tuple(first["segmentation"]["size"]), dtype=bool)
        fixed[:5, :5] = True
        store.update_annotation(first["id"], mask=fixed, prompts={"points": [[1, 2]], "imported_from": "x"})
        prompts = store.list_annotations()[0]["prompts"]
        assert prompts["points"] == [[1, 2]] and prompts["imported_from"] == first["prompts"]["imported_from"]
        assert prompts["import_digest"] == first["prompts"]["import_digest"]
    finally:
        store.close()
    assert "updated 0, unchanged 3" in _import(root, src, capsys)  # the reviewer's fix stays
    store = open_store(root)
    try:
        store.delete_annotation(store.list_annotations()[0]["id"])
        assert _tombstones(store) == [first["uuid"]]
    finally:
        store.close()
