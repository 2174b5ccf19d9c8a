"""The experimental SDPA path of the windowed blocks (FastWindowBlock.biased_windows, off by default): the
rel-pos bias built per window and head and handed to SDPA as a mask must give the reference block's
attention, on padded grids and with a rel-pos table trained for another size. Its speed is a GPU question
(bench/relpos_kernel.py, cudnn_bias_windows); here the maths, on the CPU's SDPA."""

from __future__ import annotations

import pytest
import torch

import segany.fast
from segany.fast import FastViTAttention, FastWindowBlock
from segany.modeling import image_encoder as vit
from segany.modeling.config import ViTConfig


@pytest.mark.parametrize(("dim", "heads", "window", "grid", "rows"),
                         [(160, 2, 14, 20, None), (64, 2, 4, 10, None), (48, 3, 5, 11, 15)])
def test_biased_windows_match_the_reference_block(dim, heads, window, grid, rows):
    torch.manual_seed(0)
    blk = vit.Block(ViTConfig(embed_dim=dim, num_heads=heads), window=window)
    if rows is not None:  # a table trained at another size is resampled, as for a checkpoint at another resolution
        blk.attn.rel_pos_h = torch.nn.Parameter(torch.zeros(rows, dim // heads))
        blk.attn.rel_pos_w = torch.nn.Parameter(torch.zeros(rows, dim // heads))
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.1)
    blk.eval()
    fast = FastWindowBlock.from_block(blk, FastViTAttention.from_attention(blk.attn, "fold"))
    qkv_nobias = torch.randn(1, grid, grid, 3 * dim)
    with torch.no_grad():
        ref = fast.folded_windows(qkv_nobias)
        for backend in (None, torch.nn.attention.SDPBackend.MATH):
            got = fast.biased_windows(qkv_nobias, backend)
            assert got.shape == ref.shape == (1, grid, grid, dim)
            assert (got - ref).abs().max() < 1e-5 * ref.abs().max()
        # The whole block: the reference's forward (pad, partition, attention, merge) against the SDPA path.
        x = torch.randn(1, grid, grid, dim)
        h = blk.norm1(x)
        out = x + blk.attn.proj(fast.biased_windows(torch.nn.functional.linear(h, blk.attn.qkv.weight)))
        out = out + blk.mlp(blk.norm2(out))
        assert (out - blk(x)).abs().max() < 1e-5 * blk(x).abs().max()


def test_the_sdpa_path_is_off_by_default_and_cuda_only(monkeypatch):
    assert segany.fast.WINDOW_SDPA_BACKEND is None
    torch.manual_seed(0)
    blk = vit.Block(ViTConfig(embed_dim=32, num_heads=2), window=4).eval()
    monkeypatch.setattr(segany.fast.window_kernel, "register_op", lambda: None)  # Triton is not needed here
    fast = FastWindowBlock.from_block(blk, FastViTAttention.from_attention(blk.attn, "fold"), fused=True)
    called = []
    monkeypatch.setattr(FastWindowBlock, "biased_windows", lambda *a, **k: called.append(1))
    monkeypatch.setattr(segany.fast, "WINDOW_SDPA_BACKEND", "CUDNN_ATTENTION")
    with torch.no_grad():
        fast(torch.randn(1, 8, 8, 32))  # a CPU tensor: the switch is for CUDA only
    assert called == []
