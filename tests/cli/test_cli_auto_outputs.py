"""`segany auto`'s output folder: bookkeeping names, stable ids, --out inside the input, overlays on resume,
the prompt limit and the manifest's counts. In-process runs on small images keep each test a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, randomize_, tiny_config
from PIL import Image

from segany.checkpoints import save_checkpoint
from segany.cli.main import main
from segany.modeling.sam import Sam

SAMPLES = sorted((REPO / "src" / "segany" / "assets" / "samples").glob("*.jpg"))
FAST = ["--points-per-side", "3", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--device", "cpu",
        "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(randomize_(Sam(tiny_config()), seed=0, scale=0.1).eval(), path)
    return path


def _images(folder: Path, *names: str, first: int = 0) -> Path:
    """Small copies of the sample photos (a different one per name, so their masks differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, start=first):
        with Image.open(SAMPLES[i % len(SAMPLES)]) as im:
            im.convert("RGB").resize((96, 64)).save(folder / name)
    return folder


def _auto(checkpoint: Path, *args: str | Path) -> int:
    return main(["auto", *map(str, args), "--checkpoint", str(checkpoint), *FAST])


def _json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("fmt", ["coco", "sa1b", "png"])
def test_image_names_never_overwrite_bookkeeping_files(fmt: str, checkpoint: Path, tmp_path: Path) -> None:
    names = ["run.jpg", "manifest.jpg", "coco_results.jpg", "coco_images.jpg", "image_ids.jpg", "Run.png",
             "x.jpg"]
    d, out = _images(tmp_path / "in", *names), tmp_path / "out"
    assert _auto(checkpoint, d, "--out", out, "--format", fmt) == 0
    assert _auto(checkpoint, d, "--out", out, "--format", fmt, "--resume") == 0
    assert "settings" in _json(out / "run.json") and _json(out / "manifest.json")["counts"]["done"] == 7
    suffix = "" if fmt == "png" else ".json"
    for name in names[:6]:  # each reserved name keeps its extension, the way x.jpg beside x.png does
        assert (out / f"{name}{suffix}").exists(), name
    assert (out / f"x{suffix}").exists()  # ordinary names stay where they always were
    if fmt == "coco":
        assert sorted(im["file_name"] for im in _json(out / "coco_images.json")["images"]) == sorted(names)
    listing = tmp_path / "list.txt"  # a list input is held to the same rule
    listing.write_text("in/run.jpg\nin/x.jpg\n")
    assert _auto(checkpoint, listing, "--out", tmp_path / "l", "--format", fmt) == 0
    assert (tmp_path / "l" / f"run.jpg{suffix}").exists() and "settings" in _json(tmp_path / "l" / "run.json")


def test_names_a_next_run_would_clean_up_are_kept_apart(tmp_path: Path) -> None:
    from segany.cli.auto import collect_images

    listing = tmp_path / "list.txt"  # a png output folder ".x.tmp" would look like a killed run's temp file
    listing.write_text(".x.tmp.jpg\nrun.jpg\nRUN.png\nrun.jpg\n")  # run.jpg twice: segmented once
    assert [k for _, k in collect_images(str(listing))] == [".x.tmp.jpg", "run.jpg", "RUN.png"]


def test_image_ids_stay_stable_across_resumes_and_folder_changes(checkpoint: Path, tmp_path: Path) -> None:
    d, out = _images(tmp_path / "in", "b.jpg", "d.jpg"), tmp_path / "out"
    assert _auto(checkpoint, d, "--out", out, "--format", "coco") == 0
    _images(d, "a.jpg", first=2)  # sorts first, so a listing position would give it id 1
    assert _auto(checkpoint, d, "--out", out, "--format", "coco", "--resume") == 0
    ids = {im["file_name"]: im["id"] for im in _json(out / "coco_images.json")["images"]}
    assert ids == {"b.jpg": 1, "d.jpg": 2, "a.jpg": 3}
    per_image = {im: _json(out / f"{Path(im).stem}.json")["results"] for im in ids}
    merged = _json(out / "coco_results.json")
    for name, image_id in ids.items():  # each image's masks under its own id only
        assert [r for r in merged if r["image_id"] == image_id] == per_image[name]
    # An image removed and another added: the new one gets a new id, never the removed one's.
    (d / "d.jpg").unlink()
    _images(d, "e.jpg", first=3)
    assert _auto(checkpoint, d, "--out", out, "--format", "coco", "--resume") == 0
    assert {im["file_name"]: im["id"] for im in _json(out / "coco_images.json")["images"]} == {"a.jpg": 3, "b.jpg": 1,
                                                                                      "e.jpg": 4}


def test_sa1b_annotation_ids_are_unique_across_the_output(checkpoint: Path, tmp_path: Path) -> None:
    d, out = _images(tmp_path / "in", "b.jpg", "c.jpg"), tmp_path / "out"
    assert _auto(checkpoint, d, "--out", out) == 0
    _images(d, "a.jpg", first=2)
    assert _auto(checkpoint, d, "--out", out, "--resume") == 0
    files = {n: _json(out / f"{n}.json") for n in ("a", "b", "c")}
    assert {n: f["image"]["image_id"] for n, f in files.items()} == {"a": 3, "b": 1, "c": 2}
    ann_ids = [a["id"] for f in files.values() for a in f["annotations"]]
    assert len(ann_ids) >= 3 and len(set(ann_ids)) == len(ann_ids)
    assert files["b"]["annotations"][0]["id"] == 1_000_000  # image_id * 1e6 + index: same in any run


def test_out_inside_the_input_folder_is_not_read_back(checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    nest = _images(tmp_path / "nest", "x.jpg", "y.jpg")
    args = ["--out", nest / "masks", "--format", "png", "--overlay"]
    assert _auto(checkpoint, nest, *args) == 0
    capsys.readouterr()
    assert _auto(checkpoint, nest, *args, "--resume") == 0
    err = capsys.readouterr().err
    assert "0 processed, 2 already done" in err and "skipped" not in err, err
    assert _json(nest / "masks" / "manifest.json")["counts"]["images"] == 2
    assert not (nest / "masks" / "masks").exists()
    # A second output folder beside the first: the first's masks and overlays are not input either.
    assert _auto(checkpoint, nest, "--out", nest / "v2", "--format", "png") == 0
    assert sorted(p.name for p in (nest / "v2").iterdir() if p.is_dir()) == ["x", "y"]
    capsys.readouterr()
    # --out the input folder itself: its PNG outputs would be input next time, so that is refused up front.
    assert _auto(checkpoint, nest, "--out", nest, "--format", "png") == 1
    err = capsys.readouterr().err
    assert "is the input folder" in err and err.count("\n") == 1 and not (nest / "run.json").exists()


@pytest.mark.parametrize("fmt", ["sa1b", "coco", "png"])
def test_resume_with_overlay_adds_the_missing_overlays(fmt: str, checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    d = _images(tmp_path / "in", "a.jpg", "b.jpg")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert _auto(checkpoint, d, "--out", out, "--format", fmt) == 0
    assert not list(out.glob("*.overlay.png"))
    capsys.readouterr()
    assert _auto(checkpoint, d, "--out", out, "--format", fmt, "--resume", "--overlay") == 0
    assert "(2 overlays added)" in capsys.readouterr().err
    assert _json(out / "manifest.json")["this_run"]["overlays_added"] == 2
    assert _auto(checkpoint, d, "--out", fresh, "--format", fmt, "--overlay") == 0
    for name in ("a", "b"):  # drawn from the saved masks, identical to a run that had --overlay throughout
        assert (out / f"{name}.overlay.png").read_bytes() == (fresh / f"{name}.overlay.png").read_bytes()


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--points-per-side", "100000"], "asks for 10,000,000,000 point prompts per image, over the limit of 65,536"),
    (["--points-per-side", "3000"], "asks for 9,000,000 point prompts per image"),
    (["--points-per-side", "256", "--crop-n-layers", "1"], "--crop-n-layers 1 asks for 327,680 point prompts per image"),
    (["--points-per-side", "64", "--crop-n-layers", "9", "--crop-n-points-downscale-factor", "1"],
     "--crop-n-layers 9 asks for at least"),
])
def test_oversized_grids_are_refused_before_anything_is_written(flags: list[str], fragment: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = _images(tmp_path / "in", "a.jpg")
    assert main(["auto", str(src), "--out", str(tmp_path / "o"), *flags]) == 1
    err = capsys.readouterr().err
    assert fragment in err and "lower --points-per-side or --crop-n-layers" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_grids_up_to_the_limit_pass_the_check() -> None:
    from segany.cli.auto import check_prompt_budget

    for pps, layers, down in ((256, 0, 1), (32, 3, 2), (64, 2, 2), (1, 1000, 2)):
        check_prompt_budget({"points_per_side": pps, "crop_n_layers": layers,
                             "crop_n_points_downscale_factor": down})


def test_manifest_counts_the_whole_output_and_other_files_are_mentioned(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, out = _images(tmp_path / "in", "a.jpg", "b.jpg"), tmp_path / "out"
    Image.new("RGB", (8, 8)).save(d / "anim.gif")
    (d / "notes.txt").write_text("not an image")
    assert _auto(checkpoint, d, "--out", out) == 0
    err = capsys.readouterr().err
    assert "skipped 2 files that are not images (1 .gif, 1 .txt); images are .bmp" in err, err
    assert _auto(checkpoint, d, "--out", out, "--resume") == 0
    manifest = _json(out / "manifest.json")
    masks = sum(len(_json(out / f"{n}.json")["annotations"]) for n in ("a", "b"))
    assert masks > 0
    assert manifest["counts"] == {"images": 2, "done": 2, "failed": 0, "masks": masks, "not_images": 2}
    assert manifest["this_run"]["processed"] == 0 and manifest["this_run"]["skipped_existing"] == 2
    assert manifest["overlay"] is False
    assert f"the output holds 2 of 2 images, {masks} masks" in capsys.readouterr().err
