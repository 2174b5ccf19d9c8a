"""TinyViT's attention-bias offset table, against its definition."""

from __future__ import annotations

import itertools

import pytest
import torch

from segany.modeling.tiny_encoder import offset_index


def _first_appearance_ids(window: int) -> tuple[torch.Tensor, int]:
    """TinyViT's definition: offsets (|dy|, |dx|) numbered in the order they first appear over all cell pairs."""
    cells = list(itertools.product(range(window), range(window)))
    ids: dict[tuple[int, int], int] = {}
    index = [ids.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(ids)) for p in cells for q in cells]
    return torch.tensor(index).view(len(cells), len(cells)), len(ids)


@pytest.mark.parametrize("window", [1, 2, 3, 7, 14])
def test_offset_index_numbers_offsets_as_tinyvit_does(window: int) -> None:
    ref, n_offsets = _first_appearance_ids(window)
    got = offset_index(window)
    assert got.dtype == torch.int64 and torch.equal(got, ref)
    assert n_offsets == window * window  # the size of each block's attention_biases


def test_offset_index_follows_the_default_device() -> None:
    with torch.device("meta"):
        assert offset_index(7).device.type == "meta"
    assert offset_index(7).device.type == "cpu"
