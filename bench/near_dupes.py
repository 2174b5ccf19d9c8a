"""Speed of the near-duplicate grouping (:mod:`segany.engine.near_dupes`) on synthetic dHashes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/near_dupes.py [--images 20000] [--bits 6] [--runs 3]

Four sets of N hashes: random (few near pairs, the usual project), 1 in 5 a near-copy of another (a 1-3 bit
change), one long "video" where each frame is a 1-bit change of the one before (one group of chained pairs), and
a still camera: N distinct hashes all within 3 bits of one (one group, most of the N^2/2 pairs near). Prints the
best of ``--runs`` seconds for :func:`near_duplicate_groups` on each, and the machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time

import numpy as np


def _sets(n: int, rng: np.random.Generator) -> dict[str, dict[int, int]]:
    rand = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    copies = rand.copy()
    src = rng.integers(0, n, size=n // 5)
    for k, s in enumerate(src):
        flip = np.uint64(0)
        for b in rng.choice(64, size=int(rng.integers(1, 4)), replace=False):
            flip |= np.uint64(1) << np.uint64(b)
        copies[(s + 1 + k) % n] = copies[s] ^ flip
    video = np.empty(n, dtype=np.uint64)
    video[0] = rand[0]
    for i in range(1, n):
        video[i] = video[i - 1] ^ (np.uint64(1) << np.uint64(int(rng.integers(0, 64))))
    still: list[int] = []
    for r in (1, 2, 3):
        for bits in itertools.combinations(range(64), r):
            still.append(int(rand[0]) ^ sum(1 << b for b in bits))
    still = still[:n]
    return {**{name: {i: int(v) for i, v in enumerate(arr)}
               for name, arr in (("random", rand), ("20% near-copies", copies), ("video chain", video))},
            "still camera": dict(enumerate(still))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    from segany.engine.near_dupes import near_duplicate_groups

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for name, hashes in _sets(args.images, np.random.default_rng(0)).items():
        best, groups = float("inf"), []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            groups = near_duplicate_groups(hashes, args.bits)
            best = min(best, time.perf_counter() - t0)
        big = sum(1 for g in groups if len(g) > 1)
        print(f"{name:18s} {args.images} images: {best:.2f} s, {len(groups)} groups ({big} with 2 or more)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
