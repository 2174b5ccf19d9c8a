"""Low-res mask logits → image-size logits or masks on the CPU, with OpenCV's bilinear resize.

Why not ``F.interpolate``: on a 2-core AVX2 CPU, torch's bilinear upsampling of one click's three
(193, 256) logit planes to (772, 1024) takes 3.5–7.5 ms and the ``> threshold`` pass another 1.3 ms,
a fifth of a ViT-B click with the folded decoder. ``cv2.resize`` does the same planes in 0.4 ms and
the threshold writes straight into the returned boolean array. Both use the same half-pixel sampling
(source = (dest + 0.5) / scale − 0.5, clamped at the edges) with float weights. At the integer ×4 step
they agree to ~1e-6; at a non-integer resize to the original size OpenCV, which forms source coordinates
in double, is within 2e-5 of an exact (float64) resize, while torch's fp32 coordinates put ``interpolate``
up to 1e-3 off on ±30 logits. Sign flips need a logit within that of zero.

Only the fast path's eager CPU decode uses this. The exact fp32 path keeps the reference's
``interpolate`` calls, and compiled or CUDA paths keep torch ops, which trace and run on the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from segany.transforms import cropped_upsample_extent

# cv2.resize indexes with int and keeps per-row offsets in short tables; stay well inside that.
_MAX_SIDE = 32767


def applies(low_res: torch.Tensor, original_hw: tuple[int, int]) -> bool:
    """Whether :func:`upscale_logits` can serve this call: fp32 on the CPU, sizes OpenCV takes, eager."""
    return (low_res.device.type == "cpu" and low_res.dtype == torch.float32 and low_res.ndim == 4
            and max(original_hw) <= _MAX_SIDE and not _compiling())


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling()) if is_compiling is not None else False


def _resize(src: np.ndarray, size_hw: tuple[int, int], dst: np.ndarray) -> np.ndarray:
    """``cv2.resize`` into ``dst`` (which it may decline to use if it does not fit; then the result is copied).

    OpenCV is imported here, not with the module: its import prepends to the process's LD_LIBRARY_PATH, which
    every child process inherits, and building any SamPredictor imports this module.
    """
    import cv2
    import torch

    # OpenCV keeps its own thread pool, sized to every core: --threads and torch.set_num_threads bound it too
    # (lowered only: an application's own lower OpenCV setting stays).
    n = torch.get_num_threads()
    if cv2.getNumThreads() > n:
        cv2.setNumThreads(n)
    out = cv2.resize(src, (size_hw[1], size_hw[0]), dst=dst, interpolation=cv2.INTER_LINEAR)
    if out is not dst:
        dst[...] = out
    return dst


def upscale_logits(low_res: torch.Tensor, img_size: int, input_hw: tuple[int, int], original_hw: tuple[int, int],
                   threshold: float | None) -> torch.Tensor:
    """(B, C, s, s) logits of the padded ``img_size`` frame → (B, C, H, W) at ``original_hw``.

    Same steps as ``Sam.postprocess_masks``: upsample to the padded frame, crop to ``input_hw``, resize
    to ``original_hw``. Only the rows and columns that survive the crop (plus one for the interpolation)
    are upsampled, at the same integer scale, so the kept pixels are sampled as in the full upsampling.
    ``threshold``: return ``logits > threshold`` (bool) instead of the logits.
    """
    B, C, side, _ = low_res.shape
    ih, iw = input_hw
    oh, ow = original_hw
    extent = cropped_upsample_extent(side, img_size, input_hw)
    if extent is not None:
        rows, cols, k = extent
        up_hw = (rows * k, cols * k)
    else:  # not an integer scale: upsample the whole frame, as the reference does
        rows, cols, up_hw = side, side, (img_size, img_size)
    src = low_res.detach().contiguous().numpy()
    out = torch.empty((B, C, oh, ow), dtype=torch.float32 if threshold is None else torch.bool)
    dst = out.numpy()
    up = np.empty(up_hw, np.float32)
    same = (ih, iw) == (oh, ow)  # then the final resize would be the identity
    resized = np.empty((oh, ow), np.float32) if threshold is not None and not same else None
    for b in range(B):
        for c in range(C):
            _resize(src[b, c, :rows, :cols], up_hw, up)
            crop = up[:ih, :iw]
            if threshold is None:
                if same:
                    dst[b, c] = crop
                else:
                    _resize(crop, (oh, ow), dst[b, c])
            else:
                plane = crop if resized is None else _resize(crop, (oh, ow), resized)
                np.greater(plane, threshold, out=dst[b, c])
    return out
