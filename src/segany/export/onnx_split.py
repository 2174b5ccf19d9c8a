"""The prompt decoder split in two ONNX graphs, for interactive clients (the annotation app in the browser).

``decoder_image.onnx`` runs ONCE per image embedding:
    input ``image_embeddings`` float32 (1, C, g, g);
    outputs ``image_tokens`` (g·g, C) (the embedding plus the no-mask prompt embedding, channels last) and
    the first two-way block's image-side projections with the image positional encoding added, laid out
    the way the click graph reads them: ``layer0_k`` and ``layer0_v`` (heads, d, g·g) (token→image keys
    and values) and ``layer0_q`` (heads, g·g, d) (image→token queries).

``decoder_click.onnx`` runs per click:
    inputs the image graph's four outputs, ``point_coords`` (1, N, 2), ``point_labels`` (1, N),
    ``mask_input`` (1, 1, 4g, 4g), ``has_mask_input`` (1,) — the same prompt inputs as the single-graph
    ``decoder.onnx``;
    outputs ``iou_predictions`` (1, 3) and ``low_res_masks`` (1, 3, 4g, 4g): the three multimask outputs
    as low-resolution logits (threshold at 0). Resizing to the image is left to the client (it only
    needs the mask it shows), which :func:`segany.export.onnx.postprocess_masks` does exactly.

The click graph is the decoder's maths rearranged so the image tokens meet only skinny matrices; one
side of every cross attention is a handful of prompt tokens (T = 5 + points):

* token→image attention never forms image keys or values: ``softmax(q·((x+pe)·Wkᵀ + bk)ᵀ)`` equals
  ``softmax((q·Wk)·(x+pe)ᵀ)`` (the bias adds a per-row constant) and ``P·(x·Wvᵀ + bv) = (P·x)·Wvᵀ + bv``
  (rows of P sum to 1);
* image→token attention folds the image query projection into the few token keys and the output
  projection into the few token values, so the image side is two (g·g, C) × (C, heads·T) products;
* a mask prompt changes the first block's image side only through the last 1×1 convolution of the mask
  embedding, which is folded into that block's projections (16 input channels plus a constant);
* the 2×2 stride-2 transposed convolutions of the upscaler are GEMMs whose columns are the sub-pixels;
* tensors are laid out so that no per-click transpose touches an image-sized tensor, and the image-side
  LayerNorms are written out as reductions (onnxruntime-web's fused LayerNormalization kernel is about
  twice as slow on (g·g, C) tensors in wasm).

fp32 outputs agree with :class:`segany.modeling.mask_decoder.MaskDecoder` to rounding (~1e-5).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from segany.errors import require
from segany.export.onnx import model_for_export
from segany.fast import layer0_image_projection, run_two_way, upscaler_gemms
from segany.modeling.sam import Sam

IMAGE_FILE = "decoder_image.onnx"
CLICK_FILE = "decoder_click.onnx"
# Bumped whenever the graphs' inputs or outputs change, so caches of exported files (the server's) go stale.
FORMAT_VERSION = 2
IMAGE_INPUTS = ("image_embeddings",)
IMAGE_OUTPUTS = ("image_tokens", "layer0_k", "layer0_v", "layer0_q")
CLICK_INPUTS = (*IMAGE_OUTPUTS, "point_coords", "point_labels", "mask_input", "has_mask_input")
CLICK_OUTPUTS = ("iou_predictions", "low_res_masks")


def _dense_pe(model: Sam) -> torch.Tensor:
    return model.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)[0]  # (HW, C)


def _layer_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """LayerNorm over the last axis as reductions and elementwise ops (faster than the fused kernel in wasm)."""
    d = x - x.mean(dim=-1, keepdim=True)
    return d * torch.rsqrt((d * d).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight + norm.bias


class ImageSideGraph(nn.Module):
    """Image embedding (1, C, g, g) → ``image_tokens`` (HW, C), ``layer0_k``/``layer0_v`` (nh, d, HW),
    ``layer0_q`` (nh, HW, d)."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        layer = model.mask_decoder.transformer.layers[0]
        self.nh = layer.cross_attn_token_to_image.num_heads
        self.ci = layer.cross_attn_token_to_image.internal_dim
        self.ci_q = layer.cross_attn_image_to_token.internal_dim
        self.nh_q = layer.cross_attn_image_to_token.num_heads
        with torch.no_grad():
            w, add = layer0_image_projection(model.mask_decoder.transformer, _dense_pe(model))
            self.register_buffer("no_mask", model.prompt_encoder.no_mask_embed.weight[0].clone(), persistent=False)
            self.register_buffer("w0", w, persistent=False)
            self.register_buffer("add0", add, persistent=False)

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image_embeddings.flatten(2)[0].T + self.no_mask  # (HW, C)
        k, v, q = torch.addmm(self.add0, x, self.w0).split([self.ci, self.ci, self.ci_q], dim=-1)
        hw = x.shape[0]
        k_t = k.T.reshape(self.nh, self.ci // self.nh, hw).contiguous()
        v_t = v.T.reshape(self.nh, self.ci // self.nh, hw).contiguous()
        q_h = q.reshape(hw, self.nh_q, self.ci_q // self.nh_q).transpose(0, 1).contiguous()
        return x, k_t, v_t, q_h


class ClickGraph(nn.Module):
    """Prompts + the image graph's outputs → three low-res mask logits and their predicted IoU."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model
        dec, pe_enc = model.mask_decoder, model.prompt_encoder
        self.grid = tuple(pe_enc.image_embedding_size)
        layer = dec.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        ci, ci_q = t2i.internal_dim, i2t.internal_dim
        with torch.no_grad():
            w0, _ = layer0_image_projection(dec.transformer, _dense_pe(model))  # (C, 2ci + ci_q)
            last = pe_enc.mask_downscaling[-1]  # 1×1 conv: linear in the 16 channels before it
            wc = last.weight.reshape(last.weight.shape[0], -1).T  # (c_in, C)
            shift = last.bias - pe_enc.no_mask_embed.weight[0]  # mask embedding minus the cached no-mask one
            # A mask prompt's effect, as a product with [16 mask channels; has_mask] (17, HW):
            w_keys = torch.cat([wc, shift[None]])  # (17, C) onto image_tokens
            w_proj = w_keys @ w0  # (17, 2ci + ci_q) onto the first block's projections
            wk, wv, wq = w_proj.split([ci, ci, ci_q], dim=1)
            self.register_buffer("mask_keys", w_keys.contiguous(), persistent=False)
            self.register_buffer("mask_k", wk.T.contiguous(), persistent=False)  # (ci, 17)
            self.register_buffer("mask_v", wv.T.contiguous(), persistent=False)
            nh_q = i2t.num_heads
            self.register_buffer("mask_q", wq.reshape(-1, nh_q, ci_q // nh_q).transpose(0, 1).contiguous(),
                                 persistent=False)  # (nh, 17, d)
            self.register_buffer("key_pe", _dense_pe(model).contiguous(), persistent=False)
            up1_w, up1_b, up2_w, up2_b = upscaler_gemms(dec)
            self.register_buffer("up1_w", up1_w, persistent=False)
            self.register_buffer("up1_b", up1_b, persistent=False)
            self.register_buffer("up2_w", up2_w, persistent=False)
            self.register_buffer("up2_b", up2_b, persistent=False)

    # -- attention pieces; tokens are (1, T, ·) as the token-side modules expect, image tokens (HW, ·)
    @staticmethod
    def _heads(x: torch.Tensor, nh: int) -> torch.Tensor:
        T, D = x.shape
        return x.view(T, nh, D // nh).transpose(0, 1)  # (nh, T, d)

    def _t2i_cached(self, attn: nn.Module, q_tok: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor
                    ) -> torch.Tensor:
        """Block 0: image keys ``k_t`` and values ``v_t`` (nh, d, HW) come precomputed."""
        q = self._heads(attn.q_proj(q_tok)[0], attn.num_heads)
        p = torch.matmul(q * q.shape[-1] ** -0.5, k_t).softmax(dim=-1)  # (nh, T, HW)
        o = torch.matmul(p, v_t.transpose(1, 2))  # (nh, T, d)
        return attn.out_proj(o.transpose(0, 1).reshape(1, q.shape[1], -1))

    def _t2i_folded(self, attn: nn.Module, q_tok: torch.Tensor, keys: torch.Tensor, keys_pe: torch.Tensor
                    ) -> torch.Tensor:
        nh = attn.num_heads
        q = self._heads(attn.q_proj(q_tok)[0], nh)  # (nh, T, d)
        _, T, d = q.shape
        C = keys.shape[-1]
        qk = torch.matmul(q * d ** -0.5, attn.k_proj.weight.view(nh, d, C)).reshape(nh * T, C)
        p = torch.matmul(qk, keys_pe.T).softmax(dim=-1)  # (nh·T, HW): softmax along the long rows
        ctx = torch.matmul(p, keys).view(nh, T, C)
        o = torch.matmul(ctx, attn.v_proj.weight.view(nh, d, C).transpose(1, 2)) + attn.v_proj.bias.view(nh, 1, d)
        return attn.out_proj(o.transpose(0, 1).reshape(1, T, nh * d))

    def _i2t(self, attn: nn.Module, keys: torch.Tensor, keys_pe: torch.Tensor | None, q_img: torch.Tensor | None,
             q_tok_pe: torch.Tensor, q_tok: torch.Tensor) -> torch.Tensor:
        """``keys + attn(image → tokens)``: from the precomputed image queries ``q_img`` (nh, HW, d) in
        block 0, else folded from ``keys_pe`` (HW, C)."""
        nh = attn.num_heads
        k = self._heads(attn.k_proj(q_tok_pe)[0], nh)  # (nh, T, d)
        _, T, d = k.shape
        k = k * d ** -0.5
        if keys_pe is None:
            assert q_img is not None
            p = torch.matmul(q_img, k.transpose(1, 2)).softmax(dim=-1)  # (nh, HW, T)
            p = p.transpose(0, 1).reshape(-1, nh * T)
        else:
            C = keys.shape[-1]
            g = torch.matmul(attn.q_proj.weight.view(nh, d, C).transpose(1, 2), k.transpose(1, 2))  # (nh, C, T)
            g = g.transpose(0, 1).reshape(C, nh * T)
            bias = torch.matmul(attn.q_proj.bias.view(nh, 1, d), k.transpose(1, 2)).reshape(nh * T)
            s = torch.addmm(bias, keys_pe, g)  # (HW, nh·T)
            p = s.view(-1, nh, T).softmax(dim=-1).view(-1, nh * T)
        v = self._heads(attn.v_proj(q_tok)[0], nh)  # (nh, T, d)
        wo = attn.out_proj.weight.view(-1, nh, d).permute(1, 2, 0)  # (nh, d, C)
        m = (torch.matmul(v, wo) + attn.out_proj.bias / nh).reshape(nh * T, -1)  # each head's P rows sum to 1
        return torch.addmm(keys, p, m)

    def forward(self, image_tokens: torch.Tensor, layer0_k: torch.Tensor, layer0_v: torch.Tensor,
                layer0_q: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dec, pe_enc = self.model.mask_decoder, self.model.prompt_encoder
        sparse = pe_enc._embed_points(point_coords, point_labels, pad=False)  # padding comes from the caller
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, sparse[0]], dim=0)[None]  # (1, T, C)
        # Mask prompt: its embedding minus the no-mask one the image graph added, through the folded 1×1 conv;
        # all zeros without a mask. (16 + 1, HW): the conv's 16 input channels, then has_mask for the bias.
        hw = image_tokens.shape[0]
        has = has_mask_input.reshape(1, 1)
        h = torch.cat([pe_enc.mask_downscaling[:-1](mask_input).reshape(-1, hw) * has, has.expand(1, hw)])
        keys = torch.addmm(image_tokens, h.T, self.mask_keys)
        k_t = torch.addmm(layer0_k.reshape(-1, hw), self.mask_k, h).view(layer0_k.shape)
        v_t = torch.addmm(layer0_v.reshape(-1, hw), self.mask_v, h).view(layer0_v.shape)
        q_img = layer0_q + torch.matmul(h.T, self.mask_q)

        def t2i(i: int, attn: nn.Module, _img: nn.Module, queries_pe: torch.Tensor, keys: torch.Tensor,
                keys_pe: torch.Tensor | None) -> torch.Tensor:
            if keys_pe is None:
                return self._t2i_cached(attn, queries_pe, k_t, v_t)
            return self._t2i_folded(attn, queries_pe, keys, keys_pe)

        def i2t(i: int, attn: nn.Module, _img: nn.Module, keys: torch.Tensor, keys_pe: torch.Tensor | None,
                queries: torch.Tensor, queries_pe: torch.Tensor) -> torch.Tensor:
            return self._i2t(attn, keys, keys_pe, q_img, queries_pe, queries)

        t = dec.transformer
        queries, keys = run_two_way(t, t, tokens, keys, self.key_pe, t2i=t2i, i2t=i2t,
                                    norm4=lambda norm, x: _layer_norm(x, norm))
        iou = dec.iou_prediction_head(queries[:, 0])[:, 1:]  # (1, 3)
        hyper = torch.stack([dec.output_hypernetworks_mlps[j](queries[0, 1 + j]) for j in range(1, dec.num_mask_tokens)])
        return iou, self._masks(keys, hyper)[None]

    def _masks(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        _, ln, act1, _, act2 = self.model.mask_decoder.output_upscaling
        c1, c2 = self.up1_w.shape[1] // 4, self.up2_w.shape[1] // 4
        x = torch.addmm(self.up1_b, keys, self.up1_w).reshape(-1, c1)  # (4·HW, c1), rows (h, w, a1, b1)
        x = act1(_layer_norm(x, ln))
        x = act2(torch.addmm(self.up2_b, x, self.up2_w)).reshape(-1, c2)  # (16·HW, c2)
        M = hyper.shape[0]
        m = torch.matmul(hyper, x.T)  # (M, 16·HW), columns (h, w, a1, b1, a2, b2)
        h, w = self.grid
        return m.view(M, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(M, 4 * h, 4 * w)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: tuple[str, ...],
            outputs: tuple[str, ...], dynamic_axes: dict[str, dict[int, str]]) -> Path:
    from segany.export.onnx import _legacy_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _legacy_export(module, args, path, list(inputs), list(outputs), dynamic_axes)
    return path


def export_split_decoder(model: Sam, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``decoder_image.onnx`` and ``decoder_click.onnx`` (see the module docstring) into ``out_dir``."""
    require("onnx", "onnx")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model_for_export(model)  # a copy unless already fp32, CPU, eval: a served model stays as it is
    g = model.cfg.embed_size
    c = model.cfg.prompt.embed_dim
    image = ImageSideGraph(model).eval()
    click = ClickGraph(model).eval()
    emb = torch.randn(1, c, g, g)
    with torch.no_grad():
        image_outs = image(emb)
        paths = {"image": _export(image, (emb,), out / IMAGE_FILE, IMAGE_INPUTS, IMAGE_OUTPUTS, {})}
        example = (*image_outs, torch.randint(0, model.img_size, (1, 3, 2)).float(),
                   torch.tensor([[1.0, 0.0, -1.0]]), torch.randn(1, 1, 4 * g, 4 * g), torch.tensor([1.0]))
        paths["click"] = _export(click, example, out / CLICK_FILE, CLICK_INPUTS, CLICK_OUTPUTS,
                                 {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})
    return paths


__all__ = ["ImageSideGraph", "ClickGraph", "export_split_decoder", "IMAGE_FILE", "CLICK_FILE", "FORMAT_VERSION"]
