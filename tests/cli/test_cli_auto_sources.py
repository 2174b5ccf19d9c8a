"""`segany auto`, re-audit: outputs tied to the image file behind them (list keys, changed images, file_name),
a fresh run owning its folder, coco_images.json as a COCO dataset, the loaded architecture recorded, and an
interrupted run's closing lines. In-process runs on small images keep each test a few seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import randomize_, tiny_config
from PIL import Image
from test_cli_auto_outputs import SAMPLES, _auto, _json

from segany.checkpoints import save_checkpoint
from segany.modeling.sam import Sam


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-file stand-in of the tiny test ViT: not any registered model's architecture."""
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(randomize_(Sam(tiny_config()), seed=0, scale=0.1).eval(), path)
    return path


def _image(path: Path, sample: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(SAMPLES[sample % len(SAMPLES)]) as im:
        im.convert("RGB").resize((96, 64)).save(path)
    return path


def _masks(path: Path) -> list[object]:
    """An output's masks with their scores (which differ between images even where the masks do not)."""
    return [{k: v for k, v in a.items() if k != "id"} for a in _json(path)["annotations"]]


def test_list_keys_follow_the_image_not_its_position(checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cs = tmp_path / "cs"
    _image(cs / "x.jpg", 0), _image(cs / "sub" / "x.jpg", 1)
    listing, out = tmp_path / "list.txt", tmp_path / "out"
    listing.write_text("cs/x.jpg\ncs/sub/x.jpg\ncs/x.jpg\n")
    assert _auto(checkpoint, listing, "--out", out) == 0
    err = capsys.readouterr().err
    assert "names 1 image more than once; each is segmented once" in err and "2 processed" in err, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")
                  if p.name not in ("run.json", "manifest.json", "image_ids.json")) == ["sub/x.json", "x.json"]
    assert _json(out / "sub" / "x.json")["image"]["file_name"] == "sub/x.jpg"
    top, sub = _masks(out / "x.json"), _masks(out / "sub" / "x.json")
    assert top != sub
    listing.write_text("cs/sub/x.jpg\ncs/x.jpg\n")  # the same images in another order: nothing to redo
    assert _auto(checkpoint, listing, "--out", out, "--resume") == 0
    assert "0 processed, 2 already done" in capsys.readouterr().err
    assert _masks(out / "sub" / "x.json") == sub and _masks(out / "x.json") == top
    # Only cs/sub/x.jpg now: the list's root moves to cs/sub, but the image keeps its name sub/x.
    listing.write_text("cs/sub/x.jpg\n")
    assert _auto(checkpoint, listing, "--out", out, "--resume") == 0
    assert "0 processed, 1 already done" in capsys.readouterr().err
    # A new image whose key is "x", which holds cs/x.jpg's masks: it is redone, not reused.
    _image(cs / "new" / "x.jpg", 2)
    listing.write_text("cs/new/x.jpg\n")
    assert _auto(checkpoint, listing, "--out", out, "--resume") == 0
    assert "1 processed, 0 already done" in capsys.readouterr().err
    assert _masks(out / "x.json") != top
    record = _json(out / "image_ids.json")
    assert record["sources"]["x"]["path"] == str(cs / "new" / "x.jpg")
    assert record["ids"]["x"] not in (1, 2)  # another image: a new id, never the old one's


def test_resume_redoes_an_image_whose_file_changed(checkpoint: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    d, out, fresh = tmp_path / "in", tmp_path / "out", tmp_path / "fresh"
    _image(d / "a.jpg", 0), _image(d / "b.jpg", 1)
    assert _auto(checkpoint, d, "--out", out, "--overlay") == 0
    before = _masks(out / "b.json")
    time.sleep(0.01)
    _image(d / "b.jpg", 2)  # cp other.jpg b.jpg
    capsys.readouterr()
    assert _auto(checkpoint, d, "--out", out, "--overlay", "--resume") == 0
    err = capsys.readouterr().err
    assert "1 processed, 1 already done, 1 redone because their image changed" in err, err
    assert _json(out / "manifest.json")["this_run"]["redone_changed"] == 1
    assert _auto(checkpoint, d, "--out", fresh, "--overlay") == 0
    assert _masks(out / "b.json") == _masks(fresh / "b.json") != before
    assert (out / "b.overlay.png").read_bytes() == (fresh / "b.overlay.png").read_bytes()
    assert _json(out / "b.json")["image"]["image_id"] == 2  # the same file changed in place keeps its id


def test_file_names_are_paths_below_the_input_folder(checkpoint: Path, tmp_path: Path) -> None:
    cs = tmp_path / "cs"
    _image(cs / "x.jpg", 0), _image(cs / "sub" / "x.jpg", 1)
    assert _auto(checkpoint, cs, "--out", tmp_path / "c", "--format", "coco") == 0
    names = sorted(im["file_name"] for im in _json(tmp_path / "c" / "coco_images.json")["images"])
    assert names == ["sub/x.jpg", "x.jpg"]
    assert _auto(checkpoint, cs, "--out", tmp_path / "s") == 0
    assert _json(tmp_path / "s" / "sub" / "x.json")["image"]["file_name"] == "sub/x.jpg"


def test_coco_images_json_loads_in_pycocotools_with_the_results(checkpoint: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    d = tmp_path / "in"
    _image(d / "a.jpg", 0), _image(d / "sub" / "b.jpg", 1)
    assert _auto(checkpoint, d, "--out", tmp_path / "o", "--format", "coco") == 0
    gt = COCO(str(tmp_path / "o" / "coco_images.json"))
    dt = gt.loadRes(str(tmp_path / "o" / "coco_results.json"))
    assert sorted(im["file_name"] for im in gt.loadImgs(gt.getImgIds())) == ["a.jpg", "sub/b.jpg"]
    assert len(dt.getAnnIds()) == len(_json(tmp_path / "o" / "coco_results.json")) > 0
    assert gt.loadCats(gt.getCatIds()) == [{"id": 1, "name": "object", "supercategory": "object"}]
    from pycocotools import mask as mask_utils

    for r in _json(tmp_path / "o" / "coco_results.json"):  # COCO's box, which its box evaluation reads
        assert r["bbox"] == mask_utils.toBbox(r["segmentation"]).tolist()


@pytest.mark.parametrize("fmt", ["coco", "png"])
def test_a_fresh_run_removes_what_the_earlier_run_wrote_and_nothing_else(
        fmt: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, out = tmp_path / "in", tmp_path / "out"
    _image(d / "a.jpg", 0), _image(d / "b.jpg", 1)
    assert _auto(checkpoint, d, "--out", out, "--format", fmt, "--overlay") == 0
    (out / "notes.txt").write_text("mine")  # the user's own files are never touched
    (out / "c.json").write_text("{}")
    (d / "b.jpg").unlink()
    capsys.readouterr()
    assert _auto(checkpoint, d, "--out", out) == 0  # sa1b, no --overlay, without b.jpg
    err = capsys.readouterr().err
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == ["a.json", "c.json", "image_ids.json", "manifest.json", "notes.txt", "run.json"], left
    stale = {"coco": 5, "png": 4}[fmt]  # overlays, b's output (a's png folder), coco's merged files
    assert f"removed {stale} outputs of the earlier run" in err, err


def test_the_loaded_architecture_is_recorded_and_picks_the_defaults(checkpoint: Path, tmp_path: Path) -> None:
    from segany.cli._util import loaded_model_name
    from segany.registry import get_config

    d, out = tmp_path / "in", tmp_path / "out"
    _image(d / "a.jpg", 0)
    assert _auto(checkpoint, d, "--out", out, "--model", "segany_tiny") == 0
    manifest, run = _json(out / "manifest.json"), _json(out / "run.json")
    assert manifest["model"] == run["settings"]["model"] == "custom (last.pt)"
    # Unset options take SAM's defaults, not segany_tiny's tuned ones (offset 0.1, NMS 0.5, 800 px).
    assert (manifest["options"]["stability_score_offset"], manifest["options"]["box_nms_thresh"],
            manifest["options"]["min_mask_region_area"]) == (1.0, 0.7, 0)
    assert loaded_model_name(get_config("segany_tiny"), "vit_b", None) == "segany_tiny"
    assert loaded_model_name(get_config("vit_b"), "vit_b", checkpoint) == "vit_b"


def test_earlier_output_folders_inside_the_input_are_named(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "p"
    _image(p / "a.jpg", 0)
    assert _auto(checkpoint, p, "--out", p / "out", "--format", "png") == 0
    capsys.readouterr()
    assert _auto(checkpoint, p, "--out", tmp_path / "o2") == 0
    err = capsys.readouterr().err
    assert f"skipped 1 folder holding an earlier segany auto output: {p / 'out'}" in err, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_writes_the_manifest_and_says_how_to_resume(checkpoint: Path, tmp_path: Path, sig: int) -> None:
    # SIGTERM (timeout, a batch system's time limit, docker stop) killed the run at once: no manifest, or the
    # earlier run's, which then described another run. It now ends as Ctrl-C does.
    d, out = tmp_path / "in", tmp_path / "out"
    for i in range(12):
        _image(d / f"img_{i:02d}.jpg", i)
    cmd = [sys.executable, "-m", "segany.cli.main", "auto", str(d), "--out", str(out), "--checkpoint",
           str(checkpoint), "--points-per-side", "8", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
           "--device", "cpu"]  # with the progress bar
    # The child gets SIGINT's default action even where the test runner was started in the background, which
    # leaves SIGINT ignored and so inherited (a Ctrl-C reaches the command in a terminal).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("img_*.json")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig if sig == signal.SIGTERM else 130, err  # 143: a batch system reads it
    assert "rerun the same command with --resume" in err, err
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    last = "segany: stopped by SIGTERM" if sig == signal.SIGTERM else "segany: interrupted"
    assert lines[-1] == last, lines[-3:]  # no progress line after it
    done = len(list(out.glob("img_*.json")))
    assert 0 < done < 12 and _json(out / "manifest.json")["counts"]["done"] == done
    shutil.rmtree(out)


def test_png_output_of_x_beside_a_folder_x_keeps_both(checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Key x would be the folder of x/y's png outputs, and rewriting x deleted them: x keeps its extension."""
    src, out = tmp_path / "src", tmp_path / "out"
    _image(src / "x.png", 0), _image(src / "x" / "y.png", 1)
    assert _auto(checkpoint, src, "--out", out, "--format", "png") == 0
    assert (out / "x.png" / "masks.json").is_file() and (out / "x" / "y" / "masks.json").is_file()
    assert "the output holds 2 of 2 images" in capsys.readouterr().err
    assert _auto(checkpoint, src, "--out", out, "--format", "png", "--resume") == 0
    assert "0 processed, 2 already done" in capsys.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "x.png").stat().st_mode & 0o777 == 0o777 & ~umask  # mkdtemp's 0700 kept other readers out


def test_new_keys_never_nest_with_kept_ones_in_png_and_stay_as_they_are_elsewhere() -> None:
    from segany.cli.auto import _unnested

    # a new x/y under a kept x, and a new x over a kept x2/y... and a kept a/b under a new a
    assert _unnested(["x", "x/y", "a/b", "a", "c"], kept={0, 2}) == ["x", "x_new/y", "a/b", "a_new", "c"]


def test_a_folder_x_added_beside_x_on_resume_does_not_nest_in_xs_output(checkpoint: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # x.png (output folder x/) first; x/y.png added later: its output landed in x/ and went when x was redone.
    src, out = tmp_path / "src", tmp_path / "out"
    _image(src / "x.png", 0)
    assert _auto(checkpoint, src, "--out", out, "--format", "png") == 0
    _image(src / "x" / "y.png", 1)
    assert _auto(checkpoint, src, "--out", out, "--format", "png", "--resume") == 0
    assert (out / "x" / "masks.json").is_file() and (out / "x_new" / "y" / "masks.json").is_file()
    _image(src / "x.png", 2)  # x changes: it is redone
    assert _auto(checkpoint, src, "--out", out, "--format", "png", "--resume") == 0
    assert (out / "x_new" / "y" / "masks.json").is_file(), "x/y's masks went with x's"
    assert "the output holds 2 of 2 images" in capsys.readouterr().err


def test_an_output_left_empty_by_a_crash_is_redone_on_resume(checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _image(src / "a.jpg", 0), _image(src / "b.jpg", 1)
    assert _auto(checkpoint, src, "--out", out) == 0
    good = (out / "a.json").read_bytes()
    (out / "a.json").write_bytes(b"")  # what a power cut after the rename and before the data can leave
    capsys.readouterr()
    assert _auto(checkpoint, src, "--out", out, "--resume") == 0
    err = capsys.readouterr().err
    assert "1 earlier output(s) cannot be read" in err and "1 processed, 1 already done" in err, err
    assert (out / "a.json").read_bytes() == good


def test_outputs_hold_no_empty_mask_and_no_nan(checkpoint: Path, tmp_path: Path) -> None:
    """With --stability-score-thresh 0 an empty mask survives with stability 0/0; SA-1B has no empty masks
    and NaN is not JSON."""
    src, out = tmp_path / "src", tmp_path / "out"
    for i, size in enumerate([(3, 3), (1, 40), (96, 64)]):  # tiny images give empty masks with random weights
        src.mkdir(parents=True, exist_ok=True)
        with Image.open(SAMPLES[i % len(SAMPLES)]) as im:
            im.convert("RGB").resize(size).save(src / f"i{i}.png")
    assert _auto(checkpoint, src, "--out", out, "--points-per-side", "4") == 0

    def no_constants(name: str) -> object:
        raise AssertionError(f"{name} in an output")

    for path in sorted(out.glob("i[0-9].json")):
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)
        assert all(a["area"] > 0 for a in data["annotations"]), path


def test_a_list_that_gains_an_image_from_elsewhere_keeps_the_earlier_names(checkpoint: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _image(tmp_path / "imgs" / "a.jpg", 0), _image(tmp_path / "other" / "b.jpg", 1)
    listing, out = tmp_path / "list.txt", tmp_path / "out"
    listing.write_text("imgs/a.jpg\n")
    assert _auto(checkpoint, listing, "--out", out) == 0
    assert (out / "a.json").is_file()
    listing.write_text("imgs/a.jpg\nother/b.jpg\n")  # the deepest common folder is now tmp_path, not imgs/
    capsys.readouterr()
    assert _auto(checkpoint, listing, "--out", out, "--resume") == 0
    assert "1 processed, 1 already done" in capsys.readouterr().err
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")
                   if p.name not in ("run.json", "manifest.json", "image_ids.json"))
    assert names == ["a.json", "other/b.json"]


def test_hidden_images_are_counted_not_dropped_silently(checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import cli_fails

    src, out = tmp_path / "src", tmp_path / "out"
    _image(src / ".cache" / "a.png", 0), _image(src / ".b.png", 1)
    _image(src / "._b.png", 1), _image(src / ".c.png.x1.tmp" / "m.png", 1)  # a resource fork, a run's temp folder
    cli_fails(["auto", str(src), "--out", str(out), "--checkpoint", str(checkpoint)], capsys,
              "2 hidden ones (a name starting with '.'")
    _image(src / "c.png", 2)
    assert _auto(checkpoint, src, "--out", out) == 0
    assert "skipped 2 hidden images (a name starting with '.'" in capsys.readouterr().err


def test_an_ignored_sighup_stays_ignored() -> None:
    # Under `nohup` SIGHUP is ignored; turning it into a stop would end the run when the terminal closes.
    from segany.cli.auto import _stops_as_interrupts

    before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _stops_as_interrupts():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before_hup)
