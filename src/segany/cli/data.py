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
    pk.epilog = "An interrupted pack resumes: rerun the same command and images already written are kept."
    pk.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segany.cli._checks import check_out_dir
    from segany.cli._util import comma_list
    from segany.data.pack import pack_shared

    check_out_dir(args.out, "--out")
    datasets = comma_list(args.datasets)
    bar = None

    def progress(n: int) -> None:
        nonlocal bar
        if bar is None:  # made on the first image, so errors in the options print no empty bar
            bar = tqdm(unit="img", desc="pack", file=sys.stderr, mininterval=1.0)
        bar.update(n)

    try:
        manifest = pack_shared(args.data, args.out, datasets=datasets, max_side=args.max_side,
                               quality=args.quality, limit=args.limit, progress=progress)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"segany: interrupted; images written so far stay in {args.out}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    if bar is not None:
        bar.close()
    for name, sp in manifest["splits"].items():
        print(f"{name:10s} train {len(sp['train']):4d}  val {len(sp['val']):4d}")
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    reused = f" ({manifest['reused']} kept from an earlier run)" if manifest.get("reused") else ""
    print(f"{len(manifest['records'])} images{reused}, {size / 1e6:.1f} MB in {args.out}")
    return 0
