"""Bad input to ``segany train``, ``segany eval`` and ``segany data pack``: one clear line, exit 1, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from segany.cli.main import main

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def _fails(capsys: pytest.CaptureFixture[str], args: list[str], fragment: str) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("segany: error:") and fragment in err and "unexpected" not in err, err
    return err


@pytest.mark.parametrize("extra, fragment", [
    (["--max-minutes", "-1"], "run.max_minutes (--max-minutes) must be > 0"),
    (["-o", "run.max_steps=0"], "run.max_steps must be >= 1"),
    (["-o", "run.batch_size=0"], "run.batch_size must be >= 1"),
])
def test_train_rejects_bad_budgets_before_creating_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            extra: list[str], fragment: str) -> None:
    out = tmp_path / "run"
    _fails(capsys, ["train", TINY, "-o", f"run.out_dir={out}", *extra], fragment)
    assert not out.exists()


def test_train_config_and_out_dir_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import SAMPLE_IMAGE

    _fails(capsys, ["train", str(SAMPLE_IMAGE)], "not a text file")
    _fails(capsys, ["train", str(tmp_path)], "is a folder")
    (tmp_path / "bad.yaml").write_text("run: {max_steps: [1}\n")
    _fails(capsys, ["train", str(tmp_path / "bad.yaml")], "not valid YAML")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails(capsys, ["train", TINY, "-o", f"run.out_dir={afile}"], "run.out_dir")
    _fails(capsys, ["train", TINY, "-o", f"run.out_dir={afile / 'sub'}"], "is a file")
    _fails(capsys, ["train", TINY, "-o", f"run.out_dir={tmp_path / 'r'}", "--export", str(tmp_path)], "--export")
    assert not (tmp_path / "r").exists()


def test_train_into_a_folder_holding_a_run_needs_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Starting over in a run's folder would overwrite its last.pt and log: refused unless --resume."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"previous run")
    _fails(capsys, ["train", TINY, "-o", f"run.out_dir={out}"], "already holds a training run (last.pt); pass --resume")
    assert (out / "last.pt").read_bytes() == b"previous run" and sorted(p.name for p in out.iterdir()) == ["last.pt"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import randomize_, tiny_config

    from segany.checkpoints import save_checkpoint
    from segany.modeling.sam import Sam

    return save_checkpoint(randomize_(Sam(tiny_config())), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_eval_rejects_bad_options_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import SHARED_DATA

    import segany.checkpoints
    import segany.eval.run

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("options must be checked before the model loads or evaluation runs")

    monkeypatch.setattr(segany.eval.run, "run_evaluation", no_work)
    monkeypatch.setattr(segany.checkpoints, "build_sam", no_work)
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["eval", "--checkpoint", str(tiny_ckpt), "--data", str(SHARED_DATA), "--quiet"]
    _fails(capsys, [*base, "--out", str(afile)], "--out")
    _fails(capsys, [*base, "--out", str(afile / "sub")], "is a file")
    err = _fails(capsys, [*base, "--datasets", "foo,kvasir"], "unknown dataset(s) 'foo'")
    assert "coco128, pennfudan, kvasir, bsds" in err
    _fails(capsys, [*base, "--split", "bogus"], "choose from train, val")
    _fails(capsys, [*base, "--max-clicks", "0"], "--max-clicks must be at least 1")
    _fails(capsys, [*base, "--max-objects-per-image", "-1"], "--max-objects-per-image must be 0 (every object)")
    _fails(capsys, [*base, "--limit-images", "0"], "--limit-images")


def test_train_on_cuda_without_a_gpu_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # the message is for machines without one
    _fails(capsys, ["train", TINY, "-o", f"run.out_dir={tmp_path / 'r'}", "-o", "run.device=cuda"], "no usable CUDA")
    assert not (tmp_path / "r").exists()


def test_eval_names_the_architecture_it_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--model segany_tiny with a checkpoint of another architecture wrote "model": "segany_tiny" into
    results.json without a note, although the file's own model was evaluated."""
    from conftest import SHARED_DATA

    import segany.eval.run
    from segany.cli.main import main
    from segany.errors import InputError

    def record(*a: object, meta: dict, **k: object) -> None:
        raise InputError(f"evaluated as {meta['model']!r}")

    monkeypatch.setattr(segany.eval.run, "run_evaluation", record)
    assert main(["eval", "--model", "segany_tiny", "--checkpoint", str(tiny_ckpt), "--data", str(SHARED_DATA),
                 "--datasets", "pennfudan", "--limit-images", "1", "--quiet", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"{tiny_ckpt} holds custom" in err and "not segany_tiny: that is what is evaluated" in err
    assert "evaluated as 'custom (tiny.pt)'" in err
