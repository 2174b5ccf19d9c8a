"""Speed of the near-duplicate grouping (:mod:`segany.engine.near_dupes`) on synthetic dHashes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/near_dupes.py [--images 20000] [--bits 6] [--runs 3]
    OMP_NUM_THREADS=1 .venv/bin/python bench/near_dupes.py --freeze 100000

Four sets of N hashes: random (few near pairs, the usual project), 1 in 5 a near-copy of another (a 1-3 bit
change), one long "video" where each frame is a 1-bit change of the one before (one group of chained pairs), and
a still camera: N distinct hashes all within 3 bits of one (one group, most of the N^2/2 pairs near). Prints the
best of ``--runs`` seconds for :func:`near_duplicate_groups` on each, and the machine.

``--freeze N`` times one ``freeze_dataset_version`` of a SQLite project of N images (rows only, one mask each,
random dHashes cached in an earlier version's meta, so no file is read): how long the write transaction was open
and how long the near-duplicate grouping ran inside and outside it (the grouping once ran inside it, where SQLite
holds every other writer). Run it with ``PYTHONPATH=`` another checkout's ``src`` to compare.
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


def freeze_timing(n: int) -> None:
    """Print the seconds a freeze of ``n`` images held the write lock, and grouped inside and outside it."""
    import tempfile
    import uuid
    from contextlib import contextmanager
    from pathlib import Path

    from segany.engine import near_dupes, retrain
    from segany.engine.db import Annotation, DatasetVersion, Image
    from segany.engine.store import open_store

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "proj", create=True)
        pid = store.create_project("bench")["id"]
        shas = [f"{k:064x}" for k in rng.integers(0, 2**62, size=n, dtype=np.int64).tolist()]
        with store.transaction() as s:
            s.add_all([Image(project_id=pid, path=f"/nowhere/{k}.png", file_name=f"{k}.png", width=8, height=8,
                             sha256=sha) for k, sha in enumerate(shas)])
        with store.transaction() as s:
            ids = [i for (i,) in s.execute(Image.__table__.select().with_only_columns(Image.id))]
            s.add_all([Annotation(uuid=str(uuid.UUID(int=i)), image_id=i, rle_counts="0 64", height=8, width=8,
                                  area=64, bbox_xywh=[0, 0, 8, 8], source="manual", review_state="accepted",
                                  prompts={}, revision=1) for i in ids])
            cache = {sha: int(h) for sha, h in zip(shas, rng.integers(0, 2**63, size=n, dtype=np.int64), strict=True)}
            s.add(DatasetVersion(project_id=pid, name="v0-cache", meta={  # another fraction: its sides do not apply
                "held_out": 0.5, near_dupes.DHASH_META_KEY: near_dupes.to_meta(cache)}))
        state = {"writing": False, "inside": 0.0, "outside": 0.0, "locked": 0.0}
        real_transaction, real_groups = store.transaction, near_dupes.near_duplicate_groups

        @contextmanager
        def transaction(*, write: bool = True):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            with real_transaction(write=write) as s:
                state["writing"] = write
                try:
                    yield s
                finally:
                    state["writing"] = False
            if write:
                state["locked"] += time.perf_counter() - t0

        def groups(*args):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = real_groups(*args)
            state["inside" if state["writing"] else "outside"] += time.perf_counter() - t0
            return out

        store.transaction = transaction  # type: ignore[method-assign]
        near_dupes.near_duplicate_groups = groups  # type: ignore[assignment]
        t0 = time.perf_counter()
        retrain.freeze_dataset_version(store, None, held_out=0.2)
        total = time.perf_counter() - t0
        near_dupes.near_duplicate_groups = real_groups  # type: ignore[assignment]
        store.close()
    print(f"freeze of {n} images: {total:.1f} s in all; write transaction open {state['locked']:.1f} s; grouping "
          f"{state['inside']:.1f} s inside it, {state['outside']:.1f} s outside ({retrain.__file__})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--freeze", type=int, default=0, metavar="N", help="time a freeze of N images instead")
    args = p.parse_args()
    if args.freeze:
        freeze_timing(args.freeze)
        return 0

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
