"""Folder exports replace the previous export cleanly, refuse a folder that is not one, always create their
target, say what they wrote and leave out empty masks (audit findings 8, 9, 11); YOLO exports its images and
SA-1B keeps the stored crop box (finding 12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fails
from engine_fixtures import make_images

from segany.cli.main import main
from segany.engine import exports
from segany.engine.db import Annotation
from segany.engine.masks import encode_mask
from segany.engine.store import Store, open_store


def _mask(h: int, w: int, x0: int, side: int = 20) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[10:10 + side, x0:x0 + side] = True
    return m


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, Store, dict, list[dict]]:
    root = tmp_path / "proj"
    store = open_store(root, create=True)
    p = store.create_project("p", labels=["thing"])
    ims = store.add_images(p["id"], make_images(tmp_path / "imgs", 2))
    anns = [store.save_annotation(im["id"], mask=_mask(im["height"], im["width"], x0), label="thing")[0]
            for im in ims for x0 in (5, 40)]
    yield root, store, p, anns
    store.close()


def _empty_mask_row(store: Store, image: dict) -> None:
    """An area-0 annotation as older versions stored them (the store now refuses them)."""
    enc = encode_mask(np.zeros((image["height"], image["width"]), bool))
    with store.transaction() as s:
        s.add(Annotation(uuid="00000000-0000-4000-8000-000000000001", image_id=image["id"], label="thing",
                         rle_counts=enc["counts"], height=image["height"], width=image["width"], area=0,
                         bbox_xywh=[0.0, 0.0, 0.0, 0.0], source="manual", review_state="accepted", prompts={},
                         revision=1))


def test_png_reexport_leaves_no_stale_files(filled: tuple, tmp_path: Path) -> None:
    _, store, p, anns = filled
    out = tmp_path / "png"
    exports.export_png(store, p["id"], out)
    store.update_annotation(anns[1]["id"], review_state="rejected")
    result = exports.export_png_summary(store, p["id"], out)
    listed = {e["file"] for e in json.loads((out / "index.json").read_text())}
    on_disk = {str(f.relative_to(out)) for f in out.rglob("*.png")}
    assert on_disk == listed and len(listed) == 3 and result.annotations == 3
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".png.")]  # no temp folders left


@pytest.mark.parametrize("fmt", ["sa1b", "yolo", "png"])
def test_foreign_folder_refused_unless_forced(filled: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              fmt: str) -> None:
    root = filled[0]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cli_fails(["project", "export", str(root), fmt, str(out)], capsys, "not a segany export")
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    assert main(["project", "export", str(root), fmt, str(out), "--force"]) == 0
    assert "wrote 4 annotations on 2 images" in capsys.readouterr().out and not (out / "keep.txt").exists()


@pytest.mark.parametrize("fmt", ["coco", "sa1b", "yolo", "png"])
def test_empty_project_export_creates_the_target(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 fmt: str) -> None:
    root = tmp_path / "empty"
    assert main(["project", "create", str(root)]) == 0
    out = tmp_path / "ex_empty" / (fmt + (".json" if fmt == "coco" else ""))
    capsys.readouterr()
    assert main(["project", "export", str(root), fmt, str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 0 annotations on 0 images to {out}")
    assert out.is_file() if fmt == "coco" else out.is_dir()


def test_empty_masks_are_left_out_and_counted(filled: tuple, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root, store, p, _ = filled
    _empty_mask_row(store, store.list_images(p["id"])[0])
    for fmt in ("coco", "sa1b", "yolo", "png"):
        out = tmp_path / f"out_{fmt}"
        assert main(["project", "export", str(root), fmt, str(out)]) == 0
        assert "wrote 4 annotations on 2 images" in (line := capsys.readouterr().out) and "1 empty" in line, line
    coco = json.loads((tmp_path / "out_coco").read_text())
    assert all(a["area"] > 0 and a["bbox"][2] > 0 for a in coco["annotations"]) and len(coco["annotations"]) == 4


def test_yolo_exports_its_images_and_sa1b_keeps_the_crop_box(filled: tuple, tmp_path: Path) -> None:
    _, store, p, anns = filled
    yolo = exports.export_yolo(store, p["id"], tmp_path / "yolo")
    yaml = (yolo / "data.yaml").read_text()
    assert "train: images" in yaml and "path:" not in yaml
    labels = sorted(f.stem for f in (yolo / "labels").iterdir())
    assert sorted(f.stem for f in (yolo / "images").iterdir()) == labels and len(labels) == 2
    im = store.list_images(p["id"])[0]
    store.save_annotation(im["id"], mask=_mask(im["height"], im["width"], 70), label="thing", source="auto",
                          review_state="accepted", prompts={"crop_box": [0, 0, 120, 90]})
    sa1b = exports.export_sa1b(store, p["id"], tmp_path / "sa1b")
    recs = json.loads((sa1b / f"{Path(im['file_name']).stem}.json").read_text())["annotations"]
    assert [r["crop_box"] for r in recs] == [[0, 0, im["width"], im["height"]]] * 2 + [[0, 0, 120, 90]]
