"""``segany download NAME``: fetch registered weights into the cache (``$SEGANY_HOME``) and verify them."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("download", help="download and verify model weights",
                              description="Download registered weights (a weights name such as sam_vit_b, or a "
                                          "model name such as vit_b) into $SEGANY_HOME/weights and check them.")
    p.add_argument("name", help="weights or model name (see `segany models`)")
    p.add_argument("--force", action="store_true", help="download again even if a verified file is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _weights_name(name: str) -> str:
    from segany.registry import get_model_info, get_weights_info, list_models, list_weights

    if name in list_weights():
        return name
    if name in list_models() or name == "default":
        info = get_model_info(name)
        if info.weights:
            return info.weights
    return get_weights_info(name).name  # raises with suggestions


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segany.checkpoints import download

    name = _weights_name(args.name)
    bar: tqdm | None = None

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            # ``initial``: a continued download starts at the bytes it kept (its speed is not counted from them)
            bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                       file=sys.stderr)
        if total != bar.total:  # a restart on the whole file, or a length first unknown
            bar.total = total
        bar.update(done - bar.n)

    try:
        path = download(name, force=args.force, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(path)
    return 0
