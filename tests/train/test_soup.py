"""Checkpoint averaging (segany.train.soup): the arithmetic, and refusals that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config

from segany.checkpoints import read_checkpoint, save_checkpoint
from segany.errors import CheckpointError, InputError
from segany.modeling.config import SamConfig, ViTConfig
from segany.modeling.sam import Sam
from segany.train.soup import average_checkpoints, average_to_file


def _saved(tmp_path: Path, name: str, seed: int, cfg: SamConfig | None = None) -> Path:
    model = randomize_(Sam(cfg or tiny_config()), seed=seed)
    return save_checkpoint(model, tmp_path / name)


def test_weighted_mean_of_every_float_tensor(tmp_path: Path) -> None:
    a, b = _saved(tmp_path, "a.pt", 1), _saved(tmp_path, "b.pt", 2)
    sa, sb = read_checkpoint(a)[0], read_checkpoint(b)[0]
    soup = average_checkpoints([a, b], [3, 1]).state_dict()
    for k, v in soup.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * sa[k].float() + 0.25 * sb[k].float(), rtol=0, atol=1e-6)
    out = average_to_file([a, b], tmp_path / "soup.pt")
    sd, cfg, meta = read_checkpoint(out)
    assert meta["weights"] == [0.5, 0.5] and meta["soup_of"] == [str(a), str(b)]
    assert cfg is not None and all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    k = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 10)
    torch.testing.assert_close(sd[k].float(), (0.5 * sa[k].float() + 0.5 * sb[k].float()).half().float())


def test_refuses_mismatched_architectures_and_bad_weights(tmp_path: Path) -> None:
    a = _saved(tmp_path, "a.pt", 1)
    other = SamConfig(encoder=ViTConfig(img_size=256, depth=1, embed_dim=96, num_heads=3,
                                        global_attn_indexes=(0,), window_size=8))
    b = _saved(tmp_path, "b.pt", 2, other)
    with pytest.raises(CheckpointError, match="different architecture"):
        average_checkpoints([a, b])
    with pytest.raises(InputError, match="at least 2"):
        average_checkpoints([a])
    with pytest.raises(InputError, match="one finite, non-negative weight per checkpoint"):
        average_checkpoints([a, a], [1.0])
    for bad in ([float("nan"), 1.0], [float("inf"), 1.0]):  # they gave NaN weights, or [nan, 0.0]
        with pytest.raises(InputError, match="finite, non-negative"):
            average_checkpoints([a, a], bad)
