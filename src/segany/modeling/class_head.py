"""Class head (issue 10): what each predicted mask is.

Reads the mask decoder's output mask tokens (the same tokens the hypernetworks turn into masks), so
a label costs a small MLP per mask and nothing else. Outputs closed-vocabulary logits over the
config's ``class_names`` plus one "background" logit (a mask of something outside the vocabulary,
e.g. sky or road from a grid point), and optionally an L2-normalized embedding in a CLIP space, which
gives open-vocabulary labels by cosine similarity with CLIP text embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.config import ClassHeadConfig
from segany.modeling.layers import MLP


class ClassHead(nn.Module):
    def __init__(self, cfg: ClassHeadConfig, token_dim: int) -> None:
        super().__init__()
        self.class_names = tuple(cfg.class_names)
        self.num_classes = len(cfg.class_names)
        # Last logit = background ("none of the classes"); its index is num_classes.
        self.trunk = MLP(token_dim, cfg.hidden_dim, cfg.hidden_dim, max(1, cfg.num_layers - 1))
        self.logits = nn.Linear(cfg.hidden_dim, self.num_classes + 1)
        self.clip_dim = cfg.clip_dim
        if cfg.clip_dim > 0:
            self.clip_proj = nn.Linear(cfg.hidden_dim, cfg.clip_dim)
            # CLIP's own logit scale is 100; a learned one starts there (log 100 ≈ 4.6).
            self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def forward(self, mask_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) mask tokens → logits (B, T, K+1) and CLIP-space embeddings (B, T, D) or None."""
        h = F.relu(self.trunk(mask_tokens))
        emb = F.normalize(self.clip_proj(h), dim=-1) if self.clip_dim > 0 else None
        return self.logits(h), emb

    def open_vocab_logits(self, clip_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(…, D) mask embeddings and (N, D) normalized text embeddings → (…, N) scaled cosine logits."""
        return self.logit_scale.exp().clamp(max=100.0) * clip_embeddings @ text_embeddings.to(clip_embeddings).T
