"""bench/cpu_click_ab.py runs both A/B comparisons end to end and refuses bad options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _ab(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "cpu_click_ab.py"), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_both_comparisons_report(tmp_path: Path) -> None:
    """In-process (the allocator pair still runs as two child processes, as it must)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cpu_click_ab", REPO / "bench" / "cpu_click_ab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "ab.json"
    threads = torch.get_num_threads()
    try:
        assert module.main(["--model", "segany_tiny", "--clicks", "3", "--pairs", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["model"] == "segany_tiny" and report["machine"]["cpu"]
    post, alloc = report["post"], report["alloc"]
    assert post["interpolate_ms"] > 0 and post["opencv_ms"] > 0 and post["clicks_each"] == 3
    assert len(alloc["off_ms"]) == len(alloc["on_ms"]) == 1 and alloc["on_faster_pairs"].endswith("/1")
    # How many faults glibc's defaults cost depends on the interpreter's history (test_cpu_alloc pins it),
    # so only their presence is checked here.
    assert alloc["faults_per_click_on"] >= 0 and alloc["faults_per_click_off"] >= 0


@pytest.mark.parametrize(("args", "says"), [
    (["--parts", "post,gpu"], "--parts takes post and/or alloc"),
    (["--clicks", "0"], "--clicks and --pairs must be at least 1"),
])
def test_bad_options_are_refused(args: list[str], says: str) -> None:
    r = _ab(*args)
    assert r.returncode == 2 and says in r.stderr
