"""Exports round-trip through pycocotools; polygons keep holes; YOLO/PNG/SA-1B files; COCO import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from pycocotools.coco import COCO

from segany.engine import exports
from segany.engine.store import open_store

SAMPLE = REPO / "src" / "segany" / "assets" / "samples" / "coco_000000000025.jpg"


def _ring(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 200, xx - 300)
    return (r < 100) & (r > 40)


def _blob(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[10:80, 20:120] = True
    m[30:50, 50:80] = False  # a rectangular hole
    m[300:340, 500:600] = True  # and a second piece
    return m


@pytest.fixture
def filled(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = open_store(tmp_path / "p", create=True)
    p = store.create_project("demo", labels=["ring", "blob"])
    im = store.add_images(p["id"], [SAMPLE])[0]
    h, w = im["height"], im["width"]
    store.save_annotation(im["id"], mask=_ring(h, w), label="ring")
    store.save_annotation(im["id"], mask=_blob(h, w), label="blob")
    store.save_annotation(im["id"], mask=_ring(h, w), label="ring", source="semi")  # pending: not exported
    yield store, p, im
    store.close()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("polygons", [False, True])
def test_coco_roundtrip_through_pycocotools(filled, tmp_path: Path, polygons: bool) -> None:  # type: ignore[no-untyped-def]
    store, p, im = filled
    out = exports.export_coco(store, p["id"], tmp_path / "coco.json", polygons=polygons)
    coco = COCO(str(out))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 2
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    h, w = im["height"], im["width"]
    for a in anns:
        got = coco.annToMask(a).astype(bool)
        ref = _ring(h, w) if names[a["category_id"]] == "ring" else _blob(h, w)
        if polygons:
            assert isinstance(a["segmentation"], list)
            assert _iou(got, ref) > 0.9
        else:
            assert (got == ref).all()
    ring = next(a for a in anns if names[a["category_id"]] == "ring")
    blob = next(a for a in anns if names[a["category_id"]] == "blob")
    assert not coco.annToMask(ring)[200, 300], "the ring's hole was filled"
    assert not coco.annToMask(blob)[40, 65], "the blob's hole was filled"
    assert coco.annToMask(blob)[320, 550], "the second piece is missing"


def test_coco_carries_annotator_and_reviewer(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The ``segany`` block names who drew each mask and who reviewed it: a review does not re-credit the mask."""
    store, p, im = filled
    store.add_annotator("alice")
    store.add_annotator("rita", role="reviewer")
    alice, rita = (u["id"] for u in store.list_annotators())
    drawn, _ = store.save_annotation(im["id"], mask=_blob(im["height"], im["width"]), label="blob",
                                     annotator_id=alice)
    store.update_annotation(drawn["id"], review_state="accepted", by=rita)
    coco = json.loads(exports.export_coco(store, p["id"], tmp_path / "coco.json").read_text())
    extra = {a["id"]: a["segany"] for a in coco["annotations"]}
    assert (extra[drawn["id"]]["annotator_id"], extra[drawn["id"]]["reviewer_id"]) == (alice, rita)
    assert extra[drawn["id"]]["reviewed_at"] == store.get_annotation(drawn["id"])["reviewed_at"] is not None
    unreviewed = [e for i, e in extra.items() if i != drawn["id"]]
    assert len(unreviewed) == 2 and all(e["reviewer_id"] is None and e["reviewed_at"] is None for e in unreviewed)


def test_polygon_of_mask_with_hole_keeps_hole() -> None:
    from pycocotools import mask as mask_utils

    m = np.zeros((60, 60), bool)
    m[10:50, 10:50] = True
    m[20:40, 20:40] = False
    polys = exports.mask_to_polygons(m)
    assert len(polys) == 1
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 60, 60))).astype(bool)
    assert np.array_equal(back, m)


def test_polygons_fill_back_to_exactly_the_mask() -> None:
    """Vertices on pixel corners: pycocotools fills each export back to the very mask (holes, diagonal
    neighbours, single pixels, image edges), both as COCO's polygon list and as YOLO's one joined polygon.
    Through pixel centres a 20x35 box came back 19x34."""
    import cv2
    from pycocotools import mask as mask_utils

    def fill(polys: list[list[float]], h: int, w: int) -> np.ndarray:
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)

    rng = np.random.default_rng(0)
    for k in range(150):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        if k % 2:  # blobs with holes rather than noise
            m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
        polys = exports.mask_to_polygons(m)
        if not m.any():
            assert polys == []
            continue
        assert np.array_equal(fill(polys, h, w), m)
        assert np.array_equal(fill([exports.join_polygons(polys)], h, w), m)
    box = np.zeros((60, 80), bool)
    box[10:30, 5:40] = True
    assert exports.mask_to_polygons(box) == [[5.0, 10.0, 5.0, 30.0, 40.0, 30.0, 40.0, 10.0]]


def test_coco_import_roundtrip(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, p, im = filled
    src = exports.export_coco(store, p["id"], tmp_path / "coco.json", polygons=True)
    other = open_store(tmp_path / "q", create=True)
    q = other.create_project("copy")
    assert exports.import_coco(other, q["id"], src, images_dir=SAMPLE.parent) == 2
    assert exports.import_coco(other, q["id"], src, images_dir=SAMPLE.parent) == 0  # re-import adds nothing
    got = {a["label"]: a for a in other.list_annotations(project_id=q["id"])}
    assert set(got) == {"ring", "blob"} and other.get_project("copy")["labels"] == ["ring", "blob"]
    other.close()


def test_sa1b_yolo_png(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, p, im = filled
    sa = exports.export_sa1b(store, p["id"], tmp_path / "sa1b")
    rec = json.loads((sa / "coco_000000000025.json").read_text())
    assert rec["image"]["width"] == im["width"] and len(rec["annotations"]) == 2
    assert {"segmentation", "bbox", "area", "predicted_iou", "point_coords", "crop_box"} <= set(rec["annotations"][0])
    yolo = exports.export_yolo(store, p["id"], tmp_path / "yolo")
    lines = (yolo / "labels" / "coco_000000000025.txt").read_text().splitlines()
    assert len(lines) == 2  # ring, and the two-piece blob as ONE instance (its parts joined)
    vals = [float(v) for v in lines[0].split()[1:]]
    assert all(0 <= v <= 1 for v in vals) and len(vals) % 2 == 0
    png = exports.export_png(store, p["id"], tmp_path / "png")
    index = json.loads((png / "index.json").read_text())
    first = np.array(Image.open(png / index[0]["file"])) > 0
    assert first.shape == (im["height"], im["width"]) and first.any()


def test_images_sharing_a_stem_get_their_own_files(tmp_path: Path) -> None:
    """x.jpg and x.png in one project: per-image exports name both (no file overwrites the other's)."""
    src = tmp_path / "src"
    src.mkdir()
    jpg, png = src / "x.jpg", src / "x.png"
    jpg.write_bytes(SAMPLE.read_bytes())
    Image.open(SAMPLE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(png)
    store = open_store(tmp_path / "p", create=True)
    try:
        p = store.create_project("demo", labels=["blob"])
        ims = store.add_images(p["id"], [jpg, png])
        assert len({im["id"] for im in ims}) == 2
        for im in ims:
            store.save_annotation(im["id"], mask=_blob(im["height"], im["width"]), label="blob")
        sa1b = exports.export_sa1b(store, p["id"], tmp_path / "sa1b")
        files = sorted(f.name for f in sa1b.glob("*.json"))
        assert len(files) == 2 and all(f.startswith("x") for f in files), files
        names = {json.loads((sa1b / f).read_text())["image"]["file_name"] for f in files}
        assert len(names) == 2
        yolo = exports.export_yolo(store, p["id"], tmp_path / "yolo")
        assert len(list((yolo / "labels").iterdir())) == 2
        pngs = exports.export_png(store, p["id"], tmp_path / "png")
        assert len(json.loads((pngs / "index.json").read_text())) == 2
        assert len([d for d in pngs.iterdir() if d.is_dir()]) == 2
    finally:
        store.close()


def test_a_renamed_stem_never_takes_another_images_name(tmp_path: Path) -> None:
    """a-3.png (id 1), a.jpg (id 2) and a.png (id 3): the clash renamed a.png to a-3, which a-3.png already was,
    so the YOLO export wrote a.png through a-3.png's hard link into the user's own a-3.png, and the SA-1B export
    held two images' annotations under one file. Names are compared case-folded too (A.jpg beside a.png)."""
    import hashlib

    src = tmp_path / "src"
    src.mkdir()
    files = [src / n for n in ("a-3.png", "a.jpg", "a.png", "B.png", "b.jpg")]
    for k, f in enumerate(files):
        Image.open(SAMPLE).rotate(30 * k).save(f)
    digest = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    store = open_store(tmp_path / "p", create=True)
    try:
        p = store.create_project("demo", labels=["blob"])
        ims = store.add_images(p["id"], files)
        assert [im["id"] for im in ims] == [1, 2, 3, 4, 5]
        for im in ims:
            store.save_annotation(im["id"], mask=_blob(im["height"], im["width"]), label="blob")
        yolo = exports.export_yolo(store, p["id"], tmp_path / "yolo")
        sa1b = exports.export_sa1b(store, p["id"], tmp_path / "sa1b")
        assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == digest  # sources untouched
        stems = {f.stem.casefold() for f in (yolo / "images").iterdir()}
        assert len(stems) == 5 and {f.stem.casefold() for f in (yolo / "labels").iterdir()} == stems
        by_name = {json.loads(f.read_text())["image"]["file_name"] for f in sa1b.glob("*.json")}
        assert by_name == {f.name for f in files}
    finally:
        store.close()


def test_a_yolo_export_reads_back_to_its_masks(tmp_path: Path) -> None:
    """segany's YOLO reader fills as Ultralytics does, the fill the export writes for: one-piece masks with
    holes come back exactly (read with pycocotools' fill, a ring lost a row and a column of its pixels)."""
    from segany.data.formats import read_yolo_seg
    from segany.data.formats.common import decode_rle

    store = open_store(tmp_path / "p", create=True)
    try:
        p = store.create_project("demo", labels=["ring", "box"])
        im = store.add_images(p["id"], [SAMPLE])[0]
        h, w = im["height"], im["width"]
        box = np.zeros((h, w), bool)
        box[5:17, 30:61] = True
        masks = {"ring": _ring(h, w), "box": box}
        for label, m in masks.items():
            store.save_annotation(im["id"], mask=m, label=label)
        out = exports.export_yolo(store, p["id"], tmp_path / "yolo")
    finally:
        store.close()
    (rec,) = read_yolo_seg(out, split=None, dataset="own")
    assert sorted(rec.class_names) == ["box", "ring"]
    for label, rle in zip(rec.class_names, rec.masks, strict=True):
        assert np.array_equal(decode_rle(rle), masks[label])


def test_export_targets_of_the_wrong_kind_are_refused_before_writing(filled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from segany.errors import InputError

    store, p, _ = filled
    folder = tmp_path / "o"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder; the coco export writes one file"):
        exports.export_coco(store, p["id"], folder)
    assert list(folder.iterdir()) == []  # no stray temp file
    afile = tmp_path / "f.json"
    afile.write_text("{}")
    for export in (exports.export_sa1b, exports.export_yolo, exports.export_png):
        with pytest.raises(InputError, match="is a file; the .* export writes a folder"):
            export(store, p["id"], afile)
    assert afile.read_text() == "{}"


def test_yolo_polygons_fill_back_the_way_ultralytics_fills_them() -> None:
    """Ultralytics scales a label's coordinates, truncates them to int32 and fills with cv2.fillPoly (edges
    included), so YOLO polygons go through boundary-pixel centres: with COCO's corner vertices an 8x9 box
    came back with 90 px for 72."""
    import cv2

    def ultralytics_fill(poly: list[float], h: int, w: int) -> np.ndarray:
        xy = np.round(np.asarray(poly).reshape(-1, 2) / [w, h], 6) * [w, h]  # the label file's 6 decimals
        out = np.zeros((h, w), np.uint8)
        cv2.fillPoly(out, [xy.astype(np.int32)], 1)
        return out.astype(bool)

    box = np.zeros((40, 50), bool)
    box[2:10, 3:12] = True
    ring = np.zeros((40, 50), bool)
    ring[15:35, 20:45] = True
    ring[20:28, 26:36] = False  # a hole, joined by a zero-width seam
    for m in (box, ring):
        poly = exports.join_polygons(exports.mask_to_polygons(m, convention="yolo"))
        assert np.array_equal(ultralytics_fill(poly, 40, 50), m)
    corners = exports.join_polygons(exports.mask_to_polygons(box))
    assert ultralytics_fill(corners, 40, 50).sum() >= 90  # 72 px grown by a row and a column
