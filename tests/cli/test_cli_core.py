"""The ``segany`` command in a subprocess, on a tiny self-describing checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_IMAGE, randomize_, tiny_config
from PIL import Image

from segany import registry
from segany.checkpoints import save_checkpoint
from segany.cli.main import main
from segany.modeling.sam import Sam
from segany.registry import WeightsInfo

REPO = Path(__file__).resolve().parents[2]


def segany(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SEGANY_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "segany.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Larger-than-default noise so the masks are neither empty nor full.
    return save_checkpoint(randomize_(Sam(tiny_config()), seed=4, scale=0.5),
                           tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_predict_writes_masks_overlay_and_json(tmp_path: Path, tiny_ckpt: Path, home: Path) -> None:
    out = tmp_path / "out"
    # --model vit_t: any registered name works, the segany checkpoint brings its own config.
    r = segany("predict", str(SAMPLE_IMAGE), "--point", "320,212", "--point", "40,40,0",
               "--box", "100,60,560,400", "--checkpoint", str(tiny_ckpt), "--model", "vit_t",
               "--out", str(out), "--multimask", home=home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "sample.json")
    assert "embedding 640x425 image" in r.stderr and " s\n" in r.stderr  # progress and timing on stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["sample.json", "sample_mask0.png", "sample_mask1.png", "sample_mask2.png", "sample_overlay.png"]
    result = json.loads((out / "sample.json").read_text())
    assert result["size_hw"] == [425, 640] and result["multimask"] is True
    # The checkpoint's own architecture ran, and the JSON names it as `segany auto` does, not --model.
    assert result["model"] == "custom (tiny.pt)" and "holds custom (tiny.pt), not vit_t" in r.stderr
    assert result["prompts"] == {"points_xy": [[320.0, 212.0], [40.0, 40.0]], "labels": [1, 0],
                                 "box_xyxy": [100.0, 60.0, 560.0, 400.0]}
    assert set(result["timings_s"]) == {"load_s", "embed_s", "decode_s"}
    scores = [m["score"] for m in result["masks"]]
    assert scores == sorted(scores, reverse=True), "masks are written best first"

    from pycocotools import mask as mask_utils

    for rec in result["masks"]:
        png = np.asarray(Image.open(out / rec["file"]))
        assert png.shape == (425, 640) and set(np.unique(png)) <= {0, 255}
        decoded = mask_utils.decode({"size": rec["rle"]["size"], "counts": rec["rle"]["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), png > 0)
        assert rec["area"] == int((png > 0).sum())
        if rec["area"]:
            ys, xs = np.nonzero(png)
            assert rec["box_xyxy"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    overlay = Image.open(out / "sample_overlay.png")
    assert overlay.size == (640, 425) and overlay.mode == "RGB"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_predict_without_weights_says_how_to_get_them(tmp_path: Path, home: Path) -> None:
    r = segany("predict", str(SAMPLE_IMAGE), "--point", "10,10", "--model", "vit_b", "--out", str(tmp_path), home=home)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "no weights for 'vit_b' in the cache" in lines[0]
    assert "segany download sam_vit_b" in lines[0] and "--checkpoint" in lines[0]
    assert str(home) in lines[0]


def test_debug_shows_traceback(tmp_path: Path, tiny_ckpt: Path, home: Path) -> None:
    args = ("predict", str(SAMPLE_IMAGE), "--point", "5000,10", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path))
    r = segany(*args, "--debug", home=home)
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "PromptError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("segany: error: point [5000.0, 10.0] lies outside")
    assert list(tmp_path.iterdir()) == [], "a failed run must not leave outputs"


def test_models_lists_weights_and_presence(home: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (main(argv)) to save a subprocess start; the subprocess path is covered above.
    monkeypatch.setenv("SEGANY_HOME", str(home))
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_name = {m["model"]: m for m in listing["models"]}
    assert {"vit_b", "vit_l", "vit_h", "vit_t"} <= set(by_name)
    assert by_name["vit_b"]["weights"] == "sam_vit_b" and by_name["vit_b"]["present"] is False
    assert listing["cache"] == str(home / "weights")  # the folder the table's last line names too

    # Put a file where the cache expects sam_vit_b: `models` must report it present.
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("vit_b "))
    assert row.split()[:3] == ["vit_b", "sam_vit_b", "yes"]
    assert table.splitlines()[0].split() == ["MODEL", "WEIGHTS", "PRESENT", "DESCRIPTION"]
    assert table.splitlines()[-1].startswith(f"cache: {home / 'weights'}  ")


def test_download_command_with_file_url(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    payload = tmp_path / "weights.bin"
    payload.write_bytes(os.urandom(300_000))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    monkeypatch.setenv("SEGANY_HOME", str(home))
    registry._ensure_loaded()
    info = WeightsInfo(name="test_w", model="vit_t", url=payload.as_uri(), filename="test_w.bin",
                       size=payload.stat().st_size, sha256=digest)
    monkeypatch.setitem(registry._WEIGHTS, "test_w", info)

    assert main(["download", "test_w"]) == 0
    captured = capsys.readouterr()
    assert Path(captured.out.strip()) == home / "weights" / "test_w.bin"
    assert "test_w" in captured.err and "%" in captured.err  # tqdm progress bar on stderr

    monkeypatch.setitem(registry._WEIGHTS, "test_w", WeightsInfo(**{**info.__dict__, "sha256": "0" * 64}))
    assert main(["download", "test_w", "--force", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("segany: error:") and "fails its sha256 check" in err[0]
    assert (home / "weights" / "test_w.bin").read_bytes() == payload.read_bytes(), "good file kept"
    assert sorted(p.name for p in (home / "weights").iterdir()) == ["test_w.bin"]

    # A model name resolves to its weights; a typo gets suggestions.
    assert main(["download", "vit_bx"]) == 1
    assert "did you mean" in capsys.readouterr().err


def test_entry_point_and_help(home: Path) -> None:
    exe = Path(sys.executable).parent / "segany"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "segany.cli"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for name in ("predict", "models", "download"):
        assert name in r.stdout


def test_help_and_usage_errors_do_not_load_torch() -> None:
    """Building the parser imports no torch, torchvision or cv2, so `segany --help` and a mistyped option
    answer in a fraction of a second; importing the generator for its defaults once made them take 5 s."""
    probe = ("import sys\nfrom segany.cli.main import build_parser\nbuild_parser()\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'cv2') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", "img.jpg"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "segany: error: the following arguments are required: --out (see `segany predict --help`)"
    ]


def test_predict_fast_path_options(tmp_path: Path, tiny_ckpt: Path, home: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--precision/--quantize reach the predictor (same prompt, nearly the same mask as the exact path), and a
    combination that cannot run is one line naming the fix, with no output folder left behind. In-process:
    the subprocess path of predict is covered above."""
    from conftest import cli_fails

    monkeypatch.setenv("SEGANY_HOME", str(home))
    args = [str(SAMPLE_IMAGE), "--point", "320,212", "--checkpoint", str(tiny_ckpt), "--single"]
    exact, quick = tmp_path / "exact", tmp_path / "int8"
    assert main(["predict", *args, "--out", str(exact)]) == 0
    assert main(["predict", *args, "--out", str(quick), "--precision", "bf16", "--quantize", "int8"]) == 0
    capsys.readouterr()
    record = json.loads((quick / "sample.json").read_text())
    assert record["precision"] == "bf16" and record["quantize"] == "int8"  # the JSON says what ran
    assert main(["predict", *args, "--out", str(tmp_path / "fp32"), "--precision", "fp32"]) == 0
    record = json.loads((tmp_path / "fp32" / "sample.json").read_text())
    assert (record["precision"], record["decoder"]) == ("fp32", "exact")  # the reference modules, not the folded ones
    capsys.readouterr()
    a = np.asarray(Image.open(exact / "sample_mask0.png")) > 0
    b = np.asarray(Image.open(quick / "sample_mask0.png")) > 0
    assert a.any() and (a & b).sum() / (a | b).sum() > 0.95
    bad = tmp_path / "bad"
    cli_fails(["predict", *args, "--out", str(bad), "--quantize", "fp8"], capsys, "--precision bf16")  # CPU auto: fp32
    assert not bad.exists()


def test_predict_auto_precision_is_bf16_on_a_native_bf16_cpu(tmp_path: Path, tiny_ckpt: Path, home: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision auto: exact fp32 on CPUs without native bf16, bf16 on those with it (as on CUDA); the JSON
    says which ran, and the mask is nearly the exact one."""
    args = [str(SAMPLE_IMAGE), "--point", "320,212", "--checkpoint", str(tiny_ckpt), "--single"]
    masks = {}
    for flag, expected in (("0", "fp32"), ("1", "bf16")):
        monkeypatch.setenv("SEGANY_CPU_BF16", flag)
        out = tmp_path / expected
        r = segany("predict", *args, "--out", str(out), home=home)
        assert r.returncode == 0, r.stderr
        record = json.loads((out / "sample.json").read_text())
        assert record["precision"] == expected and record["decoder"] == "folded"  # auto folds the decoder on CPU
        assert f"on cpu ({expected})" in r.stderr
        masks[expected] = np.asarray(Image.open(out / "sample_mask0.png")) > 0
    a, b = masks["fp32"], masks["bf16"]
    assert a.any() and (a & b).sum() / (a | b).sum() > 0.95


def test_predict_never_replaces_another_tools_files_beside_the_image(tmp_path: Path, tiny_ckpt: Path, home: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # LabelMe keeps x.json beside x.jpg, so `--out .` in an image folder destroyed the user's annotation.
    from conftest import cli_fails

    monkeypatch.setenv("SEGANY_HOME", str(home))
    out = tmp_path / "out"
    out.mkdir()
    labelme = '{"version": "5.2.1", "shapes": [{"label": "dog"}], "imagePath": "sample.jpg"}'
    (out / "sample.json").write_text(labelme)
    (out / "sample_mask0.png").write_bytes(b"mine")
    args = ["predict", str(SAMPLE_IMAGE), "--point", "320,212", "--checkpoint", str(tiny_ckpt), "--out", str(out),
            "--quiet"]
    line = cli_fails(args, capsys, "no earlier segany predict wrote")
    assert "sample.json, sample_mask0.png" in line and "--overwrite" in line
    assert (out / "sample.json").read_text() == labelme and (out / "sample_mask0.png").read_bytes() == b"mine"
    assert sorted(p.name for p in out.iterdir()) == ["sample.json", "sample_mask0.png"]

    assert main([*args, "--overwrite"]) == 0  # named on stderr, then replaced
    assert "replacing sample.json, sample_mask0.png" in capsys.readouterr().err
    first = json.loads((out / "sample.json").read_text())
    assert first["masks"] and (out / "sample_mask0.png").read_bytes() != b"mine"
    assert main(args) == 0  # segany's own earlier result is replaced without --overwrite
    assert json.loads((out / "sample.json").read_text())["masks"] == first["masks"]
