"""scripts/compare_evals.py: paired A − B over the same objects, and refusals for files that do not pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _results(path: Path, box: list[float], clicks: list[list[float]], images: list[str]) -> Path:
    rows = [{"dataset": "d", "image_id": im, "box_iou": b, "click_ious": c}
            for b, c, im in zip(box, clicks, images, strict=True)]
    path.write_text(json.dumps({"per_object": {"model": rows}}))
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "compare_evals.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_paired_differences(tmp_path: Path) -> None:
    images = ["a", "a", "b", "c"]
    clicks_b = [[0.5] * 5, [0.4] * 5, [0.6] * 5, [0.3] * 5]
    a = _results(tmp_path / "a.json", [0.9, 0.8, 0.7, 0.6], [[v + 0.1 for v in c] for c in clicks_b], images)
    b = _results(tmp_path / "b.json", [0.8, 0.8, 0.7, 0.7], clicks_b, images)
    r = _run(a, b, "--json", tmp_path / "out.json")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert abs(out["box"]["mean"]) < 1e-9 and out["box"]["objects"] == 4 and out["box"]["clusters"] == 3
    assert abs(out["1-click"]["mean"] - 0.1) < 1e-9 and out["1-click"]["a_better"] == 1.0
    assert abs(out["5-click"]["ci_low"] - 0.1) < 1e-9  # every resample has the same +0.1
    assert "box" in r.stdout and "1-click" in r.stdout


def test_files_that_do_not_pair_are_refused(tmp_path: Path) -> None:
    a = _results(tmp_path / "a.json", [0.5, 0.5], [[0.5], [0.5]], ["x", "y"])
    b = _results(tmp_path / "b.json", [0.5, 0.5], [[0.5], [0.5]], ["x", "z"])
    r = _run(a, b)
    assert r.returncode == 1 and "list different objects" in r.stderr
    (tmp_path / "bad.json").write_text("{}")
    r = _run(a, tmp_path / "bad.json")
    assert r.returncode == 1 and "not a segany eval results.json" in r.stderr
