"""Bugs found by the third CLI audit: each test failed before its fix.

In-process (``segany.cli.main.main``) with tiny images and the tiny seeded model of conftest, so the whole
file runs in well under a minute on one core.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fails, randomize_, tiny_config
from PIL import Image

from segany.checkpoints import save_checkpoint
from segany.cli.main import build_parser, main
from segany.data.pack import load_pack, pack_own
from segany.errors import InputError
from segany.modeling.sam import Sam


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(randomize_(Sam(tiny_config()), seed=4, scale=0.5),
                           tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _coco(folder: Path, sizes_hw: list[tuple[int, int]], *, seed: int, anns: list[dict] | None = None) -> Path:
    """A COCO file with one box-shaped polygon per image (ids 1..n) and the images beside it."""
    images, default = [], []
    for i, (h, w) in enumerate(sizes_hw, start=1):
        _image(folder / f"im{i}.png", h, w, seed=seed + i)
        images.append({"id": i, "file_name": f"im{i}.png", "height": h, "width": w})
        default.append({"id": 100 + i, "image_id": i, "category_id": 1, "iscrowd": 0,
                        "segmentation": [[2, 2, w - 3, 2, w - 3, h - 3, 2, h - 3]]})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": default if anns is None else anns,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _manifest(pack: Path) -> dict:
    with gzip.open(pack / "manifest.json.gz", "rt") as f:
        return json.load(f)


# ------------------------------------------------------------------ 1: an interrupted re-pack
def test_an_interrupted_repack_never_pairs_old_records_with_new_images(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pack"
    first = _coco(tmp_path / "a", [(40, 60)] * 4, seed=0)
    second = _coco(tmp_path / "b", [(30, 50)] * 6, seed=50)  # the same ids name other images, of another size
    pack_own(out, coco=str(first), name="mc")
    written = []

    def stop_after_two(n: int) -> None:
        written.append(n)
        if len(written) == 2:
            raise KeyboardInterrupt  # what Ctrl-C (or the kill -9 of the audit) does mid-pack

    with pytest.raises(KeyboardInterrupt):
        pack_own(out, coco=str(second), name="mc", progress=stop_after_two)
    assert not any(r["dataset"] == "mc" for r in _manifest(out)["records"])  # old masks no longer listed
    with pytest.raises(InputError, match="rerun the same `segany data pack` command"):
        load_pack(out, split="train", datasets=["mc"])
    cli_fails(["eval", "--data", str(out), "--datasets", "mc", "--split", "train"], capsys, "being packed again")
    pack_own(out, coco=str(second), name="mc")  # the rerun finishes it
    records = load_pack(out, datasets=["mc"])
    assert len(records) == 6 and "unfinished" not in _manifest(out)
    for rec in records:
        with Image.open(rec.image_path) as im:
            assert (im.size[1], im.size[0]) == tuple(rec.size_hw)


def test_a_record_whose_packed_image_was_overwritten_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "pack"
    pack_own(out, coco=str(_coco(tmp_path / "a", [(40, 60), (40, 60)], seed=0)), name="mc")
    jpegs = out / "images" / "mc"
    (jpegs / "1.jpg").write_bytes((jpegs / "2.jpg").read_bytes())  # same size, another source
    with pytest.raises(InputError, match="written from another image than its masks"):
        load_pack(out)


# ------------------------------------------------------------------ 2: an image too thin for the model
def test_a_too_thin_image_fails_alone_in_auto_and_in_one_line_in_predict(tmp_path: Path, tiny_ckpt: Path,
                                                                         capsys) -> None:
    src = tmp_path / "in"
    _image(src / "a.png", 24, 32, seed=1)
    _image(src / "thin.png", 2, 3000, seed=2)
    _image(src / "c.png", 24, 32, seed=3)
    cli_fails(["predict", str(src / "thin.png"), "--point", "1500,1", "--out", str(tmp_path / "p"),
               "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--quiet"], capsys, "too thin")
    out = tmp_path / "auto"
    code = main(["auto", str(src), "--out", str(out), "--checkpoint", str(tiny_ckpt), "--points-per-side", "2",
                 "--device", "cpu", "--quiet"])
    assert code == 1  # a failed image makes the exit status 1, as an unreadable one does
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["done"] == 2 and (out / "c.json").exists()
    [failure] = manifest["failures"]
    assert failure["image"].endswith("thin.png") and "too thin" in failure["error"]


# ------------------------------------------------------------------ 3, 4: COCO annotations left out
@pytest.mark.parametrize(("change", "reason"), [({"iscrowd": 1}, "are crowd regions"),
                                                ({"segmentation": None}, "have no segmentation"),
                                                ({"segmentation": []}, "have an empty segmentation")])
def test_coco_annotations_left_out_are_counted_per_reason(tmp_path: Path, capsys, change: dict,
                                                          reason: str) -> None:
    coco = _coco(tmp_path / "a", [(40, 60)] * 3, seed=0)
    data = json.loads(coco.read_text())
    data["annotations"][0].update(change)
    if change.get("segmentation", 0) is None:
        del data["annotations"][0]["segmentation"]
    coco.write_text(json.dumps(data))
    assert main(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "pack")]) == 0
    err = capsys.readouterr().err
    assert f"1 annotation(s) {reason}" in err, err
    assert len(_manifest(tmp_path / "pack")["records"]) == 2


@pytest.mark.parametrize(("change", "fragment"), [({"iscrowd": 1}, "10 are crowd regions"),
                                                  ({"segmentation": None}, "10 have no segmentation")])
def test_coco_with_no_usable_annotation_says_why_not_to_check_paths(tmp_path: Path, capsys, change: dict,
                                                                    fragment: str) -> None:
    coco = _coco(tmp_path / "a", [(40, 60)] * 5, seed=0)
    data = json.loads(coco.read_text())
    data["annotations"] = [{**a, **change} for a in data["annotations"] * 2]
    coco.write_text(json.dumps(data))
    line = cli_fails(["data", "pack", "--coco", str(coco), "--out", str(tmp_path / "pack")], capsys, fragment)
    assert "check the paths" not in line
    assert not (tmp_path / "pack").exists()


# ------------------------------------------------------------------ 5, 6: YOLO labels
def _yolo(tmp_path: Path, extra_line: str) -> Path:
    root = tmp_path / "yolo"
    for i in range(3):
        _image(root / "images" / "train" / f"i{i}.png", 40, 60, seed=i)
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        lines = ["0 0.1 0.1 0.6 0.1 0.6 0.6 0.1 0.6"] + ([extra_line] if i == 1 else [])
        (root / "labels" / "train" / f"i{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("names:\n  0: box\n  1: tri\n")
    return root


@pytest.mark.parametrize(("line", "fragment"), [("0 nan 0.1 0.5 0.1 0.5 0.5", "i1.txt:2: a coordinate is 'nan'"),
                                                ("0 0.1 inf 0.5 0.1 0.5 0.5", "i1.txt:2: a coordinate is 'inf'"),
                                                ("7 0.1 0.1 0.5 0.1 0.5 0.5", "i1.txt:2: class 7 is not in")])
def test_yolo_nan_coordinates_and_unknown_classes_are_refused_with_file_and_line(tmp_path: Path, capsys,
                                                                                  line: str, fragment: str) -> None:
    cli_fails(["data", "pack", "--yolo", str(_yolo(tmp_path, line)), "--out", str(tmp_path / "pack")], capsys,
              fragment)
    assert not (tmp_path / "pack").exists()


def test_yolo_coordinates_off_the_image_are_clipped_with_a_counted_warning(tmp_path: Path, capsys) -> None:
    root = _yolo(tmp_path, "1 0.5 0.1 1.5 0.1 0.9 0.9")
    assert main(["data", "pack", "--yolo", str(root), "--out", str(tmp_path / "pack")]) == 0
    err = capsys.readouterr().err
    assert "1 YOLO label line(s) have coordinates outside 0-1 (e.g." in err and "i1.txt:2" in err, err


# ------------------------------------------------------------------ 7: an unwritable weights cache
def test_bundled_weights_load_when_the_cache_cannot_be_written(tmp_path: Path, monkeypatch, capsys) -> None:
    from segany.checkpoints import find_weights

    home = tmp_path / "home"
    home.mkdir()
    (home / "joined").write_text("a file where the cache's folder goes: nothing can be written there")
    monkeypatch.setenv("SEGANY_HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = find_weights("segany_tiny")
    assert path is not None and path.is_file() and (tmp_path / "tmp") in path.parents
    assert main(["models"]) == 0
    assert "segany_tiny" in capsys.readouterr().out


# ------------------------------------------------------------------ 8: an interrupted ONNX re-export
def test_an_interrupted_onnx_reexport_leaves_a_folder_that_is_refused(tmp_path: Path, monkeypatch) -> None:
    from segany.export import onnx as onnx_export

    out = tmp_path / "onnx"
    out.mkdir()
    for name in ("encoder.onnx", "decoder.onnx"):  # an earlier export's files
        (out / name).write_bytes(b"old graph")
    (out / onnx_export.META_FILE).write_text(json.dumps(
        {"format": "segany-onnx-v1", "config": tiny_config().to_dict(),
         "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}}))

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_decoder", killed)  # stopped after the encoder was replaced
    monkeypatch.setattr(onnx_export, "export_encoder", lambda model, path: Path(path))
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(Sam(tiny_config()), out)
    assert not (out / onnx_export.META_FILE).exists()
    with pytest.raises(InputError, match="did not finish"):
        onnx_export.OnnxPredictor(out)


# ------------------------------------------------------------------ 9: eval --device
def test_eval_device_mistakes_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import torch

    cli_fails(["eval", "--data", str(tmp_path), "--device", "foo"], capsys, "'foo' is not a device name")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli_fails(["eval", "--data", str(tmp_path), "--device", "cuda"], capsys, "CUDA is not available here")


# ------------------------------------------------------------------ 10: smaller mistakes
def test_predict_rewrite_removes_this_images_earlier_masks(tmp_path: Path, tiny_ckpt: Path) -> None:
    image = _image(tmp_path / "small.png", 24, 32)
    out = tmp_path / "s1"
    base = ["predict", str(image), "--point", "5,5", "--out", str(out), "--checkpoint", str(tiny_ckpt),
            "--device", "cpu", "--quiet"]
    (out / "other_mask1.png").parent.mkdir(parents=True)
    (out / "other_mask1.png").write_bytes(b"another image's mask")
    assert main([*base, "--multimask"]) == 0
    assert (out / "small_mask2.png").exists()
    assert main([*base, "--single"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["other_mask1.png", "small.json", "small_mask0.png",
                                                     "small_overlay.png"]


def test_auto_with_only_unreadable_images_exits_1_saying_none_was_segmented(tmp_path: Path, tiny_ckpt: Path,
                                                                           capsys) -> None:
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["auto", str(bad), "--out", str(tmp_path / "k2"), "--checkpoint", str(tiny_ckpt),
                 "--device", "cpu", "--quiet"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("segany auto: no image could be segmented")
    assert json.loads((tmp_path / "k2" / "manifest.json").read_text())["counts"]["failed"] == 1


@pytest.mark.parametrize("argv", [["predict", "x.png", "--point", "5,5", "--out", ""],
                                  ["auto", "x.png", "--out", ""],
                                  ["eval", "--data", "p", "--out", " "],
                                  ["data", "pack", "--coco", "x.json", "--out", ""]])
def test_an_empty_out_is_refused(tmp_path: Path, capsys, monkeypatch, argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    cli_fails(argv, capsys, "--out is empty")
    assert os.listdir(tmp_path) == []


def test_coco_given_a_folder_says_it_takes_the_json_file(tmp_path: Path, capsys) -> None:
    _coco(tmp_path / "ds", [(40, 60)], seed=0)
    line = cli_fails(["data", "pack", "--coco", str(tmp_path / "ds"), "--out", str(tmp_path / "q")], capsys,
                     "is a folder")
    assert "instances.json" in line and "does not exist" not in line


def test_predict_device_defaults_to_auto_like_auto_and_eval() -> None:
    parser = build_parser()
    for argv in (["predict", "x.png", "--out", "o"], ["auto", "x.png", "--out", "o"], ["eval", "--data", "p"]):
        assert parser.parse_args(argv).device == "auto", argv


def test_auto_rerun_removes_subfolders_it_emptied(tmp_path: Path, tiny_ckpt: Path) -> None:
    src = tmp_path / "in"
    _image(src / "a.png", 24, 32, seed=1)
    _image(src / "sub" / "x.png", 24, 32, seed=2)
    out = tmp_path / "out"
    args = ["--out", str(out), "--checkpoint", str(tiny_ckpt), "--points-per-side", "2", "--device", "cpu",
            "--quiet"]
    assert main(["auto", str(src), *args]) == 0
    assert (out / "sub" / "x.json").exists()
    (src / "sub" / "x.png").unlink()
    (src / "sub").rmdir()
    assert main(["auto", str(src), *args]) == 0
    assert not (out / "sub").exists()


def test_text_grid_over_its_limit_is_refused_before_loading(tmp_path: Path, capsys) -> None:
    """`predict --text` keeps 3 candidates per grid point: --points-per-side 100000 ran out of memory (74.5 GiB)."""
    image = _image(tmp_path / "small.png", 24, 32)
    out = tmp_path / "t"
    for pps in ("65", "100000", "0"):
        cli_fails(["predict", str(image), "--text", "person", "--model", "segany_tiny_labels", "--points-per-side", pps,
                   "--out", str(out)], capsys, "--points-per-side must be between 1 and 64")
    assert not out.exists()


def test_an_image_cut_short_names_skip_bad_and_the_rest_of_the_pack_is_not_read_without_it(tmp_path: Path,
                                                                                           capsys) -> None:
    # A JPEG cut short passes the header check, so packing stopped midway with only the decoder's words; the
    # dataset was withdrawn, and `eval --data PACK` then quietly evaluated the pack's other datasets alone.
    out = tmp_path / "pack"
    pack_own(out, coco=str(_coco(tmp_path / "a", [(40, 60)] * 4, seed=0)), name="mc")
    pack_own(out, coco=str(_coco(tmp_path / "o", [(40, 60)] * 4, seed=9)), name="other")
    second = _coco(tmp_path / "b", [(30, 50)] * 4, seed=50)
    good = (tmp_path / "b" / "im4.png").read_bytes()
    (tmp_path / "b" / "im4.png").write_bytes(good[: len(good) // 3])  # the header reads, the pixels do not
    with pytest.raises(InputError, match="pass --skip-bad to pack the rest without it; until a pack of mc"):
        pack_own(out, coco=str(second), name="mc")
    with pytest.raises(InputError, match=r"mc of the pack .* ask for the others alone \(eval: --datasets other"):
        load_pack(out, split="val")
    assert {r.dataset for r in load_pack(out, datasets=["other"])} == {"other"}
    pack_own(out, coco=str(second), name="mc", skip_bad=True)  # the rerun the message names finishes it
    assert {r.dataset for r in load_pack(out)} == {"mc", "other"}


def test_eval_refuses_a_named_dataset_with_no_images_in_the_split(tmp_path: Path) -> None:
    # `--datasets coco128,pennfudan` evaluated pennfudan alone, and its "all" row said nothing of coco128.
    from segany.eval.run import load_eval_records

    out = tmp_path / "pack"
    pack_own(out, coco=str(_coco(tmp_path / "a", [(40, 60)] * 4, seed=0)), name="trainonly", val_fraction=0.0)
    pack_own(out, coco=str(_coco(tmp_path / "o", [(40, 60)] * 4, seed=9)), name="other", val_fraction=0.5)
    with pytest.raises(InputError, match="dataset.s. trainonly in --datasets have no 'val' images"):
        load_eval_records(out, "val", ["trainonly", "other"])
    with pytest.raises(InputError, match="in --eval-datasets have no 'val' images.*drop them from --eval-datasets"):
        load_eval_records(out, "val", ["trainonly", "other"], flag="--eval-data")  # engine retrain's names
    assert {r.dataset for r in load_eval_records(out, "val", ["other"])} == {"other"}


def test_eval_without_matplotlib_fails_before_the_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    # Its plot came after the whole evaluation: hours of work, then an error and no table.
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cli_fails(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "o")], capsys,
              "'matplotlib' is needed for this feature")
    assert not (tmp_path / "o").exists()


def test_the_eval_table_of_one_click_has_one_click_column() -> None:
    from segany.eval.run import format_table

    row = {"objects": 3, "miou_1": 0.5, "miou_5": 0.5, "noc85": 1.0, "noc90": 1.0, "nof85": 3, "nof90": 3,
           "box_miou": 0.6, "miou_by_clicks": [0.5]}
    head = format_table({"model": {"all": row}}).splitlines()[0]
    assert head.count("1-click") == 1 and "NoC1@85" in head
    row5 = {**row, "miou_by_clicks": [0.5] * 5}
    assert "5-click" in format_table({"model": {"all": row5}}).splitlines()[0]


def test_a_coco_file_listing_one_picture_under_two_ids_is_refused(tmp_path: Path) -> None:
    coco = _coco(tmp_path / "a", [(40, 60)] * 3, seed=0)
    data = json.loads(coco.read_text())
    data["images"][2]["file_name"] = "./" + data["images"][0]["file_name"]  # a merged export's repeat
    coco.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"images 1 and 3 are both './im1.png'; one picture would be packed twice"):
        pack_own(tmp_path / "pack", coco=str(coco), name="mc")
    assert not (tmp_path / "pack").exists()


def _unfinished_pack(tmp_path: Path) -> Path:
    """A pack of datasets "mc" (left unfinished by a re-pack an image stopped) and "other"."""
    out = tmp_path / "pack"
    pack_own(out, coco=str(_coco(tmp_path / "a", [(40, 60)] * 4, seed=0)), name="mc")
    pack_own(out, coco=str(_coco(tmp_path / "o", [(40, 60)] * 4, seed=9)), name="other", val_fraction=0.5)
    second = _coco(tmp_path / "b", [(30, 50)] * 4, seed=50)
    cut = tmp_path / "b" / "im4.png"
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(InputError, match="pass --skip-bad"):
        pack_own(out, coco=str(second), name="mc")
    return out


def test_an_unfinished_dataset_does_not_stop_what_leaves_it_out(tmp_path: Path) -> None:
    # Training on "other" alone was refused for the unfinished "mc", advising the very setting it had; and a
    # typo in eval's --datasets was reported as "mc is unfinished".
    from segany.eval.run import load_eval_records
    from segany.train.config import DataSection
    from segany.train.data import train_records, val_records

    out = _unfinished_pack(tmp_path)
    data = DataSection(pack=str(out), datasets=("other",))
    assert {r.dataset for r in train_records(data)} == {"other"} and val_records(data)
    with pytest.raises(InputError, match="unknown dataset.s. 'othr' in --datasets"):
        load_eval_records(out, "val", ["other", "othr"])
    # Training that names the unfinished one is told to finish the pack, not that the dataset is unknown.
    with pytest.raises(InputError, match="mc of the pack .* rerun the same `segany data pack` command"):
        train_records(DataSection(pack=str(out), datasets=("mc", "other")))


def test_shared_data_packs_take_skip_bad(tmp_path: Path, capsys, monkeypatch) -> None:
    # --skip-bad was silently ignored with --data, so the error's own advice stopped on the same file again.
    import segany.data.formats as formats
    from segany.data.formats.common import InstanceRecord
    from segany.engine.masks import encode_mask

    root = tmp_path / "shared"
    (root / "PennFudanPed").mkdir(parents=True)
    mask = np.zeros((40, 60), bool)
    mask[5:30, 10:50] = True
    recs = [InstanceRecord(image_path=str(_image(tmp_path / "i" / f"{k}.png", 40, 60, seed=k)), size_hw=(40, 60),
                           masks=[encode_mask(mask)], image_id=str(k), dataset="pennfudan") for k in range(3)]
    bad = Path(recs[1].image_path)
    bad.write_bytes(bad.read_bytes()[:200])
    monkeypatch.setattr(formats, "read_shared", lambda name, data_root, limit=None: {"train": recs, "val": []})
    argv = ["data", "pack", "--data", str(root), "--datasets", "pennfudan", "--out", str(tmp_path / "p")]
    assert main(argv) == 1 and "pass --skip-bad" in capsys.readouterr().err
    assert main([*argv, "--skip-bad"]) == 0
    assert f"left out {bad}" in capsys.readouterr().err
    assert len(load_pack(tmp_path / "p")) == 2
