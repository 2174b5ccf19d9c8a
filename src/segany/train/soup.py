"""Weight averaging ("model soup") of checkpoints that share one architecture.

Why: with a few CPU hours and no GPU, the shipped segany_tiny was improved by fine-tuning and then
averaging the result with its starting point. Averaging keeps most of what the fine-tune gained on the
data it stressed while giving back less of what it forgot elsewhere (kvasir, in our runs). Keeping it
here, tested, makes the shipped weights reproducible from the commands in docs/benchmarks.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from segany.checkpoints import read_checkpoint, save_checkpoint
from segany.errors import CheckpointError, InputError
from segany.modeling.sam import Sam


def normalized_weights(n: int, weights: Sequence[float] | None = None) -> list[float]:
    """One weight per checkpoint, summing to 1 (equal when ``weights`` is None); checked."""
    if n < 2:
        raise InputError(f"averaging needs at least 2 checkpoints, got {n}")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or not all(0 <= x < math.inf for x in w) or sum(w) <= 0:  # NaN fails 0 <= x too
        raise InputError(f"need one finite, non-negative weight per checkpoint ({n}), not all zero; got {w}")
    return [x / sum(w) for x in w]


def average_checkpoints(paths: Sequence[str | os.PathLike[str]], weights: Sequence[float] | None = None) -> Sam:
    """A model whose float tensors are the weighted mean of the checkpoints' (fp32 arithmetic).

    Every checkpoint must embed the same config and hold the same keys and shapes; integer buffers are
    taken from the first. Weights default to equal and are normalised to sum to 1.
    """
    w = normalized_weights(len(paths), weights)
    first_sd, cfg, _ = read_checkpoint(paths[0])
    if cfg is None:
        raise CheckpointError(f"{str(paths[0])!r} has no embedded config; average segany checkpoints")
    acc = {k: v.float() * w[0] if v.is_floating_point() else v for k, v in first_sd.items()}
    for p, wi in zip(paths[1:], w[1:], strict=True):
        sd, other, _ = read_checkpoint(p)
        if other is None or other.to_dict() != cfg.to_dict():
            raise CheckpointError(f"{str(p)!r} is a different architecture from {str(paths[0])!r}")
        if sd.keys() != acc.keys() or any(sd[k].shape != acc[k].shape for k in acc):
            raise CheckpointError(f"{str(p)!r} does not hold the same tensors as {str(paths[0])!r}")
        for k, v in sd.items():
            if v.is_floating_point():
                acc[k] += v.float() * wi
    model = Sam(cfg)
    model.load_state_dict(acc, strict=True)
    return model.eval()


def average_to_file(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                    weights: Sequence[float] | None = None, half: bool = True) -> Path:
    """Average ``paths`` and write a self-describing checkpoint (fp16 by default, as shipped) atomically."""
    model = average_checkpoints(paths, weights)
    meta = {"soup_of": [str(p) for p in paths], "weights": normalized_weights(len(paths), weights)}
    with torch.no_grad():
        return save_checkpoint(model, out, meta=meta, half=half)
