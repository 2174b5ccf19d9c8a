"""Shared by the kernels' interpreter tests: run a script under ``TRITON_INTERPRET=1`` in a subprocess (the
variable must be set before Triton decorates a kernel, so never in the test process), and check that
``torch.compile`` captures a kernel as one registered op in one graph."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# Scripts the collected test modules will run, and the processes started for them. The interpreter runs on one
# core; the first module to ask starts them all, so the 2-core CI runs the two interpreted kernels side by side
# while that module waits for its own (about 15 s of the suite).
_registered: list[str] = []
_started: dict[str, subprocess.Popen[str]] = {}


def register(script: str) -> str:
    """Announce at import that this module will :func:`run_interpreted` ``script``; returns it."""
    if script not in _registered:
        _registered.append(script)
    return script


def _start(script: str) -> subprocess.Popen[str]:
    if script not in _started:
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        _started[script] = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env=env)
    return _started[script]


@atexit.register
def _stop_unread() -> None:
    """A script started for a module whose tests were then not run (deselected) is not left running."""
    for proc in _started.values():
        if proc.poll() is None:
            proc.kill()


def run_interpreted(script: str, timeout: int = 600) -> dict[str, Any]:
    """Run ``script`` with Triton's interpreter (starting every registered one); it must print one JSON object as
    its last line."""
    for other in _registered:
        _start(other)
    proc = _start(script)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def compiled_graph_report(module: Any, x: Any, ref: Any, op_name: str) -> dict[str, Any]:
    """Compile ``module`` with ``fullgraph=True`` (fails on any graph break) and a backend that records the
    graphs and runs them eagerly, so the registered op is what executes; count ``op_name`` in them."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        c = compiled(x)
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    return {"graphs": len(graphs), "op_calls": sum(op_name in t for t in ops),
            "err": float((c - ref).abs().max() / ref.abs().max())}
