"""The prompt decoder split in two ONNX graphs, for interactive clients (the annotation app in the browser).

``decoder_image.onnx`` runs ONCE per image embedding:
    input ``image_embeddings`` float32 (1, C, g, g);
    outputs ``image_tokens`` (1, g·g, C) (the embedding plus the no-mask prompt embedding, channels last)
    and ``layer0_proj`` (1, g·g, 3·ci): the first two-way block's image-side projections (token→image keys
    and values, image→token queries) with the image positional encoding already added.

``decoder_click.onnx`` runs per click:
    inputs ``image_tokens``, ``layer0_proj`` (from the image graph), ``point_coords`` (1, N, 2),
    ``point_labels`` (1, N), ``mask_input`` (1, 1, 4g, 4g), ``has_mask_input`` (1,) — the same prompt
    inputs as the single-graph ``decoder.onnx``;
    outputs ``iou_predictions`` (1, 3) and ``low_res_masks`` (1, 3, 4g, 4g): the three multimask outputs
    as low-resolution logits (threshold at 0). Resizing to the image is left to the client (it only
    needs the mask it shows), which :func:`segany.export.onnx.postprocess_masks` does exactly.

The click graph is the decoder's maths rearranged so the 4096 image tokens (64×64) meet only skinny
matrices; one side of every cross attention is a handful of prompt tokens (T = 5 + points):

* token→image attention never forms image keys or values: ``softmax(q·((x+pe)·Wkᵀ + bk)ᵀ)`` equals
  ``softmax((q·Wk)·(x+pe)ᵀ)`` (the bias adds a per-row constant) and ``P·(x·Wvᵀ + bv) = (P·x)·Wvᵀ + bv``
  (rows of P sum to 1);
* image→token attention folds the image query projection into the few token keys and the output
  projection into the few token values, so the image side is two (g·g, C) × (C, heads·T) products;
* a mask prompt changes the first block's image side only through the last 1×1 convolution of the mask
  embedding, which is folded into that block's projections (16 input channels instead of 256);
* the 2×2 stride-2 transposed convolutions of the upscaler are GEMMs whose columns are the sub-pixels.

fp32 outputs agree with :class:`segany.modeling.mask_decoder.MaskDecoder` to rounding (~1e-5).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segany.errors import require
from segany.modeling.sam import Sam

IMAGE_FILE = "decoder_image.onnx"
CLICK_FILE = "decoder_click.onnx"
IMAGE_INPUTS = ("image_embeddings",)
IMAGE_OUTPUTS = ("image_tokens", "layer0_proj")
CLICK_INPUTS = ("image_tokens", "layer0_proj", "point_coords", "point_labels", "mask_input", "has_mask_input")
CLICK_OUTPUTS = ("iou_predictions", "low_res_masks")


def _layer0_weights(model: Sam) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 3ci) weight and (HW, 3ci) additive term of the first block's image-side projections."""
    layer = model.mask_decoder.transformer.layers[0]
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    pe = model.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)[0]  # (HW, C)
    w = torch.cat([t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight]).T
    add = torch.cat([pe @ t2i.k_proj.weight.T + t2i.k_proj.bias, t2i.v_proj.bias.expand(pe.shape[0], -1),
                     pe @ i2t.q_proj.weight.T + i2t.q_proj.bias], dim=1)
    return w.contiguous(), add.contiguous()


class ImageSideGraph(nn.Module):
    """Image embedding (1, C, g, g) → ``image_tokens`` (1, HW, C), ``layer0_proj`` (1, HW, 3ci)."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        with torch.no_grad():
            w, add = _layer0_weights(model)
            self.register_buffer("no_mask", model.prompt_encoder.no_mask_embed.weight[0].clone(), persistent=False)
            self.register_buffer("w0", w, persistent=False)
            self.register_buffer("add0", add, persistent=False)

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image_embeddings.flatten(2).transpose(1, 2) + self.no_mask
        return x, torch.matmul(x, self.w0) + self.add0


class ClickGraph(nn.Module):
    """Prompts + the image graph's outputs → three low-res mask logits and their predicted IoU."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model
        dec, pe_enc = model.mask_decoder, model.prompt_encoder
        self.img_size = model.img_size
        self.grid = tuple(pe_enc.image_embedding_size)
        with torch.no_grad():
            w0, _ = _layer0_weights(model)
            last = pe_enc.mask_downscaling[-1]  # 1×1 conv: linear in the 16 channels before it
            wc = last.weight.reshape(last.weight.shape[0], -1).T  # (c_in, C)
            shift = last.bias - pe_enc.no_mask_embed.weight[0]  # mask embedding minus the cached no-mask one
            self.register_buffer("mask_w", wc.contiguous(), persistent=False)
            self.register_buffer("mask_b", shift.clone(), persistent=False)
            self.register_buffer("mask_w0", (wc @ w0).contiguous(), persistent=False)
            self.register_buffer("mask_b0", (shift @ w0).contiguous(), persistent=False)
            self.register_buffer("key_pe", pe_enc.get_dense_pe().flatten(2).transpose(1, 2)[0].contiguous(),
                                 persistent=False)
            up1, _, _, up2, _ = dec.output_upscaling
            # ConvTranspose2d weight (in, out, 2, 2) → (in, 2·2·out): output columns ordered (sub-row, sub-col, ch).
            self.register_buffer("up1_w", up1.weight.permute(0, 2, 3, 1).reshape(up1.weight.shape[0], -1).contiguous(),
                                 persistent=False)
            self.register_buffer("up1_b", up1.bias.repeat(4).contiguous(), persistent=False)
            self.register_buffer("up2_w", up2.weight.permute(0, 2, 3, 1).reshape(up2.weight.shape[0], -1).contiguous(),
                                 persistent=False)
            self.register_buffer("up2_b", up2.bias.repeat(4).contiguous(), persistent=False)

    # -- prompts
    def _sparse(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Padding comes from the caller (label -1), as in SAM's ONNX contract.
        return self.model.prompt_encoder._embed_points(coords, labels, pad=False)[0]  # (N, C)

    # -- attention pieces; tokens are (1, T, ·) as the token-side modules expect, image tokens (HW, ·)
    @staticmethod
    def _heads(x: torch.Tensor, nh: int) -> torch.Tensor:
        T, D = x.shape
        return x.view(T, nh, D // nh).transpose(0, 1)  # (nh, T, d)

    def _t2i_cached(self, attn: nn.Module, q_tok: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor
                    ) -> torch.Tensor:
        nh = attn.num_heads
        q = self._heads(attn.q_proj(q_tok)[0], nh)
        d = q.shape[-1]
        k, v = self._heads(k_img, nh), self._heads(v_img, nh)  # (nh, HW, d)
        p = torch.matmul(q * d ** -0.5, k.transpose(1, 2)).softmax(dim=-1)  # (nh, T, HW)
        o = torch.matmul(p, v).transpose(0, 1).reshape(q.shape[1], -1)
        return attn.out_proj(o)[None]

    def _t2i_folded(self, attn: nn.Module, q_tok: torch.Tensor, keys: torch.Tensor, keys_pe: torch.Tensor
                    ) -> torch.Tensor:
        nh = attn.num_heads
        q = self._heads(attn.q_proj(q_tok)[0], nh)  # (nh, T, d)
        nh_, T, d = q.shape
        C = keys.shape[-1]
        wk = attn.k_proj.weight.view(nh, d, C)
        qk = torch.matmul(q * d ** -0.5, wk).reshape(nh * T, C)
        p = torch.matmul(keys_pe, qk.T).softmax(dim=0)  # (HW, nh·T), softmax over the image tokens
        ctx = torch.matmul(p.T, keys).view(nh, T, C)
        wv = attn.v_proj.weight.view(nh, d, C)
        o = torch.matmul(ctx, wv.transpose(1, 2)) + attn.v_proj.bias.view(nh, 1, d)  # (nh, T, d)
        return attn.out_proj(o.transpose(0, 1).reshape(T, nh * d))[None]

    def _i2t(self, attn: nn.Module, keys: torch.Tensor, scores_from: torch.Tensor, folded: bool,
             q_tok_pe: torch.Tensor, q_tok: torch.Tensor) -> torch.Tensor:
        """``keys + attn(image → tokens)``; ``scores_from`` is the projected image queries (HW, ci), or
        ``keys + pe`` (HW, C) when ``folded``."""
        nh = attn.num_heads
        k = self._heads(attn.k_proj(q_tok_pe)[0], nh)  # (nh, T, d)
        nh_, T, d = k.shape
        k = k * d ** -0.5
        if folded:
            C = keys.shape[-1]
            wq = attn.q_proj.weight.view(nh, d, C)
            g = torch.matmul(wq.transpose(1, 2), k.transpose(1, 2))  # (nh, C, T)
            g = g.transpose(0, 1).reshape(C, nh * T)
            bias = torch.matmul(attn.q_proj.bias.view(nh, 1, d), k.transpose(1, 2)).reshape(nh * T)
            s = torch.matmul(scores_from, g) + bias  # (HW, nh·T)
            p = s.view(-1, nh, T).softmax(dim=-1).view(-1, nh * T)
        else:
            q = self._heads(scores_from, nh)  # (nh, HW, d)
            p = torch.matmul(q, k.transpose(1, 2)).softmax(dim=-1)  # (nh, HW, T)
            p = p.transpose(0, 1).reshape(-1, nh * T)
        v = self._heads(attn.v_proj(q_tok)[0], nh)  # (nh, T, d)
        wo = attn.out_proj.weight.view(-1, nh, d).permute(1, 2, 0)  # (nh, d, C)
        m = (torch.matmul(v, wo) + attn.out_proj.bias / nh).reshape(nh * T, -1)  # each head's P rows sum to 1
        return keys + torch.matmul(p, m)

    def forward(self, image_tokens: torch.Tensor, layer0_proj: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor, mask_input: torch.Tensor, has_mask_input: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        dec, pe_enc = self.model.mask_decoder, self.model.prompt_encoder
        t = dec.transformer
        sparse = self._sparse(point_coords, point_labels)
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, sparse], dim=0)[None]  # (1, T, C)
        # Mask prompt: its embedding minus the no-mask one the image graph added, through the folded 1×1 conv.
        has = has_mask_input.reshape(1, 1)
        h = pe_enc.mask_downscaling[:-1](mask_input)[0].flatten(1).T * has  # (HW, c_in), zeros without a mask
        keys = image_tokens[0] + (torch.matmul(h, self.mask_w) + has * self.mask_b)
        proj = layer0_proj[0] + (torch.matmul(h, self.mask_w0) + has * self.mask_b0)
        queries, query_pe = tokens, tokens
        for i, layer in enumerate(t.layers):
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(queries, queries, queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q, q, queries)
            queries = layer.norm1(queries)
            if i == 0:
                ci = t2i.internal_dim
                k_img, v_img, q_img = proj.split([ci, ci, i2t.internal_dim], dim=-1)
                queries = layer.norm2(queries + self._t2i_cached(t2i, queries + query_pe, k_img, v_img))
                queries = layer.norm3(queries + layer.mlp(queries))
                keys = layer.norm4(self._i2t(i2t, keys, q_img, False, queries + query_pe, queries))
            else:
                keys_pe = keys + self.key_pe
                queries = layer.norm2(queries + self._t2i_folded(t2i, queries + query_pe, keys, keys_pe))
                queries = layer.norm3(queries + layer.mlp(queries))
                keys = layer.norm4(self._i2t(i2t, keys, keys_pe, True, queries + query_pe, queries))
        fin = t.final_attn_token_to_image
        queries = t.norm_final_attn(queries + self._t2i_folded(fin, queries + query_pe, keys, keys + self.key_pe))
        iou = dec.iou_prediction_head(queries[:, 0])[:, 1:]  # (1, 3)
        hyper = torch.stack([dec.output_hypernetworks_mlps[j](queries[0, 1 + j]) for j in range(1, dec.num_mask_tokens)])
        return iou, self._masks(keys, hyper)[None]

    def _masks(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        _, ln, act1, _, act2 = self.model.mask_decoder.output_upscaling
        c1, c2 = self.up1_w.shape[1] // 4, self.up2_w.shape[1] // 4
        x = (torch.matmul(keys, self.up1_w) + self.up1_b).reshape(-1, c1)  # (4·HW, c1), rows (h, w, a1, b1)
        x = act1(F.layer_norm(x, (c1,), ln.weight, ln.bias, ln.eps))
        x = act2(torch.matmul(x, self.up2_w) + self.up2_b).reshape(-1, c2)  # (16·HW, c2)
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
    p0 = next(model.parameters())
    if p0.device.type != "cpu" or p0.dtype != torch.float32:  # leave a served model where it is
        model = copy.deepcopy(model).cpu().float()
    model = model.eval()
    g = model.cfg.embed_size
    c = model.cfg.prompt.embed_dim
    image = ImageSideGraph(model).eval()
    click = ClickGraph(model).eval()
    emb = torch.randn(1, c, g, g)
    with torch.no_grad():
        toks, proj = image(emb)
        paths = {"image": _export(image, (emb,), out / IMAGE_FILE, IMAGE_INPUTS, IMAGE_OUTPUTS, {})}
        example = (toks, proj, torch.randint(0, model.img_size, (1, 3, 2)).float(), torch.tensor([[1.0, 0.0, -1.0]]),
                   torch.randn(1, 1, 4 * g, 4 * g), torch.tensor([1.0]))
        paths["click"] = _export(click, example, out / CLICK_FILE, CLICK_INPUTS, CLICK_OUTPUTS,
                                 {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})
    return paths


__all__ = ["ImageSideGraph", "ClickGraph", "export_split_decoder", "IMAGE_FILE", "CLICK_FILE"]
