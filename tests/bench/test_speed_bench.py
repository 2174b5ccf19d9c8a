"""bench/speed.py on the CPU: the script a scarce GPU session runs must not be first run there.

The CUDA-only variants cannot run here; this covers argument handling, the accuracy rows (8-bit encoder
against the exact fp32 modules on ViT-B) and the JSON it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _speed(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_accuracy_rows_for_the_int8_encoder(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    r = _speed("--device", "cpu", "--models", "vit_b", "--parts", "accuracy", "--cpu-variants", "none",
               "--encoder-quant", "int8", "--skip-reference", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["args"]["encoder_quant"] == ["int8"] and report["machine"]
    (result,) = report["results"]
    row = result["bf16_accuracy"]["segany_int8"]
    assert "error" not in row, row
    assert row["n_masks"] == 32 and 0.97 < row["mask_iou_mean"] <= 1.0
    assert 0 < row["embedding_max_abs_err"] < 0.1 * row["embedding_max_abs"]


def test_bad_options_are_refused_before_any_model_loads(tmp_path: Path) -> None:
    for args, says in ((["--encoder-quant", "int4"], "unknown --encoder-quant format 'int4'"),
                       (["--parts", "encoder,latency"], "unknown --parts latency"),
                       (["--attentions", "flash9"], "unknown attention mode 'flash9'")):
        r = _speed("--device", "cpu", "--models", "vit_b", *args, "--json", str(tmp_path / "x.json"))
        assert r.returncode == 2 and says in r.stderr, r.stderr[-1000:]
        assert not (tmp_path / "x.json").exists()
