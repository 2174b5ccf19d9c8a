"""``segany models``: registered models, their weights and whether those are in the download cache."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list models and whether their weights are downloaded",
                              description="List registered models, their weights names and cache status.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def rows() -> list[dict[str, Any]]:
    from segany.checkpoints import cached_path, find_weights
    from segany.registry import get_model_info, get_weights_info, list_models

    out = []
    for name in list_models():
        info = get_model_info(name)
        row: dict[str, Any] = {"model": name, "weights": info.weights, "present": False, "path": None,
                               "description": info.description}
        if info.weights:
            try:
                expected = cached_path(get_weights_info(info.weights))
            except KeyError:  # the model names weights that are not registered (yet)
                pass
            else:
                found = find_weights(info.weights)  # the cache, or weights shipped inside the package
                row["path"], row["present"] = str(found or expected), found is not None
        out.append(row)
    return out


def run(args: argparse.Namespace) -> int:
    from segany.checkpoints import weights_home

    table = rows()
    cache = weights_home() / "weights"  # where `segany download` puts weights: the same folder in both forms
    if args.json:
        print(json.dumps({"cache": str(cache), "models": table}, indent=2))
        return 0
    header = ("MODEL", "WEIGHTS", "PRESENT", "DESCRIPTION")
    lines = [(r["model"], r["weights"] or "-", "yes" if r["present"] else "no", r["description"]) for r in table]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(wd) for x, wd in zip(line, widths, strict=True)).rstrip())
    print(f"\ncache: {cache}  (get weights: segany download WEIGHTS)")
    return 0
