"""Run-length encoding of binary masks: batched on the model's device, decoded at the numpy edge.

Masks are run-length encoded in column-major (Fortran) order, as COCO and SA-1B do: ``counts``
alternates runs of 0s and 1s and always starts with a (possibly empty) run of 0s.

Inside segany a batch of masks is held as an :class:`RleBatch`: for every mask the flat
column-major positions where the value changes, stored for the whole batch in one tensor plus
CSR offsets. Encoding is three tensor ops and one ``nonzero``, so a GPU encodes hundreds of
full-resolution masks without a Python loop; a mask's ``counts`` are one ``np.diff`` away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segany.errors import InputError

UncompressedRLE = dict[str, Any]  # {"size": [h, w], "counts": [int, ...]}
CocoRLE = dict[str, Any]  # {"size": [h, w], "counts": str} (pycocotools' compressed string)


@dataclass(frozen=True)
class RleBatch:
    """Run-length encodings of N masks of one size, as device tensors.

    Attributes:
        changes: (K,) int64, flat column-major index ``p`` of every pixel whose value differs from
            pixel ``p - 1``, mask after mask.
        offsets: (N + 1,) int64; mask ``i``'s changes are ``changes[offsets[i]:offsets[i + 1]]``.
        first: (N,) bool, the value of pixel 0 of each mask.
        size_hw: (H, W) of every mask.
    """

    changes: torch.Tensor
    offsets: torch.Tensor
    first: torch.Tensor
    size_hw: tuple[int, int]

    def __len__(self) -> int:
        return int(self.first.shape[0])

    @classmethod
    def empty(cls, size_hw: tuple[int, int], device: torch.device | str = "cpu") -> RleBatch:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(z, torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.bool, device=device),
                   size_hw)

    def to(self, device: torch.device | str) -> RleBatch:
        return RleBatch(self.changes.to(device), self.offsets.to(device), self.first.to(device), self.size_hw)

    def select(self, index: torch.Tensor) -> RleBatch:
        """The masks at ``index`` (int64 indices or a bool mask), in that order."""
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(self.offsets.device)
        starts = self.offsets[:-1][index]
        lengths = self.offsets[1:][index] - starts
        new_offsets = torch.zeros(len(index) + 1, dtype=torch.int64, device=index.device)
        torch.cumsum(lengths, 0, out=new_offsets[1:])
        total = int(new_offsets[-1])
        # Gather each selected segment: position j of the output belongs to segment seg[j].
        seg = torch.repeat_interleave(torch.arange(len(index), device=index.device), lengths, output_size=total)
        src = starts[seg] + (torch.arange(total, device=index.device) - new_offsets[:-1][seg])
        return RleBatch(self.changes[src], new_offsets, self.first[index], self.size_hw)

    @staticmethod
    def cat(batches: Sequence[RleBatch]) -> RleBatch:
        if not batches:
            raise ValueError("RleBatch.cat needs at least one batch")
        sizes = {b.size_hw for b in batches}
        if len(sizes) != 1:
            raise ValueError(f"cannot concatenate run-length encodings of different sizes {sorted(sizes)}")
        offsets = [batches[0].offsets[:1]]
        base = batches[0].offsets.new_zeros(())
        for b in batches:
            offsets.append(b.offsets[1:] + base)
            base = base + b.offsets[-1]
        return RleBatch(torch.cat([b.changes for b in batches]), torch.cat(offsets),
                        torch.cat([b.first for b in batches]), batches[0].size_hw)

    # ------------------------------------------------------------- numpy edge
    def to_numpy(self) -> NumpyRle:
        return NumpyRle(self.changes.cpu().numpy(), self.offsets.cpu().numpy(), self.first.cpu().numpy(), self.size_hw)


@dataclass(frozen=True)
class NumpyRle:
    """The numpy twin of :class:`RleBatch`, for per-mask output encoding on the CPU."""

    changes: np.ndarray
    offsets: np.ndarray
    first: np.ndarray
    size_hw: tuple[int, int]

    def __len__(self) -> int:
        return int(self.first.shape[0])

    def counts(self, i: int) -> np.ndarray:
        """COCO ``counts`` of mask ``i`` (int64), starting with the run of 0s."""
        h, w = self.size_hw
        ch = self.changes[self.offsets[i]:self.offsets[i + 1]]
        bounds = np.concatenate(([0], ch, [h * w]))
        runs = np.diff(bounds)
        return np.concatenate(([0], runs)) if self.first[i] else runs

    def uncompressed(self, i: int) -> UncompressedRLE:
        return {"size": [self.size_hw[0], self.size_hw[1]], "counts": self.counts(i).tolist()}

    def decode(self, i: int) -> np.ndarray:
        """Mask ``i`` as (H, W) bool (a Fortran-ordered view)."""
        return counts_to_mask(self.counts(i), self.size_hw)

    def to_coco(self) -> list[CocoRLE]:
        """Every mask as a compressed COCO RLE with ``counts`` as str (one pycocotools call)."""
        if len(self) == 0:
            return []
        from pycocotools import mask as mask_utils

        h, w = self.size_hw
        rles = mask_utils.frPyObjects([{"size": [h, w], "counts": self.counts(i).astype(np.uint32)}
                                       for i in range(len(self))], h, w)
        return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in rles]


def encode_masks(masks: torch.Tensor) -> RleBatch:
    """Run-length encode (N, H, W) bool masks on their device."""
    n, h, w = masks.shape
    device = masks.device
    if n == 0:
        return RleBatch.empty((h, w), device)
    flat = masks.transpose(1, 2).reshape(n, h * w)  # column-major, as COCO counts run
    changed = flat[:, 1:] != flat[:, :-1]
    idx = changed.nonzero()  # (K, 2) sorted by mask then position
    per_mask = torch.bincount(idx[:, 0], minlength=n)
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(per_mask, 0, out=offsets[1:])
    return RleBatch(idx[:, 1] + 1, offsets, flat[:, 0].clone(), (h, w))


def decode_masks_torch(rle: RleBatch, index: torch.Tensor | None = None) -> torch.Tensor:
    """Decode masks back to (N, H, W) bool on the RleBatch's device (fast on a GPU)."""
    if index is not None:
        rle = rle.select(index)
    h, w = rle.size_hw
    n = len(rle)
    device = rle.changes.device
    toggles = torch.zeros(n, h * w, dtype=torch.int32, device=device)
    seg = torch.repeat_interleave(torch.arange(n, device=device), rle.offsets[1:] - rle.offsets[:-1],
                                  output_size=int(rle.changes.shape[0]))
    toggles[seg, rle.changes] = 1
    # A pixel's value is the first pixel's value flipped once per change at or before it.
    flat = (toggles.cumsum(1) & 1).bool() ^ rle.first[:, None]
    return flat.reshape(n, w, h).transpose(1, 2)


def counts_to_mask(counts: Sequence[int] | np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """Decode uncompressed COCO ``counts`` to an (H, W) bool mask (a Fortran-ordered view).

    Raises :class:`InputError` (a ``ValueError``) when the counts do not describe an HxW mask: they often
    come from a user's file (an SA-1B or AMG output), so the message says what is wrong rather than numpy.
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    counts = np.asarray(counts)
    if counts.ndim != 1 or not (np.issubdtype(counts.dtype, np.integer) or counts.size == 0):
        raise InputError(f"RLE counts must be a flat list of whole numbers, got {counts.dtype} of shape "
                         f"{counts.shape}; the annotation is corrupt: re-export it")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise InputError(f"RLE counts hold a negative run ({int(counts.min())}); the annotation is corrupt: "
                         "re-export it")
    total = int(counts.sum())
    if total != h * w:
        raise InputError(f"RLE counts sum to {total} pixels but size {h}x{w} has {h * w}; the annotation is "
                         "corrupt or made for another image size: re-export it")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(w, h).T


def mask_to_counts(mask: np.ndarray) -> np.ndarray:
    """Uncompressed COCO ``counts`` of one (H, W) bool mask."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(1, dtype=np.int64)
    ch = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], ch, [flat.size])))
    return np.concatenate(([0], runs)) if flat[0] else runs


def counts_area(counts: Sequence[int] | np.ndarray) -> int:
    """Number of foreground pixels: the sum of the odd-indexed runs."""
    return int(np.asarray(counts, dtype=np.int64)[1::2].sum())


def mask_to_coco(mask: np.ndarray) -> CocoRLE:
    """Compress one (H, W) mask to COCO RLE with ``counts`` as str."""
    from pycocotools import mask as mask_utils

    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle["counts"].decode("ascii")}


def coco_to_mask(rle: CocoRLE) -> np.ndarray:
    """Decode a COCO RLE (compressed str/bytes or uncompressed list counts) to (H, W) bool."""
    from pycocotools import mask as mask_utils

    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        return counts_to_mask(counts, (h, w))
    enc = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(enc).astype(bool)


def counts_to_changes(counts: Sequence[int] | np.ndarray) -> tuple[np.ndarray, bool]:
    """Uncompressed ``counts`` → (change positions, value of the first pixel), the RleBatch form."""
    counts = np.asarray(counts, dtype=np.int64)
    bounds = np.cumsum(counts)[:-1]
    if len(counts) > 1 and counts[0] == 0:  # starts with foreground: the leading empty run is no change
        return bounds[1:], True
    return bounds, False
