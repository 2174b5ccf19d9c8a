"""Exports never delete the project or files the user put beside an export, replace files only when they are
earlier segany exports, write one YOLO line per instance, and COCO import says what it did to labels and to
annotations no longer in the file (re-audit findings 1, 2, 6, 7, 8, 9, 12 and 16)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import cli_fails
from engine_fixtures import make_images

from segany.cli.main import main
from segany.engine import exports
from segany.engine.masks import encode_mask
from segany.engine.store import open_store


def _square(h: int, w: int, x0: int, y0: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


@pytest.fixture
def proj(tmp_path: Path) -> tuple[Path, Path]:
    """A project folder with three registered images (in ``imgs``) and one accepted mask on each."""
    root, imgs = tmp_path / "P", tmp_path / "imgs"
    make_images(imgs, 3)
    assert main(["project", "create", str(root), "--labels", "thing"]) == 0
    assert main(["project", "add-images", str(root), str(imgs)]) == 0
    store = open_store(root)
    try:
        for im in store.list_images(store.get_project()["id"]):
            store.save_annotation(im["id"], mask=_square(im["height"], im["width"], 5, 5, 20), label="thing")
    finally:
        store.close()
    return root, imgs


def _leftovers(folder: Path) -> list[str]:
    return [f.name for f in folder.iterdir() if f.name.endswith((".tmp", ".old"))]


# ------------------------------------------------------------------------- finding 1: the project's own data
@pytest.mark.parametrize("fmt", ["png", "yolo", "sa1b"])
def test_forced_export_never_replaces_the_project_or_its_images(proj: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    root, imgs = proj
    before = sorted(f.name for f in imgs.iterdir())
    cli_fails(["project", "export", str(root), fmt, str(root), "--force"], capsys, "holds the project's database")
    cli_fails(["project", "export", str(root), fmt, str(tmp_path), "--force"], capsys, "holds the project's database")
    cli_fails(["project", "export", str(root), fmt, str(imgs), "--force"], capsys, "holds images registered")
    cli_fails(["project", "export", str(root), fmt, str(root / "images"), "--force"], capsys, "media folder")
    assert (root / "segany.db").is_file() and sorted(f.name for f in imgs.iterdir()) == before
    assert not _leftovers(root) and not _leftovers(tmp_path)


def test_forced_coco_export_never_overwrites_the_database_or_an_image(proj: tuple[Path, Path],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root, imgs = proj
    image = sorted(imgs.iterdir())[0]
    data = image.read_bytes()
    cli_fails(["project", "export", str(root), "coco", str(root / "segany.db"), "--force"], capsys,
              "is the project's database")
    cli_fails(["project", "export", str(root), "coco", str(image), "--force"], capsys, "is an image registered")
    assert image.read_bytes() == data
    assert main(["project", "stats", str(root)]) == 0


# ------------------------------------------------------------------------- finding 2: files the user added
def test_reexport_refuses_files_the_user_added(proj: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = proj
    out = tmp_path / "ex" / "yolo"
    assert main(["project", "export", str(root), "yolo", str(out)]) == 0
    assert main(["project", "export", str(root), "yolo", str(out)]) == 0  # its own files only: replaced
    (out / "my_notes.txt").write_text("mine")
    (out / "runs" / "train1").mkdir(parents=True)
    (out / "runs" / "train1" / "best.pt").write_bytes(b"weights")
    (out / "labels" / "labels.cache").write_bytes(b"cache")
    line = cli_fails(["project", "export", str(root), "yolo", str(out)], capsys, "3 files it did not write")
    assert "labels/labels.cache" in line and "my_notes.txt" in line and "--force" in line
    assert (out / "runs" / "train1" / "best.pt").read_bytes() == b"weights" and (out / "my_notes.txt").exists()
    assert main(["project", "export", str(root), "yolo", str(out), "--force"]) == 0
    assert not (out / "my_notes.txt").exists()


def test_export_older_than_the_file_list_keeps_added_files(proj: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A marker without a file list (segany before this change): files outside the format's layout are the user's."""
    root, _ = proj
    out = tmp_path / "sa"
    assert main(["project", "export", str(root), "sa1b", str(out)]) == 0
    (out / exports.EXPORT_MARKER).write_text(json.dumps({"format": "sa1b", "written_by": "segany"}))
    assert main(["project", "export", str(root), "sa1b", str(out)]) == 0
    (out / exports.EXPORT_MARKER).write_text(json.dumps({"format": "sa1b", "written_by": "segany"}))
    (out / "notes" / "a.txt").parent.mkdir()
    (out / "notes" / "a.txt").write_text("mine")
    cli_fails(["project", "export", str(root), "sa1b", str(out)], capsys, "notes/a.txt")


# --------------------------------------------------------------------- finding 8: the current folder, rollback
def test_export_into_the_current_folder_is_refused_cleanly(proj: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = proj
    t = tmp_path / "t"
    t.mkdir()
    monkeypatch.chdir(t)
    for _ in range(2):  # a retry says the same, not "not a segany export"
        cli_fails(["project", "export", "../P", "png", "."], capsys, "is the current folder")
    cli_fails(["project", "export", "../P", "png", "..", "--force"], capsys, "holds the project's database")
    assert list(t.iterdir()) == [] and not _leftovers(tmp_path)
    assert main(["project", "export", "../P", "png", "sub"]) == 0 and (t / "sub" / "index.json").is_file()


def test_failed_swap_puts_the_earlier_export_back(proj: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = proj
    out = tmp_path / "png"
    assert main(["project", "export", str(root), "png", str(out)]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    real = os.replace

    def refuse_the_new_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(src).endswith(".tmp") and Path(dst) == out:  # the step that puts the new export in place
            raise OSError(16, "Device or resource busy")
        real(src, dst)

    monkeypatch.setattr(exports.os, "replace", refuse_the_new_folder)
    cli_fails(["project", "export", str(root), "png", str(out)], capsys, "could not move")
    assert sorted(p.name for p in out.rglob("*")) == before and not _leftovers(tmp_path)


# ----------------------------------------------------------------------------- finding 9: file exports
def test_coco_export_replaces_only_its_own_earlier_file(proj: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = proj
    mine = tmp_path / "cocofile.json"
    mine.write_text('{"mine": true}')
    cli_fails(["project", "export", str(root), "coco", str(mine)], capsys, "is not a segany COCO export")
    assert mine.read_text() == '{"mine": true}'
    assert main(["project", "export", str(root), "coco", str(mine), "--force"]) == 0
    assert json.loads(mine.read_text())["info"]["segany"]["format"] == "coco"
    assert main(["project", "export", str(root), "coco-polygons", str(mine)]) == 0  # its own file: replaced
    assert len(json.loads(mine.read_text())["annotations"]) == 3


def test_coco_export_never_overwrites_the_file_the_project_imported(proj: tuple[Path, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root, imgs = proj
    src = tmp_path / "gt.json"
    assert main(["project", "export", str(root), "coco", str(src)]) == 0  # a segany export, imported elsewhere
    assert main(["project", "create", str(tmp_path / "Q")]) == 0
    assert main(["project", "import-coco", str(tmp_path / "Q"), str(src), "--images-dir", str(imgs)]) == 0
    data = src.read_bytes()
    cli_fails(["project", "export", str(tmp_path / "Q"), "coco", str(src), "--force"], capsys,
              "imported annotations from")
    assert src.read_bytes() == data


# ------------------------------------------------------------------------------- finding 7: YOLO instances
def test_yolo_writes_one_line_per_instance(tmp_path: Path) -> None:
    store = open_store(tmp_path / "p", create=True)
    try:
        p = store.create_project("p", labels=["thing"])
        im = store.add_images(p["id"], make_images(tmp_path / "imgs", 1))[0]
        h, w = im["height"], im["width"]
        two_parts = _square(h, w, 10, 10, 40) | _square(h, w, 120, 90, 50)
        two_parts[25:35, 20:30] = False  # and a hole in the first part
        store.save_annotation(im["id"], mask=two_parts, label="thing")
        result = exports.export_yolo_summary(store, p["id"], tmp_path / "yolo")
    finally:
        store.close()
    lines = next((tmp_path / "yolo" / "labels").iterdir()).read_text().splitlines()
    assert len(lines) == 1 == result.annotations
    xy = np.asarray(lines[0].split()[1:], dtype=np.float64).reshape(-1, 2) * [w, h]
    drawn = np.zeros((h, w), np.uint8)
    cv2.fillPoly(drawn, [np.round(xy - 0.5).astype(np.int32)], 1)  # as YOLO trainers rasterise a label line
    iou = (drawn.astype(bool) & two_parts).sum() / (drawn.astype(bool) | two_parts).sum()
    assert iou >= 0.95, iou
    assert not drawn[30, 25], "the hole was filled"


# --------------------------------------------------------------------------------- finding 12: permissions
def test_export_folders_get_the_usual_permissions(proj: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = proj
    old = os.umask(0o022)
    try:
        assert main(["project", "export", str(root), "png", str(tmp_path / "png")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "png").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "png" / "index.json").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------- findings 6 and 16: import
def _coco_file(path: Path, images: list[Path], ids: list[int]) -> Path:
    from PIL import Image

    with Image.open(images[0]) as im:
        w, h = im.size
    anns = [{"id": i, "image_id": 1, "category_id": 1 + i % 2, "iscrowd": 0,
             "segmentation": encode_mask(_square(h, w, 5 + 25 * i, 5, 20))} for i in ids]
    cats = [{"id": i, "name": n} for i, n in enumerate(["person", "bag", "car", "dog", "kite"], 1)]
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": images[0].name, "width": w, "height": h}],
                                "annotations": anns, "categories": cats}))
    return path


def test_import_declares_only_the_labels_it_uses(proj: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root, imgs = proj
    src = _coco_file(tmp_path / "gt.json", sorted(imgs.iterdir()), [1, 2])
    capsys.readouterr()
    assert main(["project", "import-coco", str(root), str(src)]) == 0
    assert "added labels bag, person" in capsys.readouterr().out
    store = open_store(root)
    try:
        assert store.get_project()["labels"] == ["thing", "bag", "person"]
    finally:
        store.close()


def test_reimport_reports_deleted_and_vanished_annotations(proj: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root, imgs = proj
    images = sorted(imgs.iterdir())
    src = _coco_file(tmp_path / "gt.json", images, [1, 2, 3])
    assert main(["project", "import-coco", str(root), str(src)]) == 0
    store = open_store(root)
    try:
        gone = next(a for a in store.list_annotations() if a["prompts"].get("imported_from"))
        store.delete_annotation(gone["id"])
    finally:
        store.close()
    _coco_file(src, images, [1, 2])  # annotation 3 taken out of the file
    capsys.readouterr()
    assert main(["project", "import-coco", str(root), str(src)]) == 0
    out = capsys.readouterr().out
    assert "imported 0 annotations" in out  # the deleted one stays deleted
    assert "1 annotations deleted in the project since an earlier import were left deleted" in out
    assert "1 annotations an earlier import of this file created are no longer in it (kept" in out
    assert main(["project", "add-images", str(root), str(imgs)]) == 0
    assert "added 0 images to 'P', 3 already registered" in capsys.readouterr().out


def test_a_damaged_stored_mask_is_named_and_nothing_is_written(proj: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A stored RLE damaged in the database failed polygon, YOLO and PNG exports with only the decoder's line."""
    from segany.engine.db import Annotation

    root, _ = proj
    store = open_store(root)
    try:
        with store.transaction() as s:
            ann = s.query(Annotation).order_by(Annotation.id).first()
            ann.rle_counts = "0" + ann.rle_counts  # one more run: the counts no longer cover the image
            aid, image_id = ann.id, ann.image_id
    finally:
        store.close()
    for fmt, out in (("coco-polygons", tmp_path / "c.json"), ("yolo", tmp_path / "y"), ("png", tmp_path / "p")):
        cli_fails(["project", "export", str(root), fmt, str(out)], capsys,
                  f"annotation {aid} (image {image_id}) has a damaged stored mask")
        assert not out.exists() and not _leftovers(tmp_path)
