"""Readers on the real shared datasets, the RLE codec against pycocotools, packing and the Dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from pycocotools import mask as mask_utils

from segany.data.formats import held_out_ids, read_coco, read_shared
from segany.data.formats.common import (
    _counts_of,
    _counts_to_string,
    _string_to_counts,
    decode_rle,
    encode_mask,
)


def _shared() -> None:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared datasets not found at {SHARED_DATA}; CI lays ../shared/data beside the repo, or set SEGANY_SHARED_DATA")


def test_rle_codec_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.random()
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
        assert _counts_to_string(_counts_of(m)) == ref
        assert _string_to_counts(ref) == _counts_of(m)
        assert np.array_equal(decode_rle({"size": [h, w], "counts": ref}), m)
        assert np.array_equal(decode_rle(encode_mask(m)), m)


def test_coco_reader_polygons_and_rle(tmp_path) -> None:
    m = np.zeros((20, 30), bool)
    m[5:10, 3:12] = True
    rle = encode_mask(m)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0,
                 "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]]},
                {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": rle},
                {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 0,
                 "segmentation": {"size": [20, 30], "counts": _counts_of(m)}},
                {"id": 4, "image_id": 1, "category_id": 3, "iscrowd": 1, "segmentation": rle}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    (rec,) = read_coco(tmp_path / "ann.json")
    assert rec.size_hw == (20, 30) and rec.class_names == ["cat"] * 3 and len(rec.masks) == 3
    poly = decode_rle(rec.masks[0])
    assert poly[2:9, 2:13].all() and poly.sum() == 7 * 11
    assert np.array_equal(decode_rle(rec.masks[1]), m) and np.array_equal(decode_rle(rec.masks[2]), m)


@pytest.mark.parametrize("name", ["coco128", "pennfudan", "kvasir", "bsds"])
def test_shared_readers(name: str) -> None:
    _shared()
    splits = read_shared(name, SHARED_DATA, limit=4)
    recs = splits["train"] + splits["val"]
    assert recs and all(r.dataset == name for r in recs)
    for r in recs:
        for rle in r.masks:
            m = decode_rle(rle)
            assert m.shape == r.size_hw and m.any()
    if name == "bsds":
        assert splits["val"] and all(r.groups is not None and len(r.groups) == len(r.masks) for r in recs)
    if name == "coco128":
        assert any(r.class_names for r in recs) and not splits["val"]


def test_pennfudan_instances_and_split_are_fixed() -> None:
    _shared()
    splits = read_shared("pennfudan", SHARED_DATA)
    assert len(splits["val"]) == 20 and len(splits["train"]) == 110
    assert sum(len(r.masks) for r in splits["train"] + splits["val"]) == 320  # README: 320 pedestrians
    ids = [r.image_id for r in splits["train"] + splits["val"]]
    assert held_out_ids("pennfudan", ids) == held_out_ids("pennfudan", ids[::-1])
    assert sorted(r.image_id for r in splits["val"]) == held_out_ids("pennfudan", ids)


def test_kvasir_held_out_is_80_ids() -> None:
    _shared()
    ids = (SHARED_DATA / "kvasir-seg" / "train.txt").read_text().split()
    held = held_out_ids("kvasir", ids)
    assert len(held) == 80 and set(held) <= set(ids)
