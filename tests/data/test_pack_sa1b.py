"""Packing per-image SA-1B files (SA-1B's own layout, or what `segany auto` writes) for fine-tuning, and what
`segany data pack` says when the objects it looked for are all empty.

Each dataset is real image files in a temp folder with SA-1B files written by segany's own writer, packed for
real through the command line; what is checked is the pack a person gets and the one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import cli_fails
from PIL import Image

from segany.cli.main import main
from segany.data.formats.common import decode_rle
from segany.data.formats.sa1b import to_sa1b, write_sa1b
from segany.data.pack import load_pack

# Distinct sizes, so an image paired with another's masks shows in its size.
SIZES_HW = {"img0": (40, 60), "img1": (64, 48), "img2": (50, 50)}


def _mask(size_hw: tuple[int, int], k: int) -> np.ndarray:
    h, w = size_hw
    m = np.zeros((h, w), dtype=bool)
    m[k * h // 2:(k + 1) * h // 2, w // 4:3 * w // 4] = True  # the top half's box, or the bottom half's
    return m


def _record(m: np.ndarray) -> dict:
    ys, xs = np.nonzero(m)
    h, w = m.shape
    return {"segmentation": m, "bbox": [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()],
            "area": int(m.sum()), "predicted_iou": 0.9, "stability_score": 0.95, "crop_box": [0, 0, w, h],
            "point_coords": [[float(xs.mean()), float(ys.mean())]]}


def _sa1b_dataset(images: Path, jsons: Path, *, subfolder: str = "") -> dict[str, Path]:
    """Images under ``images`` (img2 in ``subfolder``) and their SA-1B files under ``jsons``, named and
    keyed as `segany auto IMAGES --out JSONS` does: ``<key>.json`` with file_name relative to IMAGES."""
    paths = {}
    for i, (stem, size_hw) in enumerate(SIZES_HW.items()):
        key = f"{subfolder}/{stem}" if subfolder and stem == "img2" else stem
        path = images / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*size_hw, 3), 60 * (i + 1), dtype=np.uint8)).save(path)
        records = [_record(_mask(size_hw, k)) for k in range(2)]
        out = jsons / f"{key}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_sa1b(out, to_sa1b(records, image_id=i + 1, file_name=f"{key}.png", size_hw=size_hw))
        paths[key] = path
    return paths


def _pack(*argv: str) -> int:
    return main(["data", "pack", *argv, "--max-side", "128"])


def test_sa1b_folder_of_segany_auto_packs_every_mask(tmp_path: Path, capsys) -> None:
    """--sa1b OUT --images IMAGES packs `segany auto`'s files (a subfolder included; its bookkeeping JSONs
    are not images) with every mask on its own image; SA-1B's own layout (image beside its JSON) needs no
    --images."""
    from segany.data.formats.auto_files import BOOKKEEPING

    _sa1b_dataset(tmp_path / "imgs", tmp_path / "auto", subfolder="sub")
    for name in BOOKKEEPING:
        (tmp_path / "auto" / name).write_text(json.dumps({"images": [], "annotations": []}))
    assert _pack("--sa1b", str(tmp_path / "auto"), "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "pack"), "--name", "mine") == 0
    recs = {r.image_id: r for r in load_pack(tmp_path / "pack")}
    assert sorted(recs) == ["img0", "img1", "sub/img2"]
    for key, rec in recs.items():
        size_hw = SIZES_HW[key.split("/")[-1]]
        assert rec.size_hw == size_hw and rec.dataset == "mine"
        with Image.open(rec.image_path) as im:
            assert (im.size[1], im.size[0]) == size_hw
        assert [np.array_equal(decode_rle(m), _mask(size_hw, k)) for k, m in enumerate(rec.masks)] == [True, True]
    assert "data.datasets=[mine]" in capsys.readouterr().out

    sa1b = tmp_path / "sa1b"  # SA-1B as it ships: sa_N.jpg beside sa_N.json, file_name the bare name
    _sa1b_dataset(sa1b, sa1b)
    assert _pack("--sa1b", str(sa1b), "--out", str(tmp_path / "pack2")) == 0
    assert sorted(r.image_id for r in load_pack(tmp_path / "pack2")) == ["img0", "img1", "img2"]


def test_sa1b_missing_and_resized_images_are_listed_and_skippable(tmp_path: Path, capsys) -> None:
    paths = _sa1b_dataset(tmp_path / "imgs", tmp_path / "auto")
    paths["img0"].unlink()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(paths["img1"])  # resized after segmenting
    argv = ["--sa1b", str(tmp_path / "auto"), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "p")]
    line = cli_fails(["data", "pack", *argv], capsys, "2 image(s) cannot be used")
    assert "img0.png: file not found" in line and "img1.png: image is 20x30 but its annotations say 64x48" in line
    assert "--skip-bad" in line and not (tmp_path / "p").exists()
    assert _pack(*argv, "--skip-bad") == 0
    assert [r.image_id for r in load_pack(tmp_path / "p")] == ["img2"]
    capsys.readouterr()
    # Without --images each image is looked for beside its JSON: the message says where they are looked for.
    cli_fails(["data", "pack", "--sa1b", str(tmp_path / "auto"), "--out", str(tmp_path / "q")], capsys,
              "pass --images")


def test_coco_on_sa1b_files_says_to_use_sa1b(tmp_path: Path, capsys) -> None:
    _sa1b_dataset(tmp_path / "d", tmp_path / "d")
    line = cli_fails(["data", "pack", "--coco", str(tmp_path / "d" / "img0.json"), "--out", str(tmp_path / "p")],
                     capsys, "is an SA-1B file")
    assert f"--sa1b {tmp_path / 'd'}" in line
    cli_fails(["data", "pack", "--coco", str(tmp_path / "d"), "--out", str(tmp_path / "p")], capsys,
              f"is a folder of SA-1B files, as SA-1B and `segany auto` write, not a COCO instances file; pack SA-1B "
              f"files with --sa1b DIR, the folder of the .json files: --sa1b {tmp_path / 'd'}")
    # The other way round: a COCO file among SA-1B files is named, with the option that reads it.
    (tmp_path / "d" / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    cli_fails(["data", "pack", "--sa1b", str(tmp_path / "d"), "--out", str(tmp_path / "p")], capsys,
              "instances.json is a COCO instances file (an 'images' list), not a per-image SA-1B file; pack it "
              "with --coco")


def test_blank_masks_and_empty_labels_say_so_not_to_check_paths(tmp_path: Path, capsys) -> None:
    """Every mask PNG black, or every YOLO label file empty: the paths are right, and the error says what was
    found there instead of "read 3 image(s) with masks; check the paths"."""
    imgs = tmp_path / "imgs"
    _sa1b_dataset(imgs, tmp_path / "unused")
    for stem, (h, w) in SIZES_HW.items():
        (tmp_path / "masks" / stem).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.zeros((h, w), dtype=np.uint8)).save(tmp_path / "masks" / stem / f"{k}.png")
    line = cli_fails(["data", "pack", "--masks", str(tmp_path / "masks"), "--images", str(imgs),
                      "--out", str(tmp_path / "p")], capsys, "all 6 mask PNG(s) in them are empty")
    assert "the masks are blank" in line and "check the paths" not in line

    yolo = tmp_path / "yolo"
    for split, stems in (("train", ["img0", "img1"]), ("val", ["img2"])):
        (yolo / "images" / split).mkdir(parents=True)
        (yolo / "labels" / split).mkdir(parents=True)
        for stem in stems:
            (yolo / "images" / split / f"{stem}.png").write_bytes((imgs / f"{stem}.png").read_bytes())
            (yolo / "labels" / split / f"{stem}.txt").write_text("\n" if stem == "img1" else "")
    line = cli_fails(["data", "pack", "--yolo", str(yolo), "--out", str(tmp_path / "p")], capsys,
                     "of the 3 image(s) under")
    assert "3 have an empty label file; label the objects" in line and "check the paths" not in line
    (yolo / "labels" / "val" / "img2.txt").unlink()
    cli_fails(["data", "pack", "--yolo", str(yolo), "--out", str(tmp_path / "p")], capsys,
              "2 have an empty label file, 1 have no label file")

    coco = tmp_path / "imgs" / "instances.json"  # images listed, none annotated
    coco.write_text(json.dumps({"images": [{"id": i, "file_name": f"{stem}.png", "height": h, "width": w}
                                           for i, (stem, (h, w)) in enumerate(SIZES_HW.items())],
                                "annotations": [], "categories": []}))
    line = cli_fails(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "p")], capsys,
                     f"none of the 3 image(s) listed in {coco} has an annotation")
    assert "check the paths" not in line
    for stem, size_hw in SIZES_HW.items():  # segany auto found no mask in any image
        write_sa1b(imgs / f"{stem}.json", to_sa1b([], image_id=1, file_name=f"{stem}.png", size_hw=size_hw))
    coco.unlink()
    cli_fails(["data", "pack", "--sa1b", str(imgs), "--out", str(tmp_path / "p")], capsys,
              f"the 3 SA-1B file(s) in {imgs} have no annotations")


def test_sa1b_masks_are_on_the_picture_as_shown(tmp_path: Path) -> None:
    """`segany auto` (like SAM's own scripts) segments a photo with its EXIF rotation applied, so an upside-down
    phone photo (orientation 3: same size both ways, which the size cannot tell) is packed turned, masks on it."""
    h, w = 40, 60
    stored = np.zeros((h, w, 3), dtype=np.uint8)
    stored[: h // 2] = 250  # bright top half as stored: the bottom half as shown
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    shown_bright = _mask((h, w), 1) & (np.arange(h)[:, None] >= h // 2)
    write_sa1b(tmp_path / "rot.json", to_sa1b([_record(shown_bright)], image_id=1, file_name="rot.jpg",
                                              size_hw=(h, w)))
    assert _pack("--sa1b", str(tmp_path / "rot.json"), "--out", str(tmp_path / "p"), "--val-fraction", "0") == 0
    (rec,) = load_pack(tmp_path / "p")
    with Image.open(rec.image_path) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels[decode_rle(rec.masks[0])].min() > 200


def test_sa1b_folder_opens_each_header_and_parses_each_mask_once(tmp_path: Path, monkeypatch) -> None:
    """Packing's size check reuses the header the reader opened for the EXIF tag (an unreadable image's line
    included), and the reader's RLE check gives each mask's area: one header open per image, one counts
    parse per mask, where each used to happen twice."""
    from segany.data.formats import common, sa1b
    from segany.data.formats.common import ReadReport
    from segany.data.pack import _readable

    paths = _sa1b_dataset(tmp_path / "imgs", tmp_path / "auto")
    paths["img1"].write_bytes(b"not an image")
    opened: list[str] = []
    parsed: list[str] = []
    real_header, real_parse = common._header, common._string_to_counts

    def header(path: Path, *args, **kwargs):  # noqa: ANN202
        opened.append(Path(path).name)
        return real_header(path, *args, **kwargs)

    def parse(counts: str) -> list[int]:
        parsed.append(counts)
        return real_parse(counts)

    monkeypatch.setattr(common, "_header", header)
    for module in (common, sa1b):
        monkeypatch.setattr(module, "_string_to_counts", parse)
    report = ReadReport()
    recs = _readable(sa1b.read_sa1b_folder(tmp_path / "auto", tmp_path / "imgs", report=report), report)
    assert [r.image_id for r in recs] == ["img0", "img2"]
    assert report.bad == [f"{paths['img1']}: not a readable image (UnidentifiedImageError)"]
    assert sorted(opened) == ["img0.png", "img1.png", "img2.png"]
    masks = [json.loads((tmp_path / "auto" / f"{k}.json").read_text())["annotations"] for k in SIZES_HW]
    assert sorted(parsed) == sorted(a["segmentation"]["counts"] for anns in masks for a in anns)


def test_an_image_named_like_a_bookkeeping_file_in_a_subfolder_is_read(tmp_path: Path) -> None:
    # `segany auto` writes sub/run.jpg's masks as sub/run.json (its own run.json is at the top only), but the
    # reader skipped every run.json, manifest.json... at any depth: those images were lost without a word.
    from segany.data.formats.sa1b import sa1b_json_files

    for rel in ("run.json", "manifest.json", "sub/run.json", "sub/manifest.json", "sub/x.json", ".hidden/y.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in sa1b_json_files(tmp_path)] == [
        "sub/manifest.json", "sub/run.json", "sub/x.json"]
    # A folder of several auto runs' outputs: each run's own bookkeeping (its run.json records a run) is skipped.
    run = tmp_path / "runs" / "run1"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"settings": {"format": "sa1b"}}))
    (run / "image_ids.json").write_text("{}")
    (run / "a.json").write_text("{}")
    assert "runs/run1/a.json" in [p.relative_to(tmp_path).as_posix() for p in sa1b_json_files(tmp_path)]
    assert not {"runs/run1/run.json", "runs/run1/image_ids.json"} & {
        p.relative_to(tmp_path).as_posix() for p in sa1b_json_files(tmp_path)}
