"""Box NMS with torchvision's kernel, loaded without importing the torchvision package.

Why: ``import torchvision`` imports its model zoo and ``torchvision.ops.roi_align``, which imports
``torch._dynamo``: 2.5 s before the first mask, paid by every ``segany auto``, ``serve`` and ``engine auto``
process (and by every test that starts one). The NMS kernel itself lives in torchvision's compiled extension,
which ``torch.ops.load_library`` loads on its own; where that fails (a torchvision with another layout), the
package is imported as usual and registers the same kernel.

:func:`single_class_nms` gives exactly what ``torchvision.ops.batched_nms`` gives for one category (the call the
reference generator makes), the order of tied scores included, so the masks kept stay the reference's.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import torch

# torchvision.ops.batched_nms switches to its per-category loop above a box-tensor size (one on CPU, another on
# other devices); its output is then re-sorted by score, which can order tied scores differently, so the same
# switch is made here. The sizes are read from the installed torchvision's source (they changed between
# releases: 20000 on GPUs before, 100_000 in 0.29); these are its 0.29 values, used if that cannot be read.
_VANILLA_ABOVE_CPU, _VANILLA_ABOVE_OTHER = 4000, 100_000
_SWITCH = re.compile(r"numel\(\) > \((\d[\d_]*) if boxes\.device\.type == [\"']cpu[\"'] else (\d[\d_]*)\)")


@functools.cache
def switch_sizes() -> tuple[int, int]:
    """(CPU, other devices) box-tensor sizes above which ``batched_nms`` loops per category, read from the
    installed torchvision's ``ops/boxes.py`` without importing it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return _VANILLA_ABOVE_CPU, _VANILLA_ABOVE_OTHER
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "ops" / "boxes.py").read_text(encoding="utf-8")
    except OSError:
        return _VANILLA_ABOVE_CPU, _VANILLA_ABOVE_OTHER
    found = _SWITCH.search(text)
    return (int(found[1]), int(found[2])) if found else (_VANILLA_ABOVE_CPU, _VANILLA_ABOVE_OTHER)


def _extension_paths() -> list[Path]:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations)))
    suffixes = dict.fromkeys([*importlib.machinery.EXTENSION_SUFFIXES, ".so"])  # ".so" is often listed already
    return [folder / f"{name}{suffix}" for name in ("_C_stable", "_C") for suffix in suffixes
            if (folder / f"{name}{suffix}").is_file()]


def _registered() -> Callable[..., torch.Tensor] | None:
    try:
        return torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def nms_op() -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """``torch.ops.torchvision.nms``, loading torchvision's extension alone if nobody has yet."""
    op = _registered()
    for path in _extension_paths() if op is None else []:
        try:
            torch.ops.load_library(str(path))
        except OSError:
            continue
        op = _registered()
        if op is not None:
            break
    if op is None:  # another layout: the package loads (and checks) its extension itself
        import torchvision  # noqa: F401

        op = torch.ops.torchvision.nms
    return op


def single_class_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of ``boxes`` (N, 4) XYXY kept by NMS, by decreasing score: ``batched_nms`` with one category."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    keep = nms_op()(boxes, scores, float(iou_threshold))
    cpu_limit, other_limit = switch_sizes()
    if boxes.numel() <= (cpu_limit if boxes.device.type == "cpu" else other_limit):
        return keep
    # batched_nms's per-category path: a mask of the kept boxes, read in index order, then sorted by score.
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept[keep] = True
    idx = torch.where(kept)[0]
    return idx[scores[idx].sort(descending=True)[1]]
