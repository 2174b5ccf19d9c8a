"""Resize-longest-side geometry shared by the predictor, the generator and training.

The model sees images whose longer side is ``target_length`` (1024 for SAM); prompts given in
original-image pixels are scaled by the same factors. Image resizing uses PIL's bilinear filter on
uint8 for numpy input (as the reference does, so masks match it) and antialiased bilinear
interpolation for tensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segany.data.images import float_to_uint8
from segany.errors import InputError


def preprocess_shape(h: int, w: int, target_length: int) -> tuple[int, int]:
    """(h, w) after scaling the longer side to ``target_length`` (rounded half up)."""
    scale = target_length / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def cropped_upsample_extent(side: int, img_size: int, input_hw: tuple[int, int]) -> tuple[int, int, int] | None:
    """The part of (side, side) low-res logits that survives "upsample to (img_size, img_size), crop to input_hw".

    Returns ``(rows, cols, k)``: upsampling just the first ``rows`` × ``cols`` low-res pixels by the integer
    scale ``k = img_size / side`` samples every kept pixel as the full upsampling does. Bilinear
    (align_corners=False) output pixel y reads input rows floor(y/k + 0.5/k − 0.5) and the next one, so one
    row/column beyond the crop is kept. None when ``img_size`` is not a whole multiple of ``side``.
    """
    k = img_size // side
    if k * side != img_size:
        return None
    return min(side, -(-input_hw[0] // k) + 1), min(side, -(-input_hw[1] // k) + 1), k


class ImageDtypeError(InputError, TypeError):
    """An image of a dtype the resize cannot take; a TypeError too, as the reference's (PIL's) error is."""


class ResizeLongestSide:
    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(h, w) after scaling the longer side to ``long_side_length``; the reference's name for
        :func:`preprocess_shape`."""
        return preprocess_shape(oldh, oldw, long_side_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (h, w, 3) uint8, resized so the long side is ``target_length``.

        Other inputs follow the reference's transform: float images in [0, 1] become uint8 by truncating
        ``x·255``, and (H, W, 1) or (H, W) come back as (h, w).
        """
        arr = np.asarray(image)
        if np.issubdtype(arr.dtype, np.floating):
            arr = float_to_uint8(arr)
        if arr.dtype != np.uint8:  # PIL's "Cannot handle this data type" named neither the dtype nor a fix
            raise ImageDtypeError(f"apply_image takes a uint8 image (or a float one in [0, 1]), got {arr.dtype}; "
                                  "convert it first with segany.data.images.to_rgb_uint8(image)")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3):
            raise InputError(f"apply_image expects an (H, W, C) image array, got shape {arr.shape}")
        h, w = preprocess_shape(arr.shape[0], arr.shape[1], self.target_length)
        if h < 1 or w < 1:
            raise InputError(f"a {arr.shape[0]}x{arr.shape[1]} image is too thin for this model: scaled so its long "
                             f"side is {self.target_length} px, its short side rounds to 0 px; pad or crop it to a "
                             "less extreme aspect ratio")
        # np.array, not asarray: PIL's buffer is read-only and torch.as_tensor warns on it.
        return np.array(Image.fromarray(arr).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """Scale (..., 2) XY pixel coordinates from ``original_size`` (H, W) to the model frame."""
        old_h, old_w = original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.target_length)
        out = np.array(coords, dtype=float, copy=True)
        out[..., 0] *= new_w / old_w
        out[..., 1] *= new_h / old_h
        return out

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float → (B, 3, h, w)."""
        h, w = preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, (h, w), mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        old_h, old_w = original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.target_length)
        scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float32, device=coords.device)
        return coords.to(torch.float32) * scale

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
