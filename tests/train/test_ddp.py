"""Training under torchrun with two CPU processes (gloo): the multi-GPU path, run where CI can run it.

Each process must take the same steps with the same learning rate, or the run hangs in a gradient
all-reduce (one process ended its time budget a step early) or its weights drift apart (each scheduled
its learning rate from its own clock). So the clock and Ctrl-C are agreed on by all processes each step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both scenarios in one torchrun launch (starting it and two interpreters is most of the time)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out), "clock,interrupt"]
    log = out / "torchrun.log"
    with open(log, "w") as sink:  # a file, not a pipe: a worker left running cannot hold this test open
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:  # the failure this guards against: a process waiting forever in an
            os.killpg(proc.pid, signal.SIGKILL)  # all-reduce; torchrun gives workers sessions of their own
            for pid_file in out.glob("worker*.pid"):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the 2-process run hung (a process left the loop alone): {log.read_text()[-1500:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    return out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_time_budget_ends_every_process_after_the_same_step_with_the_same_weights(runs: Path) -> None:
    """Rank 1's clock runs 200× fast: alone it would stop after one step while rank 0 went on to four."""
    r0, r1 = _ranks(runs / "clock")
    assert r0["step"] == r1["step"] and 1 <= r0["step"] < 4, (r0, r1)
    assert r0["checksum"] == r1["checksum"]  # same gradients (all-reduced) and same learning rate
    log = [json.loads(line) for line in (runs / "clock" / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == r0["step"]


def test_ctrl_c_to_one_process_stops_all_after_the_same_step_and_saves(runs: Path) -> None:
    import torch

    r0, r1 = _ranks(runs / "interrupt")
    assert r0["interrupted"] and r1["interrupted"], (r0, r1)
    assert r0["step"] == r1["step"] and 2 <= r0["step"] < 4 and r0["checksum"] == r1["checksum"]
    state = torch.load(runs / "interrupt" / "run" / "last.pt", weights_only=True)  # rank 0 wrote it, once
    assert state["step"] == r0["step"]
