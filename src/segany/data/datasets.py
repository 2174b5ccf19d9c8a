"""A torch Dataset of (image, up to K instance masks) with SAM preprocessing and augmentation.

Preprocessing follows SAM: resize the long side to ``img_size``, normalize with the model's pixel
statistics, zero-pad bottom/right to a square. Augmentation is segmentation-safe: horizontal flip and
scale jitter followed by a random crop, applied identically to the image and its masks.

Every sample is a pure function of (seed, epoch, index): the sampler passes ``(index, epoch)`` keys, so
a resumed run sees exactly the batches it would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segany.data.formats.common import InstanceRecord, decode_rle
from segany.errors import InputError
from segany.transforms import preprocess_shape


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5
    scale_min: float = 0.6  # long side becomes img_size * U(scale_min, scale_max), then crop to img_size
    scale_max: float = 1.5
    min_mask_area: int = 64  # pixels at model resolution; smaller crops of masks are dropped


class SegmentationDataset(Dataset):
    """Samples ``(image, masks)`` for training.

    Items are dicts: ``image`` (3, S, S) float32 normalized and zero-padded, ``masks`` (K, S, S) bool
    (zero-padded beyond ``num_masks``), ``num_masks`` int, ``size_hw`` (h, w) of the valid image region.
    """

    def __init__(self, records: Sequence[InstanceRecord], *, img_size: int, max_masks: int = 16,
                 augment: AugmentConfig | None = None, seed: int = 0,
                 pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
                 pixel_std: Sequence[float] = (58.395, 57.12, 57.375)) -> None:
        self.records = [r for r in records if r.masks]
        if not self.records:
            raise InputError("the dataset has no image with masks; check the data path and split")
        self.img_size = img_size
        self.max_masks = max_masks
        self.augment = augment
        self.seed = seed
        self.mean = np.asarray(pixel_mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(pixel_std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.sample(int(index), rng)

    def _choose_masks(self, rec: InstanceRecord, rng: np.random.Generator, n: int) -> list[int]:
        ids = np.arange(len(rec.masks))
        if rec.groups is not None:  # one annotator's partition per sample (BSDS)
            groups = np.asarray(rec.groups)
            ids = ids[groups == rng.choice(np.unique(groups))]
        return rng.permutation(ids)[:n].tolist()

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        import cv2

        from segany.data.images import load_image

        rec = self.records[index]
        image = load_image(rec.image_path)
        S = self.img_size
        aug = self.augment
        # Oversample candidates: a crop can cut some masks away.
        chosen = self._choose_masks(rec, rng, self.max_masks * (2 if aug else 1))
        decoded = [decode_rle(rec.masks[i]) for i in chosen]
        check_frames(rec, image.shape[:2], [m.shape for m in decoded])
        masks = np.stack(decoded).astype(np.uint8)  # (n, H, W)
        h0, w0 = image.shape[:2]
        if aug is not None and rng.random() < aug.hflip:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        scale = rng.uniform(aug.scale_min, aug.scale_max) if aug is not None else 1.0
        h, w = preprocess_shape(h0, w0, max(1, round(S * scale)))
        image = cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_LINEAR)
        # NEAREST_EXACT samples pixel centres as INTER_LINEAR does for the image; plain INTER_NEAREST put
        # every mask half a pixel right and down of its object.
        masks = np.stack([cv2.resize(np.ascontiguousarray(m), (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
                          for m in masks])
        y0 = int(rng.integers(0, h - S + 1)) if h > S else 0
        x0 = int(rng.integers(0, w - S + 1)) if w > S else 0
        image = image[y0:y0 + S, x0:x0 + S]
        masks = masks[:, y0:y0 + S, x0:x0 + S]
        min_area = aug.min_mask_area if aug is not None else 1
        keep = [i for i in range(len(masks)) if masks[i].sum() >= min_area][: self.max_masks]
        vh, vw = image.shape[:2]
        out_img = np.zeros((3, S, S), dtype=np.float32)
        out_img[:, :vh, :vw] = (image.transpose(2, 0, 1).astype(np.float32) - self.mean) / self.std
        out_masks = np.zeros((self.max_masks, S, S), dtype=bool)
        for j, i in enumerate(keep):
            out_masks[j, :vh, :vw] = masks[i] > 0
        return {"image": torch.from_numpy(out_img), "masks": torch.from_numpy(out_masks),
                "num_masks": len(keep), "size_hw": (vh, vw)}


def check_frames(rec: InstanceRecord, image_hw: tuple[int, ...], mask_shapes: Iterable[tuple[int, ...]]) -> None:
    """Refuse an image whose size is not the size of each of its masks.

    Stretching the masks onto it would train on objects in the wrong place without a word: the pack
    is stale (an old image kept under a reused id) or edited, and only repacking repairs it. Every mask
    is checked, not just the first: one edited mask is enough to misplace an object.
    """
    want = tuple(rec.size_hw)
    for masks_hw in [tuple(image_hw), *(tuple(m) for m in mask_shapes)]:
        if tuple(image_hw) != want or masks_hw != want:
            raise InputError(f"{rec.image_path} is {image_hw[0]}x{image_hw[1]} but a mask of it in the pack is "
                             f"{masks_hw[0]}x{masks_hw[1]} (record says {want[0]}x{want[1]}); the pack is stale "
                             "or edited: pack the data again (segany data pack) into a new --out folder")


def repeat_records(records: Sequence[InstanceRecord], factors: Mapping[str, float] | None, seed: int = 0
                   ) -> list[InstanceRecord]:
    """Records with each dataset's share scaled by its factor (the same objects, repeated).

    A factor f keeps every record floor(f) times plus a seeded, fixed subset of round(frac(f) * n) of
    them, so the epoch is a pure function of the seed and resumed runs see the same data.
    """
    if not factors:
        return list(records)
    by_ds: dict[str, list[InstanceRecord]] = {}
    for r in records:
        by_ds.setdefault(r.dataset, []).append(r)
    out: list[InstanceRecord] = []
    for k, (name, recs) in enumerate(sorted(by_ds.items())):
        f = float(factors.get(name, 1.0))
        whole, frac = int(f), f - int(f)
        out.extend(recs * whole)
        extra = int(round(frac * len(recs)))
        if extra:
            pick = np.random.default_rng([seed, 31337, k]).permutation(len(recs))[:extra]
            out.extend(recs[i] for i in sorted(pick))
    if not out:
        raise InputError("data.repeat leaves no training images; use factors > 0")
    return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "masks": torch.stack([it["masks"] for it in items]),
        "num_masks": torch.tensor([it["num_masks"] for it in items]),
        "size_hw": [it["size_hw"] for it in items],
    }


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(index, epoch)`` keys, starting at ``start_step``, sharded over ranks.

    Epoch e uses the permutation seeded by (seed, e); each global batch of ``batch_size * world_size``
    consecutive items is split across ranks. A run resumed at step s gets the batches it would have had.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, start_step: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n, self.bs, self.seed = num_items, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world_size

    def _key(self, position: int, perms: dict[int, np.ndarray]) -> tuple[int, int]:
        epoch, i = divmod(position, self.n)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)
        return int(perms[epoch][i]), epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perms: dict[int, np.ndarray] = {}
        step = self.start_step
        global_bs = self.bs * self.world
        while True:
            first = step * global_bs + self.rank * self.bs
            yield [self._key(first + j, perms) for j in range(self.bs)]
            step += 1

    def __len__(self) -> int:  # endless; a large number keeps DataLoader happy
        return 1 << 31
