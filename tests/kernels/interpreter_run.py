"""Shared by the kernels' interpreter tests: run a script under ``TRITON_INTERPRET=1`` in a subprocess (the
variable must be set before Triton decorates a kernel, so never in the test process), and check that
``torch.compile`` captures a kernel as one registered op in one graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_interpreted(script: str, timeout: int = 600) -> dict[str, Any]:
    """Run ``script`` with Triton's interpreter; it must print one JSON object as its last line."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
