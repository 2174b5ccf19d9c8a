"""Paired comparison of two ``segany eval`` results files on the same objects: A − B per object, with a
95% image-level bootstrap interval (``segany.eval.metrics.paired_bootstrap``).

Why: two mIoU figures from separate runs hide how much of their gap is noise; pairing the same objects
and resampling whole images gives the gap an error bar. Used for shipping decisions (issue 5) and for
what a fast path costs (issue 7: bf16, int8, fp8 against fp32).

    python scripts/compare_evals.py A/results.json B/results.json [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segany.eval.metrics import paired_bootstrap


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text())["per_object"]["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"compare_evals: {path} is not a segany eval results.json ({exc}); "
                         "pass the results.json that `segany eval --out DIR` wrote") from None


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """A − B for box IoU, 1-click and 5-click IoU over the objects both list in the same order."""
    keys = [(r["dataset"], r["image_id"]) for r in a]
    if len(a) != len(b) or keys != [(r["dataset"], r["image_id"]) for r in b]:
        raise SystemExit("compare_evals: the two files list different objects; run both with the same "
                         "--data, --split, --datasets, --limit-images and --max-objects-per-image")
    out = {"box": paired_bootstrap([x["box_iou"] - y["box_iou"] for x, y in zip(a, b, strict=True)], keys)}
    for k in (1, 5):
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if len(x.get("click_ious", [])) >= k
                 and len(y.get("click_ious", [])) >= k]
        out[f"{k}-click"] = paired_bootstrap([x["click_ious"][k - 1] - y["click_ious"][k - 1] for x, y in pairs],
                                             [(x["dataset"], x["image_id"]) for x, _ in pairs])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    result = compare(_rows(args.a), _rows(args.b))
    for name, s in result.items():
        print(f"{name:8s} A−B {s['mean']:+.4f}  95% CI {s['ci_low']:+.4f} … {s['ci_high']:+.4f}  "
              f"A better on {s['a_better']:.0%} of {s['objects']} objects")
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
