"""Training batches made on the accelerator from a dataset decoded once into its memory.

A small model on a GPU eats images far faster than worker processes can decode JPEGs, resize masks
and crop them (the first GPU run of ``segany_tiny`` spent most of its time waiting on the loader at
~20 images/s). The packed datasets are small (≈1.4k images, ≈8k masks at ≤512 px), so they fit in
GPU memory: decode everything once, then flip, scale-jitter and crop whole batches with
``grid_sample``. Batches are a pure function of (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segany.data.datasets import AugmentConfig, check_frames
from segany.data.formats.common import InstanceRecord, decode_rle
from segany.errors import InputError
from segany.transforms import preprocess_shape

log = logging.getLogger(__name__)


def _decode(rec: InstanceRecord, size: int) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    from segany.data.images import load_image

    image = load_image(rec.image_path)
    full = [decode_rle(r) for r in rec.masks]
    check_frames(rec, image.shape[:2], [m.shape for m in full])  # a stale pack: never stretch masks onto another image
    h, w = preprocess_shape(image.shape[0], image.shape[1], size)
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    # NEAREST_EXACT samples pixel centres as INTER_LINEAR does for the image; plain INTER_NEAREST put
    # every mask half a pixel right and down of its object.
    masks = np.stack([cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST_EXACT) for m in full])
    return image, masks


class DeviceBatcher:
    """Holds every image (N, 3, S, S) uint8 and mask (M, S, S) uint8 on ``device``; ``batch(step)`` samples.

    Output matches :func:`segany.data.datasets.collate`: ``image`` (B, 3, S, S) normalized and zero-padded,
    ``masks`` (B, K, S, S) bool with the valid ones first, ``num_masks`` (B,).
    """

    def __init__(self, records: Sequence[InstanceRecord], *, img_size: int, max_masks: int, batch_size: int,
                 augment: AugmentConfig, seed: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 device: torch.device, workers: int = 8, rank: int = 0, world_size: int = 1) -> None:
        positions = [r for r in records if r.masks]
        if not positions:
            raise InputError("the dataset has no image with masks; check the data path and split")
        # Repeated records (data.repeat) are decoded once; an epoch walks ``positions``, each mapped to a slot.
        slot_of: dict[int, int] = {}
        self.records: list[InstanceRecord] = []
        for r in positions:
            if id(r) not in slot_of:
                slot_of[id(r)] = len(self.records)
                self.records.append(r)
        self.slots = np.array([slot_of[id(r)] for r in positions], dtype=np.int64)
        S = self.S = img_size
        self.K, self.B, self.aug, self.seed = max_masks, batch_size, augment, seed
        self.rank, self.world = rank, world_size
        self.device = device
        n = len(self.records)
        self.images = torch.zeros(n, 3, S, S, dtype=torch.uint8, device=device)
        self.sizes = torch.zeros(n, 2, dtype=torch.long)
        self.first = np.zeros(n, dtype=np.int64)
        self.count = np.zeros(n, dtype=np.int64)
        total = sum(len(r.masks) for r in self.records)
        self.masks = torch.zeros(total, S, S, dtype=torch.uint8, device=device)
        self.groups: list[np.ndarray | None] = []
        offset = 0
        with ThreadPoolExecutor(workers) as pool:  # cv2 and zlib release the GIL
            for i, (image, masks) in enumerate(pool.map(lambda r: _decode(r, S), self.records)):
                h, w = image.shape[:2]
                self.images[i, :, :h, :w] = torch.from_numpy(image).permute(2, 0, 1).to(device)
                self.masks[offset:offset + len(masks), :h, :w] = torch.from_numpy(masks).to(device)
                self.sizes[i] = torch.tensor([h, w])
                self.first[i], self.count[i] = offset, len(masks)
                g = self.records[i].groups
                self.groups.append(np.asarray(g) if g is not None else None)
                offset += len(masks)
        self.mean = torch.tensor(pixel_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pixel_std, device=device).view(1, 3, 1, 1)
        log.info("device batcher: %d images, %d masks, %.2f GiB on %s", n, total,
                 (self.images.numel() + self.masks.numel()) / 2**30, device)

    def __len__(self) -> int:
        return len(self.slots)

    def _indices(self, step: int) -> list[int]:
        n, gbs = len(self.slots), self.B * self.world
        out = []
        for j in range(self.B):
            pos = step * gbs + self.rank * self.B + j
            epoch, i = divmod(pos, n)
            perm = np.random.default_rng([self.seed, 7919, epoch]).permutation(n)
            out.append(int(self.slots[perm[i]]))
        return out

    def batch(self, step: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, 104729, step, self.rank])
        idx = self._indices(step)
        B, K, S, aug = self.B, self.K, self.S, self.aug
        cand = 2 * K  # oversample: crops cut some masks away
        mask_ids = np.zeros((B, cand), dtype=np.int64)
        have = np.zeros((B, cand), dtype=bool)
        for b, i in enumerate(idx):
            ids = np.arange(self.count[i])
            g = self.groups[i]
            if g is not None:  # one annotator's partition (BSDS)
                ids = ids[g == rng.choice(np.unique(g))]
            ids = rng.permutation(ids)[:cand]
            mask_ids[b, : len(ids)] = self.first[i] + ids
            have[b, : len(ids)] = True
        scale = rng.uniform(aug.scale_min, aug.scale_max, size=B)
        flip = rng.random(B) < aug.hflip
        hw = self.sizes[idx].numpy().astype(np.float64)
        new_h, new_w = np.maximum(1, np.round(hw[:, 0] * scale)), np.maximum(1, np.round(hw[:, 1] * scale))
        y0 = np.floor(rng.random(B) * np.maximum(new_h - S + 1, 1))
        x0 = np.floor(rng.random(B) * np.maximum(new_w - S + 1, 1))
        # Output pixel centre u maps to source pixel (u + x0 + 0.5) / s - 0.5 (flipped: w - 1 - that).
        # grid_sample's normalized coords with align_corners=False: x_n = (x_src + 0.5) / S * 2 - 1.
        dev = self.device
        s_t = torch.tensor(scale, device=dev, dtype=torch.float32)
        u = torch.arange(S, device=dev, dtype=torch.float32)
        src_x = (u[None] + torch.tensor(x0, device=dev, dtype=torch.float32)[:, None] + 0.5) / s_t[:, None] - 0.5
        src_y = (u[None] + torch.tensor(y0, device=dev, dtype=torch.float32)[:, None] + 0.5) / s_t[:, None] - 0.5
        w_src = torch.tensor(hw[:, 1], device=dev, dtype=torch.float32)
        flip_t = torch.tensor(flip, device=dev)
        src_x = torch.where(flip_t[:, None], w_src[:, None] - 1 - src_x, src_x)
        gx = (src_x + 0.5) / S * 2 - 1  # (B, S)
        gy = (src_y + 0.5) / S * 2 - 1
        grid = torch.stack([gx[:, None, :].expand(B, S, S), gy[:, :, None].expand(B, S, S)], dim=-1)
        # Zero outside the valid source region, so padding matches SAM (zeros after normalization).
        valid_src = torch.zeros(B, 1, S, S, device=dev)
        for b, (h, w) in enumerate(hw.astype(int)):
            valid_src[b, :, :h, :w] = 1
        src = (self.images[idx].float() - self.mean) / self.std * valid_src
        images = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        m_src = self.masks[torch.as_tensor(mask_ids.reshape(-1), device=dev)].view(B, cand, S, S).float()
        masks = F.grid_sample(m_src, grid, mode="nearest", padding_mode="zeros", align_corners=False) > 0.5
        ok = (masks.flatten(2).sum(-1) >= aug.min_mask_area) & torch.as_tensor(have, device=dev)
        # Valid masks first, at most K of them.
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :K]
        masks = torch.gather(masks, 1, order[:, :, None, None].expand(-1, -1, S, S))
        num = ok.sum(1).clamp(max=K)
        masks &= (torch.arange(K, device=dev)[None] < num[:, None])[:, :, None, None]
        # The image part of each output: pixels whose source lies inside the scaled image (the rest is padding).
        size_hw = [(int(min(S, h - y)), int(min(S, w - x))) for h, w, y, x in zip(new_h, new_w, y0, x0, strict=True)]
        return {"image": images, "masks": masks, "num_masks": num, "size_hw": size_hw}
