"""Frozen dataset versions stay frozen; one model-version name per set of weights (serve and engine agree)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_fixtures import box_mask, make_images, make_project, save_tiny_checkpoint, seed_store_at


@pytest.fixture
def annotated(tmp_path: Path) -> dict:
    """3 images with 4 accepted manual masks each, labelled person/car."""
    store, proj = make_project(tmp_path / "proj", make_images(tmp_path / "images", 3))
    store.add_annotator("alice")
    alice = store.list_annotators()[0]["id"]
    for im in store.list_images(proj["id"]):
        for k in range(4):
            store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"], k), source="manual",
                                  annotator_id=alice, label="person" if k % 2 else "car")
    yield {"store": store, "proj": proj, "root": tmp_path}
    store.close()


def _frozen(store, dv_id: int) -> list[tuple]:
    from segany.engine.versions import snapshot_items

    return [(it["annotation_uuid"], it["label"], it["rle_counts"], it["image_sha256"])
            for it in snapshot_items(store, dv_id)]


def test_frozen_version_survives_delete_and_relabel(annotated: dict, tmp_path: Path) -> None:
    from segany.engine.retrain import dataset_records, freeze_dataset_version
    from segany.engine.versions import export_version_coco, list_versions

    store, proj = annotated["store"], annotated["proj"]
    dv = freeze_dataset_version(store, None, held_out=0.0)
    before = _frozen(store, dv["id"])
    records_before = dataset_records(store, dv["id"], dv["train_image_ids"])
    assert len(before) == 12 and sum(len(r.masks) for r in records_before) == 12

    anns = store.list_annotations(project_id=proj["id"])
    store.delete_annotation(anns[0]["id"])  # a reviewer deletes one and relabels another
    store.update_annotation(anns[1]["id"], label="bicycle", by=1)

    assert _frozen(store, dv["id"]) == before
    records_after = dataset_records(store, dv["id"], dv["train_image_ids"])
    assert [(r.image_path, r.masks, r.class_names) for r in records_after] == \
        [(r.image_path, r.masks, r.class_names) for r in records_before]
    assert "bicycle" not in {c for r in records_after for c in (r.class_names or [])}
    assert [v["masks"] for v in list_versions(store, None)] == [12]

    # Freezing the edited data makes a new version; the old one keeps its 12 masks.
    dv2 = freeze_dataset_version(store, None, held_out=0.0)
    assert dv2["id"] != dv["id"] and dv2["annotations"] == 11
    out = export_version_coco(store, None, "v1", tmp_path / "v1.json")
    coco = json.loads((tmp_path / "v1.json").read_text())
    assert out["annotations"] == 12 and len(coco["annotations"]) == 12 and len(coco["images"]) == 3
    assert {c["name"] for c in coco["categories"]} == {"person", "car"}


def test_versions_cli_lists_and_exports(annotated: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from segany.cli.engine import main
    from segany.engine.retrain import freeze_dataset_version
    from segany.errors import InputError

    dv = freeze_dataset_version(annotated["store"], None, held_out=0.0)
    target = str(annotated["root"] / "proj")
    assert main(["versions", target]) == 0
    assert dv["name"] in capsys.readouterr().out
    assert main(["versions", target, "--export-coco", dv["name"], str(tmp_path / "out.json")]) == 0
    assert len(json.loads((tmp_path / "out.json").read_text())["annotations"]) == 12
    assert main(["versions", target, "--export-coco", dv["name"], str(tmp_path / "out.json")]) == 0  # its own: replaced
    theirs = tmp_path / "gt.json"
    theirs.write_text('{"images": [], "annotations": []}')
    with pytest.raises(InputError, match="exists and is not a segany dataset-version export"):
        main(["versions", target, "--export-coco", dv["name"], str(theirs)])
    assert theirs.read_text() == '{"images": [], "annotations": []}'  # a user's file is never overwritten
    with pytest.raises(InputError, match="no dataset version 'v9'.*pass one of"):
        main(["versions", target, "--export-coco", "v9", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_upgrade_snapshots_versions_frozen_before(tmp_path: Path) -> None:
    """A store at 0004 with a dataset version: the upgrade copies what its links point at."""
    from sqlalchemy import text

    from segany.engine.store import make_engine, open_store
    from segany.engine.versions import snapshot_items

    seed_store_at(tmp_path / "p", "0004", {"u1": "{}"})
    engine = make_engine(f"sqlite:///{tmp_path / 'p' / 'segany.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO dataset_versions (project_id, name, meta, created_at) "
                              "VALUES (1, 'v1', '{}', '2025-01-01')"))
            conn.execute(text("INSERT INTO dataset_version_annotations VALUES (1, 1)"))
            conn.execute(text("INSERT INTO image_runs (image_id, kind, num_masks, finished_at) "
                              "VALUES (1, 'auto', 0, '2025-01-01')"))
    finally:
        engine.dispose()
    store = open_store(tmp_path / "p")
    try:
        store.delete_annotation(1)  # after the upgrade, deleting the live row leaves the version whole
        assert [(i["annotation_uuid"], i["label"], i["image_sha256"]) for i in snapshot_items(store, 1)] == [
            ("u1", "cat", "abc")]
        with store.transaction() as s:
            assert s.execute(text("SELECT generation FROM image_runs")).scalar() == 1
    finally:
        store.close()


def test_serve_and_engine_name_the_same_weights_alike(tmp_path: Path) -> None:
    """After retrain registered weights with their lineage, the server finds that row instead of a new one."""
    from segany.engine.auto import ModelSpec
    from segany.server.model_service import ModelService

    ckpt = save_tiny_checkpoint(tmp_path / "a" / "tiny.pt")
    copy = tmp_path / "b" / "same.pt"  # the same weights elsewhere are the same model version
    copy.parent.mkdir()
    copy.write_bytes(ckpt.read_bytes())
    engine_name = ModelSpec("vit_b", str(ckpt)).version_name()
    assert ModelService("vit_b", str(ckpt), device="cpu").version_name == engine_name
    assert ModelService("vit_b", str(copy), device="cpu").version_name == engine_name

    store, _ = make_project(tmp_path / "proj", make_images(tmp_path / "images", 1))
    try:
        parent = store.register_model_version("vit_b:parent", "vit_b")
        mv = store.register_model_version(engine_name, "vit_b", str(ckpt), parent_id=parent)
        service = ModelService("vit_b", str(ckpt), device="cpu")
        # what segany serve does at start-up (server/app.py)
        assert store.register_model_version(service.version_name, service.model_type, service.checkpoint) == mv
        rows = [m for m in store.list_model_versions() if m["name"] == engine_name]
        assert len(rows) == 1 and rows[0]["parent_id"] == parent
    finally:
        store.close()


def test_store_made_version_is_frozen_too(annotated: dict) -> None:
    """Store.create_dataset_version (the API's way to cut a version) snapshots its masks as retrain's does:
    it fell back to live links, so a delete and a relabel changed it."""
    store, proj = annotated["store"], annotated["proj"]
    dv_id = store.create_dataset_version(proj["id"], "manual-cut")
    before = _frozen(store, dv_id)
    assert len(before) == 12
    anns = store.list_annotations(project_id=proj["id"])
    store.delete_annotation(anns[0]["id"])
    store.update_annotation(anns[1]["id"], label="bicycle", by=1)
    assert _frozen(store, dv_id) == before


def test_version_exports_keep_each_labels_category_id(annotated: dict, tmp_path: Path) -> None:
    """Ids numbered only the labels present, in sorted order: a later version with one 'apple' mask moved 'car'
    from 1 to 2. The ids are now frozen with each version, and a later version keeps the earlier ones."""
    from segany.engine.retrain import freeze_dataset_version
    from segany.engine.versions import export_version_coco

    store, proj = annotated["store"], annotated["proj"]
    v1 = freeze_dataset_version(store, None, held_out=0.0)
    im = store.list_images(proj["id"])[0]
    store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"], 5), source="manual", label="apple")
    v2 = freeze_dataset_version(store, None, held_out=0.0)
    ids = []
    for v in (v1, v2):
        export_version_coco(store, None, v["name"], tmp_path / f"{v['name']}.json")
        coco = json.loads((tmp_path / f"{v['name']}.json").read_text())
        ids.append({c["name"]: c["id"] for c in coco["categories"]})
    assert ids[0]["car"] == ids[1]["car"] and ids[0]["person"] == ids[1]["person"]
    assert "apple" in ids[1] and ids[1]["apple"] not in (ids[1]["car"], ids[1]["person"])


def _split_before_near_duplicates(images: dict[int, str], fraction: float, earlier: dict[int, bool]
                                  ) -> tuple[list[int], list[int]]:
    """retrain._split as it was before near-duplicates were grouped: each image by its own sha256, an image held
    out before stays held out, and a tiny project holds out its fresh image of smallest hash."""
    from segany.engine.retrain import held_out_image

    held = sorted(i for i, sha in images.items() if held_out_image(sha, fraction) or earlier.get(i) is True)
    if fraction > 0 and not held and len(images) >= 2:
        fresh = [i for i in images if i not in earlier]
        held = [min(fresh, key=lambda i: images[i])] if fresh else []
    return sorted(i for i in images if i not in held), held


def test_a_project_without_near_duplicates_splits_as_before(tmp_path: Path) -> None:
    """Grouping near-duplicates moves no image of a project that has none: versions after versions (images
    added, masks rejected) split exactly as each image's own hash did, on real images and on random hashes."""
    import hashlib
    import random

    from segany.engine.retrain import _split, freeze_dataset_version

    rng = random.Random(0)
    for _ in range(200):  # histories of 3 versions of up to 6 images, tiny projects' fallback included
        fraction, sides = rng.choice([0.0, 0.2, 0.5]), {}
        pool = {i: hashlib.sha256(f"{i}-{rng.random()}".encode()).hexdigest() for i in range(8)}
        for _version in range(3):
            images = {i: pool[i] for i in rng.sample(sorted(pool), rng.randint(1, 6))}
            train, held = _split(images, fraction, sides)
            assert (train, held) == _split_before_near_duplicates(images, fraction, sides)
            sides.update({**{i: False for i in train}, **{i: True for i in held}})

    store, proj = make_project(tmp_path / "proj", make_images(tmp_path / "images", 6))
    try:
        for im in store.list_images(proj["id"]):
            store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"]), source="manual")
        sides = {}
        for step in range(2):
            dv = freeze_dataset_version(store, None, held_out=0.5)
            images = {im["id"]: im["sha256"] for im in store.list_images(proj["id"])
                      if store.list_annotations(image_id=im["id"], states=["accepted"])}
            assert (dv["train_image_ids"], dv["held_out_image_ids"]) == \
                _split_before_near_duplicates(images, 0.5, sides)
            assert dv.get("near_duplicate_groups", 0) == 0 and dv["held_out_image_ids"]
            sides.update({**{i: False for i in dv["train_image_ids"]}, **{i: True for i in dv["held_out_image_ids"]}})
            if step == 0:  # two more distinct images (mirrored samples); one image's mask rejected
                for im in store.add_images(proj["id"], make_images(tmp_path / "more", 6)[4:]):
                    store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"]), source="manual")
                ann = store.list_annotations(project_id=proj["id"])[0]
                store.update_annotation(ann["id"], project_id=proj["id"], review_state="rejected")
    finally:
        store.close()
