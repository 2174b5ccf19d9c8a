"""Build the reference implementations (test oracles) from a segany :class:`SamConfig`.

The reference packages are test dependencies only. If one is missing the parity tests fail with
the install command instead of silently skipping, because parity is the proof that we are a drop-in.
"""

from __future__ import annotations

import importlib
from functools import partial
from types import ModuleType
from typing import Any

import pytest
import torch

from segany.modeling.config import SamConfig, TinyViTConfig, ViTConfig


def require_oracle(module: str, pip_name: str) -> ModuleType:
    """Import a reference package or fail (never skip) with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"parity oracle {module!r} is missing: run `.venv/bin/pip install {pip_name}` "
                    f"(or `pip install -e '.[dev]'`) ({exc})")


def _prompt_and_decoder(cfg: SamConfig, sa: Any) -> dict[str, Any]:
    g = cfg.embed_size
    d = cfg.decoder
    return dict(
        prompt_encoder=sa.PromptEncoder(
            embed_dim=cfg.prompt.embed_dim, image_embedding_size=(g, g),
            input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.prompt.mask_in_chans,
        ),
        mask_decoder=sa.MaskDecoder(
            num_multimask_outputs=d.num_multimask_outputs,
            transformer=sa.TwoWayTransformer(depth=d.transformer_depth, embedding_dim=d.transformer_dim,
                                             mlp_dim=d.transformer_mlp_dim, num_heads=d.transformer_heads,
                                             attention_downsample_rate=d.attention_downsample_rate),
            transformer_dim=d.transformer_dim, iou_head_depth=d.iou_head_depth,
            iou_head_hidden_dim=d.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std),
    )


def reference_sam(cfg: SamConfig) -> torch.nn.Module:
    """The ``segment_anything`` model with the same architecture as ``cfg`` (ViT encoders only)."""
    sa = require_oracle("segment_anything.modeling", "segment-anything==1.0")
    enc = cfg.encoder
    if not isinstance(enc, ViTConfig):
        raise TypeError("segment_anything has no TinyViT; use reference_mobile_sam")
    encoder = sa.ImageEncoderViT(
        depth=enc.depth, embed_dim=enc.embed_dim, img_size=enc.img_size, mlp_ratio=enc.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=enc.num_heads, patch_size=enc.patch_size,
        qkv_bias=enc.qkv_bias, use_rel_pos=enc.use_rel_pos, global_attn_indexes=enc.global_attn_indexes,
        window_size=enc.window_size, out_chans=enc.out_chans, use_abs_pos=enc.use_abs_pos,
    )
    return sa.Sam(image_encoder=encoder, **_prompt_and_decoder(cfg, sa)).eval()


def reference_predictor(model: torch.nn.Module) -> Any:
    sa = require_oracle("segment_anything", "segment-anything==1.0")
    return sa.SamPredictor(model)


def reference_mobile_sam(cfg: SamConfig) -> torch.nn.Module:
    """MobileSAM (package ``mobilesam-mirror``, imported as ``mobile_sam``) with ``cfg``'s TinyViT.

    Its encoder hard-codes a 64x64 grid and 256 neck channels, so only 1024 px configs can be compared.
    """
    ms = require_oracle("mobile_sam.modeling", "mobilesam-mirror==1.0.0 timm")
    enc = cfg.encoder
    if not isinstance(enc, TinyViTConfig):
        raise TypeError("reference_mobile_sam needs a TinyViTConfig")
    encoder = ms.TinyViT(
        img_size=enc.img_size, in_chans=enc.in_chans, num_classes=enc.num_classes, embed_dims=list(enc.embed_dims),
        depths=list(enc.depths), num_heads=list(enc.num_heads), window_sizes=list(enc.window_sizes),
        mlp_ratio=enc.mlp_ratio, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=enc.mbconv_expand_ratio, local_conv_size=enc.local_conv_size,
        layer_lr_decay=0.8,
    )
    # Not put in eval mode here: MobileSAM's attention caches its bias table when ``eval()`` is called,
    # so callers must call ``.eval()`` *after* loading weights or the oracle runs with stale biases.
    return ms.Sam(image_encoder=encoder, **_prompt_and_decoder(cfg, ms))


def mobile_sam_predictor(model: torch.nn.Module) -> Any:
    ms = require_oracle("mobile_sam", "mobilesam-mirror==1.0.0 timm")
    return ms.SamPredictor(model)


def randomize_realistic_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights at trained-network scale, so parity is tested on O(1) logits.

    ``conftest.randomize_`` (uniform 0.05 noise) shrinks every LayerNorm gain to ~0.05 and the logits
    to ~1e-2, where a 1e-4 tolerance would prove almost nothing and masks would be near-random.
    Here linear/conv weights get 1/sqrt(fan_in) scale, norm gains 1 ± 0.1, biases ±0.02.
    """
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.GroupNorm)
    norm_params = {f"{mod_name}.{p}" for mod_name, mod in model.named_modules()
                   if isinstance(mod, norm_types) or type(mod).__name__ == "LayerNorm2d" for p in ("weight", "bias")}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                value = 1.0 + 0.1 * noise.abs()
            elif name.endswith("running_mean"):
                value = 0.1 * noise
            elif name in norm_params:
                value = (1.0 + 0.1 * noise) if name.endswith("weight") else 0.05 * noise
            elif name.endswith("positional_encoding_gaussian_matrix"):
                value = noise  # SAM's Fourier features use unit-variance frequencies
            elif name.endswith("pos_embed"):
                value = 0.1 * noise
            elif t.ndim >= 2:
                value = noise / float(torch.tensor(t.shape[1:]).prod()) ** 0.5
            else:
                value = 0.02 * noise
            t.copy_(value)
    return model


TOL = 1e-4


def seeded_pair(cfg: SamConfig, seed: int) -> tuple[Any, torch.nn.Module]:
    """(segany model, reference model), both in eval mode, holding one set of seeded realistic weights."""
    from segany.modeling.sam import Sam

    ref = randomize_realistic_(reference_sam(cfg), seed=seed).eval()
    ours = Sam(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref


def max_abs_diff(a: Any, b: Any) -> float:
    ta, tb = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert ta.shape == tb.shape, f"shapes differ: {tuple(ta.shape)} vs {tuple(tb.shape)}"
    return float((ta - tb).abs().max()) if ta.numel() else 0.0


def assert_close(ours: Any, ref: Any, what: str, tol: float = TOL) -> None:
    diff = max_abs_diff(ours, ref)
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:g}"


def assert_masks_match(ours_masks: Any, ref_masks: Any, ours_logits: Any, threshold: float = 0.0,
                       max_flips: int = 16) -> None:
    """Boolean masks must be equal, except a handful of pixels whose logit is within TOL of the threshold.

    Those pixels can legitimately flip: 1e-6 of float noise decides which side of 0.0 they land on.
    """
    m_ours, m_ref = torch.as_tensor(ours_masks), torch.as_tensor(ref_masks)
    assert m_ours.dtype == torch.bool and m_ref.dtype == torch.bool
    assert m_ours.shape == m_ref.shape
    flips = m_ours != m_ref
    n = int(flips.sum())
    if n:
        near = (torch.as_tensor(ours_logits).float() - threshold).abs() <= TOL
        assert bool(near[flips].all()), "masks differ at pixels whose logits are not at the threshold"
    assert n <= max_flips, f"{n} mask pixels differ (allowed {max_flips}, all at the threshold)"
    # A parity test on an all-empty or all-full mask would prove nothing about the decoder.
    frac = float(m_ref.float().mean())
    assert 0.0 < frac < 1.0, f"reference mask is trivially {'empty' if frac == 0 else 'full'}"
