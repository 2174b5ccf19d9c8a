#!/usr/bin/env python3
"""Pack ../shared/data into a small folder for a GPU machine: images ≤ 512 px (JPEG), masks as RLE.

    .venv/bin/python scripts/pack_data.py --data ../shared/data --out out/packed
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segany.data.pack import pack_shared  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="out/packed")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--bsds-annotators", type=int, default=3)
    ap.add_argument("--datasets", default="coco128,pennfudan,kvasir,bsds")
    ap.add_argument("--limit", type=int, default=None, help="images per dataset split (for quick tries)")
    args = ap.parse_args()
    t0 = time.time()
    from tqdm import tqdm

    bar = tqdm(unit="img", desc="pack", mininterval=2)
    manifest = pack_shared(args.data, args.out, datasets=args.datasets.split(","), max_side=args.max_side,
                           quality=args.quality, bsds_annotators=args.bsds_annotators, limit=args.limit,
                           progress=bar.update)
    bar.close()
    size = subprocess.run(["du", "-sh", args.out], capture_output=True, text=True).stdout.split()[0]
    for name, sp in manifest["splits"].items():
        print(f"{name:10s} train {len(sp['train']):4d}  val {len(sp['val']):4d}")
    print(f"{len(manifest['records'])} images, {sum(len(r['masks']) for r in manifest['records'])} masks, "
          f"{size} in {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
