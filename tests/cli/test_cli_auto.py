"""`segany auto`: outputs, kill -9 and --resume, bad inputs, manifest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE_IMAGE, randomize_, tiny_config

from segany.checkpoints import save_checkpoint
from segany.data.formats.sa1b import read_sa1b
from segany.modeling.sam import Sam

SAMPLES = sorted((REPO / "src" / "segany" / "assets" / "samples").glob("*.jpg"))
FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(randomize_(Sam(tiny_config()), seed=0, scale=0.1).eval(), path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i, p in enumerate([*SAMPLES, SAMPLE_IMAGE, SAMPLES[0]]):
        shutil.copy(p, (d / "sub" if i == 5 else d) / f"img_{i}.jpg")
    return d


def _cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "segany.cli.main", "auto", *map(str, args)]


def _run(*args: str | Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    return subprocess.run(_cmd(*args), capture_output=True, text=True, timeout=300, env=env)


def _main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """``segany auto ARGS`` in this process (no interpreter start per run): exit status and stderr."""
    from segany.cli.main import main

    code = main(["auto", *map(str, args)])
    return code, capsys.readouterr().err


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.json"))
            if p.name not in ("manifest.json", "run.json")}


def test_kill_9_then_resume_equals_uninterrupted_run(folder: Path, checkpoint: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    r = _run(folder, "--out", full, "--checkpoint", checkpoint, *FAST, "--quiet")
    assert r.returncode == 0, r.stderr
    expected = _outputs(full)
    assert len(expected) == 7 and "image_ids.json" in expected  # 6 images and their ids
    manifest = json.loads((full / "manifest.json").read_text())
    masks = manifest["counts"]["masks"]
    assert manifest["counts"] == {"images": 6, "done": 6, "failed": 0, "masks": masks, "not_images": 0}
    assert {k: v for k, v in manifest["this_run"].items() if k != "seconds"} == {
        "processed": 6, "skipped_existing": 0, "redone_changed": 0, "overlays_added": 0, "failed": 0, "masks": masks,
        "dropped_nonfinite_masks": 0}
    assert masks > 0 and manifest["options"]["points_per_side"] == 4
    assert {"segany", "torch", "pycocotools"} <= set(manifest["versions"])

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(folder, "--out", killed, "--checkpoint", checkpoint, *FAST, "--quiet"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(killed.rglob("img_*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _outputs(killed)
    assert 0 < len(partial) - 1 < 6, "the kill should land mid-folder"  # image_ids.json is written first
    for name, data in partial.items():  # whatever exists is complete and final
        assert data == expected[name]

    r = _run(folder, "--out", killed, "--checkpoint", checkpoint, *FAST, "--resume")
    assert r.returncode == 0, r.stderr
    assert _outputs(killed) == expected
    assert not list(killed.rglob("*.tmp"))
    manifest = json.loads((killed / "manifest.json").read_text())
    this_run = manifest["this_run"]
    assert this_run["skipped_existing"] == len(partial) - 1 and this_run["processed"] == 7 - len(partial)
    assert manifest["counts"]["done"] == 6 and manifest["counts"]["masks"] == masks  # the whole output
    assert "img/s" in r.stderr or "s/img" in r.stderr  # the progress bar


def test_sa1b_png_coco_and_overlay_outputs(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    img = tmp_path / "photo.jpg"
    shutil.copy(SAMPLE_IMAGE, img)
    code, err = _main(capsys, img, "--out", tmp_path / "a", "--checkpoint", checkpoint, *FAST, "--overlay", "--quiet")
    assert code == 0, err
    sa1b = read_sa1b(tmp_path / "a" / "photo.json")
    assert sa1b.annotations and (sa1b.width, sa1b.height, sa1b.file_name) == (640, 425, "photo.jpg")
    assert (tmp_path / "a" / "photo.overlay.png").stat().st_size > 0

    code, err = _main(capsys, img, "--out", tmp_path / "p", "--checkpoint", checkpoint, *FAST, "--format", "png", "--quiet")
    assert code == 0, err
    masks_json = json.loads((tmp_path / "p" / "photo" / "masks.json").read_text())
    meta = masks_json["annotations"]
    assert len(meta) == len(sa1b.annotations) and masks_json["image"]["file_name"] == "photo.jpg"
    assert [m["id"] for m in meta] == [a["id"] for a in json.loads((tmp_path / "a" / "photo.json").read_text())[
        "annotations"]]  # the same ids as sa1b
    from PIL import Image

    m0 = np.asarray(Image.open(tmp_path / "p" / "photo" / meta[0]["file"])) > 0
    assert np.array_equal(m0, sa1b.masks()[0])

    code, err = _main(capsys, img, "--out", tmp_path / "c", "--checkpoint", checkpoint, *FAST, "--format", "coco", "--quiet")
    assert code == 0, err
    results = json.loads((tmp_path / "c" / "coco_results.json").read_text())
    assert len(results) == len(sa1b.annotations) and {"image_id", "segmentation", "score", "bbox"} <= set(results[0])


def test_unreadable_image_is_reported_and_skipped(folder: Path, checkpoint: Path, tmp_path: Path) -> None:
    for p in list(folder.rglob("*.jpg"))[1:]:
        p.unlink()
    (folder / "broken.jpg").write_bytes(b"not an image")
    # above the pixel limit (PIL's decompression-bomb guard; lowered here so the file stays small): skipped
    # like a corrupt file, not the end of the whole run
    from PIL import Image

    Image.new("RGB", (1000, 1000)).save(folder / "huge.png")
    r = _run(folder, "--out", tmp_path / "o", "--checkpoint", checkpoint, *FAST, "--quiet",
             SEGANY_MAX_IMAGE_PIXELS="500000")
    assert r.returncode == 1
    assert "broken.jpg" in r.stderr and "2 failed" in r.stderr and "failed images:" in r.stderr
    assert "SEGANY_MAX_IMAGE_PIXELS" in r.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["counts"]["failed"] == 2 and manifest["this_run"]["processed"] == 1
    assert sorted(Path(f["image"]).name for f in manifest["failures"]) == ["broken.jpg", "huge.png"]


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d, "no images"),
    (lambda d: (d / "list.txt").write_text("# nothing\n") and d / "list.txt", "names no images"),
    (lambda d: (d / "photo.txt").write_bytes(SAMPLE_IMAGE.read_bytes()) and d / "photo.txt",
     "is not a UTF-8 text list of image paths"),
])
def test_bad_inputs(make, fragment: str, checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    r = _run(make(src), "--out", tmp_path / "o", "--checkpoint", checkpoint, *FAST)
    assert r.returncode == 1 and fragment in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1  # one line, no traceback


def _three(tmp_path: Path) -> Path:
    d = tmp_path / "three"
    d.mkdir()
    for i, p in enumerate(SAMPLES[:3]):
        shutil.copy(p, d / f"img_{i}.jpg")
    return d


def test_resume_refuses_a_folder_made_with_other_settings(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    images, out = _three(tmp_path), tmp_path / "out"
    code, err = _main(capsys, images, "--out", out, "--checkpoint", checkpoint, *FAST, "--quiet")
    assert code == 0, err
    before = _outputs(out)
    other = tmp_path / "other.pt"
    shutil.copy(checkpoint, other)
    for extra, says in ((["--checkpoint", checkpoint, "--points-per-side", "3"], "points_per_side 4 → 3"),
                        (["--checkpoint", other, "--points-per-side", "4"], f"checkpoint '{checkpoint.resolve()}' → '{other.resolve()}'")):
        code, err = _main(capsys, images, "--out", out, *extra, *FAST[2:], "--resume", "--quiet")
        assert code == 1 and says in err and "rerun without --resume" in err, err
        assert "Traceback" not in err and _outputs(out) == before
    # Outputs with no record of what made them (another tool, an older segany) are not silently kept either.
    (out / "run.json").unlink()
    code, err = _main(capsys, images, "--out", out, "--checkpoint", checkpoint, *FAST, "--resume", "--quiet")
    assert code == 1 and "no run.json" in err


def test_resume_redoes_what_a_replaced_run_left_behind(checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    images, out, clean = _three(tmp_path), tmp_path / "out", tmp_path / "clean"
    three = ["--points-per-side", "3", *FAST[2:]]
    assert _main(capsys, images, "--out", out, "--checkpoint", checkpoint, *FAST, "--quiet")[0] == 0
    # A run with other settings and no --resume replaces every image; this one "dies" after the first,
    # leaving two outputs of the old settings in the folder.
    first = tmp_path / "first.txt"
    first.write_text(f"{images / 'img_0.jpg'}\n")
    assert _main(capsys, first, "--out", out, "--checkpoint", checkpoint, *three, "--quiet")[0] == 0
    code, err = _main(capsys, images, "--out", out, "--checkpoint", checkpoint, *three, "--resume", "--quiet")
    assert code == 0, err
    counts = json.loads((out / "manifest.json").read_text())["this_run"]
    assert counts["skipped_existing"] == 1 and counts["processed"] == 2
    assert _main(capsys, images, "--out", clean, "--checkpoint", checkpoint, *three, "--quiet")[0] == 0
    assert _outputs(out) == _outputs(clean)


def test_quantized_run_is_recorded_and_not_mixed_on_resume(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An 8-bit encoder changes masks beyond rounding, so run.json records it and --resume with other
    options is refused."""
    images, out = _three(tmp_path), tmp_path / "out"
    code, err = _main(capsys, images, "--out", out, "--checkpoint", checkpoint, *FAST, "--precision", "bf16",
                      "--quantize", "int8", "--quiet")
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert (run["settings"]["precision"], run["settings"]["quantize"]) == ("bf16", "int8")
    assert len(_outputs(out)) == 4  # and image_ids.json
    code, err = _main(capsys, images, "--out", out, "--checkpoint", checkpoint, *FAST, "--resume", "--quiet")
    assert code == 1 and "quantize 'int8' → None" in err and "rerun without --resume" in err, err


def test_precision_auto_is_recorded_as_what_ran_and_a_resume_running_another_is_refused(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision auto is fp32 on one machine and bf16 on another (here: SEGANY_CPU_BF16), whose masks differ
    beyond rounding. A resume on the other machine went on silently and mixed the two in one output."""
    image, out = tmp_path / "one.jpg", tmp_path / "out"
    shutil.copy(SAMPLES[0], image)
    assert _main(capsys, image, "--out", out, "--checkpoint", checkpoint, *FAST, "--quiet")[0] == 0  # fp32 here
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["precision"] == "fp32" and run["requested"] == {"precision": "auto", "quantize": None}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == {"requested": "auto", "resolved": "fp32", "quantize": None, "decoder": "folded"}
    monkeypatch.setenv("SEGANY_CPU_BF16", "1")  # "another machine": auto now resolves to bf16
    code, err = _main(capsys, image, "--out", out, "--checkpoint", checkpoint, *FAST, "--resume", "--quiet")
    assert code == 1 and "precision 'fp32' → 'bf16'" in err, err
    assert "; resume with --precision fp32, which made them (--precision auto runs bf16 on this machine), or rerun " \
        "without --resume" in err
    # The fix it names works: what runs is what the record says (auto then, fp32 now: same masks to rounding).
    code, err = _main(capsys, image, "--out", out, "--checkpoint", checkpoint, *FAST, "--precision", "fp32",
                      "--resume", "--quiet")
    assert code == 0 and "0 processed, 1 already done" in err, err
    # A record written before precision was recorded (no "precision" key) still resumes, as it did then.
    run["settings"] = {k: v for k, v in run["settings"].items() if k not in ("precision", "quantize")}
    mtime = (out / "run.json").stat().st_mtime_ns
    (out / "run.json").write_text(json.dumps({"settings": run["settings"]}))
    os.utime(out / "run.json", ns=(mtime, mtime))  # its mtime dates the outputs
    code, err = _main(capsys, image, "--out", out, "--checkpoint", checkpoint, *FAST, "--precision", "fp32",
                      "--resume", "--quiet")
    assert code == 0 and "0 processed, 1 already done" in err, err


def test_outputs_of_images_sharing_a_name_do_not_overwrite_each_other(tmp_path: Path) -> None:
    from segany.cli.auto import collect_images

    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    for name in ("x.jpg", "x.png", "y.jpg", "a/x.jpg"):
        (d / name).write_bytes(b"")
    keys = dict((p.relative_to(d).as_posix(), k) for p, k in collect_images(str(d)))
    assert keys == {"a/x.jpg": "a/x", "x.jpg": "x.jpg", "x.png": "x.png", "y.jpg": "y"}
    listing = d / "list.txt"  # one name in two folders: keyed by the path, as a folder input is
    listing.write_text("x.jpg\na/x.jpg\nx_1.jpg\n")
    assert [k for _, k in collect_images(str(listing))] == ["x", "a/x", "x_1"]


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--pred-iou-thresh", "5"], "--pred-iou-thresh must be in [0, 1], got 5"),
    (["--stability-score-thresh", "-1"], "--stability-score-thresh must be in [0, 1], got -1"),
])
def test_thresholds_outside_0_1_are_refused(flags: list[str], fragment: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from segany.cli.main import main

    assert main(["auto", str(SAMPLE_IMAGE), "--out", str(tmp_path / "o"), *flags]) == 1
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
