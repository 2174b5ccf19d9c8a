"""Training under torchrun with two CPU processes (gloo): the multi-GPU path, run where CI can run it.

Each process must take the same steps with the same learning rate, or the run hangs in a gradient
all-reduce (one process ended its time budget a step early) or its weights drift apart (each scheduled
its learning rate from its own clock). So the clock and Ctrl-C are agreed on by all processes each step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(out: Path, mode: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out), mode]
    try:  # a process waiting forever in an all-reduce is the failure this guards against
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the 2-process run hung (a process left the loop alone): {str(exc.stderr)[-1500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_time_budget_ends_every_process_after_the_same_step_with_the_same_weights(tmp_path: Path) -> None:
    """Rank 1's clock runs 200× fast: alone it would stop after one step while rank 0 went on to four."""
    r0, r1 = _torchrun(tmp_path, "clock")
    assert r0["step"] == r1["step"] and 1 <= r0["step"] < 4, (r0, r1)
    assert r0["checksum"] == r1["checksum"]  # same gradients (all-reduced) and same learning rate
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == r0["step"]


def test_ctrl_c_to_one_process_stops_all_after_the_same_step_and_saves(tmp_path: Path) -> None:
    import torch

    r0, r1 = _torchrun(tmp_path, "interrupt")
    assert r0["interrupted"] and r1["interrupted"], (r0, r1)
    assert r0["step"] == r1["step"] and 2 <= r0["step"] < 4 and r0["checksum"] == r1["checksum"]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # rank 0 wrote it, once
    assert state["step"] == r0["step"]
