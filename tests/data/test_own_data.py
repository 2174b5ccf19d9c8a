"""Packing a user's own dataset (COCO json, YOLO-seg folder, per-object PNG masks) from the command line.

Every test builds its dataset from real image files in a temp folder and packs it for real, so what is
checked is what a person gets: the files in the pack, the split, and the one-line errors.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fails
from PIL import Image

from segany.cli.main import main
from segany.data.datasets import SegmentationDataset
from segany.data.formats import held_out_ids, read_coco, read_yolo_seg
from segany.data.formats.common import decode_rle, encode_mask
from segany.data.pack import load_pack, pack_records
from segany.errors import InputError

# Distinct sizes and colours, so an image packed under the wrong id shows in both its size and its pixels.
SIZES_HW = [(40, 60), (64, 48), (50, 50), (36, 72)]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def _images(folder: Path, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ((h, w), colour) in enumerate(zip(SIZES_HW, COLOURS, strict=True)):
        p = folder / f"img{k}{suffix}"
        Image.fromarray(np.full((h, w, 3), colour, dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _box_polygon(h: int, w: int) -> list[float]:
    x0, y0, x1, y1 = w // 4, h // 4, 3 * w // 4, 3 * h // 4
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _coco(tmp_path: Path, *, reverse_ids: bool = False, name: str = "instances.json") -> Path:
    paths = _images(tmp_path / "imgs")
    ids = list(range(1, len(paths) + 1))
    if reverse_ids:
        ids = ids[::-1]
    images = [{"id": i, "file_name": p.name, "height": h, "width": w}
              for i, p, (h, w) in zip(ids, paths, SIZES_HW, strict=True)]
    anns = [{"id": 100 + i, "image_id": i, "category_id": 1 + (k % 2), "iscrowd": 0,
             "segmentation": [_box_polygon(h, w)]} for k, (i, (h, w)) in enumerate(zip(ids, SIZES_HW, strict=True))]
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    out = tmp_path / name
    out.write_text(json.dumps(data))
    return out


def _manifest(pack: Path) -> dict:
    with gzip.open(pack / "manifest.json.gz", "rt") as f:
        return json.load(f)


def _pack_coco(tmp_path: Path, coco: Path, out: Path, *extra: str) -> int:
    return main(["data", "pack", "--coco", str(coco), "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--max-side", "128", *extra])


# ------------------------------------------------------------------ 1: a rerun never keeps another image
def test_repack_with_other_ids_rewrites_the_images(tmp_path, capsys) -> None:
    out = tmp_path / "pack"
    assert _pack_coco(tmp_path, _coco(tmp_path), out) == 0
    again = _coco(tmp_path, reverse_ids=True, name="reversed.json")  # same files, ids now name other images
    assert _pack_coco(tmp_path, again, out) == 0
    assert "kept from an earlier run" not in capsys.readouterr().out
    for rec in load_pack(out):
        with Image.open(rec.image_path) as im:
            assert (im.size[1], im.size[0]) == rec.size_hw
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert all(decode_rle(m).shape == rec.size_hw for m in rec.masks)
        k = SIZES_HW.index(tuple(rec.size_hw))
        assert np.allclose(pixels.mean(axis=(0, 1)), COLOURS[k], atol=8)
    # The same input again keeps every image.
    assert _pack_coco(tmp_path, again, out) == 0
    assert "4 images (4 kept from an earlier run)" in capsys.readouterr().out


def test_pack_records_rerun_with_other_ids_writes_the_right_pixels(tmp_path) -> None:
    """The library path of the same bug: records whose ids now name other images."""
    out = tmp_path / "pack"
    pack_records([("train", r) for r in read_coco(_coco(tmp_path), tmp_path / "imgs")], out)
    again = pack_records([("train", r) for r in read_coco(_coco(tmp_path, reverse_ids=True, name="r.json"),
                                                         tmp_path / "imgs")], out)
    assert again["reused"] == 0
    for rec in load_pack(out):
        with Image.open(rec.image_path) as im:
            assert (im.size[1], im.size[0]) == rec.size_hw


def test_dataset_refuses_an_image_whose_size_is_not_its_masks(tmp_path) -> None:
    out = tmp_path / "pack"
    pack_records([("train", r) for r in read_coco(_coco(tmp_path), tmp_path / "imgs")], out)
    rec = load_pack(out)[0]
    Image.new("RGB", (rec.size_hw[1] + 7, rec.size_hw[0] + 3)).save(rec.image_path, format="JPEG")
    ds = SegmentationDataset([rec], img_size=64, augment=None)
    with pytest.raises(InputError, match="stale or edited") as exc:
        ds[0]
    assert rec.image_path in str(exc.value)


def test_pack_records_refuses_nothing(tmp_path) -> None:
    with pytest.raises(InputError, match="nothing to pack"):
        pack_records([], tmp_path / "p")
    assert not (tmp_path / "p" / "manifest.json.gz").exists()


# ------------------------------------------------------------------ 2: own data from the command line
def test_coco_pack_has_a_seeded_recorded_split_that_eval_and_training_use(tmp_path, capsys) -> None:
    from segany.eval.run import load_eval_records

    out = tmp_path / "pack"
    args = ["--name", "pets", "--val-fraction", "0.25", "--seed", "3"]
    assert _pack_coco(tmp_path, _coco(tmp_path), out, *args) == 0
    printed = capsys.readouterr().out
    assert "pets" in printed and "data.datasets=[pets]" in printed
    m = _manifest(out)
    assert m["split_rule"] == {"pets": {"val_fraction": 0.25, "seed": 3}}
    assert len(m["splits"]["pets"]["val"]) == 1 and len(m["splits"]["pets"]["train"]) == 3
    assert m["splits"]["pets"]["val"] == held_out_ids("pets", ["1", "2", "3", "4"], fraction=0.25, seed=3)
    val = load_eval_records(out)
    assert [r.image_id for r in val] == m["splits"]["pets"]["val"]
    train = load_pack(out, split="train", datasets=["pets"])
    item = SegmentationDataset(train, img_size=64, augment=None)[0]
    assert item["num_masks"] == 1
    with pytest.raises(InputError, match=r"data.datasets=\[pets\]"):  # the training config's default names
        load_pack(out, split="train", datasets=["coco128", "pennfudan"])
    # Same seed, same split; the split does not depend on the order of the images.
    out2 = tmp_path / "pack2"
    assert _pack_coco(tmp_path, _coco(tmp_path, reverse_ids=True, name="r.json"), out2, *args) == 0
    assert _manifest(out2)["splits"]["pets"]["val"] == m["splits"]["pets"]["val"]


def test_coco_categories_filter_leaves_out_images_without_objects(tmp_path, capsys) -> None:
    out = tmp_path / "pack"
    assert _pack_coco(tmp_path, _coco(tmp_path), out, "--categories", "dog") == 0
    assert "2 image(s) have no objects of dog" in capsys.readouterr().err
    recs = load_pack(out)
    assert len(recs) == 2 and all(r.class_names == ["dog"] for r in recs)


def test_coco_unknown_category_names_the_known_ones(tmp_path, capsys) -> None:
    coco = _coco(tmp_path)
    cli_fails(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "p"), "--images",
               str(tmp_path / "imgs"), "--categories", "cow"], capsys, "'cow'")
    assert not (tmp_path / "p").exists()


def _yolo(tmp_path: Path, lines: dict[str, str]) -> Path:
    root = tmp_path / "yolo"
    paths = _images(root / "images" / "train", ".jpg")
    (root / "labels" / "train").mkdir(parents=True)
    for p in paths:
        (root / "labels" / "train" / f"{p.stem}.txt").write_text(
            lines.get(p.stem, "0 0.2 0.2 0.8 0.2 0.8 0.8 0.2 0.8\n1 0.1 0.1 0.4 0.1 0.4 0.4\n"))
    (root / "data.yaml").write_text("names: [car, bike]\n")
    return root


def test_yolo_pack_with_categories(tmp_path) -> None:
    root = _yolo(tmp_path, {})
    out = tmp_path / "pack"
    assert main(["data", "pack", "--yolo", str(root), "--out", str(out), "--categories", "car", "--name", "rd"]) == 0
    recs = load_pack(out)
    assert len(recs) == 4 and all(r.class_names == ["car"] and r.dataset == "rd" for r in recs)


@pytest.mark.parametrize("line, fragment", [
    ("0 0.1 0.1 0.5 0.1 0.5", "img1.txt:2: expected a class and at least 3 x y pairs, got 6 values"),
    ("0 0.1 0.1 0.5 x 0.5 0.5", "img1.txt:2: not a number"),
    ("0 0.5 0.5 0.2 0.2", "img1.txt:2: 5 values is a YOLO box label"),
])
def test_yolo_malformed_line_names_file_and_line(tmp_path, capsys, line, fragment) -> None:
    root = _yolo(tmp_path, {"img1": f"0 0.2 0.2 0.8 0.2 0.8 0.8\n{line}\n"})
    cli_fails(["data", "pack", "--yolo", str(root), "--out", str(tmp_path / "p")], capsys, fragment)
    assert not (tmp_path / "p").exists()


def test_yolo_missing_split_names_an_option_data_pack_has(tmp_path, capsys) -> None:
    root = _yolo(tmp_path, {})
    line = cli_fails(["data", "pack", "--yolo", str(root), "--split", "val", "--out", str(tmp_path / "p")],
                     capsys, "images/val")
    assert "--split NAME picks" in line
    assert read_yolo_seg(root, None, dataset="x")[0].image_id == "img0"


def _object_masks(tmp_path: Path) -> tuple[Path, Path]:
    imgs = _images(tmp_path / "imgs")
    masks = tmp_path / "masks"
    for p, (h, w) in zip(imgs[:3], SIZES_HW[:3], strict=True):
        (masks / p.stem).mkdir(parents=True)
        for k in range(2):
            m = np.zeros((h, w), dtype=np.uint8)
            m[k * h // 2:(k + 1) * h // 2, : w // 2] = 255
            Image.fromarray(m).save(masks / p.stem / f"object_{k}.png")
    return tmp_path / "imgs", masks


def test_masks_layout_packs_one_object_per_png(tmp_path, capsys) -> None:
    imgs, masks = _object_masks(tmp_path)
    out = tmp_path / "pack"
    assert main(["data", "pack", "--masks", str(masks), "--images", str(imgs), "--out", str(out)]) == 0
    assert "1 image(s) have no mask folder" in capsys.readouterr().err
    recs = load_pack(out)
    assert sorted(r.image_id for r in recs) == ["img0", "img1", "img2"]
    assert all(len(r.masks) == 2 for r in recs)
    assert sum(1 for r in recs if r.image_id in _manifest(out)["splits"]["own"]["val"]) == 1


def test_masks_of_another_size_are_refused(tmp_path, capsys) -> None:
    imgs, masks = _object_masks(tmp_path)
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(masks / "img0" / "object_0.png")
    cli_fails(["data", "pack", "--masks", str(masks), "--images", str(imgs), "--out", str(tmp_path / "p")],
              capsys, "object_0.png is 10x10 but its image")


def test_input_with_no_objects_says_what_was_looked_for(tmp_path, capsys) -> None:
    _images(tmp_path / "imgs")
    (tmp_path / "masks").mkdir()
    cli_fails(["data", "pack", "--masks", str(tmp_path / "masks"), "--images", str(tmp_path / "imgs"),
               "--out", str(tmp_path / "p")], capsys, "/<image stem>/*.png")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--data", "{coco}"], "--coco FILE"),
    (["--datasets", "coco"], "--coco FILE"),
    (["--coco", "{coco}", "--yolo", "x"], "exactly one input"),
    (["--coco", "{coco}", "--datasets", "kvasir"], "--datasets"),
    (["--coco", "{coco}", "--val-fraction", "1.5"], "--val-fraction"),
    (["--coco", "{coco}", "--name", "../up"], "--name"),
])
def test_option_mistakes_are_one_line(tmp_path, capsys, argv, fragment) -> None:
    coco = str(_coco(tmp_path))
    cli_fails(["data", "pack", *(a.format(coco=coco) for a in argv), "--out", str(tmp_path / "p")], capsys, fragment)
    assert not (tmp_path / "p" / "manifest.json.gz").exists()


def test_held_out_ids_needs_a_fraction_for_other_datasets() -> None:
    with pytest.raises(InputError, match="fraction"):
        held_out_ids("ped", ["a", "b"])
    assert held_out_ids("ped", list("abcdefghij"), fraction=0.2) == held_out_ids("ped", list("jihgfedcba"),
                                                                                 fraction=0.2)


# ------------------------------------------------------------------ 5: RLE of another size
def _coco_with_segmentation(tmp_path: Path, seg: dict) -> Path:
    _images(tmp_path / "imgs")
    h, w = SIZES_HW[0]
    data = {"images": [{"id": 1, "file_name": "imgs/img0.png", "height": h, "width": w}],
            "annotations": [{"id": 77, "image_id": 1, "category_id": 1, "segmentation": seg}],
            "categories": [{"id": 1, "name": "a"}]}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return p


def test_uncompressed_rle_of_another_size_is_refused(tmp_path) -> None:
    counts = [10, 20, 30 * 40 - 30]  # a 30x40 mask on a 40x60 image
    p = _coco_with_segmentation(tmp_path, {"size": [30, 40], "counts": counts})
    with pytest.raises(InputError, match=r"annotation 77 .*RLE of size 30x40 but its image is 40x60") as exc:
        read_coco(p)
    assert str(p) in str(exc.value)


def test_compressed_rle_of_another_size_is_refused(tmp_path, capsys) -> None:
    rle = encode_mask(np.ones((30, 40), dtype=bool))
    p = _coco_with_segmentation(tmp_path, rle)
    cli_fails(["data", "pack", "--coco", str(p), "--out", str(tmp_path / "pk")], capsys,
              "annotation 77 (image_id 1) has an RLE of size 30x40 but its image is 40x60")


# ------------------------------------------------------------------ 7: malformed input, named
def test_coco_image_without_height_is_sized_from_its_file(tmp_path) -> None:
    coco = _coco(tmp_path)
    data = json.loads(coco.read_text())
    for img in data["images"]:
        del img["height"], img["width"]
    coco.write_text(json.dumps(data))
    recs = read_coco(coco, tmp_path / "imgs")
    assert [r.size_hw for r in recs] == SIZES_HW


def test_coco_odd_polygon_names_the_annotation(tmp_path) -> None:
    p = _coco_with_segmentation(tmp_path, [[1, 1, 10, 1, 10]])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="annotation 77 .*5 coordinates, an odd count"):
        read_coco(p)


def test_orphan_annotations_are_counted(tmp_path, capsys) -> None:
    coco = _coco(tmp_path)
    data = json.loads(coco.read_text())
    data["annotations"].append({"id": 999, "image_id": 42, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]})
    coco.write_text(json.dumps(data))
    assert _pack_coco(tmp_path, coco, tmp_path / "pack") == 0
    assert "1 annotation(s) name an image_id that is not in 'images'" in capsys.readouterr().err


def test_bad_images_are_all_listed_and_skippable(tmp_path, capsys) -> None:
    coco = _coco(tmp_path)
    (tmp_path / "imgs" / "img1.png").unlink()
    (tmp_path / "imgs" / "img2.png").write_bytes(b"not an image")
    out = tmp_path / "pack"
    line = cli_fails(["data", "pack", "--coco", str(coco), "--images", str(tmp_path / "imgs"), "--out", str(out)],
                     capsys, "2 image(s) cannot be used")
    assert "img1.png: file not found" in line and "img2.png: not a readable image" in line and "--skip-bad" in line
    assert not (out / "manifest.json.gz").exists()
    assert _pack_coco(tmp_path, coco, out, "--skip-bad") == 0
    captured = capsys.readouterr()
    assert captured.err.count("segany: skipped:") == 2 and "2 skipped" in captured.out
    assert sorted(r.image_id for r in load_pack(out)) == ["1", "4"]
