#!/usr/bin/env python
"""Average segany checkpoints of one architecture into an fp16 checkpoint (how segany_tiny was made).

    .venv/bin/python scripts/average_weights.py START.pt runs/segany_tiny_cpu3/model_fp16.pt --out runs/soup3.pt
    .venv/bin/python scripts/average_weights.py A.pt B.pt C.pt --weights 2,1,1 --out soup.pt
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="two or more segany checkpoints (same config)")
    ap.add_argument("--weights", default=None, help="comma-separated, one per checkpoint (default: equal)")
    ap.add_argument("--out", required=True, help="output checkpoint (written atomically)")
    ap.add_argument("--fp32", action="store_true", help="store fp32 instead of the shipped fp16")
    args = ap.parse_args(argv)

    from segany.errors import SeganyError
    from segany.train.soup import average_to_file

    try:
        weights = [float(x) for x in args.weights.split(",")] if args.weights else None
    except ValueError:
        print(f"average_weights: --weights {args.weights!r} is not a comma-separated list of numbers",
              file=sys.stderr)
        return 1
    try:
        out = average_to_file(args.checkpoints, args.out, weights, half=not args.fp32)
    except (SeganyError, FileNotFoundError) as e:
        print(f"average_weights: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
