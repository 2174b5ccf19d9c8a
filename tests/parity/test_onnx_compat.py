"""``segany.utils.onnx.SamOnnxModel`` against the reference's, and the ONNX export notebook's code path.

A tiny reference model gets seeded trained-scale weights, which load strictly into segany's ``Sam``; both
``SamOnnxModel``s then decode the same prompt sets with every option. Tolerance 1e-4 in fp32 on CPU.
The export test follows SAM's notebook: ``torch.onnx.export`` with a dynamic point axis, then ONNX
Runtime with the six named inputs, compared with torch within 1e-3.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_config
from sam_oracle import assert_close, require_oracle, seeded_pair

from segany.modeling.sam import Sam
from segany.utils.onnx import SamOnnxModel

pytestmark = pytest.mark.parity

ref_onnx = require_oracle("segment_anything.utils.onnx", "segment-anything==1.0")

ORIG_HW = (150, 226)  # not square, so unpadding matters; small, so the test stays fast


@pytest.fixture(scope="module")
def models() -> tuple[Sam, Any]:
    return seeded_pair(tiny_config(), seed=5)


def _prompts(model: Sam) -> dict[str, dict[str, torch.Tensor]]:
    """Prompt sets in the resized model frame (256 px for the tiny config), as the notebook builds them."""
    g = torch.Generator().manual_seed(7)
    s = model.img_size
    grid = model.cfg.embed_size
    emb = torch.randn(1, 256, grid, grid, generator=g)
    low_res_in = torch.randn(1, 1, 4 * grid, 4 * grid, generator=g) * 4
    no_mask = dict(mask_input=torch.zeros(1, 1, 4 * grid, 4 * grid), has_mask_input=torch.zeros(1))

    def prompt(coords: list[list[float]], labels: list[int], batch: int = 1, **mask: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        c = torch.tensor(coords, dtype=torch.float32)[None].repeat(batch, 1, 1)
        if batch > 1:
            c = c + torch.arange(batch, dtype=torch.float32).reshape(-1, 1, 1) * 17
        return dict(image_embeddings=emb, point_coords=c,
                    point_labels=torch.tensor(labels, dtype=torch.float32)[None].repeat(batch, 1),
                    **(mask or no_mask), orig_im_size=torch.tensor(ORIG_HW, dtype=torch.float32))

    h = s * ORIG_HW[0] / max(ORIG_HW)
    return {
        "point_and_padding": prompt([[0.5 * s, 0.55 * h], [0.0, 0.0]], [1, -1]),
        "box_corners": prompt([[0.2 * s, 0.15 * h], [0.8 * s, 0.9 * h]], [2, 3]),
        "two_points": prompt([[0.5 * s, 0.55 * h], [0.1 * s, 0.1 * h]], [1, 0]),
        "box_and_point": prompt([[0.5 * s, 0.5 * h], [0.2 * s, 0.15 * h], [0.8 * s, 0.9 * h]], [1, 2, 3]),
        "mask_input": prompt([[0.5 * s, 0.55 * h], [0.0, 0.0]], [1, -1], mask_input=low_res_in,
                             has_mask_input=torch.ones(1)),
        "batch_of_3": prompt([[0.3 * s, 0.4 * h], [0.0, 0.0]], [1, -1], batch=3),
    }


# Each option on and off against the notebook's (single mask, no extras), and all together.
OPTIONS = [(True, False, False), (False, False, False), (True, True, False), (False, False, True), (True, True, True),
           (False, True, True)]


@pytest.mark.parametrize(("single", "stability", "extra"), OPTIONS,
                         ids=[f"single{int(a)}-stab{int(b)}-extra{int(c)}" for a, b, c in OPTIONS])
def test_matches_reference(models: tuple[Sam, Any], single: bool, stability: bool, extra: bool) -> None:
    ours_model, ref_model = models
    ours = SamOnnxModel(ours_model, single, use_stability_score=stability, return_extra_metrics=extra)
    ref = ref_onnx.SamOnnxModel(ref_model, single, use_stability_score=stability, return_extra_metrics=extra)
    names = (["masks", "scores", "stability", "areas", "low_res"] if extra else ["masks", "scores", "low_res"])
    k = 1 if single else 4
    for what, inputs in _prompts(ours_model).items():
        out_ours, out_ref = ours(**inputs), ref(**inputs)
        assert len(out_ours) == len(out_ref) == len(names)
        b = inputs["point_coords"].shape[0]
        assert out_ours[0].shape == (b, k, *ORIG_HW)
        assert float(out_ref[-1].abs().max()) > 0.5, "logits too small for a meaningful comparison"
        for name, o, r in zip(names, out_ours, out_ref, strict=True):
            assert o.dtype == r.dtype, f"{what} {name}: dtype {o.dtype} vs {r.dtype}"
            if name == "areas":  # a pixel whose logit is within float noise of 0 may flip
                assert int((o - r).abs().max()) <= 2, f"{what} areas: {o.tolist()} vs {r.tolist()}"
            else:
                assert_close(o, r, f"{what} {name}", tol=1e-4 if name != "stability" else 1e-3)


def test_single_mask_rule(models: tuple[Sam, Any]) -> None:
    """Up to 2 points (padding and corners included) choose among the multimask outputs, 3+ the single one."""
    ours_model, _ = models
    full = SamOnnxModel(ours_model, return_single_mask=False)
    single = SamOnnxModel(ours_model, return_single_mask=True)
    for what, inputs in _prompts(ours_model).items():
        _, scores, low_all = full(**inputs)
        _, chosen_score, low_one = single(**inputs)
        n = inputs["point_coords"].shape[1]
        idx = torch.zeros(scores.shape[0], dtype=torch.int64) if n >= 3 else scores[:, 1:].argmax(1) + 1
        assert torch.equal(chosen_score[:, 0], scores[torch.arange(len(idx)), idx]), what
        assert torch.equal(low_one[:, 0], low_all[torch.arange(len(idx)), idx]), what


def test_notebook_export_runs_in_onnxruntime(models: tuple[Sam, Any], tmp_path: Path) -> None:
    """SAM's export notebook, unchanged but for the model: export, then run with the six inputs."""
    ort = require_oracle("onnxruntime", "onnxruntime")
    ours_model, _ = models
    onnx_model = SamOnnxModel(ours_model, return_single_mask=True)
    grid = ours_model.cfg.embed_size
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    dummy_inputs = {
        "image_embeddings": torch.randn(1, 256, grid, grid, dtype=torch.float),
        "point_coords": torch.randint(low=0, high=ours_model.img_size, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, 4 * grid, 4 * grid, dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    output_names = ["masks", "iou_predictions", "low_res_masks"]
    path = tmp_path / "sam_onnx_example.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings, as the notebook silences them
        torch.onnx.export(onnx_model, tuple(dummy_inputs.values()), str(path), export_params=True, verbose=False,
                          opset_version=17, do_constant_folding=True, input_names=list(dummy_inputs.keys()),
                          output_names=output_names, dynamic_axes=dynamic_axes, dynamo=False)
    ort_session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Other point counts and other image sizes than the export's dummies: both must stay dynamic. (The
    # reference's graph bakes the dummy's unpadded size in, so a portrait image differs there by O(1).)
    prompts = [(what, inputs) for what, inputs in _prompts(ours_model).items() if inputs["point_coords"].shape[0] == 1]
    portrait = [(f"{what} portrait", {**inputs, "orig_im_size": inputs["orig_im_size"].flip(0)})
                for what, inputs in prompts[:2]]
    for what, inputs in prompts + portrait:
        ort_inputs = {k: v.numpy().astype(np.float32) for k, v in inputs.items()}
        masks, scores, low_res_logits = ort_session.run(None, ort_inputs)
        ref_masks, ref_scores, ref_low = onnx_model(**inputs)
        assert masks.shape == (1, 1, *inputs["orig_im_size"].to(torch.int64).tolist())
        assert_close(masks, ref_masks, f"onnxruntime {what} masks", tol=1e-3)
        assert_close(scores, ref_scores, f"onnxruntime {what} scores", tol=1e-3)
        assert_close(low_res_logits, ref_low, f"onnxruntime {what} low_res_masks", tol=1e-3)
