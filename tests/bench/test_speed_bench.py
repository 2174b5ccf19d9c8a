"""bench/speed.py on the CPU: the script a scarce GPU session runs must not be first run there.

The CUDA-only variants cannot run here; this covers argument handling, the accuracy rows (8-bit encoder
against the exact fp32 modules on ViT-B, built at 128 px: at 1024 the row took 210 s on a CPU without
native bf16, a fifth of the suite, and 18 s at 256) and the JSON it writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _speed(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def _speed_module() -> object:
    spec = importlib.util.spec_from_file_location("bench_speed", REPO / "bench" / "speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_rows_for_the_int8_encoder(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    r = _speed("--device", "cpu", "--models", "vit_b", "--parts", "accuracy", "--cpu-variants", "none",
               "--encoder-quant", "int8", "--skip-reference", "--img-size", "128", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["args"]["encoder_quant"] == ["int8"] and report["machine"]
    (result,) = report["results"]
    assert result["img_size"] == 128 and result["model"] == "vit_b"
    row = result["bf16_accuracy"]["segany_int8"]
    assert "error" not in row, row
    assert row["n_masks"] == 32 and 0.97 < row["mask_iou_mean"] <= 1.0
    assert 0 < row["embedding_max_abs_err"] < 0.1 * row["embedding_max_abs"]


@pytest.mark.parametrize(("args", "says"), [
    (["--encoder-quant", "int4"], "unknown --encoder-quant format 'int4'"),
    (["--parts", "encoder,latency"], "unknown --parts latency"),
    (["--attentions", "flash9"], "unknown attention mode 'flash9'"),
    (["--img-size", "100", "--skip-reference"], "--img-size must be a positive multiple of 64, got 100"),
    (["--img-size", "256"], "--img-size needs --skip-reference"),
])
def test_bad_options_are_refused_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                         says: str) -> None:
    speed = _speed_module()  # in-process: argparse exits before anything is built or written
    monkeypatch.setattr(speed, "build_sam", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--device", "cpu", "--models", "vit_b", *args, "--json", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_gelu_epilogue_both_times_each_bf16_variant_with_and_without(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    r = _speed("--device", "cpu", "--models", "vit_b", "--parts", "encoder", "--cpu-variants", "bf16",
               "--gelu-epilogue", "both", "--skip-reference", "--img-size", "128", "--iters", "1",
               "--warmup", "0", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    enc = json.loads(out.read_text())["results"][0]["encoder_img_per_s"]
    assert set(enc) == {"segany_fp32", "segany_bf16", "segany_bf16_gelu_epilogue"}  # fp32 has no twin
    assert all("error" not in row and row["img_per_s"] > 0 for row in enc.values()), enc


def test_gelu_epilogue_choice_leaves_fp32_and_8_bit_variants_alone() -> None:
    speed = _speed_module()
    variants = [("fp32", {"precision": "fp32"}), ("bf16", {"precision": "bf16"}),
                ("int8", {"precision": "bf16", "quantize": "int8"})]
    assert speed.with_gelu_epilogue(variants, "default") == variants
    assert speed.with_gelu_epilogue(variants, "on") == [
        variants[0], ("bf16_gelu_epilogue", {"precision": "bf16", "gelu_epilogue": True}), variants[2]]
    assert [label for label, _ in speed.with_gelu_epilogue(variants, "both")] == [
        "fp32", "bf16", "bf16_gelu_epilogue", "int8"]
    assert speed.with_gelu_epilogue(variants, "off")[1] == ("bf16", {"precision": "bf16", "gelu_epilogue": False})


def test_compiled_runs_record_their_compile_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A compiled row may come from a graph that a warm cache compiled under other settings: the JSON says
    which cache folder the run used and how many files it held before."""
    speed = _speed_module()
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert "compile_cache" not in speed.machine("cpu")
    record = speed.machine("cpu", compiled=True)["compile_cache"]
    assert Path(record["dir"]).parent == tmp_path / "compile-cache" and record["files_before"] == 0
    (Path(record["dir"]) / "entry").write_text("x")
    assert speed.machine("cpu", compiled=True)["compile_cache"]["files_before"] == 1


def test_every_step_the_gpu_runbook_names_exists() -> None:
    """A misspelt step costs a scarce GPU call: every STEPS="..." of the runbook and of gpu_all.sh's own
    usage note must name a step that gpu_all.sh defines."""
    import re

    script = (REPO / "bench" / "gpu_all.sh").read_text()
    defined = set(re.findall(r"^step \S+ (\S+) ", script, flags=re.M))
    texts = [(REPO / "docs" / "dev" / "GPU_RUNBOOK.md").read_text(), script]
    named = {name for text in texts for steps in re.findall(r'STEPS="([^"$]*)"', text) for name in steps.split()}
    assert named and "speed_h_base" in defined, (named, defined)
    assert named <= defined, f"not defined in bench/gpu_all.sh: {sorted(named - defined)}"


def test_forced_tiles_time_the_searchs_fastest_each_alone_and_restore_the_list() -> None:
    spec = importlib.util.spec_from_file_location("bench_relpos", REPO / "bench" / "relpos_kernel.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Kernel:  # what the bench uses of Triton's Autotuner: its tile list and its choice cache
        def __init__(self) -> None:
            self.configs = ["own"]
            self.cache = {"key": "own"}

    kernel = Kernel()
    tiles = ["a", "b", "c", "d", "e"]
    timings = {"a": 0.5, "b": 0.2, "c": 0.9, "d": 0.3, "e": 0.4, "gone": 0.1}  # "gone": not a tile on offer
    ran: list[list[str]] = []

    def time_one() -> dict[str, float]:
        assert kernel.cache == {}, "the choice must be forgotten, or the old pick runs"
        ran.append(list(kernel.configs))
        return {"ms": 10.0 * len(ran)}

    forced = bench._forced(kernel, tiles, timings, time_one)
    assert ran == [["b"], ["d"], ["e"]]  # the three fastest, each the only tile
    assert forced == {"b": {"autotune_ms": 0.2, "ms": 10.0}, "d": {"autotune_ms": 0.3, "ms": 20.0},
                      "e": {"autotune_ms": 0.4, "ms": 30.0}}
    assert kernel.configs == ["own"] and kernel.cache == {}
