"""`segany auto`, fourth audit: a run survives what one image does to it and says what the disk did.

A NaN score (an empty mask that hole filling made non-empty) is dropped and counted, not a crash; an
unexpected error fails its image only; a full disk stops the run naming the file, with the manifest
written and every finished output whole; a fresh run does not replace the user's own files without
--overwrite; --threads sets torch's CPU threads; a slow image shows its progress. In-process runs on tiny
images with the tiny seeded model: a few seconds for the file.
"""

from __future__ import annotations

import errno
import json
import os
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_fails, randomize_, tiny_config
from PIL import Image
from test_cli_auto_outputs import SAMPLES

from segany.checkpoints import save_checkpoint
from segany.cli.main import main
from segany.modeling.sam import Sam

FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seed 4 at scale 0.5: on a 1-pixel-high image some masks are empty, and hole filling fills them."""
    return save_checkpoint(randomize_(Sam(tiny_config()), seed=4, scale=0.5).eval(),
                           tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _image(path: Path, sample: int, size_wh: tuple[int, int] = (48, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(SAMPLES[sample % len(SAMPLES)]) as im:
        im.convert("RGB").resize(size_wh).save(path)
    return path


def _auto(checkpoint: Path, *args: str | Path) -> int:
    return main(["auto", *map(str, args), "--checkpoint", str(checkpoint), *FAST])


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _strict(path: Path) -> dict:
    def refuse(name: str) -> object:
        raise AssertionError(f"{name} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_masks_with_a_nan_score_are_dropped_and_counted_not_a_crash(checkpoint: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _image(src / "a_thin.png", 0, (40, 1)), _image(src / "b.png", 1)
    code = _auto(checkpoint, src, "--out", out, "--min-mask-region-area", "800", "--quiet")
    err = capsys.readouterr().err
    assert code == 0, err
    manifest = _json(out / "manifest.json")
    dropped = manifest["this_run"]["dropped_nonfinite_masks"]
    assert dropped > 0 and f"({dropped} more dropped: a score was not a number)" in err, err
    assert manifest["counts"]["done"] == 2 and manifest["failures"] == [] and manifest["stopped"] is None
    for name in ("a_thin.json", "b.json"):
        assert all(a["area"] > 0 for a in _strict(out / name)["annotations"])


def test_an_unexpected_error_fails_its_image_and_the_run_goes_on(checkpoint: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from segany.amg.generator import SamAutomaticMaskGenerator

    generate = SamAutomaticMaskGenerator.generate

    def buggy(self: SamAutomaticMaskGenerator, image: np.ndarray) -> list:
        if image.shape[1] == 50:
            raise RuntimeError("boom\nsecond line")
        return generate(self, image)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", buggy)
    src, out = tmp_path / "in", tmp_path / "out"
    _image(src / "a.png", 0), _image(src / "b.png", 1, (50, 32)), _image(src / "c.png", 2)
    code = _auto(checkpoint, src, "--out", out, "--quiet")
    err = capsys.readouterr().err
    assert code == 1, err
    assert (out / "a.json").is_file() and (out / "c.json").is_file() and not (out / "b.json").exists()
    manifest = _json(out / "manifest.json")
    [failure] = manifest["failures"]
    assert failure["image"].endswith("b.png") and failure["error"] == "unexpected error: RuntimeError: boom second line"
    assert "Traceback" in failure["traceback"] and "boom" in failure["traceback"]
    assert f"{src / 'b.png'}: unexpected error: RuntimeError: boom second line" in err, err
    assert manifest["counts"]["done"] == 2 and manifest["stopped"] is None


def test_the_manifest_versions_come_from_the_package_metadata() -> None:
    from segany.cli.auto import _versions

    versions = _versions()  # pycocotools has no __version__: it was recorded as "unknown"
    assert versions["pycocotools"] == version("pycocotools") and versions["numpy"] == version("numpy")


def test_a_full_disk_stops_the_run_naming_the_file_and_keeps_what_was_written(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _image(src / "a.png", 0), _image(src / "b.png", 1), _image(src / "c.png", 2)
    fsync, calls = os.fsync, []

    def full_after_one_output(fd: int) -> None:  # outputs are fsynced before they replace their name
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_one_output)
    code = main(["auto", str(src), "--out", str(out), "--checkpoint", str(checkpoint), *FAST, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("segany: error: No space left on device while writing ") and str(out / "b.json") in last
    assert "free space on that disk and rerun the same command with --resume" in last, last
    assert "1 processed" in err, err  # the summary is printed as for any other end
    a = _strict(out / "a.json")  # whole
    assert not (out / "b.json").exists() and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    manifest = _json(out / "manifest.json")
    assert manifest["stopped"].startswith("No space left on device while writing") and manifest["counts"]["done"] == 1

    monkeypatch.setattr(os, "fsync", fsync)
    assert _auto(checkpoint, src, "--out", out, "--quiet", "--resume") == 0
    assert "2 processed, 1 already done" in capsys.readouterr().err
    assert _strict(out / "a.json") == a


def test_a_fresh_run_does_not_replace_the_users_files_without_overwrite(checkpoint: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _image(src / "a.jpg", 0), _image(src / "b.jpg", 1)
    out.mkdir()
    (out / "a.json").write_text('{"mine": true}')  # the user's notes on a.jpg
    cli_fails(["auto", str(src), "--out", str(out), "--checkpoint", str(checkpoint), *FAST, "--quiet"], capsys,
              f"holds 1 file(s) this run would replace that no recorded segany auto run wrote there: {out / 'a.json'}")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"] and _json(out / "a.json") == {"mine": True}

    assert _auto(checkpoint, src, "--out", out, "--quiet", "--overwrite") == 0
    assert f"--overwrite: replacing 1 file(s) no recorded run wrote: {out / 'a.json'}" in capsys.readouterr().err
    assert "annotations" in _json(out / "a.json")
    # what the recorded run wrote is the run's to replace: a fresh run needs no --overwrite
    assert _auto(checkpoint, src, "--out", out, "--quiet") == 0
    assert "--overwrite" not in capsys.readouterr().err


def test_threads_sets_torchs_cpu_threads_and_is_recorded(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from segany.cli.main import build_parser

    _image(tmp_path / "in" / "a.png", 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _auto(checkpoint, tmp_path / "in", "--out", tmp_path / "out", "--quiet", "--threads", "1") == 0
        assert torch.get_num_threads() == 1 and _json(tmp_path / "out" / "manifest.json")["threads"] == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    cli_fails(["auto", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--threads", "0"], capsys,
              "--threads must be at least 1, got 0")
    assert not (tmp_path / "o2").exists()
    for command in ("predict", "eval", "serve"):  # every command that runs a model takes it
        sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        assert "--threads" in sub.format_help(), command


def test_a_slow_image_shows_its_prompts_done(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from segany.cli.auto import _WithinImage

    monkeypatch.setattr(_WithinImage, "SLOW_IMAGE_S", 0.0)  # every image counts as slow here
    monkeypatch.setattr(_WithinImage, "REFRESH_S", 0.0)
    _image(tmp_path / "in" / "big.png", 0)
    assert main(["auto", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint),
                 *FAST, "--points-per-side", "8", "--points-per-batch", "16"]) == 0
    err = capsys.readouterr().err
    shown = [part for part in err.replace("\r", "\n").splitlines() if "prompts" in part]
    assert any("big: 0/64 prompts" in s for s in shown) and any("big: 48/64 prompts" in s for s in shown), err


def test_an_image_list_saved_with_a_bom_reads_its_first_path(tmp_path: Path) -> None:
    # Windows editors and PowerShell's utf8 write a BOM: it was glued to the first path, which then "did not exist".
    from segany.cli.auto import _read_list

    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffa.png\r\n# a note\r\nsub/b.png\r\n".encode())
    assert _read_list(listing) == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]


def test_resume_takes_another_points_per_batch_but_not_another_threshold(tmp_path: Path) -> None:
    # A user who lowers --points-per-batch after running out of memory must not redo every finished image:
    # the batch size changes memory, not the masks.
    from segany.cli.auto_resume import RUN_FILE, check_resume, run_settings
    from segany.errors import InputError

    def settings(**options: object) -> dict:
        return run_settings("segany_tiny", None, "sa1b", {"points_per_side": 8, "points_per_batch": 64,
                                                          "pred_iou_thresh": 0.88, **options}, None)

    (tmp_path / RUN_FILE).write_text(json.dumps({"settings": settings()}))
    assert check_resume(tmp_path, settings(points_per_batch=16), True, lambda: True) is True
    with pytest.raises(InputError, match=r"pred_iou_thresh 0.88 → 0.5"):
        check_resume(tmp_path, settings(points_per_batch=16, pred_iou_thresh=0.5), True, lambda: True)


def test_a_folder_input_goes_through_linked_folders_once(tmp_path: Path) -> None:
    # Path.rglob skipped linked folders without a word (while following linked files): their images were lost.
    from segany.cli.auto import scan_input

    src, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for folder, name in ((src / "sub", "a.png"), (elsewhere, "b.png"), (elsewhere, "c.png")):
        Image.new("RGB", (8, 8)).save(folder / name)
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    (src / "again").symlink_to(elsewhere, target_is_directory=True)  # one folder twice: its images once
    (src / "sub" / "loop").symlink_to(src, target_is_directory=True)  # a link to a parent must not loop
    # Links to a folder of the tree add nothing and rename nothing, hidden or sorted first.
    (src / ".backup").symlink_to(src / "sub", target_is_directory=True)
    (src / "0-link").symlink_to(src / "sub", target_is_directory=True)
    keys = sorted(key for _, key in scan_input(str(src)).images)
    assert keys == ["again/b", "again/c", "sub/a"], keys
    from segany.engine.store import collect_image_files  # `project add-images FOLDER` lists the same way

    assert sorted(f.name for f in collect_image_files([src])) == ["a.png", "b.png", "c.png"]


def test_resume_redoes_a_png_output_whose_mask_file_is_gone_or_cut_short(tmp_path: Path) -> None:
    # masks.json alone was checked: a deleted or truncated mask PNG counted as done, and --overlay then
    # stopped the run as a failed write, telling the user to rerun with --resume (the same stop again).
    from segany.cli.auto import _output_masks

    target = tmp_path / "img"
    target.mkdir()
    files = [f"mask_{i:04d}.png" for i in range(2)]
    for name in files:
        Image.new("L", (8, 6), 255).save(target / name)
    (target / "masks.json").write_text(json.dumps({"image": {"image_id": 1}, "annotations": [
        {"id": i + 1, "file": name} for i, name in enumerate(files)]}))
    assert _output_masks(target, "png") == 2
    whole = (target / files[0]).read_bytes()
    (target / files[0]).write_bytes(whole[:40])
    assert _output_masks(target, "png") is None
    (target / files[0]).write_bytes(whole)
    (target / files[1]).unlink()
    assert _output_masks(target, "png") is None
