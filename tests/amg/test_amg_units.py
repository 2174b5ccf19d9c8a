"""Units of automatic mask generation: RLE helpers, windowed small-region clean-up, SA-1B files, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segany.amg.config import AmgConfig
from segany.amg.filters import masks_to_boxes_xyxy
from segany.amg.postprocess import clean_mask_full, clean_mask_windowed
from segany.data.formats.sa1b import read_sa1b, to_sa1b, write_sa1b
from segany.data.rle import (
    coco_to_mask,
    counts_to_changes,
    decode_masks_torch,
    encode_masks,
    mask_to_counts,
)
from segany.errors import InputError


def _random_masks(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(1, 6)):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            masks[i, y0:y0 + rng.integers(1, h), x0:x0 + rng.integers(1, w)] ^= True
        masks[i] ^= rng.random((h, w)) < 0.02  # speckle: tiny holes and islands
    masks[0] = False
    masks[1] = True
    return masks


def test_rle_batch_matches_pycocotools_and_round_trips() -> None:
    masks = _random_masks(12, 23, 31)
    rle = encode_masks(torch.as_tensor(masks))
    np_rle = rle.to_numpy()
    coco = np_rle.to_coco()
    for i, m in enumerate(masks):
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert coco[i]["counts"] == ref["counts"].decode("ascii")
        assert np.array_equal(np_rle.decode(i), m)
        assert np.array_equal(coco_to_mask(coco[i]), m)
        assert np.array_equal(np_rle.counts(i), mask_to_counts(m))
        ch, first = counts_to_changes(mask_to_counts(m))
        assert np.array_equal(ch, np_rle.changes[np_rle.offsets[i]:np_rle.offsets[i + 1]]) and first == m.flat[0]
    assert np.array_equal(decode_masks_torch(rle).numpy(), masks)
    idx = torch.tensor([5, 0, 11, 5])
    sub = rle.select(idx).to_numpy()
    for j, i in enumerate(idx.tolist()):
        assert np.array_equal(sub.decode(j), masks[i])


def test_boxes_of_masks() -> None:
    masks = _random_masks(6, 17, 29, seed=3)
    boxes = masks_to_boxes_xyxy(torch.as_tensor(masks)).numpy()
    for m, b in zip(masks, boxes, strict=True):
        if not m.any():
            assert b.tolist() == [0, 0, 0, 0]
            continue
        ys, xs = np.nonzero(m)
        assert b.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


@pytest.mark.parametrize("seed", range(6))
def test_windowed_cleanup_equals_whole_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = 40, 56
    cases = list(_random_masks(8, h, w, seed))
    band = np.zeros((h, w), dtype=bool)  # full-height band: the outside splits into left and right parts
    band[:, 3:50] = True
    band[5:9, 10:12] = False
    cases.append(band)
    thin = np.zeros((h, w), dtype=bool)  # outside strips thinner than min_area: they count as holes
    thin[:, 1:] = True
    cases.append(thin)
    for dy in (0, 1):  # two equal small islands, the window starting on an odd or even row: OpenCV labels
        tie = np.zeros((h, w), dtype=bool)  # in 2 x 2 blocks, so a window could keep the other island
        tie[12 + dy:15 + dy, 40:43] = True
        tie[13:16, 5:8] = True
        cases.append(tie)
    for m in cases:
        for min_area in (3, 20, int(rng.integers(40, 400))):
            full, changed = clean_mask_full(m.copy(), min_area)
            ys, xs = np.nonzero(m)
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()]) if xs.size else np.zeros(4, dtype=np.int64)
            counts, new_box, changed_w = clean_mask_windowed(mask_to_counts(m), box, (h, w), min_area)
            assert changed_w == changed
            if changed:
                assert counts is not None
                assert np.array_equal(coco_to_mask({"size": [h, w], "counts": counts.tolist()}), full)
                fy, fx = np.nonzero(full)
                if fx.size:
                    assert new_box.tolist() == [fx.min(), fy.min(), fx.max(), fy.max()]


def test_sa1b_round_trip_validated_by_pycocotools(tmp_path) -> None:
    masks = _random_masks(4, 30, 20, seed=7)
    records = [{"segmentation": m, "area": int(m.sum()), "bbox": [1, 2, 3, 4], "predicted_iou": 0.9,
                "point_coords": [[1.5, 2.5]], "stability_score": 0.97, "crop_box": [0, 0, 20, 30]} for m in masks]
    data = to_sa1b(records, image_id=7, file_name="x.jpg", size_hw=(30, 20))
    path = write_sa1b(tmp_path / "x.json", data)
    back = read_sa1b(path)
    assert (back.image_id, back.width, back.height, back.file_name) == (7, 20, 30, "x.jpg")
    for a, m in zip(back.annotations, masks, strict=True):
        assert isinstance(a["segmentation"]["counts"], str)
        enc = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(enc).astype(bool), m)
        assert int(mask_utils.area(enc)) == a["area"]
    assert np.array_equal(back.masks(), masks)
    assert not list(tmp_path.glob(".*.tmp"))


def test_sa1b_reader_rejects_bad_files(tmp_path) -> None:
    (tmp_path / "t.json").write_text('{"image": {"image_id": 1')
    with pytest.raises(InputError, match="not valid JSON"):
        read_sa1b(tmp_path / "t.json")
    (tmp_path / "k.json").write_text('{"images": []}')
    with pytest.raises(InputError, match="not an SA-1B file"):
        read_sa1b(tmp_path / "k.json")


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"output_mode": "png"}, "output_mode must be one of"),
    ({"points_per_side": None}, "exactly one of points_per_side and point_grids"),
    ({"points_per_side": 0}, "points_per_side must be >= 1"),
    ({"box_nms_thresh": 1.5}, "box_nms_thresh must be in"),
    ({"points_per_side": None, "point_grids": [np.zeros((4, 2))], "crop_n_layers": 1}, "one grid per crop layer"),
    ({"points_per_side": 3, "crop_n_layers": 2, "crop_n_points_downscale_factor": 2},
     "crop layer 2 would get no points: points_per_side=3 divided by crop_n_points_downscale_factor\\*\\*2=4"),
])
def test_config_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        AmgConfig(**kwargs)


@pytest.mark.parametrize("n", [40, 1500])  # below and above batched_nms's switch to its per-category loop (CPU)
def test_single_class_nms_is_batched_nms_with_one_category(n: int) -> None:
    """The generator's NMS (torchvision's kernel, loaded without the package) keeps the boxes, in the order,
    that the reference's ``batched_nms(boxes, scores, zeros, thr)`` keeps, tied scores included."""
    import torch
    from torchvision.ops import batched_nms

    from segany.amg.nms import single_class_nms

    g = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 60], dim=1)
    scores = (torch.rand(n, generator=g) * 8).round() / 8  # few distinct values: many ties
    for thr in (0.3, 0.7):
        expected = batched_nms(boxes, scores, torch.zeros(n), thr)
        assert torch.equal(single_class_nms(boxes, scores, thr), expected), thr
    assert single_class_nms(boxes[:0], scores[:0], 0.7).tolist() == []


def test_nms_switches_paths_where_the_installed_torchvision_does() -> None:
    """On a GPU the switch was 20000 box values while torchvision 0.29 switches at 100_000: between the two,
    tied scores could keep other duplicates than the reference. The sizes now come from torchvision's source."""
    import inspect
    import re

    from torchvision.ops import boxes

    from segany.amg.nms import switch_sizes

    src = inspect.getsource(boxes.batched_nms)
    cpu, other = re.search(r"\((\d[\d_]*) if boxes\.device\.type == \"cpu\" else (\d[\d_]*)\)", src).groups()
    assert switch_sizes() == (int(cpu), int(other))


def test_an_image_too_small_for_its_crop_layers_is_named_with_the_fix(tiny_sam) -> None:
    from segany import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(tiny_sam, points_per_side=2, crop_n_layers=1)
    with pytest.raises(InputError, match=r"image 50x1 is too small for crop_n_layers=1: crops of layer 1 would "
                                         r"hold no pixel; lower crop_n_layers"):
        gen.generate(np.zeros((1, 50, 3), np.uint8))

