"""Drop-in gaps found by the compat audit, each checked against the reference ``segment_anything``.

1. ``SamAutomaticMaskGenerator.postprocess_small_regions`` (a static method downstream code calls on its own
   ``MaskData``) gives the reference's records on masks with small holes, islands, ties, an empty mask and
   duplicates that only appear after clean-up; a subclass that overrides it changes ``generate`` as in the
   reference.
2. ``sam_model_registry`` is a ``dict`` with the reference's keys first, in its order, and keeps segany's
   extras (user builders first, live registry, helpful errors); it pickles and deep-copies.
3. ``SamOnnxModel.select_masks`` takes ``iou_preds`` by keyword, and the exported single-mask graph declares
   ``low_res_masks`` with a fixed mask dimension of 1, as the reference's export does.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The reference package, a test dependency (the dev extra): where it is missing these imports fail, naming it.
import segment_anything as ref_sa
import segment_anything.utils.amg as ref_amg
import segment_anything.utils.onnx as ref_onnx
import torch
from conftest import tiny_config

import segany
import segany.registry
from segany.amg.generator import SamAutomaticMaskGenerator
from segany.compat import build_sam_vit_b, build_sam_vit_h
from segany.errors import UnknownModelError
from segany.modeling.sam import Sam
from segany.registry import ModelInfo, get_model_info, list_models
from segany.utils import amg as our_amg
from segany.utils.onnx import SamOnnxModel

pytestmark = pytest.mark.parity


MIN_AREA = 12
NMS_THRESH = 0.7


# ----------------------------------------------------------------------------------- 1. small regions
# Each mask as rectangles (y0, y1, x0, x1, value) painted in order, built to hit one case of the clean-up.
CASES = [
    [(5, 25, 6, 30, True), (10, 12, 12, 14, False)],  # a small hole: filled, then a duplicate of the next
    [(5, 25, 6, 30, True)],  # clean: wins NMS over the cleaned one above
    [(20, 38, 30, 50, True), (1, 3, 1, 3, True)],  # an island far away: the box shrinks
    [(2, 5, 40, 43, True), (30, 33, 2, 5, True), (15, 17, 20, 22, True)],  # only small islands, tied
    [],  # empty
    [(0, 40, 10, 14, True), (0, 40, 30, 34, True), (18, 22, 14, 30, True)],  # an H: background open to the edge
    [(8, 30, 8, 44, True), (8, 30, 25, 27, False), (18, 20, 25, 27, True)],  # thin slots, not holes
]


def _masks() -> np.ndarray:
    """(N, 40, 52) bool masks: :data:`CASES`, then speckled rectangles."""
    h, w = 40, 52
    rng = np.random.default_rng(3)
    out = []
    for case in CASES:
        m = np.zeros((h, w), dtype=bool)
        for y0, y1, x0, x1, value in case:
            m[y0:y1, x0:x1] = value
        out.append(m)
    for _ in range(5):
        m = np.zeros((h, w), dtype=bool)
        y0, x0 = rng.integers(0, 20, 2)
        m[y0:y0 + rng.integers(8, 20), x0:x0 + rng.integers(8, 30)] = True
        out.append(m ^ (rng.random((h, w)) < 0.04))
    return np.stack(out)


def _bag(cls: type, masks: np.ndarray) -> Any:
    t = torch.from_numpy(masks)
    return cls(
        rles=ref_amg.mask_to_rle_pytorch(t),
        boxes=ref_amg.batched_mask_to_box(t),
        iou_preds=torch.linspace(0.9, 0.99, len(masks)),
        points=torch.arange(2 * len(masks), dtype=torch.float64).reshape(-1, 2),
        stability_score=torch.linspace(0.95, 0.999, len(masks)),
        crop_boxes=torch.tensor([[0, 0, 52, 40]] * len(masks)),
        names=[f"m{i}" for i in range(len(masks))],
        areas_np=masks.sum(axis=(1, 2)),
    )


def _assert_same_bag(ours: Any, ref: Any) -> None:
    assert sorted(k for k, _ in ours.items()) == sorted(k for k, _ in ref.items())
    for key, want in ref.items():
        got = ours[key]
        assert type(got) is type(want), key
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want), key
        elif isinstance(want, np.ndarray):
            assert np.array_equal(got, want), key
        else:
            assert got == want, key


@pytest.mark.parametrize("bag_cls", [our_amg.MaskData, ref_amg.MaskData], ids=["segany_MaskData", "ref_MaskData"])
def test_postprocess_small_regions_matches_reference(bag_cls: type) -> None:
    masks = _masks()
    ref = _bag(ref_amg.MaskData, masks)
    ref_out = ref_sa.SamAutomaticMaskGenerator.postprocess_small_regions(ref, MIN_AREA, NMS_THRESH)
    ours = _bag(bag_cls, masks)
    our_out = SamAutomaticMaskGenerator.postprocess_small_regions(ours, MIN_AREA, NMS_THRESH)
    assert our_out is ours  # edited in place and returned, as in the reference
    _assert_same_bag(ours, ref_out)
    # The cases did what they were built for: some masks changed, one duplicate went, the clean one stayed first.
    assert 0 < len(ours["names"]) < len(masks) and "m0" not in ours["names"] and ours["names"][0] == "m1"
    changed = [r for r, n in zip(ours["rles"], ours["names"], strict=True)
               if r != ref_amg.mask_to_rle_pytorch(torch.from_numpy(masks[int(n[1:])])[None])[0]]
    assert changed


def test_postprocess_small_regions_edge_cases() -> None:
    """An empty bag comes back as it is; the path of the reference's module reaches the same function."""
    from segany.automatic_mask_generator import SamAutomaticMaskGenerator as Alias

    empty = our_amg.MaskData(rles=[], boxes=torch.zeros(0, 4))
    assert Alias.postprocess_small_regions(empty, MIN_AREA, NMS_THRESH) is empty and empty["rles"] == []
    masks = _masks()
    ours, ref = _bag(our_amg.MaskData, masks), _bag(ref_amg.MaskData, masks)
    for area in (0, 400):  # nothing to clean; nearly everything small
        a = Alias.postprocess_small_regions(copy.deepcopy(ours), area, 0.3)
        b = ref_sa.SamAutomaticMaskGenerator.postprocess_small_regions(copy.deepcopy(ref), area, 0.3)
        _assert_same_bag(a, b)


def _recording_generators(kind: str) -> tuple[type, type, list[tuple[Any, ...]]]:
    """A subclass of each generator whose ``postprocess_small_regions`` (a ``kind`` method) records its
    arguments and returns a new bag: rows 2 and 0, in that order, with row 2's mask swapped for a box."""
    calls: list[tuple[Any, ...]] = []

    def clean(mask_data: Any, min_area: int, nms_thresh: float) -> Any:
        calls.append((copy.deepcopy(mask_data), min_area, nms_thresh))
        out = type(mask_data)(**dict(mask_data.items()))
        out.filter(torch.tensor([2, 0]))
        box = np.zeros(out["rles"][0]["size"], dtype=bool)
        box[3:9, 5:20] = True
        out["rles"][0] = ref_amg.mask_to_rle_pytorch(torch.from_numpy(box)[None])[0]
        out["boxes"][0] = [5, 3, 19, 8]
        return out

    body: dict[str, Any] = {
        "static": {"postprocess_small_regions": staticmethod(clean)},
        "class": {"postprocess_small_regions": classmethod(lambda cls, *args: clean(*args))},
        "instance": {"postprocess_small_regions": lambda self, *args: clean(*args)},
    }[kind]
    return (type("Ours", (SamAutomaticMaskGenerator,), dict(body)),
            type("Ref", (ref_sa.SamAutomaticMaskGenerator,), dict(body)), calls)


def _assert_same_anns(ours: list[dict[str, Any]], ref: list[dict[str, Any]]) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert list(a) == list(b)
        for key, want in b.items():
            got = a[key]
            if isinstance(want, np.ndarray):
                assert got.dtype == want.dtype and np.array_equal(got, want), key
            else:
                assert type(got) is type(want) and got == want, key


def test_generate_calls_a_subclass_postprocess_small_regions(tiny_sam: Sam) -> None:
    """As the reference's generate does: the subclass's method gets the reference's bag, the minimum area and
    the larger NMS threshold, and what it returns becomes the output; with the clean-up off it is not called."""
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    for kind, mode in [("static", "binary_mask"), ("class", "uncompressed_rle"), ("instance", "coco_rle")]:
        kwargs = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.5,
                      crop_nms_thresh=0.6, output_mode=mode)
        ours_cls, ref_cls, calls = _recording_generators(kind)
        ref = ref_cls(tiny_sam, min_mask_region_area=MIN_AREA, **kwargs).generate(image)
        ours = ours_cls(tiny_sam, min_mask_region_area=MIN_AREA, **kwargs).generate(image)
        assert len(calls) == 2 and len(ref) == 2, kind
        (ref_bag, *ref_args), (our_bag, *our_args) = calls
        assert our_args == ref_args == [MIN_AREA, 0.6]
        assert type(our_bag) is our_amg.MaskData and len(ref_bag["rles"]) > 2
        assert [k for k, _ in our_bag.items()] == [k for k, _ in ref_bag.items()]
        _assert_same_bag(our_bag, ref_bag)
        _assert_same_anns(ours, ref)
        assert ours[0]["bbox"] == [5, 3, 14, 5] and ours[0]["area"] == 6 * 15, kind
    calls.clear()
    ours_cls(tiny_sam, min_mask_region_area=0, **kwargs).generate(image)
    ref_cls(tiny_sam, min_mask_region_area=0, **kwargs).generate(image)
    assert calls == []


# --------------------------------------------------------------------------------- 2. sam_model_registry
def test_sam_model_registry_is_a_dict() -> None:
    reg, ref = segany.sam_model_registry, ref_sa.sam_model_registry
    assert isinstance(reg, dict) and isinstance(ref, dict)
    names = list(reg)
    assert names[:len(ref)] == list(ref) == ["default", "vit_h", "vit_l", "vit_b"]
    assert set(names) == {"default", *list_models()}
    assert json.loads(json.dumps(list(reg))) == names
    plain = dict(reg)
    assert type(plain) is dict and list(plain) == names and plain == reg and reg == plain
    assert list({**reg}) == names and [k for k, _ in reg.items()] == names == list(reg.keys())
    assert len(reg) == len(names) == len(list(reg.values())) and list(reversed(reg)) == names[::-1]
    assert "vit_b" in reg and "vit_bx" not in reg and reg.get("vit_bx") is None
    # One builder per name, as the reference's module functions: "default" is ViT-H's.
    assert reg["vit_b"] is build_sam_vit_b and reg["default"] is reg["vit_h"] is build_sam_vit_h
    assert (ref["default"] is ref["vit_h"]) and ref["vit_b"] is ref_sa.build_sam_vit_b
    assert type(copy.copy(reg)) is dict and type(reg.copy()) is dict and copy.deepcopy(reg) == plain
    assert type(reg | {}) is dict and list({} | reg) == names


def test_sam_model_registry_keeps_segany_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = segany.sam_model_registry

    def mine(checkpoint: Any = None) -> Sam:
        raise NotImplementedError

    try:
        reg["vit_b"] = mine  # a user builder takes priority, in the registered name's place
        reg.update(mine2=mine)
        assert reg["vit_b"] is mine and dict(reg)["vit_b"] is mine and list(reg)[3] == "vit_b"
        assert list(reg)[-1] == "mine2" and reg.setdefault("mine2", build_sam_vit_h) is mine
        # A variant registered later shows up, before the user's own names.
        info = get_model_info("vit_b")
        monkeypatch.setitem(segany.registry._MODELS, "zz_later", ModelInfo(
            "zz_later", info.build_config, None, "test"))
        assert list(reg)[-2:] == ["zz_later", "mine2"] and "zz_later" in dict(reg)
        monkeypatch.undo()
        assert "zz_later" not in reg and "zz_later" not in list(reg)
        del reg["vit_b"]
        assert reg["vit_b"] is build_sam_vit_b and list(reg)[3] == "vit_b"
        with pytest.raises(UnknownModelError, match="registered models cannot be removed"):
            del reg["vit_l"]
        with pytest.raises(UnknownModelError, match="registered models cannot be removed"):
            reg.pop("vit_l")
        with pytest.raises(KeyError, match="did you mean vit_b"):
            reg["vit_bx"]
        assert reg.pop("nope", 5) == 5 and reg.pop("mine2") is mine and "mine2" not in reg
        reg["mine3"] = mine
        assert reg.popitem() == ("mine3", mine)
        with pytest.raises(ValueError, match="must be a builder function"):
            reg["bad"] = 3  # type: ignore[assignment]
    finally:
        reg.clear()
    assert list(reg) == ["default", "vit_h", "vit_l", "vit_b", *[m for m in list_models() if m not in
                                                                 ("vit_h", "vit_l", "vit_b")]]


def user_builder(checkpoint: Any = None) -> Sam:
    """A module-level user builder, so that it pickles by name."""
    raise NotImplementedError


def test_sam_model_registry_pickles_and_deep_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickled registry loads as a registry with the same entries, order and builders (the registered ones
    are this process's own, so they build the same models), the user's builders still the user's."""
    reg = segany.sam_model_registry
    monkeypatch.setitem(segany.registry._MODELS, "zz_tiny", ModelInfo("zz_tiny", tiny_config, None, "test"))
    try:
        reg.update([("vit_l", user_builder)], mine=user_builder)
        assert reg.setdefault("mine", build_sam_vit_h) is user_builder
        names = list(reg)
        for loaded in (pickle.loads(pickle.dumps(reg)), pickle.loads(pickle.dumps(reg, protocol=0))):
            assert type(loaded) is type(reg) and loaded is not reg and list(loaded) == names and loaded == reg
            assert loaded["vit_b"] is build_sam_vit_b and loaded["default"] is loaded["vit_h"] is build_sam_vit_h
            assert loaded["vit_l"] is loaded["mine"] is user_builder and list(loaded)[2] == "vit_l"
            del loaded["vit_l"]  # still a user builder there, shadowing the registered one
            assert loaded["vit_l"].__name__ == "build_sam_vit_l" and reg["vit_l"] is user_builder
            with pytest.raises(UnknownModelError, match="registered models cannot be removed"):
                del loaded["vit_b"]
        deep = copy.deepcopy(reg)
        assert list(deep) == names and all(deep[n] is reg[n] for n in names)
        for builder in (pickle.loads(pickle.dumps(reg))["zz_tiny"], deep["zz_tiny"]):
            assert builder is reg["zz_tiny"] and builder.__name__ == "build_sam_zz_tiny"
            assert builder().cfg == tiny_config()
    finally:
        reg.clear()


# -------------------------------------------------------------------------------------------- 3. ONNX
def test_select_masks_takes_iou_preds_by_keyword(tiny_sam: Sam) -> None:
    ours, ref = SamOnnxModel(tiny_sam, True), ref_onnx.SamOnnxModel(tiny_sam, True)
    g = torch.Generator().manual_seed(0)
    masks, iou = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, 4, generator=g)
    for n in (1, 2, 3, 5):
        got = ours.select_masks(masks, iou_preds=iou, num_points=n)
        want = ref.select_masks(masks, iou_preds=iou, num_points=n)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and torch.equal(a, b), n


def _export(module: torch.nn.Module, model: Sam, path: Path) -> dict[str, list[int | str]]:
    import onnx
    g = model.cfg.embed_size
    dummy = {
        "image_embeddings": torch.randn(1, 256, g, g), "point_coords": torch.rand(1, 5, 2) * model.img_size,
        "point_labels": torch.randint(0, 4, (1, 5)).float(), "mask_input": torch.randn(1, 1, 4 * g, 4 * g),
        "has_mask_input": torch.tensor([1.0]), "orig_im_size": torch.tensor([1500.0, 2250.0]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(dummy.values()), str(path), input_names=list(dummy),
                          output_names=["masks", "iou_predictions", "low_res_masks"], opset_version=17,
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          dynamo=False)
    return {o.name: [d.dim_value if d.HasField("dim_value") else "?" for d in o.type.tensor_type.shape.dim]
            for o in onnx.load(str(path)).graph.output}


def test_exported_low_res_masks_has_the_references_dims(tiny_sam: Sam, tmp_path: Path) -> None:
    ours = _export(SamOnnxModel(tiny_sam, True), tiny_sam, tmp_path / "ours.onnx")
    ref = _export(ref_onnx.SamOnnxModel(tiny_sam, True), tiny_sam, tmp_path / "ref.onnx")
    assert ours == ref
    assert ours["low_res_masks"] == ["?", 1, "?", "?"] and ours["iou_predictions"] == ["?", 1]
