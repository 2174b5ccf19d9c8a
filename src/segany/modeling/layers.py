"""Small building blocks shared by the encoders and the decoder."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def reference_keywords(**ours_by_reference: str) -> Callable[[_Fn], _Fn]:
    """Let a method also take the reference package's keyword names for its arguments.

    ``@reference_keywords(size="size_hw")`` makes ``f(size=x)`` call ``f(size_hw=x)``: code written against
    ``segment_anything`` runs unchanged, while segany's own names, positions and types stay as they are. A call
    without keywords pays one ``if`` (no per-element work); passing both spellings raises ``TypeError``.
    """

    def wrap(fn: _Fn) -> _Fn:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if kwargs:
                for ref_name, our_name in ours_by_reference.items():
                    if ref_name in kwargs:
                        if our_name in kwargs:
                            raise TypeError(f"{fn.__qualname__}() got {ref_name!r} and {our_name!r}, which are "
                                            f"the same argument; pass one")
                        kwargs[our_name] = kwargs.pop(ref_name)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)`` with its N(0, 1) init drawn by ``torch.randn`` (the same numbers for the same seed).

    Why: checkpoints are checked against a meta-device shell of the model, and on the meta device
    ``Tensor.normal_`` (what ``nn.Embedding`` initialises with) runs through torch's Python decompositions,
    which import ``torch._dynamo``: 1.4 s of every ``segany predict``. ``torch.randn`` does not.
    """
    return nn.Embedding(num, dim, _weight=torch.randn(num, dim))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor, as used in SAM's necks and upscalers."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).square().mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two-layer feed-forward block (``lin1`` → activation → ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (hypernetworks and the IoU head)."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))
        self.sigmoid_output = sigmoid_output

    @property
    def num_layers(self) -> int:
        """The reference's attribute: how many linear layers (``len(self.layers)``)."""
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
