"""A minimal grid-of-points mask generator with SamAutomaticMaskGenerator's interface and records.

Stage-3 tests use ``segany.amg`` when it is installed; this stand-in keeps the engine's own checks
(resume, Ray equivalence, worker death) runnable without it. It is not a faithful AMG: one mask per
grid point (the best of three by predicted IoU), a predicted-IoU threshold and box NMS.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms


class GridGenerator:
    def __init__(self, sam: Any, *, output_mode: str = "binary_mask", points_per_side: int = 4,
                 pred_iou_thresh: float = 0.0, box_nms_thresh: float = 0.7, **_: Any) -> None:
        from segany.predictor import SamPredictor

        self.predictor = SamPredictor(sam)
        self.n = points_per_side
        self.pred_iou_thresh = pred_iou_thresh
        self.box_nms_thresh = box_nms_thresh

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        h, w = image.shape[:2]
        self.predictor.set_image(image)
        offs = (np.arange(self.n) + 0.5) / self.n
        pts = np.stack(np.meshgrid(offs * w, offs * h), -1).reshape(-1, 2)
        out = []
        for xy in pts:
            masks, scores, _ = self.predictor.predict(point_coords=xy[None], point_labels=np.array([1]))
            j = int(np.argmax(scores))
            m = masks[j]
            if scores[j] < self.pred_iou_thresh or not m.any():
                continue
            ys, xs = np.nonzero(m)
            out.append({"segmentation": m, "area": int(m.sum()), "predicted_iou": float(scores[j]),
                        "stability_score": 1.0, "point_coords": [xy.tolist()], "crop_box": [0, 0, w, h],
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]})
        if not out:
            return out
        boxes = torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                              for r in out], dtype=torch.float32)
        keep = batched_nms(boxes, torch.tensor([r["predicted_iou"] for r in out]), torch.zeros(len(out)),
                           self.box_nms_thresh)
        return [out[i] for i in keep.tolist()]


POISON_HEIGHT = 77  # an image this high kills the process that segments it (PoisonGenerator)


class PoisonGenerator:
    """segany's own generator, except that an image ``POISON_HEIGHT`` pixels high kills its process, as an
    image that runs a worker out of memory does: the pool tests' image that always dies."""

    def __init__(self, sam: Any, **kwargs: Any) -> None:
        from segany.amg import SamAutomaticMaskGenerator

        self.inner = SamAutomaticMaskGenerator(sam, **kwargs)

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        if image.shape[0] == POISON_HEIGHT:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.generate(image)
