"""``segany data pack``: pack datasets into a small folder that travels to a training machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="dataset tools (pack)", description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    pk = sub.add_parser("pack", help="pack ../shared/data: images ≤ 512 px JPEG, masks as RLE, splits kept")
    pk.add_argument("--data", default=str(Path("..") / "shared" / "data"), help="the shared data folder")
    pk.add_argument("--out", default="out/packed")
    pk.add_argument("--max-side", type=int, default=512)
    pk.add_argument("--quality", type=int, default=80)
    pk.add_argument("--datasets", default="coco128,pennfudan,kvasir,bsds")
    pk.add_argument("--limit", type=int, default=None, help="images per dataset (quick tries)")
    pk.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segany.data.pack import pack_shared

    bar = tqdm(unit="img", desc="pack", file=sys.stderr, mininterval=1.0)
    manifest = pack_shared(args.data, args.out, datasets=args.datasets.split(","), max_side=args.max_side,
                           quality=args.quality, limit=args.limit, progress=bar.update)
    bar.close()
    for name, sp in manifest["splits"].items():
        print(f"{name:10s} train {len(sp['train']):4d}  val {len(sp['val']):4d}")
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"{len(manifest['records'])} images, {size / 1e6:.1f} MB in {args.out}")
    return 0
