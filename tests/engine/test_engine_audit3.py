# ruff: noqa: F811  (the PostgreSQL fixture is imported from the server tests and used as an argument)
"""Store fixes from the third audit: RLE runs must cover the mask, concurrent edits on PostgreSQL, malformed COCO
polygons, an empty project target, frozen-version export ids, and NaN/Infinity kept out of the store."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import cli_fails
from engine_fixtures import box_mask, make_images, make_project
from pycocotools import mask as mask_utils

from segany.engine.masks import decode_rle, encode_mask, normalize_rle
from segany.engine.store import ConflictError, Store, open_store
from segany.errors import InputError

# The throw-away PostgreSQL server of the server tests (one fixture for the whole suite, started on first use).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from annotation_fixtures import postgres_url  # noqa: E402, F401


@pytest.fixture
def one_image(tmp_path: Path) -> Any:
    store, proj = make_project(tmp_path / "proj", make_images(tmp_path / "images", 1))
    im = store.list_images(proj["id"])[0]
    yield store, proj, im
    store.close()


# ----------------------------------------------------------------------------- 2: RLE runs cover the mask
@pytest.mark.parametrize("counts", [
    "zzzzzzzzzzzzz",  # the audit's: 'z' is not in COCO RLE's alphabet; pycocotools decoded 430 of the pixels
    encode_mask(np.ones((10, 10), bool))["counts"],  # a real string, but for 100 pixels, not H * W
    "0",  # one run of nothing
    "",
    "1_",  # ends in the middle of a number
])
def test_compressed_rle_must_cover_the_mask(one_image: Any, counts: str) -> None:
    store, proj, im = one_image
    rle = {"size": [im["height"], im["width"]], "counts": counts}
    with pytest.raises(InputError, match="RLE"):
        normalize_rle(rle)
    with pytest.raises(InputError, match="RLE"):
        store.save_annotation(im["id"], rle=rle)
    assert store.count_annotations(proj["id"]) == 0


def test_rle_forms_store_one_canonical_string(one_image: Any) -> None:
    """A pycocotools string is stored as sent; other spellings of the same mask (empty runs, uncompressed) are
    stored as the string pycocotools' encoder writes, so equal masks have equal counts."""
    store, _, im = one_image
    h, w = im["height"], im["width"]
    m = box_mask(h, w)
    enc = encode_mask(m)
    assert normalize_rle(enc) == enc
    flat = m.T.ravel()  # column-major, as COCO RLE runs
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    assert not flat[0]  # so the runs start with zeros, as COCO's do
    spelled = [runs[0], 0, 0, *runs[1:]]  # two empty runs inside: the same mask
    odd = mask_utils.frPyObjects({"size": [h, w], "counts": spelled}, h, w)["counts"].decode("ascii")
    assert odd != enc["counts"]
    for rle in ({"size": [h, w], "counts": spelled}, {"size": [h, w], "counts": odd}):
        assert normalize_rle(rle) == enc
        assert (decode_rle(rle) == m).all()
    saved, _ = store.save_annotation(im["id"], rle={"size": [h, w], "counts": odd})
    assert saved["segmentation"]["counts"] == enc["counts"] and saved["area"] == int(m.sum())


# ----------------------------------------------------------------- 3: concurrent edits on PostgreSQL
def _race(store: Store, threads: int) -> None:
    """``threads`` edits of one annotation at revision 1 at once, then two annotators accepting one proposal:
    exactly one of each succeeds. ``check`` (called with the row as read) waits so every transaction has read
    before any writes, as concurrent requests do; unlocked reads let all of them pass."""
    proj = store.create_project(f"race-{uuid.uuid4().hex[:6]}")
    im = store.add_images(proj["id"], sorted((Path(__file__).resolve().parents[2] / "src" / "segany" / "assets"
                                              / "samples").glob("*.jpg"))[:1])[0]
    for i in range(2):
        store.add_annotator(f"{proj['name']}-{i}")
    ids = [a["id"] for a in store.list_annotators() if a["name"].startswith(proj["name"])]

    def run_all(calls: list[Any]) -> list[str]:
        results: list[str] = []
        barrier = threading.Barrier(len(calls))

        def go(call: Any) -> None:
            barrier.wait()
            try:
                call()
                results.append("ok")
            except (ConflictError, PermissionError) as exc:
                results.append(type(exc).__name__)

        workers = [threading.Thread(target=go, args=(c,)) for c in calls]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=60)
        return sorted(results)

    def slow_check(row: dict[str, Any]) -> None:
        time.sleep(0.3)

    a, _ = store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"]), annotator_id=ids[0])
    edits = [lambda i=i: store.update_annotation(a["id"], label=f"edit{i}", expected_revision=1, check=slow_check)
             for i in range(threads)]
    assert run_all(edits) == ["ConflictError"] * (threads - 1) + ["ok"]
    assert store.get_annotation(a["id"])["revision"] == 2

    p, _ = store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"], 1), source="auto")

    def open_proposal(row: dict[str, Any]) -> None:  # the server's check: an annotator may take an open one
        time.sleep(0.3)
        if row["annotator_id"] is not None or row["review_state"] != "pending":
            raise PermissionError("taken")

    takes = [lambda who=who: store.update_annotation(p["id"], review_state="accepted", by=who, label=f"by{who}",
                                                     check=open_proposal) for who in ids]
    assert run_all(takes) == ["PermissionError", "ok"]
    stored = store.get_annotation(p["id"])
    assert stored["revision"] == 2 and stored["label"] == f"by{stored['annotator_id']}"


def test_concurrent_edits_sqlite(tmp_path: Path) -> None:
    store = open_store(tmp_path / "proj", create=True)
    try:
        _race(store, 3)
    finally:
        store.close()


@pytest.mark.postgres
def test_concurrent_edits_postgres(postgres_url: str) -> None:
    store = open_store(postgres_url)
    try:
        _race(store, 4)
    finally:
        store.close()


# ------------------------------------------------------------------------ 6: malformed COCO polygons
def _coco_file(path: Path, image: Path, size_hw: tuple[int, int], segs: list[Any], extra: Any = None) -> Path:
    anns = [{"id": 10 + i, "image_id": 1, "category_id": 1, "segmentation": s, "iscrowd": 0}
            for i, s in enumerate(segs)]
    if extra is not None:
        anns[0]["segany"] = extra
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": image.name, "height": size_hw[0],
                                            "width": size_hw[1]}],
                                "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path


def test_import_coco_names_each_bad_polygon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = make_images(tmp_path / "images", 1)
    store, proj = make_project(tmp_path / "proj", images)
    h, w = store.list_images(proj["id"])[0]["height"], store.list_images(proj["id"])[0]["width"]
    store.close()
    good = [10, 10, 50, 10, 50, 50]
    src = _coco_file(tmp_path / "bad.json", images[0], (h, w), [
        [good], [[10, 10, 20, "x", 30, 30]], [[10, 10, 20, 20, 30]], [[10, 10, 20, 20]], good,
        [[10, 10, 5 * w, 10, 50, 50]]])
    line = cli_fails(["project", "import-coco", str(tmp_path / "proj"), str(src)], capsys, "5 annotations are "
                     "malformed, so nothing was imported")
    for fragment in ("annotation 11: polygon 0 holds 'x' at position 3",
                     "annotation 12: polygon 0 has 5 numbers", "annotation 13: polygon 0 has 4 numbers",
                     "annotation 14: polygon 0 is a int", f"annotation 15: polygon 0 has x = {5 * w}, outside"):
        assert fragment in line, line
    store = open_store(tmp_path / "proj")
    try:
        assert store.count_annotations(proj["id"]) == 0
    finally:
        store.close()
    ok = _coco_file(tmp_path / "ok.json", images[0], (h, w), [[good]], extra={"predicted_iou": math.nan})
    cli_fails(["project", "import-coco", str(tmp_path / "proj"), str(ok)], capsys,
              "annotation 10: segany.predicted_iou must be a finite number")
    ok = _coco_file(tmp_path / "ok.json", images[0], (h, w), [[good]], extra={"seconds_spent": -3})
    cli_fails(["project", "import-coco", str(tmp_path / "proj"), str(ok)], capsys,
              "annotation 10: segany.seconds_spent must be between 0 and 1e6, got -3")


def test_huge_polygon_coordinates_do_not_crash() -> None:
    """From 3e9, pycocotools' rasteriser overflows and the process dies (SIGSEGV): checked in a child process so
    the old behaviour fails this test instead of killing the test run."""
    code = ("from segany.engine.exports import coco_segmentation_to_rle\n"
            "from segany.errors import InputError\n"
            "try:\n"
            "    coco_segmentation_to_rle([[0, 0, 3e9, 0, 3e9, 3e9]], 426, 640)\n"
            "except InputError as exc:\n"
            "    print(exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert "polygon 0 has x = 3000000000.0, outside [-640, 1280]" in r.stdout


# --------------------------------------------------------------------------- 11: empty project target
@pytest.mark.parametrize("target", ["", "  "])
def test_create_with_empty_target_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], target: str) -> None:
    monkeypatch.chdir(tmp_path)
    cli_fails(["project", "create", target], capsys, "the project target is empty")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- 12: frozen version exports the same ids
@pytest.mark.parametrize("freeze", ["retrain", "store"])
def test_frozen_version_export_keeps_ids_after_image_removal(tmp_path: Path, freeze: str) -> None:
    from segany.engine.retrain import freeze_dataset_version
    from segany.engine.versions import export_version_coco

    store, proj = make_project(tmp_path / "proj", make_images(tmp_path / "images", 3))
    try:
        ims = store.list_images(proj["id"])
        for im in ims:
            for k in range(2):
                store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"], k), label=f"l{k}")
        if freeze == "retrain":
            name = freeze_dataset_version(store, None)["name"]
        else:
            store.create_dataset_version(proj["id"], "frozen")
            name = "frozen"
        before = export_version_coco(store, None, name, tmp_path / "before.json")
        assert before["images"] == 3
        store.remove_images(proj["id"], [str(ims[1]["id"])])
        export_version_coco(store, None, name, tmp_path / "after.json")
        b = json.loads((tmp_path / "before.json").read_text())
        a = json.loads((tmp_path / "after.json").read_text())
        assert a == b
        # Numbered in the order the images were registered (as before the removal, as exports always were).
        assert [x["file_name"] for x in b["images"]] == [im["file_name"] for im in ims]
    finally:
        store.close()


# ------------------------------------------------------------------------- NaN/Infinity never stored
@pytest.mark.parametrize("field", [{"predicted_iou": math.nan}, {"stability_score": math.inf},
                                   {"seconds_spent": math.nan},
                                   {"prompts": {"point_coords": [[1.0, -math.inf]]}}])
def test_store_refuses_non_finite_numbers(one_image: Any, field: dict[str, Any]) -> None:
    store, proj, im = one_image
    m = box_mask(im["height"], im["width"])
    with pytest.raises(InputError, match="finite|between"):
        store.save_annotation(im["id"], mask=m, **field)
    assert store.count_annotations(proj["id"]) == 0
    a, _ = store.save_annotation(im["id"], mask=m, prompts={"point_coords": [[1.0, 2.0]]})
    if "prompts" in field or "seconds_spent" in field:
        with pytest.raises(InputError, match="finite|between"):
            store.update_annotation(a["id"], **field)
        assert store.get_annotation(a["id"])["revision"] == 1
    if "prompts" in field or "predicted_iou" in field:
        rec = {"image_sha256": im["sha256"], "key": str(uuid.uuid4()), "rle": encode_mask(box_mask(im["height"],
               im["width"], 2)), "label": "x", "source": "manual", "prompts": {}, **field}
        with pytest.raises(InputError, match="finite"):
            store.import_annotations(proj["id"], new_images=[], labels=[], records=[rec])
        assert store.count_annotations(proj["id"]) == 1


def test_a_replayed_uuid_never_answers_across_projects(tmp_path: Path) -> None:
    """The store checks the image's project before answering a repeated uuid, and a conflict with another
    project's annotation does not name that project's image (the server's check, held by the store too)."""
    from segany.engine.store import NotFoundError

    images = make_images(tmp_path / "images", 2)
    store, a = make_project(tmp_path / "proj", images[:1], name="a")
    try:
        b = store.create_project("b")
        store.add_images(b["id"], images[1:])
        im_a, im_b = store.list_images(a["id"])[0], store.list_images(b["id"])[0]
        key = str(uuid.uuid4())
        saved, created = store.save_annotation(im_a["id"], mask=box_mask(im_a["height"], im_a["width"]), uuid=key,
                                               project_id=a["id"])
        assert created
        with pytest.raises(NotFoundError):  # project b asks about project a's image: no row comes back
            store.save_annotation(im_a["id"], mask=box_mask(im_a["height"], im_a["width"]), uuid=key,
                                  project_id=b["id"])
        with pytest.raises(ConflictError, match="already used on another image;") as err:
            store.save_annotation(im_b["id"], mask=box_mask(im_b["height"], im_b["width"]), uuid=key,
                                  project_id=b["id"])
        assert f"image {im_a['id']}" not in str(err.value)
        replay, created = store.save_annotation(im_a["id"], mask=box_mask(im_a["height"], im_a["width"]), uuid=key,
                                                project_id=a["id"])
        assert not created and replay["id"] == saved["id"]  # the caller's own retry still gets its row
    finally:
        store.close()


def test_sa1b_export_passes_on_only_points_and_crops_that_are_ones(one_image: Any, tmp_path: Path) -> None:
    # prompts is whatever a client sent (checked only as JSON): "hello" went out as SA-1B's point_coords.
    from segany.engine.exports import export_sa1b

    store, proj, im = one_image
    W, H = float(im["width"]), float(im["height"])
    cases = [({"points": "hello"}, [], None), ({"point_coords": {"x": 1}}, [], None),
             ({"points": [[1, 2, 3, 4, 5]]}, [], None), ({"points": [[True, 2]]}, [], None),
             ({"points": [[3, 4], [5.5, 6]], "labels": [1, 0]}, [[3.0, 4.0], [5.5, 6.0]], None),
             ({"point_coords": [[7, 8]], "crop_box": [0, 0, 1e9, -5]}, [[7.0, 8.0]], None),
             ({"crop_box": [1, 2, 3]}, [], None), ({"crop_box": [-1, 0, 5, 5]}, [], None),
             ({"crop_box": [2, 3, 10, 20]}, [], [2.0, 3.0, 10.0, 20.0])]
    for k, (prompts, _, _) in enumerate(cases):
        store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"], 2 + k), prompts=prompts,
                              review_state="accepted")
    out = export_sa1b(store, proj["id"], tmp_path / "sa1b")
    records = json.loads(next(out.glob("*.json")).read_text())["annotations"]
    assert len(records) == len(cases)
    for rec, (prompts, points, crop) in zip(records, cases, strict=True):
        assert rec["point_coords"] == points, prompts
        assert rec["crop_box"] == (crop or [0.0, 0.0, W, H]), prompts
