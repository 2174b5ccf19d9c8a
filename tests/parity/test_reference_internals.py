"""Code written against ``segment_anything``'s model internals runs on a segany model.

Scripts and wrappers (the reference's own ``utils.onnx.SamOnnxModel`` first) reach past the public API into
the modules: ``mask_decoder.predict_masks(sparse_prompt_embeddings=...)``, ``pe_layer._pe_encoding``,
``prompt_encoder._embed_points``, ``TwoWayTransformer.depth``, a block's ``window_size``. segany exposes those
names as thin aliases of its own; these tests call each one on a segany model and on the reference with the
same seeded weights (one state dict loaded into both) and compare the results (1e-4 in fp32 on CPU).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from conftest import tiny_config
from sam_oracle import assert_close, randomize_realistic_, require_oracle, seeded_pair

from segany.modeling.sam import Sam

pytestmark = pytest.mark.parity

ref_onnx = require_oracle("segment_anything.utils.onnx", "segment-anything==1.0")


@pytest.fixture(scope="module")
def models() -> tuple[Sam, Any]:
    return seeded_pair(tiny_config(), seed=11)


@pytest.fixture(autouse=True)
def _no_grad() -> Any:
    with torch.no_grad():
        yield


def _seeded(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------------ the reference's ONNX wrapper
@pytest.mark.parametrize(("single", "stability", "extra"), [(True, False, False), (False, False, False),
                                                            (True, True, True)])
def test_reference_onnx_wrapper_runs_on_segany(models: tuple[Sam, Any], single: bool, stability: bool,
                                               extra: bool) -> None:
    ours_model, ref_model = models
    s, g = ours_model.img_size, ours_model.cfg.embed_size
    # Points, padding and box corners (labels 2/3), three prompts, one with points off the grid of the others.
    coords = torch.tensor([[[0.5 * s, 0.4 * s], [0.1 * s, 0.2 * s], [0.0, 0.0]],
                           [[0.2 * s, 0.1 * s], [0.8 * s, 0.6 * s], [0.5 * s, 0.5 * s]],
                           [[0.3 * s, 0.7 * s], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[1.0, 0.0, -1.0], [2.0, 3.0, 1.0], [1.0, -1.0, -1.0]])
    emb = _seeded(1, 256, g, g, seed=1)
    with_mask = dict(mask_input=_seeded(1, 1, 4 * g, 4 * g, seed=2, scale=4.0), has_mask_input=torch.ones(1))
    no_mask = dict(mask_input=torch.zeros(1, 1, 4 * g, 4 * g), has_mask_input=torch.zeros(1))
    for mask in (no_mask, with_mask):
        inputs = dict(image_embeddings=emb, point_coords=coords, point_labels=labels, **mask,
                      orig_im_size=torch.tensor([150.0, 226.0]))
        got = ref_onnx.SamOnnxModel(ours_model, single, use_stability_score=stability,
                                    return_extra_metrics=extra)(**inputs)
        want = ref_onnx.SamOnnxModel(ref_model, single, use_stability_score=stability,
                                     return_extra_metrics=extra)(**inputs)
        assert len(got) == len(want)
        for i, (o, r) in enumerate(zip(got, want, strict=True)):
            assert_close(o, r, f"SamOnnxModel output {i} (mask input {bool(mask['has_mask_input'])})")
        assert float(want[0].abs().max()) > 0.1  # O(1) logits, so the comparison means something


# ------------------------------------------------------------------------------ methods with reference keywords
def test_predict_masks_takes_reference_keywords(models: tuple[Sam, Any]) -> None:
    ours, ref = models
    g = ours.cfg.embed_size
    emb = _seeded(1, 256, g, g, seed=3)
    sparse, dense = _seeded(2, 3, 256, seed=4), _seeded(2, 256, g, g, seed=5)
    pe = ours.prompt_encoder.get_dense_pe()
    by_ref_names = ours.mask_decoder.predict_masks(image_embeddings=emb, image_pe=pe,
                                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
    by_our_names = ours.mask_decoder.predict_masks(emb, pe, sparse=sparse, dense=dense)
    want = ref.mask_decoder.predict_masks(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                          dense_prompt_embeddings=dense)
    assert len(by_ref_names) == len(want) == 2
    for a, b, r, what in zip(by_ref_names, by_our_names, want, ("masks", "iou"), strict=True):
        assert torch.equal(a, b), what
        assert_close(a, r, f"predict_masks {what}")
    with pytest.raises(TypeError, match="sparse_prompt_embeddings"):
        ours.mask_decoder.predict_masks(emb, pe, sparse=sparse, sparse_prompt_embeddings=sparse, dense=dense)


def test_positional_encoding_reference_methods(models: tuple[Sam, Any]) -> None:
    ours, ref = models
    pe_o, pe_r = ours.prompt_encoder.pe_layer, ref.prompt_encoder.pe_layer
    coords01 = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(6))
    assert_close(pe_o._pe_encoding(coords01), pe_r._pe_encoding(coords01), "_pe_encoding")
    pixels = coords01 * torch.tensor([256.0, 192.0])
    want = pe_r.forward_with_coords(coords_input=pixels, image_size=(192, 256))
    assert_close(pe_o.forward_with_coords(coords_input=pixels, image_size=(192, 256)), want, "forward_with_coords")
    assert torch.equal(pe_o.forward_with_coords(coords_input=pixels, image_size=(192, 256)),
                       pe_o.forward_with_coords(pixels, (192, 256)))
    assert_close(pe_o(size=(5, 7)), pe_r(size=(5, 7)), "pe_layer(size=)")  # not square: H and W not swapped
    assert torch.equal(pe_o(size=(5, 7)), pe_o((5, 7)))


def test_prompt_encoder_reference_methods(models: tuple[Sam, Any]) -> None:
    ours, ref = models
    po, pr = ours.prompt_encoder, ref.prompt_encoder
    g = ours.cfg.embed_size
    masks = _seeded(3, 1, 4 * g, 4 * g, seed=7, scale=4.0)
    assert_close(po._embed_masks(masks), pr._embed_masks(masks), "_embed_masks")

    coords = torch.rand(3, 4, 2, generator=torch.Generator().manual_seed(8)) * ours.img_size
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1], [1, -1, -1, -1]])
    for pad in (True, False):
        want = pr._embed_points(points=coords, labels=labels, pad=pad)
        assert_close(po._embed_points(points=coords, labels=labels, pad=pad), want, f"_embed_points pad={pad}")
        assert_close(po._embed_points(coords, labels, pad), want, f"_embed_points positional pad={pad}")
    # The reference's method leaves box-corner labels (2/3) to their positional encoding; corners=False does too.
    corner_labels = torch.tensor([[2, 3, 1, 0]]).expand(3, -1)
    assert_close(po._embed_points(coords, corner_labels, False, corners=False),
                 pr._embed_points(coords, corner_labels, False), "_embed_points corners=False")

    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [0.0, 0.0, 255.0, 255.0]])
    assert_close(po._embed_boxes(boxes=boxes), pr._embed_boxes(boxes=boxes), "_embed_boxes")

    points = (coords, labels)
    for args in [(points, boxes[:1].expand(3, -1), masks), (None, boxes, masks), (None, None, masks),
                 (None, None, None)]:
        assert po._get_batch_size(*args) == pr._get_batch_size(*args)
    assert po._get_device() == pr._get_device()


# ------------------------------------------------------------------------------ attributes and method names
def _plain_attributes(module: torch.nn.Module) -> dict[str, Any]:
    """The reference module's own settings: public non-tensor values its ``__init__`` stored."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple))}


def test_every_reference_module_attribute_and_method_exists(models: tuple[Sam, Any]) -> None:
    """Walk the reference's module tree: each module is in segany's under the same name, with the same
    settings (``depth``, ``mlp_dim``, ``window_size``, ``scale``, ``num_layers``, ...) and the same methods."""
    ours, ref = models
    checked: set[str] = set()
    for name, ref_mod in ref.named_modules():
        our_mod = ours.get_submodule(name)
        for attr, value in _plain_attributes(ref_mod).items():
            assert hasattr(our_mod, attr), f"{name or 'model'}.{attr} is missing ({type(ref_mod).__name__})"
            assert getattr(our_mod, attr) == value, f"{name or 'model'}.{attr}: {getattr(our_mod, attr)!r} vs {value!r}"
            checked.add(attr)
        for meth, fn in vars(type(ref_mod)).items():
            if inspect.isfunction(fn) and not meth.startswith("__"):
                assert callable(getattr(our_mod, meth, None)), f"{name or 'model'}.{meth}() is missing"
                checked.add(meth)
    # The walk really covered what the audit found missing.
    assert {"depth", "embedding_dim", "mlp_dim", "num_heads", "window_size", "scale", "num_layers",
            "num_point_embeddings", "mask_input_size", "image_embedding_size", "input_image_size", "num_mask_tokens",
            "_embed_masks", "_get_batch_size", "_embed_points", "_embed_boxes", "_pe_encoding", "predict_masks",
            "_separate_heads", "_recombine_heads"} <= checked
    # Spot checks with the values of the tiny config, so a wrong walk cannot pass vacuously.
    enc, t = ours.image_encoder, ours.mask_decoder.transformer
    assert [b.window_size for b in enc.blocks] == [8, 0]
    assert enc.blocks[0].attn.scale == pytest.approx(32**-0.5) == ref.image_encoder.blocks[0].attn.scale
    assert (t.depth, t.embedding_dim, t.mlp_dim, t.num_heads) == (2, 256, 2048, 8)
    assert ours.mask_decoder.iou_prediction_head.num_layers == ref.mask_decoder.iou_prediction_head.num_layers == 3


def test_attention_head_helpers(models: tuple[Sam, Any]) -> None:
    ours, ref = models
    a_o = ours.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    a_r = ref.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    x = _seeded(2, 5, 128, seed=9)
    heads = a_o._separate_heads(x, 8)
    assert torch.equal(heads, a_r._separate_heads(x, 8))
    assert torch.equal(a_o._recombine_heads(heads), a_r._recombine_heads(heads))
    assert torch.equal(a_o._recombine_heads(heads), x)


def test_constructors_take_reference_activation() -> None:
    """``activation=`` of the reference's PromptEncoder and TwoWayTransformer; the state dict is unchanged."""
    sa = require_oracle("segment_anything.modeling", "segment-anything==1.0")
    from segany.modeling import PromptEncoder, TwoWayTransformer

    kw = dict(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=8,
              activation=torch.nn.ReLU)
    ref_pe, our_pe = sa.PromptEncoder(**kw), PromptEncoder(**kw)
    our_pe.load_state_dict(randomize_realistic_(ref_pe, seed=10).state_dict(), strict=True)
    masks = _seeded(2, 1, 16, 16, seed=12, scale=4.0)
    assert_close(our_pe(None, None, masks)[1], ref_pe(None, None, masks)[1], "dense with ReLU")

    kw = dict(depth=1, embedding_dim=32, num_heads=2, mlp_dim=64, activation=torch.nn.GELU)
    ref_t, our_t = sa.TwoWayTransformer(**kw), TwoWayTransformer(**kw)
    our_t.load_state_dict(randomize_realistic_(ref_t, seed=13).state_dict(), strict=True)
    args = (_seeded(1, 32, 4, 4, seed=14), _seeded(1, 32, 4, 4, seed=15), _seeded(1, 3, 32, seed=16))
    for o, r in zip(our_t(*args), ref_t(*args), strict=True):
        assert_close(o, r, "two-way transformer with GELU")
