"""ONNX export: graphs agree with torch (tiny config) and bad inputs give clear errors.

Tolerances: the fp32 decoder graph must match torch to 1e-4 (absolute, on logits and IoU); the
encoder graph to 1e-4 relative to the embedding range (ONNX Runtime fuses and reorders reductions
in attention and LayerNorm, so bit equality is not expected). The int8 graphs are only checked to
run and to stay within 25% of the logit range.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="pip install 'segany[onnx]'")

from segany.errors import InputError, PromptError, StateError  # noqa: E402
from segany.export.onnx import (  # noqa: E402
    DECODER_INNER,
    DECODER_INPUTS,
    OnnxPredictor,
    _with_inner_outputs,
    export_onnx,
    postprocess_masks,
)
from segany.predictor import SamPredictor  # noqa: E402

DECODER_ATOL = 1e-4
ENCODER_RTOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import randomize_, tiny_config

    from segany.modeling.sam import Sam

    model = randomize_(Sam(tiny_config())).eval()
    out = tmp_path_factory.mktemp("onnx")
    paths = export_onnx(model, out, quantize_int8=True, model_name="tiny")
    return model, out, paths


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.RandomState(0).rand(200, 300, 3) * 255).astype(np.uint8)


def test_files_and_metadata(exported):
    _, out, paths = exported
    for key in ("encoder", "decoder", "encoder_int8", "decoder_int8", "meta"):
        assert paths[key].exists() and paths[key].parent == out
    meta = json.loads((out / "segany_onnx.json").read_text())
    assert meta["format"] == "segany-onnx-v1" and meta["config"]["encoder"]["img_size"] == 256
    assert not list(out.glob("*.tmp")), "no temp files left behind"


def test_export_leaves_the_model_in_eval_mode(exported):
    """torch.onnx.export restores the exported module's mode; a wrapper built in train mode used to switch the
    caller's model to training, so BatchNorm encoders (segany_tiny) gave other masks afterwards."""
    model, _, _ = exported
    assert [name for name, m in model.named_modules() if m.training] == []


def test_decoder_contract(exported):
    import onnxruntime as ort

    _, out, _ = exported
    sess = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert tuple(i.name for i in sess.get_inputs()) == DECODER_INPUTS
    # Exactly SAM's three: its ONNX example unpacks `masks, scores, low_res = run(None, ...)` (it had five)
    assert [o.name for o in sess.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]


def test_predictor_parity(exported, image):
    model, out, _ = exported
    ref, onnx = SamPredictor(model), OnnxPredictor(out)
    ref.set_image(image)
    onnx.set_image(image)
    emb_ref = ref.features.numpy()
    assert np.abs(emb_ref - onnx.get_image_embedding()).max() <= ENCODER_RTOL * np.abs(emb_ref).max()
    onnx.features = emb_ref  # judge the decoder on identical embeddings
    prompts = [
        dict(point_coords=np.array([[120, 80]]), point_labels=np.array([1])),
        dict(point_coords=np.array([[120, 80], [30, 40]]), point_labels=np.array([1, 0]), multimask_output=False),
        dict(box=np.array([20, 30, 200, 150]), multimask_output=False),
        dict(box=np.array([20, 30, 200, 150]), point_coords=np.array([[120, 80]]), point_labels=np.array([1])),
    ]
    for kwargs in prompts:
        a = ref.predict(**kwargs, return_logits=True)
        b = onnx.predict(**kwargs, return_logits=True)
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, atol=DECODER_ATOL, rtol=0)
        with_mask = dict(kwargs, mask_input=a[2][:1])
        a2, b2 = ref.predict(**with_mask, return_logits=True), onnx.predict(**with_mask, return_logits=True)
        np.testing.assert_allclose(a2[0], b2[0], atol=DECODER_ATOL, rtol=0)
        assert (onnx.predict(**kwargs)[0] == ref.predict(**kwargs)[0]).mean() > 0.999


def test_sam_onnx_masks_output_dynamic_size(exported, image):
    """The browser path: `masks` resized in-graph to any orig_im_size, best mask for a single click."""
    import onnxruntime as ort

    model, out, _ = exported
    ref = SamPredictor(model)
    ref.set_image(image)
    sess = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    inner = ort.InferenceSession(_with_inner_outputs(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for h, w in ((200, 300), (480, 333)):
        coords = ref.transform.apply_coords(np.array([[50.0, 40.0], [0.0, 0.0]]), (h, w))
        feeds = {"image_embeddings": ref.features.numpy(),
                 "point_coords": coords[None].astype(np.float32),
                 "point_labels": np.array([[1, -1]], np.float32),
                 "mask_input": np.zeros((1, 1, 64, 64), np.float32),
                 "has_mask_input": np.zeros(1, np.float32),
                 "orig_im_size": np.array([h, w], np.float32)}
        masks, iou, low = sess.run(None, feeds)
        low_all, iou_all = inner.run(list(DECODER_INNER), feeds)
        assert masks.shape == (1, 1, h, w) and iou.shape == (1, 1) and low.shape == (1, 1, 64, 64)
        best = int(iou_all[0, 1:].argmax()) + 1
        np.testing.assert_allclose(low[0, 0], low_all[0, best], atol=0)
        ref.original_size, ref.input_size = (h, w), tuple(
            int(v) for v in np.floor(np.array([h, w]) * 256 / max(h, w) + 0.5))
        expect = postprocess_masks(torch.from_numpy(low), 256, ref.input_size, (h, w)).numpy()
        np.testing.assert_allclose(masks, expect, atol=DECODER_ATOL, rtol=0)


def test_quantized_runs(exported, image):
    model, out, _ = exported
    ref, q = SamPredictor(model), OnnxPredictor(out, quantized=True, num_threads=1)
    ref.set_image(image)
    q.set_image(image)
    kwargs = dict(point_coords=np.array([[120, 80]]), point_labels=np.array([1]), return_logits=True)
    a, b = ref.predict(**kwargs), q.predict(**kwargs)
    assert np.abs(a[0] - b[0]).max() < 0.25 * np.abs(a[0]).max()


def test_bad_inputs(exported, tmp_path, image):
    model, out, _ = exported
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file; pass a folder"):
        export_onnx(model, afile)
    with pytest.raises(InputError, match="needs a segany Sam model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="export first"):
        OnnxPredictor(tmp_path)
    p = OnnxPredictor(out)
    with pytest.raises(StateError, match="set_image"):
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    p.set_image(image)
    with pytest.raises(PromptError, match="outside"):
        p.predict(point_coords=np.array([[1000, 1]]), point_labels=np.array([1]))
    with pytest.raises(PromptError, match="mask_input must have shape"):
        p.predict(mask_input=np.zeros((256, 256)))
    with pytest.raises(PromptError, match="no prompt"):
        p.predict()
    side = p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))[2].shape[-1]
    with pytest.raises(PromptError, match="mask_input contains NaN"):  # every mask came back empty, score NaN
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]),
                  mask_input=np.full((1, side, side), np.nan, np.float32))
    with pytest.raises(PromptError, match="every point is labelled -1"):
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([-1]))


def test_reexport_without_int8_leaves_no_stale_int8(exported, tmp_path, image, caplog):
    """Exporting other weights into a folder that held int8 graphs removes them: OnnxPredictor(quantized=True)
    is refused (it used to load the old weights' int8 graphs, an embedding 7.5 off); a registered name whose
    config the weights do not have is not recorded; quantizing logs no onnxruntime warnings."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import randomize_, tiny_config

    from segany.modeling.sam import Sam

    _, out, _ = exported
    folder = tmp_path / "onnx"
    shutil.copytree(out, folder)
    other = randomize_(Sam(tiny_config()), seed=11).eval()
    export_onnx(other, folder, model_name="vit_b")
    assert not list(folder.glob("*.int8.onnx"))
    meta = json.loads((folder / "segany_onnx.json").read_text())
    assert meta["model"] is None and set(meta["files"]) == {"encoder", "decoder"}
    with pytest.raises(InputError, match="lists no encoder_int8 or decoder_int8 graph: export again with --quantize"):
        OnnxPredictor(folder, quantized=True)
    OnnxPredictor(folder).set_image(image)
    with caplog.at_level("WARNING"):
        export_onnx(other, tmp_path / "q", quantize_int8=True, model_name="tiny")
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_export_leaves_the_callers_model_as_it_was(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``model.float().eval()`` in place turned a bf16 model in training into fp32 in eval mode."""
    from conftest import randomize_, tiny_config

    from segany.export.onnx import export_decoder, export_encoder
    from segany.modeling.sam import Sam

    model = randomize_(Sam(tiny_config())).to(torch.bfloat16).train()
    export_decoder(model, tmp_path / "decoder.onnx")
    export_encoder(model, tmp_path / "encoder.onnx")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(m.training for m in model.modules())
    assert (tmp_path / "decoder.onnx").stat().st_size > 0 and (tmp_path / "encoder.onnx").stat().st_size > 0


def test_a_graph_over_2_gib_keeps_its_weights_in_one_file_beside_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # torch writes each weight of a graph over protobuf's 2 GiB limit (ViT-H's encoder) as its own file beside
    # the graph: hundreds of tensor-named files in --out, outside the temp-and-rename and the meta's list.
    # A small graph saved the same way (one file per tensor) stands in for the 2.5 GB export.
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from segany.export.onnx import place_onnx

    w = np.arange(3 * 512, dtype=np.float32).reshape(3, 512)  # 6 KiB: large enough to be stored outside
    b = np.ones(512, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    onnx.save_model(model, str(work / "encoder.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(work.iterdir())) == 3  # the graph and one file per tensor, as torch leaves them
    place_onnx(work, out / "encoder.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["encoder.onnx", "encoder.onnx.data"]
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    got = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x @ w + b)

    # A later export whose graph holds its weights removes the earlier one's weights file.
    again = tmp_path / "again"
    again.mkdir()
    onnx.save_model(model, str(again / "encoder.onnx"))
    place_onnx(again, out / "encoder.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["encoder.onnx"]


def test_a_lone_graph_over_an_exports_graph_unmakes_the_export(exported, tmp_path, caplog):  # type: ignore[no-untyped-def]
    # export_decoder alone over an exported folder's decoder left the meta naming the earlier model, and
    # OnnxPredictor paired the earlier encoder with the new decoder without a word.
    import shutil

    from segany.export.onnx import META_FILE, export_decoder

    model, out, _ = exported
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    export_decoder(model, tmp_path / "elsewhere.onnx")  # beside no export: nothing to undo
    assert (folder / META_FILE).is_file()
    with caplog.at_level("WARNING", logger="segany.export.onnx"):
        export_decoder(model, folder / "decoder.onnx")
    assert not (folder / META_FILE).exists()
    assert "export onnx" in caplog.text
    with pytest.raises(InputError, match=f"has no {META_FILE}"):
        OnnxPredictor(folder)
