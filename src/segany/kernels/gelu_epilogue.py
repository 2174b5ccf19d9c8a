"""The ViT blocks' MLP with GELU applied inside the first GEMM (a cuBLASLt epilogue) instead of after it.

Why: compiled ViT-H spends 7.8 of its 105.6 ms a batch (H200, 2026-11-27, docs/benchmarks.md) in one
elementwise kernel per block: Inductor computes ``lin1`` as a plain GEMM, then reads its (tokens, 4·C)
output back to add the bias and apply GELU, and writes it again. That is two passes over 168 million
bf16 values per block at batch 8. ``torch._addmm_activation(bias, x, w.t(), use_gelu=True)`` asks
cuBLASLt for GEMM, bias and GELU in one kernel, so that pass disappears. Inductor keeps the call as one
extern kernel (it is a fallback op there, not decomposed back into addmm + gelu; tested).

Cost: on CUDA the epilogue computes GELU's tanh form, which differs from the exact GELU the checkpoints
were trained with by at most 4.7e-4 (at x ≈ 2.7, about 2e-4 of the value there). That is far below bf16's
rounding step (2⁻⁸ relative), which is why this is only offered for the reduced-precision fast path. On
CPU ATen computes the exact form, so CPU tests check the plumbing and the GPU test checks the accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from segany.modeling.layers import MLPBlock

# On for bf16/fp16 ViTs on CUDA since it was timed (H200, torch 2.11.0+cu130, 2026-11-27 evening, compiled
# `fused` encoders at batch 8): ViT-B 368 → 399 img/s, ViT-L 139 → 146, ViT-H 72.4 → 76.7, with ViT-H's
# mask IoU against fp32 unchanged (0.9886 mean, 0.979 min; plain bf16 0.9887, 0.977). Whether cuBLASLt picks
# as fast a GEMM with the epilogue is a property of the card and cuBLAS version; FastPath(gelu_epilogue=False)
# turns it off.
DEFAULT_ON_CUDA = True


def default_on(device: torch.device, dtype: torch.dtype, *, vit: bool, quantized: bool) -> bool:
    """What ``FastPath(gelu_epilogue=None)`` picks: on for a bf16/fp16 ViT on CUDA without 8-bit GEMMs.
    Not on CPU (ATen computes the exact GELU there, so nothing is saved), not for fp32 (which stays exact),
    not with ``quantize`` (those layers are 8-bit GEMMs of their own), not for TinyViT (no ``MLPBlock``)."""
    return (DEFAULT_ON_CUDA and device.type == "cuda" and vit and not quantized
            and dtype in (torch.bfloat16, torch.float16))


class GeluEpilogueMLP(nn.Module):
    """``lin2(gelu(lin1(x)))`` with ``gelu(lin1(x))`` as one ``_addmm_activation`` call.

    Keeps the source block's two ``nn.Linear`` modules (same parameter names, so state dicts still match).
    """

    def __init__(self, src: MLPBlock) -> None:
        super().__init__()
        self.lin1, self.lin2 = src.lin1, src.lin2

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        """An :class:`MLPBlock` with exact GELU and a biased ``lin1`` (the ViT blocks' MLP)."""
        act = getattr(module, "act", None)
        return (isinstance(module, MLPBlock) and type(act) is nn.GELU and act.approximate == "none"
                and module.lin1.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        hidden = torch._addmm_activation(self.lin1.bias, x.reshape(-1, x.shape[-1]), self.lin1.weight.t(),
                                         use_gelu=True)
        return self.lin2(hidden).reshape(*lead, -1)


def convert_mlps(root: nn.Module) -> int:
    """Swap every eligible MLP under ``root`` (in place) for :class:`GeluEpilogueMLP`; returns how many."""
    count = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if GeluEpilogueMLP.applies_to(child):
                setattr(module, name, GeluEpilogueMLP(child))
                count += 1
    return count
