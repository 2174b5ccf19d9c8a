"""Small synthetic training images for the trainer tests: a red rectangle (mask 0) on noise (mask 1), each
image a little different. Shared by test_training.py and the torchrun worker ddp_worker.py (a plain module,
so a worker process imports it without pytest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segany.data.formats.common import InstanceRecord, encode_mask


def synthetic_records(folder: Path, n: int = 3) -> list[InstanceRecord]:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        img = (rng.random((96, 120, 3)) * 255).astype(np.uint8)
        m = np.zeros((96, 120), bool)
        m[10 + 5 * i : 60, 20:90 - 7 * i] = True
        img[m] = [200, 40, 40]
        path = folder / f"im{i}.png"
        Image.fromarray(img).save(path)
        recs.append(InstanceRecord(str(path), (96, 120), [encode_mask(m), encode_mask(~m)], image_id=str(i),
                                   dataset="synthetic"))
    return recs
