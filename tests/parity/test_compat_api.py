"""The ``segment_anything`` import paths and names under ``segany``, checked against the reference package.

Every helper of ``segany.utils.amg`` must give the reference's output on the same inputs (exactly:
they are integer/boolean computations or the same float ops), and the drop-in module paths must import
in any order without turning ``segany.build_sam`` from the function into the module.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sam_oracle import require_oracle

pytestmark = pytest.mark.parity

ref_amg = require_oracle("segment_anything.utils.amg", "segment-anything==1.0")

from segany.utils import amg  # noqa: E402


def assert_same(ours: Any, ref: Any, where: str = "output") -> None:
    """Recursive equality of tensors (values and dtype), arrays, lists, tuples and dicts."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{where}: {type(ours).__name__} is not a tensor"
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{where}: {ours.dtype}{tuple(ours.shape)} vs " \
            f"{ref.dtype}{tuple(ref.shape)}"
        assert torch.equal(ours, ref) or bool(torch.isnan(ref).any()) and torch.allclose(ours, ref, equal_nan=True), \
            f"{where}: values differ"
    elif isinstance(ref, np.ndarray):
        assert isinstance(ours, np.ndarray), f"{where}: {type(ours).__name__} is not an array"
        assert ours.shape == ref.shape and ours.dtype == ref.dtype, f"{where}: {ours.dtype}{ours.shape} vs " \
            f"{ref.dtype}{ref.shape}"
        assert np.array_equal(ours, ref), f"{where}: values differ"
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref), f"{where}: {ours!r} vs {ref!r}"
        for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
            assert_same(o, r, f"{where}[{i}]")
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and ours.keys() == ref.keys(), f"{where}: keys {ours!r} vs {ref!r}"
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
    else:
        assert ours == ref and type(ours) is type(ref), f"{where}: {ours!r} vs {ref!r}"


def _masks() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    m = torch.rand(5, 17, 23, generator=g) > 0.6
    m[1] = False  # empty
    m[2] = True  # full
    m[3, 0, 0] = True  # starts with foreground
    m[4] = False
    m[4, 3:9, 5:12] = True  # one blob
    return m


def test_every_reference_helper_has_a_name() -> None:
    for name in ["MaskData", "area_from_rle", "batch_iterator", "batched_mask_to_box", "box_xyxy_to_xywh",
                 "build_all_layer_point_grids", "build_point_grid", "calculate_stability_score", "coco_encode_rle",
                 "generate_crop_boxes", "is_box_near_crop_edge", "mask_to_rle_pytorch", "remove_small_regions",
                 "rle_to_mask", "uncrop_boxes_xyxy", "uncrop_masks", "uncrop_points"]:
        assert hasattr(ref_amg, name), name
        assert callable(getattr(amg, name)), name


@pytest.mark.parametrize("n", [1, 4, 32])
def test_point_grids(n: int) -> None:
    assert_same(amg.build_point_grid(n), ref_amg.build_point_grid(n))
    layers = 2 if n >= 4 else 0  # a layer grid of 0 points per side divides by zero in both
    assert_same(amg.build_all_layer_point_grids(n, layers, 2), ref_amg.build_all_layer_point_grids(n, layers, 2))


@pytest.mark.parametrize("size", [(425, 640), (640, 425), (33, 33)])
@pytest.mark.parametrize("n_layers", [0, 1, 2])
def test_crop_boxes(size: tuple[int, int], n_layers: int) -> None:
    assert_same(amg.generate_crop_boxes(size, n_layers, 512 / 1500), ref_amg.generate_crop_boxes(size, n_layers,
                                                                                                  512 / 1500))


def test_rle_round_trip() -> None:
    masks = _masks()
    ours, ref = amg.mask_to_rle_pytorch(masks), ref_amg.mask_to_rle_pytorch(masks)
    assert_same(ours, ref, "mask_to_rle_pytorch")
    for i, rle in enumerate(ref):
        assert_same(amg.rle_to_mask(rle), ref_amg.rle_to_mask(rle), f"rle_to_mask[{i}]")
        assert_same(amg.area_from_rle(rle), ref_amg.area_from_rle(rle), f"area_from_rle[{i}]")
        assert_same(amg.coco_encode_rle(rle), ref_amg.coco_encode_rle(rle), f"coco_encode_rle[{i}]")


@pytest.mark.parametrize("shape", [(5, 17, 23), (17, 23), (2, 5, 17, 23), (0, 17, 23)])
def test_batched_mask_to_box(shape: tuple[int, ...]) -> None:
    masks = _masks()
    n = int(np.prod(shape[:-2]))
    masks = torch.cat([masks, masks.flip(1)])[:n].reshape(shape)
    assert_same(amg.batched_mask_to_box(masks), ref_amg.batched_mask_to_box(masks))


def test_stability_score() -> None:
    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    logits[1, 2] = -10.0  # empty at both thresholds: NaN in both
    for thr, off in [(0.0, 1.0), (0.5, 0.25)]:
        assert_same(amg.calculate_stability_score(logits, thr, off), ref_amg.calculate_stability_score(logits, thr,
                                                                                                     off))


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [0, 3, 10, 1000])
def test_remove_small_regions(mode: str, area: float) -> None:
    pytest.importorskip("cv2", reason="segany's generator needs opencv (a core dependency)")
    mask = np.zeros((20, 24), dtype=bool)
    mask[2:15, 2:15] = True
    mask[5:7, 5:7] = False  # 4-px hole
    mask[9, 9] = False  # 1-px hole
    mask[17:19, 20:23] = True  # 6-px island
    mask[0, 23] = True  # 1-px island
    ours, ref = amg.remove_small_regions(mask, area, mode), ref_amg.remove_small_regions(mask, area, mode)
    assert_same(ours, ref)


def test_remove_small_regions_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'holes' or 'islands'"):
        amg.remove_small_regions(np.zeros((4, 4), bool), 3, "blobs")


def test_boxes_points_and_crops() -> None:
    g = torch.Generator().manual_seed(2)
    boxes = torch.randint(0, 100, (6, 4), generator=g).float()
    boxes[:, 2:] += boxes[:, :2]
    crop, orig = [50, 40, 150, 120], [0, 0, 200, 160]
    for atol in (20.0, 5.0):
        assert_same(amg.is_box_near_crop_edge(boxes, crop, orig, atol), ref_amg.is_box_near_crop_edge(boxes, crop,
                                                                                                    orig, atol))
    assert_same(amg.box_xyxy_to_xywh(boxes[0]), ref_amg.box_xyxy_to_xywh(boxes[0]))
    for b in (boxes, boxes[None], boxes.long()):
        assert_same(amg.uncrop_boxes_xyxy(b, crop), ref_amg.uncrop_boxes_xyxy(b, crop))
        assert_same(amg.uncrop_points(b[..., :2], crop), ref_amg.uncrop_points(b[..., :2], crop))
    masks = _masks()
    for crop_box in ([0, 0, 23, 17], [3, 4, 23, 17], [2, 1, 15, 9]):
        assert_same(amg.uncrop_masks(masks, crop_box, 20, 30), ref_amg.uncrop_masks(masks, crop_box, 20, 30))


def test_mask_data() -> None:
    def make(mod: Any) -> Any:
        return mod.MaskData(t=torch.arange(6.0), a=np.arange(6) * 2, names=list("abcdef"))

    ours, ref = make(amg), make(ref_amg)
    for keep in (torch.tensor([True, False, True, True, False, True]), torch.tensor([3, 0, 2])):
        o, r = make(amg), make(ref_amg)
        o.filter(keep)
        r.filter(keep)
        assert_same(dict(o.items()), dict(r.items()), f"filter({keep.tolist()})")
    ours.cat(make(amg))
    ref.cat(make(ref_amg))
    ours["extra"] = torch.ones(12)
    ref["extra"] = torch.ones(12)
    del ours["names"], ref["names"]
    ours.to_numpy()
    ref.to_numpy()
    assert_same(dict(ours.items()), dict(ref.items()), "cat + to_numpy")
    with pytest.raises(TypeError, match="list, numpy array or torch tensor"):
        amg.MaskData(x=3)


def test_batch_iterator() -> None:
    a, b = list(range(10)), np.arange(10)
    ours, ref = list(amg.batch_iterator(4, a, b)), list(ref_amg.batch_iterator(4, a, b))
    assert len(ours) == len(ref) == 3
    for o, r in zip(ours, ref, strict=True):
        assert_same(o[0], r[0])
        assert_same(o[1], r[1])
    with pytest.raises(ValueError, match="one length"):
        list(amg.batch_iterator(2, [1, 2], [1]))


def test_module_paths() -> None:
    import segany.automatic_mask_generator
    import segany.modeling
    import segany.predictor
    import segany.utils.transforms
    from segany.amg.generator import SamAutomaticMaskGenerator
    from segany.modeling.image_encoder import ImageEncoderViT
    from segany.transforms import ResizeLongestSide

    assert segany.utils.transforms.ResizeLongestSide is ResizeLongestSide
    assert segany.automatic_mask_generator.SamAutomaticMaskGenerator is SamAutomaticMaskGenerator
    assert segany.predictor.SamPredictor is segany.SamPredictor
    assert segany.modeling.ImageEncoderViT is ImageEncoderViT
    for name in ("Sam", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "TwoWayTransformer"):
        assert isinstance(getattr(segany.modeling, name), type), name


_IMPORT_ORDERS = {
    "function_first": """
        from segany import build_sam
        from segany.build_sam import sam_model_registry, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l
        from segany import build_sam as again
        import segany
        assert build_sam is again is segany.build_sam
    """,
    "module_first": """
        from segany.build_sam import sam_model_registry, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l
        import segany.build_sam
        from segany import build_sam
        import segany
        assert build_sam is segany.build_sam
        assert sys.modules["segany.build_sam"].sam_model_registry is sam_model_registry
    """,
}


@pytest.mark.parametrize("order", sorted(_IMPORT_ORDERS))
def test_build_sam_name_clash(order: str) -> None:
    """``segany.build_sam`` is the function and ``segany.build_sam.*`` the module's names, in either order."""
    code = "import sys, types\n" + textwrap.dedent(_IMPORT_ORDERS[order]) + textwrap.dedent("""
        from segany.checkpoints import build_sam as the_function
        assert build_sam is the_function, build_sam
        assert isinstance(sys.modules["segany.build_sam"], types.ModuleType)
        from segany.build_sam import build_sam as inner
        assert inner is the_function
        assert callable(sam_model_registry["vit_b"])
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------- attribute gaps
@pytest.mark.parametrize(("h", "w", "side"), [(425, 640, 1024), (640, 425, 1024), (1, 1000, 1024), (333, 333, 256),
                                              (1500, 2250, 1024), (7, 3, 5)])
def test_get_preprocess_shape(h: int, w: int, side: int) -> None:
    ref_t = require_oracle("segment_anything.utils.transforms", "segment-anything==1.0")
    from segany.utils.transforms import ResizeLongestSide

    ours = ResizeLongestSide.get_preprocess_shape(h, w, side)
    assert ours == ref_t.ResizeLongestSide.get_preprocess_shape(h, w, side)
    assert ResizeLongestSide(side).get_preprocess_shape(h, w, side) == ours  # on an instance too


def test_apply_image_takes_what_the_reference_takes() -> None:
    """Float images in [0, 1] and one-channel images resize as the reference's transform resizes them, and
    ``to_rgb_uint8`` (what ``set_image`` converts with) gives a float image the reference's pixels."""
    ref_t = require_oracle("segment_anything.utils.transforms", "segment-anything==1.0")
    from segany.data.images import to_rgb_uint8
    from segany.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(0)
    images = {"float32 rgb": rng.random((50, 75, 3), dtype=np.float32), "float64 rgb": rng.random((40, 30, 3)),
              "uint8 (H, W, 1)": rng.integers(0, 256, (50, 75, 1), dtype=np.uint8),
              "uint8 (H, W)": rng.integers(0, 256, (50, 75), dtype=np.uint8)}
    for what, image in images.items():
        ours, ref = ResizeLongestSide(64).apply_image(image), ref_t.ResizeLongestSide(64).apply_image(image)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
        np.testing.assert_array_equal(ours, ref, err_msg=what)
    rgb = images["float32 rgb"]
    np.testing.assert_array_equal(ResizeLongestSide(75).apply_image(to_rgb_uint8(rgb)),
                                  ref_t.ResizeLongestSide(75).apply_image(rgb))


def test_thin_image_is_refused_with_the_reason() -> None:
    from segany.errors import InputError
    from segany.utils.transforms import ResizeLongestSide

    with pytest.raises(InputError, match="1x600 image is too thin.*short side rounds to 0 px"):
        ResizeLongestSide(256).apply_image(np.zeros((1, 600, 3), np.uint8))
    assert ResizeLongestSide(256).apply_image(np.zeros((2, 600, 3), np.uint8)).shape == (1, 256, 3)


def test_modeling_helpers_under_the_reference_names() -> None:
    """``modeling.common`` and the image encoder's module-level helpers, by the reference's names and keywords."""
    require_oracle("segment_anything.modeling.common", "segment-anything==1.0")
    ref_e = require_oracle("segment_anything.modeling.image_encoder", "segment-anything==1.0")
    import segany.modeling.common as ours_c
    import segany.modeling.image_encoder as ours_e
    from segany.modeling.layers import LayerNorm2d, MLPBlock

    assert ours_c.LayerNorm2d is LayerNorm2d and ours_c.MLPBlock is MLPBlock
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 13, 8, generator=g)
    windows, pad = ours_e.window_partition(x, window_size=4)
    ref_windows, ref_pad = ref_e.window_partition(x, window_size=4)
    assert pad == ref_pad and torch.equal(windows, ref_windows)
    assert torch.equal(ours_e.window_unpartition(windows, window_size=4, pad_hw=pad, hw=(10, 13)),
                       ref_e.window_unpartition(ref_windows, window_size=4, pad_hw=ref_pad, hw=(10, 13)))
    table = torch.randn(9, 8, generator=g)  # trained for 5 positions, resampled for other sizes
    for q, k in ((5, 5), (3, 7), (7, 3)):
        assert torch.equal(ours_e.get_rel_pos(q, k, table), ref_e.get_rel_pos(q, k, table)), (q, k)
    q_size, k_size = (3, 4), (6, 2)
    attn = torch.randn(2, 12, 12, generator=g)
    q = torch.randn(2, 12, 8, generator=g)
    rel_h, rel_w = torch.randn(11, 8, generator=g), torch.randn(7, 8, generator=g)
    expected = ref_e.add_decomposed_rel_pos(attn.clone(), q, rel_h, rel_w, q_size, k_size)
    torch.testing.assert_close(ours_e.add_decomposed_rel_pos(attn, q, rel_h, rel_w, q_size, k_size), expected,
                               rtol=1e-5, atol=1e-5)


def test_num_point_embeddings() -> None:
    from conftest import tiny_config
    from sam_oracle import reference_sam

    from segany.modeling.sam import Sam

    ours, ref = Sam(tiny_config()).prompt_encoder, reference_sam(tiny_config()).prompt_encoder
    assert ours.num_point_embeddings == ref.num_point_embeddings == 4 == len(ours.point_embeddings)


def test_predictor_size_attributes() -> None:
    from conftest import randomize_, tiny_config
    from sam_oracle import reference_predictor, reference_sam

    from segany.errors import StateError
    from segany.modeling.sam import Sam
    from segany.predictor import SamPredictor

    ref_model = randomize_(reference_sam(tiny_config())).eval()
    ours_model = Sam(tiny_config()).eval()
    ours_model.load_state_dict(ref_model.state_dict())
    ours, ref = SamPredictor(ours_model), reference_predictor(ref_model)
    names = ("orig_h", "orig_w", "input_h", "input_w")
    assert [getattr(ours, n) for n in names] == [getattr(ref, n) for n in names] == [None] * 4
    image = np.random.default_rng(0).integers(0, 256, (61, 90, 3), dtype=np.uint8)
    ours.set_image(image)
    ref.set_image(image)
    # The reference only ever resets these (they stay None); segany fills them in, from original_size/input_size.
    assert [getattr(ref, n) for n in names] == [None] * 4
    assert [getattr(ours, n) for n in names] == [*ref.original_size, *ref.input_size] == [61, 90, 174, 256]
    # The reference's reset_image assigns None to them: code written for it (a subclass's reset_image) must run
    # (it raised AttributeError); a number sets that side of the size viewed.
    for n in names:
        setattr(ours, n, None)
    assert ours.original_size == (61, 90) and ours.input_size == (174, 256)
    ours.orig_h = 60
    assert ours.original_size == (60, 90)
    ours.reset_image()
    assert [getattr(ours, n) for n in names] == [None] * 4
    ours.orig_w = None
    with pytest.raises(StateError, match="before set_image"):
        ours.input_w = 5


# ----------------------------------------------------------------- user builders in sam_model_registry
def test_registry_accepts_user_builders() -> None:
    from segany import sam_model_registry as top_level
    from segany.build_sam import sam_model_registry
    from segany.errors import InputError, UnknownModelError

    assert top_level is sam_model_registry
    before = set(sam_model_registry)
    n_before = len(sam_model_registry)

    def mine(checkpoint: str | None = None) -> str:
        return f"mine({checkpoint})"

    def my_vit_b(checkpoint: str | None = None) -> str:
        return "override"

    try:
        sam_model_registry["mine"] = mine
        sam_model_registry.update({"vit_b": my_vit_b, "other": mine})
        assert sam_model_registry["mine"] is mine and sam_model_registry["mine"]("x.pth") == "mine(x.pth)"
        assert sam_model_registry["vit_b"] is my_vit_b  # a user builder takes priority over a registered name
        assert sam_model_registry["vit_l"].__name__ == "build_sam_vit_l"  # registered names still read live
        assert "mine" in sam_model_registry and "other" in sam_model_registry
        assert set(sam_model_registry) == before | {"mine", "other"}
        assert len(sam_model_registry) == n_before + 2
        with pytest.raises(InputError, match="builder function"):
            sam_model_registry["bad"] = "not callable"  # type: ignore[assignment]
        with pytest.raises(UnknownModelError, match="cannot be removed"):
            del sam_model_registry["vit_h"]
        del sam_model_registry["vit_b"]
        assert sam_model_registry["vit_b"].__name__ == "build_sam_vit_b"  # the registered one again
    finally:
        sam_model_registry.clear()
    assert set(sam_model_registry) == before and len(sam_model_registry) == n_before
    with pytest.raises(KeyError):
        sam_model_registry["mine"]


def test_build_sam_with_a_checkpoint_path_first(tmp_path: Path) -> None:
    """``build_sam("weights.pth")``, as code written for the reference calls it: the file is loaded, its
    variant read from it."""
    from conftest import randomize_, tiny_config

    from segany import build_sam
    from segany.checkpoints import save_checkpoint
    from segany.modeling.sam import Sam

    model = randomize_(Sam(tiny_config()), seed=3)
    path = save_checkpoint(model, tmp_path / "mine.pth")
    loaded = build_sam(str(path))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------- audit 4 (drop-in API)
def test_bare_import_reaches_the_reference_submodules() -> None:
    """After a bare ``import segment_anything``, ``.utils.transforms``, ``.modeling`` and the rest are there;
    ``segany.utils`` raised AttributeError."""
    code = textwrap.dedent("""
        import segany
        assert segany.utils.transforms.ResizeLongestSide is segany.ResizeLongestSide
        assert segany.utils.amg.build_all_layer_point_grids and segany.utils.onnx.SamOnnxModel
        assert segany.modeling.Sam is segany.Sam and segany.predictor.SamPredictor is segany.SamPredictor
        assert segany.automatic_mask_generator.SamAutomaticMaskGenerator is segany.SamAutomaticMaskGenerator
        assert callable(segany.build_sam)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_float_image_a_little_above_one_is_still_read_as_0_to_1() -> None:
    """A 0-1 image with one pixel at 1.0001 (a bicubic resize's overshoot) was read as 0-255: almost black.
    The reference clips the overshooting pixels only."""
    from segany.data.images import to_rgb_uint8

    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    f = im.astype(np.float32) / 255
    f[0, 0, 0] = 1.0001
    f[1, 1, 1] = -0.001
    got = to_rgb_uint8(f)
    want = np.clip(f.astype(np.float64) * 255, 0, 255).astype(np.uint8)  # the reference's to_pil_image reading
    assert np.array_equal(got, want) and abs(int(got.astype(int).sum()) - int(im.astype(int).sum())) < im.size
    assert to_rgb_uint8(f * 255).mean() > 100  # a 0-255 float image is still read as 0-255


def test_set_image_follows_the_models_image_format() -> None:
    """The reference reverses the channels when ``image_format`` is not ``model.image_format``; segany looked
    only at the argument."""
    from conftest import randomize_, tiny_config
    from sam_oracle import reference_predictor, reference_sam

    from segany.modeling.sam import Sam
    from segany.predictor import SamPredictor

    ref_model = randomize_(reference_sam(tiny_config())).eval()
    ours_model = Sam(tiny_config()).eval()
    ours_model.load_state_dict(ref_model.state_dict())
    ref_model.image_format = ours_model.image_format = "BGR"
    ours, ref = SamPredictor(ours_model), reference_predictor(ref_model)
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for fmt in ("RGB", "BGR"):
        ours.set_image(image, fmt)
        ref.set_image(image, fmt)
        torch.testing.assert_close(ours.features, ref.features, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, bool])
def test_apply_image_names_a_dtype_it_cannot_take(dtype) -> None:  # type: ignore[no-untyped-def]
    """PIL's bare "Cannot handle this data type" named neither the dtype nor a fix. Still a TypeError, as the
    reference's is, so code catching that keeps working."""
    from segany.errors import InputError
    from segany.utils.transforms import ResizeLongestSide

    with pytest.raises(TypeError, match=f"got {np.dtype(dtype)}; convert it first with") as exc:
        ResizeLongestSide(64).apply_image(np.zeros((10, 12, 3), dtype))
    assert isinstance(exc.value, InputError)


def test_modules_take_the_references_positional_arguments() -> None:
    """PromptEncoder(256, (64, 64), (1024, 1024), 16) and TwoWayTransformer(2, 256, 8, 2048), as the reference's
    builders and users' own code call them, raised TypeError (keyword-only); they build the reference's layout."""
    from segment_anything.modeling import PromptEncoder as RefPromptEncoder
    from segment_anything.modeling import TwoWayTransformer as RefTwoWayTransformer

    from segany.modeling.prompt_encoder import PromptEncoder
    from segany.modeling.transformer import TwoWayTransformer

    pairs = ((PromptEncoder(256, (64, 64), (1024, 1024), 16), RefPromptEncoder(256, (64, 64), (1024, 1024), 16)),
             (TwoWayTransformer(2, 256, 8, 2048), RefTwoWayTransformer(2, 256, 8, 2048)))
    for ours, ref in pairs:
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
