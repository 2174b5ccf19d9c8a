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
    assert poly[2:8, 2:12].all() and poly.sum() == 6 * 10  # pixel x spans [x, x+1], as in pycocotools
    assert np.array_equal(decode_rle(rec.masks[1]), m) and np.array_equal(decode_rle(rec.masks[2]), m)


def test_coco_polygons_fill_as_pycocotools_does(tmp_path) -> None:
    """pycocotools defines what a COCO polygon covers; a cv2.fillPoly of rounded vertices grew masks by about
    half a pixel a side, snapped .5 vertices by banker's rounding and left the overlap of two parts empty."""
    h, w = 40, 50
    polygons = [[[5, 5, 6, 5, 6, 6, 5, 6]],  # one pixel
                [[10.5, 3.5, 29.5, 3.5, 29.5, 9.5, 10.5, 9.5]],  # pixel centres
                [[0, 0, 20, 0, 20, 20, 0, 20], [10, 10, 30, 10, 30, 30, 10, 30]],  # two overlapping parts
                [[3.2, 30.7, 17.9, 21.1, 44.4, 38.6, 12.5, 39.5]]]
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": h, "width": w}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": seg}
                            for i, seg in enumerate(polygons)]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    (rec,) = read_coco(tmp_path / "ann.json")
    assert len(rec.masks) == len(polygons)
    for seg, rle in zip(polygons, rec.masks, strict=True):
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
        assert np.array_equal(decode_rle(rle), ref)
    assert decode_rle(rec.masks[0]).sum() == 1 and decode_rle(rec.masks[2])[15, 15]


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


def _bad_coco(tmp_path, edit) -> str:  # type: ignore[no-untyped-def]
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[2, 2, 12, 2, 12, 8, 2, 8]]}]}
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # NaN is written as NaN, which Python's json reads back
    return str(path)


def _seg(value):  # type: ignore[no-untyped-def]
    return lambda d: d["annotations"][0].__setitem__("segmentation", value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"][0].pop("id"), r"'images'\[0\] \('a.jpg'\) has no 'id'"),
    (lambda d: d["categories"][0].pop("id"), r"'categories'\[0\] \('x'\) has no 'id'"),
    (lambda d: d.__setitem__("annotations", [5]), r"'annotations'\[0\] is 5, not an object"),
    (lambda d: d.__setitem__("images", {"1": {}}), "'images' is a dict, not a list"),
    (lambda d: d["images"][0].__setitem__("height", -10), "has height -10 and width 30"),
    (_seg({"size": [20, 30], "counts": "P"}), "annotation 7 .*cut off"),
    (_seg({"size": [20, 30], "counts": "\u00e9"}), "annotation 7 .*only the characters"),
    (_seg({"size": [20, 30], "counts": ["100", "500"]}), "annotation 7 .*not all whole numbers"),
    (_seg({"size": [20, 30], "counts": [100, -10, 50, 460]}), "annotation 7 .*not all whole numbers"),
    (_seg({"size": [20, 30], "counts": 600}), "annotation 7 .*counts of type int"),
    (_seg([[2, 2, float("nan"), 2, 12, 8, 2, 8]]), "annotation 7 .*coordinate nan"),
    (_seg([[2, 2, 5e12, 2, 12, 8, 2, 8]]), "annotation 7 .*coordinate 5000000000000.0"),
])
def test_coco_reader_names_what_is_wrong(tmp_path, edit, message: str) -> None:
    """Each of these failed with a bare KeyError/IndexError/TypeError/AttributeError, was read as garbage (NaN,
    an int32-overflowing coordinate) or, for negative runs that still sum to H*W, failed later inside a pack."""
    from segany.errors import InputError

    path = _bad_coco(tmp_path, edit)
    with pytest.raises(InputError, match=message) as exc:
        read_coco(path)
    assert str(tmp_path) in str(exc.value)
