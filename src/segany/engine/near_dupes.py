"""Near-duplicate images by 64-bit difference hash (dHash), for the data engine's split and its report.

A project's images often hold near-copies of each other: a re-encoded or resized copy, consecutive video frames,
a dataset's near repeats (Kvasir-SEG has dozens). ``segany engine report`` lists such images by group, and
dataset versions (:mod:`segany.engine.retrain`) keep each group of them on one side of the train / held-out
split, so a model is not evaluated on a near-copy of an image it trained on.

* :func:`dhash` hashes one image file; :func:`dhashes_for` hashes many through a cache keyed by content (sha256).
* :func:`near_duplicate_groups` joins keys into groups (connected components of the pairs within a Hamming
  distance). It compares all pairs with numpy (XOR and popcount over ``uint64``), a block of rows at a time so
  memory stays bounded, and joins them with a vectorised union-find: 20,000 images group in about a second on
  one core of a 2-core EPYC (``bench/near_dupes.py``), many near-copies, a long chain of video frames or 20,000
  equal hashes included.
* :func:`pairs_within` counts the pairs of one group and lists the first few (the report's view of a group:
  20,000 equal hashes are 200 million pairs, counted but never built); :func:`near_duplicate_pairs` builds every
  pair, for small sets only; :func:`near_any` says which hashes have a near-copy in another set.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)

# Images whose dHash differ in at most this many of 64 bits are near-duplicates: `segany engine report`'s default
# (--dup-hash-bits) and the dataset versions' split use the same value, so what the report flags is what the
# split keeps together.
DEFAULT_MAX_BITS = 6

# A dataset version's meta holds, under this key, the dHash (16 hex digits) of each of its images that no earlier
# version of the project recorded, by image sha256; the union over a project's versions is its dHash cache.
DHASH_META_KEY = "image_dhash"

# Cells (row x column pairs) compared per block: 1M uint64 XORs are 8 MB, whatever the number of images
# (larger blocks were no faster on a 2-core EPYC).
_BLOCK_CELLS = 1 << 20
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- hashing
def dhash(path: str, size: int = 8) -> int:
    """64-bit difference hash of an image file.

    The image is converted to grayscale and resized (Lanczos) to ``size + 1`` columns by ``size`` rows; each bit
    says whether a pixel is brighter than its left neighbour, row by row, the first bit the most significant.
    Resizing, re-encoding and small edits change few bits; a horizontal flip changes most.

    Raises:
        OSError (or PIL's errors) when the file cannot be read as an image.
    """
    from PIL import Image

    with Image.open(path) as im:
        g = np.asarray(im.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).ravel()  # (size * size,) bool, row-major
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def dhashes_for(images: Mapping[K, tuple[str, str]], cache: Mapping[str, int]
                ) -> tuple[dict[K, int], dict[str, int], dict[K, str]]:
    """dHash of each image, from ``cache`` where its sha256 is there, else hashed from its file.

    Args:
        images: key (an image id) -> (sha256 of the file's content, path).
        cache: sha256 -> dHash, as :func:`cache_from_metas` reads it.

    Returns:
        (key -> dHash of each image that was cached or could be read; sha256 -> dHash of the images hashed now;
        key -> why the file could not be read, for the others). An unreadable image is not cached, so a later
        call tries it again; the caller logs it.
    """
    out: dict[K, int] = {}
    new: dict[str, int] = {}
    unreadable: dict[K, str] = {}
    for key, (sha, path) in images.items():
        h = cache.get(sha, new.get(sha))
        if h is None:
            try:
                h = new[sha] = dhash(path)
            # PIL raises OSError, ValueError, SyntaxError, struct.error or DecompressionBombError for a broken
            # file; whichever it is, the image is left out of the grouping rather than failing a freeze or report.
            except Exception as exc:
                unreadable[key] = f"{type(exc).__name__}: {exc}"
                continue
        out[key] = h
    return out, new, unreadable


def cache_from_metas(metas: Iterable[Mapping[str, Any] | None]) -> dict[str, int]:
    """sha256 -> dHash recorded in dataset versions' metas (under :data:`DHASH_META_KEY`)."""
    cache: dict[str, int] = {}
    for meta in metas:
        for sha, hex_hash in ((meta or {}).get(DHASH_META_KEY) or {}).items():
            cache[str(sha)] = int(hex_hash, 16)
    return cache


def to_meta(hashes: Mapping[str, int]) -> dict[str, str]:
    """sha256 -> dHash as 16 hex digits (JSON numbers beyond 2**53 lose bits in some readers), sorted by sha."""
    return {sha: f"{hashes[sha]:016x}" for sha in sorted(hashes)}


# --------------------------------------------------------------------------------------------- grouping
def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (any shape), as uint8."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def _blocks(h: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, bits) per block of rows of ``h`` (N,) uint64: ``bits[r, c]`` (uint8) is the number of bits in
    which hash ``start + r`` and hash ``start + c`` differ, for a block of rows against itself and every later
    hash, so each pair is in one block."""
    n = len(h)
    rows = max(1, _BLOCK_CELLS // max(n, 1))
    for start in range(0, n, rows):
        yield start, _popcount(h[start:start + rows, None] ^ h[None, start:])  # (rows, n - start)


def _flat_pairs(close: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the True cells of a 2-D bool array, row-major. flatnonzero then divmod: 2-D
    np.nonzero was 14x slower on such sparse blocks (numpy 2.4)."""
    return np.divmod(np.flatnonzero(close), close.shape[1])


def _as_array(hashes: Mapping[K, int]) -> tuple[list[K], np.ndarray]:
    keys = sorted(hashes)  # type: ignore[type-var]
    return keys, np.array([hashes[k] for k in keys], dtype=np.uint64)


def pairs_within(hashes: Mapping[K, int], max_bits: int = DEFAULT_MAX_BITS, limit: int | None = None
                 ) -> tuple[list[tuple[K, K, int]], int]:
    """Pairs of keys whose hashes differ in at most ``max_bits`` bits: the first ``limit`` of them and how many
    there are in all.

    Returns:
        (pairs, total): ``pairs`` holds (a, b, differing bits) with a < b, sorted by (a, b), at most ``limit``
        of them (all with None); ``total`` counts every such pair. Memory stays bounded by the block size and
        ``limit``, whatever ``total`` is (n equal hashes are n(n-1)/2 pairs); the time grows with the square of
        the number of keys, so call it per group, not on a whole project.
    """
    keys, h = _as_array(hashes)
    out: list[tuple[K, K, int]] = []
    total = 0
    for start, bits in _blocks(h):
        square = bits[:, : len(bits)]  # the block against itself: each pair once (i < j), no self-pairs
        square[np.tril(np.ones(square.shape, dtype=bool))] = 255
        close = bits <= max_bits
        total += int(np.count_nonzero(close))
        room = None if limit is None else limit - len(out)
        if room is not None and room <= 0:
            continue
        ii, jj = _flat_pairs(close)
        ii, jj = ii[:room], jj[:room]
        out += [(keys[start + i], keys[start + j], d)
                for i, j, d in zip(ii.tolist(), jj.tolist(), bits[ii, jj].tolist(), strict=True)]
    return out, total


def near_duplicate_pairs(hashes: Mapping[K, int], max_bits: int = DEFAULT_MAX_BITS) -> list[tuple[K, K, int]]:
    """(a, b, differing bits) for every pair of keys whose hashes differ in at most ``max_bits`` bits; a < b,
    sorted by (a, b).

    Every pair is built, so memory grows with their number: n equal hashes are n(n-1)/2 tuples. For a project's
    images use :func:`near_duplicate_groups` and :func:`pairs_within` per group.
    """
    return pairs_within(hashes, max_bits)[0]


def near_any(queries: Iterable[int], refs: Iterable[int], max_bits: int = DEFAULT_MAX_BITS) -> np.ndarray:
    """(len(queries),) bool: whether each query hash is within ``max_bits`` bits of any of ``refs``."""
    q = np.array(list(queries), dtype=np.uint64)
    r = np.unique(np.array(list(refs), dtype=np.uint64))
    found = np.zeros(len(q), dtype=bool)
    if not len(q) or not len(r):
        return found
    rows = max(1, _BLOCK_CELLS // len(r))
    for start in range(0, len(q), rows):
        found[start:start + rows] = (_popcount(q[start:start + rows, None] ^ r[None, :]) <= max_bits).any(axis=1)
    return found


def _compress(parent: np.ndarray) -> None:
    """Point every node straight at its root (pointer jumping: log2(depth) passes)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of a[k] and b[k] for every k; ``parent`` is compressed before and after.

    Each pass hooks the larger of two different roots under the smaller (``minimum.at`` settles several hooks of
    one root), so a root only ever points lower, no cycle forms and the number of roots falls every pass.
    """
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return
        a, b = ra[differ], rb[differ]  # joining the roots joins the sets
        np.minimum.at(parent, np.maximum(a, b), np.minimum(a, b))
        _compress(parent)


def near_duplicate_groups(hashes: Mapping[K, int], max_bits: int = DEFAULT_MAX_BITS) -> list[list[K]]:
    """Keys joined into groups by chains of near-duplicate pairs (a within ``max_bits`` of b, b of c: one group).

    Every key is in exactly one group (most alone); each group is sorted, groups by their first key.
    """
    keys, h = _as_array(hashes)
    # Equal hashes are one group before any comparison: 20,000 frames of a still camera are then one hash to
    # compare, not 200 million pairs to enumerate.
    values, of_key = np.unique(h, return_inverse=True)
    parent = np.arange(len(values), dtype=np.int64)
    for start, bits in _blocks(values):
        close = bits <= max_bits  # self-pairs and both orders within the block included: harmless here
        if np.count_nonzero(close) > 2 * len(close):  # more than one pair a row: drop those already joined, so
            roots = parent[start:]                     # a dense cluster is not enumerated pair by pair
            close &= roots[None, :] != roots[: len(close), None]
        ii, jj = _flat_pairs(close)
        _union(parent, ii + start, jj + start)
    members: dict[int, list[K]] = {}
    for k, root in zip(keys, parent[of_key.ravel()].tolist(), strict=True):
        members.setdefault(root, []).append(k)
    return list(members.values())  # keys are sorted, so each group is and groups come by their first key
