"""Packing a user's own data, second audit: each test builds real image files (JPEGs with EXIF, PNG masks,
COCO json, YOLO folders) in a temp folder and packs them for real, then reads back what a person gets."""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fails
from PIL import Image, ImageOps

from segany.cli.main import main
from segany.data.formats import HELD_OUT, held_out_ids
from segany.data.formats.common import decode_rle
from segany.data.pack import load_pack
from segany.errors import InputError

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _manifest(pack: Path) -> dict:
    with gzip.open(pack / "manifest.json.gz", "rt") as f:
        return json.load(f)


def _two_colour(h: int, w: int, *, split: str = "cols") -> np.ndarray:
    """Red on the left (or top) half, blue on the other: where a mask lands shows in its colour."""
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[...] = BLUE
    if split == "cols":
        arr[:, : w // 2] = RED
    else:
        arr[: h // 2] = RED
    return arr


def _save(path: Path, arr: np.ndarray, orientation: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def _coco_file(tmp_path: Path, images: list[dict], anns: list[dict], name: str = "ann.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return p


def _ann(i: int, image_id: object, x0: int, y0: int, x1: int, y1: int) -> dict:
    return {"id": i, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


def _colour_under_masks(pack: Path) -> list[np.ndarray]:
    out = []
    for rec in load_pack(pack):
        with Image.open(rec.image_path) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        for rle in rec.masks:
            m = decode_rle(rle)
            assert m.shape == pixels.shape[:2]
            out.append(pixels[m].mean(axis=0))
    return out


# ------------------------------------------------------------------ 1: duplicate COCO image ids
def test_coco_duplicate_image_ids_are_refused_naming_both_files(tmp_path, capsys) -> None:
    _save(tmp_path / "a.jpg", _two_colour(40, 60))
    _save(tmp_path / "b.jpg", _two_colour(40, 60))
    imgs = [{"id": 8, "file_name": "a.jpg", "height": 40, "width": 60},
            {"id": 8, "file_name": "b.jpg", "height": 40, "width": 60}]
    coco = _coco_file(tmp_path, imgs, [_ann(1, 8, 2, 2, 20, 20), _ann(2, 8, 30, 5, 50, 30)])
    line = cli_fails(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "p")], capsys, "share the id 8")
    assert "'a.jpg'" in line and "'b.jpg'" in line
    assert not (tmp_path / "p" / "manifest.json.gz").exists()


# ------------------------------------------------------------------ 2: EXIF-rotated JPEGs
@pytest.mark.parametrize("hw", [(40, 64), (48, 48)])
def test_exif_rotated_image_with_masks_on_its_stored_pixels_is_packed_unrotated(tmp_path, capsys, hw) -> None:
    h, w = hw
    _save(tmp_path / "rot.jpg", _two_colour(h, w), orientation=6)
    _save(tmp_path / "plain.jpg", _two_colour(h, w))
    imgs = [{"id": 1, "file_name": "plain.jpg", "height": h, "width": w},
            {"id": 2, "file_name": "rot.jpg", "height": h, "width": w}]  # the stored frame, as labelers draw
    anns = [_ann(10 + k, k, 2, 2, w // 2 - 4, h - 3) for k in (1, 2)]  # on the red (left) half
    coco = _coco_file(tmp_path, imgs, anns)
    assert main(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "p")]) == 0
    assert "EXIF orientation" in capsys.readouterr().err
    for colour in _colour_under_masks(tmp_path / "p"):
        assert np.allclose(colour, RED, atol=25), colour


def test_exif_rotated_image_with_masks_on_the_shown_picture_is_packed_rotated(tmp_path) -> None:
    stored = _two_colour(40, 64)
    _save(tmp_path / "rot.jpg", stored, orientation=6)
    with Image.open(tmp_path / "rot.jpg") as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert shown.shape[:2] == (64, 40)
    ys, xs = np.nonzero(shown[..., 0] > 128)  # the red part as a viewer shows it
    imgs = [{"id": 1, "file_name": "rot.jpg", "height": 64, "width": 40}]
    coco = _coco_file(tmp_path, imgs, [_ann(1, 1, int(xs.min()) + 2, int(ys.min()) + 2,
                                            int(xs.max()) - 2, int(ys.max()) - 2)])
    assert main(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "p")]) == 0
    [colour] = _colour_under_masks(tmp_path / "p")
    assert np.allclose(colour, RED, atol=25), colour


@pytest.mark.parametrize("frame", ["shown", "stored"])
def test_without_a_size_in_the_file_the_annotations_name_the_frame(tmp_path, frame: str) -> None:
    # Sized from the file's stored pixels alone, a polygon drawn on the shown (rotated) picture was cut off or
    # left out ("a mask of no pixels inside the image"). Red on the top rows: shown, it is the right-hand side,
    # whose polygon reaches below the stored frame's 40 rows, so the frame is not ambiguous.
    stored = _two_colour(40, 64, split="rows")
    _save(tmp_path / "rot.jpg", stored, orientation=6)
    with Image.open(tmp_path / "rot.jpg") as im:
        picture = np.asarray((ImageOps.exif_transpose(im) if frame == "shown" else im).convert("RGB"))
    ys, xs = np.nonzero(picture[..., 0] > 128)  # the red part in that frame
    imgs = [{"id": 1, "file_name": "rot.jpg"}]  # no height or width: sized from the file
    coco = _coco_file(tmp_path, imgs, [_ann(1, 1, int(xs.min()) + 2, int(ys.min()) + 2,
                                            int(xs.max()) - 2, int(ys.max()) - 2)])
    assert main(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "p")]) == 0
    [colour] = _colour_under_masks(tmp_path / "p")
    assert np.allclose(colour, RED, atol=25), colour


def test_size_mismatch_is_listed_before_any_image_is_written(tmp_path, capsys) -> None:
    _save(tmp_path / "a.jpg", _two_colour(40, 64))
    _save(tmp_path / "b.jpg", _two_colour(40, 64), orientation=6)
    imgs = [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 64},
            {"id": 2, "file_name": "b.jpg", "height": 50, "width": 50}]
    coco = _coco_file(tmp_path, imgs, [_ann(1, 1, 2, 2, 20, 20), _ann(2, 2, 2, 2, 20, 20)])
    line = cli_fails(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "p")], capsys,
                     "b.jpg: image is 40x64 (64x40 as its EXIF rotation shows it) but its annotations say 50x50")
    assert "--skip-bad" in line
    assert not list((tmp_path / "p").rglob("*.jpg"))


def test_object_masks_in_the_shown_frame_of_a_rotated_image(tmp_path) -> None:
    _save(tmp_path / "imgs" / "rot.jpg", _two_colour(40, 64), orientation=6)
    with Image.open(tmp_path / "imgs" / "rot.jpg") as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    mask = np.where(shown[..., 0] > 128, 255, 0).astype(np.uint8)
    (tmp_path / "masks" / "rot").mkdir(parents=True)
    Image.fromarray(mask).save(tmp_path / "masks" / "rot" / "o.png")
    assert main(["data", "pack", "--masks", str(tmp_path / "masks"), "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "p")]) == 0
    [colour] = _colour_under_masks(tmp_path / "p")
    assert np.allclose(colour, RED, atol=30), colour


# ------------------------------------------------------------------ 3: packing into an existing pack merges
def _mask_data(tmp_path: Path, stems: list[str], folder: str = "m") -> tuple[Path, Path]:
    imgs, masks = tmp_path / f"{folder}_imgs", tmp_path / f"{folder}_masks"
    for stem in stems:
        _save(imgs / f"{stem}.jpg", _two_colour(40, 60))
        (masks / stem).mkdir(parents=True, exist_ok=True)
        m = np.zeros((40, 60), dtype=np.uint8)
        m[5:30, 5:25] = 255
        Image.fromarray(m).save(masks / stem / "o.png")
    return imgs, masks


def test_packing_a_second_dataset_keeps_the_first_and_replacing_one_removes_its_orphans(tmp_path, capsys) -> None:
    out = tmp_path / "p"
    imgs_a, masks_a = _mask_data(tmp_path, ["a0", "a1", "a2"], "a")
    imgs_b, masks_b = _mask_data(tmp_path, ["b0", "b1"], "b")
    assert main(["data", "pack", "--masks", str(masks_a), "--images", str(imgs_a), "--name", "one", "--out",
                 str(out), "--seed", "4"]) == 0
    assert f"the pack {out} now holds one\n" in capsys.readouterr().out  # a new pack: nothing replaced
    assert main(["data", "pack", "--masks", str(masks_b), "--images", str(imgs_b), "--name", "two", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "now holds one, two (one kept unchanged)\n" in printed and "data.datasets=[one,two]" in printed
    m = _manifest(out)
    assert sorted(m["splits"]) == ["one", "two"] and sorted(m["split_rule"]) == ["one", "two"]
    assert m["split_rule"]["one"]["seed"] == 4
    assert sorted(r.image_id for r in load_pack(out)) == ["a0", "a1", "a2", "b0", "b1"]
    # Replacing "one" with fewer images keeps "two" and leaves no stale JPEG of "one".
    (imgs_a / "a2.jpg").unlink()
    assert main(["data", "pack", "--masks", str(masks_a), "--images", str(imgs_a), "--name", "one", "--out",
                 str(out)]) == 0
    assert "now holds two, one (one replaced; two kept unchanged)\n" in capsys.readouterr().out
    assert sorted(r.image_id for r in load_pack(out)) == ["a0", "a1", "b0", "b1"]
    assert sorted(p.name for p in (out / "images" / "one").iterdir()) == ["a0.jpg", "a1.jpg"]
    assert all(Path(r.image_path).is_file() for r in load_pack(out))


# ------------------------------------------------------------------ 6: a stable split when images are added
def test_adding_images_never_moves_an_old_image_across_the_split() -> None:
    old = [f"img{k:04d}" for k in range(100)]
    new = old + [f"new{k:04d}" for k in range(10)]
    old_val = set(held_out_ids("mine", old, fraction=0.1, seed=0))
    new_val = set(held_out_ids("mine", new, fraction=0.1, seed=0))
    assert old_val and old_val <= new_val
    assert not (set(old) - old_val) & new_val  # every old train image is still train
    assert held_out_ids("mine", ["a"], fraction=0.5) == []  # one image: it trains
    assert len(held_out_ids("mine", ["a", "b"], fraction=0.01)) == 1  # at least one held out when F > 0


def test_shared_dataset_splits_are_frozen_and_were_the_seeded_shuffle() -> None:
    """The shipped model's training and evaluation depend on these splits: the frozen lists are what the seeded
    shuffle of each dataset's ids on disk gave (20 and 80 held out), and they no longer depend on what else is read."""
    from conftest import SHARED_DATA

    from segany.data.formats import SHARED_DIRS, frozen_split

    on_disk = {"pennfudan": [p.stem for p in (SHARED_DATA / SHARED_DIRS["pennfudan"] / "PNGImages").glob("*.png")],
               "kvasir": (SHARED_DATA / SHARED_DIRS["kvasir"] / "train.txt").read_text().split()}
    for name, n in HELD_OUT.items():
        val, train = frozen_split(name)
        pool = sorted(on_disk[name])
        random.Random(f"{name}-5").shuffle(pool)
        assert sorted(val) == sorted(pool[:n]) and len(val) == n
        assert val | train == set(on_disk[name]) and not val & train
        assert held_out_ids(name, on_disk[name][::-1]) == sorted(val)


def test_a_changed_copy_of_a_shared_dataset_keeps_every_image_on_its_side() -> None:
    """A copy of PennFudan that lost one image and gained others: every known image keeps its side (the
    whole-list shuffle moved several), and the new ones split by their own hash, about the frozen share."""
    from segany.data.formats import frozen_split

    val, train = frozen_split("pennfudan")
    known = sorted(val | train)
    new = [f"MyPed{k:05d}" for k in range(400)]
    for ids in (known[1:], known + new, known[:40]):
        held = set(held_out_ids("pennfudan", ids))
        assert held & set(known) == val & set(ids)
    held_new = set(held_out_ids("pennfudan", known + new)) - val
    assert 0.08 < len(held_new) / len(new) < 0.24  # the frozen share is 20/130
    assert held_new == set(held_out_ids("pennfudan", new))
    with pytest.raises(InputError, match="frozen .* takes no seed"):  # a seed would be silently ignored
        held_out_ids("pennfudan", known, seed=6)


# ------------------------------------------------------------------ 7: coloured and alpha masks
@pytest.mark.parametrize("mode", ["green", "alpha_black", "alpha_white"])
def test_coloured_and_transparent_object_masks_keep_the_object(tmp_path, mode) -> None:
    imgs, masks = _mask_data(tmp_path, ["g"])
    inside = np.zeros((40, 60), dtype=bool)
    inside[5:30, 5:25] = True
    if mode == "green":
        arr = np.zeros((40, 60, 3), dtype=np.uint8)
        arr[inside] = (0, 255, 0)
    else:
        arr = np.zeros((40, 60, 4), dtype=np.uint8)
        arr[..., :3] = 255 if mode == "alpha_white" else 0
        arr[inside, 3] = 255
    Image.fromarray(arr).save(masks / "g" / "o.png")
    assert main(["data", "pack", "--masks", str(masks), "--images", str(imgs), "--out", str(tmp_path / "p")]) == 0
    [rec] = load_pack(tmp_path / "p")
    assert np.array_equal(decode_rle(rec.masks[0]), inside)


# ------------------------------------------------------------------ 8: a YOLO folder's own val split
def _yolo(tmp_path: Path, splits: dict[str, int]) -> Path:
    root = tmp_path / "yolo"
    for sp, n in splits.items():
        (root / "labels" / sp).mkdir(parents=True)
        for k in range(n):
            _save(root / "images" / sp / f"{sp}{k}.jpg", _two_colour(40, 60))
            (root / "labels" / sp / f"{sp}{k}.txt").write_text("0 0.1 0.1 0.4 0.1 0.4 0.8 0.1 0.8\n")
    (root / "data.yaml").write_text("names: [thing]\n")
    return root


def test_yolo_val_folder_is_the_held_out_split(tmp_path, capsys) -> None:
    root = _yolo(tmp_path, {"train": 6, "val": 2})
    out = tmp_path / "p"
    assert main(["data", "pack", "--yolo", str(root), "--out", str(out), "--val-fraction", "0.5"]) == 0
    assert "--val-fraction is not applied" in capsys.readouterr().err
    splits = _manifest(out)["splits"]["own"]
    assert sorted(splits["val"]) == ["val0", "val1"] and len(splits["train"]) == 6
    assert _manifest(out)["split_rule"]["own"] == {"val_folders": ["val"]}


# ------------------------------------------------------------------ 9: one stem, two image files
def test_masks_for_a_stem_with_two_image_files_are_refused(tmp_path, capsys) -> None:
    imgs, masks = _mask_data(tmp_path, ["gray"])
    Image.fromarray(_two_colour(40, 60)).save(imgs / "gray.png")
    line = cli_fails(["data", "pack", "--masks", str(masks), "--images", str(imgs), "--out", str(tmp_path / "p")],
                     capsys, "share the name 'gray'")
    assert "gray.jpg" in line and "gray.png" in line


# ------------------------------------------------------------------ 10: unsafe ids stay inside the pack
def test_an_id_with_a_path_never_writes_outside_the_pack(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "a.jpg", _two_colour(40, 60))
    _save(tmp_path / "in" / "b.jpg", _two_colour(40, 60))
    imgs = [{"id": "../../escaped", "file_name": "a.jpg", "height": 40, "width": 60},
            {"id": "../..escaped", "file_name": "b.jpg", "height": 40, "width": 60}]
    coco = _coco_file(tmp_path / "in", imgs, [_ann(1, "../../escaped", 2, 2, 20, 20),
                                              _ann(2, "../..escaped", 2, 2, 20, 20)])
    out = tmp_path / "deep" / "p"
    assert main(["data", "pack", "--coco", str(coco), "--out", str(out)]) == 0
    written = sorted(p for p in tmp_path.rglob("*.jpg") if not p.is_relative_to(tmp_path / "in"))
    assert len(written) == 2 and all(p.parent == out / "images" / "own" for p in written)
    assert sorted(r.image_id for r in load_pack(out)) == sorted(["../..escaped", "../../escaped"])


# ------------------------------------------------------------------ 11a: no val image, said at pack and eval
def test_a_pack_without_val_images_warns_and_eval_names_the_fix(tmp_path, capsys) -> None:
    from segany.eval.run import load_eval_records

    imgs, masks = _mask_data(tmp_path, ["a", "b"])
    out = tmp_path / "p"
    assert main(["data", "pack", "--masks", str(masks), "--images", str(imgs), "--out", str(out),
                 "--val-fraction", "0"]) == 0
    assert "own has no val image (--val-fraction is 0)" in capsys.readouterr().err
    with pytest.raises(InputError, match="--val-fraction 0.1"):
        load_eval_records(out)


# ------------------------------------------------------------------ 12a: each warning printed once
def test_each_pack_warning_is_printed_once(tmp_path, capsys, caplog) -> None:
    """The CLI prints the report's warnings; the library must not also log them at WARNING, which Python
    prints bare on stderr when no handler is set (so every warning appeared twice)."""
    imgs, masks = _mask_data(tmp_path, ["a", "b", "c"])
    _save(imgs / "lonely.jpg", _two_colour(40, 60))  # an image without a mask folder: one warning
    with caplog.at_level(logging.DEBUG):
        assert main(["data", "pack", "--masks", str(masks), "--images", str(imgs), "--out", str(tmp_path / "p")]) == 0
    printed = [ln for ln in capsys.readouterr().err.splitlines() if "have no mask folder" in ln]
    assert len(printed) == 1 and printed[0].startswith("segany: warning:")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "have no mask folder" in r.message]


@pytest.mark.parametrize("orientation", [6, 3])  # a quarter turn (sizes swap) and a half turn (sizes equal)
def test_yolo_labels_of_an_exif_rotated_photo_are_on_the_shown_picture(tmp_path, orientation) -> None:
    """Ultralytics reads images with their EXIF rotation applied, so YOLO polygons are fractions of the
    picture as shown; packed, the mask must land on the part of the image it was drawn on."""
    root = tmp_path / "yolo"
    _save(root / "images" / "train" / "rot.jpg", _two_colour(40, 64), orientation=orientation)
    with Image.open(root / "images" / "train" / "rot.jpg") as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    sh, sw = shown.shape[:2]
    ys, xs = np.nonzero(shown[..., 0] > 128)  # red, as a viewer (and Ultralytics) shows it
    x0, y0, x1, y1 = (xs.min() + 2) / sw, (ys.min() + 2) / sh, (xs.max() - 2) / sw, (ys.max() - 2) / sh
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "rot.txt").write_text(f"0 {x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1}\n")
    assert main(["data", "pack", "--yolo", str(root), "--split", "train", "--out", str(tmp_path / "p"),
                 "--val-fraction", "0"]) == 0
    [colour] = _colour_under_masks(tmp_path / "p")
    assert np.allclose(colour, RED, atol=25), colour


def test_coco_image_ids_written_as_text_for_numbered_images_are_named(tmp_path) -> None:
    # Annotations with image_id "1" for an image with id 1 were left out as orphans, and the pack then said
    # the file had no annotations at all.
    from segany.data.formats.coco import read_coco

    img = _save(tmp_path / "img" / "a.jpg", _two_colour(40, 60))
    images = [{"id": 1, "file_name": img.name, "height": 40, "width": 60}]
    path = _coco_file(tmp_path, images, [_ann(1, "1", 2, 2, 20, 20), _ann(2, "1", 30, 5, 50, 30)])
    with pytest.raises(InputError, match=r"2 annotation\(s\) give image_id as text \('1'\) where 'images' gives "
                                         r"the id as a number \(1\)"):
        read_coco(path, tmp_path / "img")
    path = _coco_file(tmp_path, images, [_ann(1, 1, 2, 2, 20, 20)])
    assert len(read_coco(path, tmp_path / "img")[0].masks) == 1
