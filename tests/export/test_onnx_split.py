"""The split browser decoder (decoder_image.onnx once per embedding, decoder_click.onnx per click) agrees
with the torch mask decoder: fp32 low-res logits and IoU within 1e-4 absolute, with and without a mask
prompt, for points, a box and several point counts (the click graph's point axis is dynamic). The
app's resize of low-res logits is checked against the exact ``postprocess_masks``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="pip install 'segany[onnx]'")

from segany.export.onnx import postprocess_masks  # noqa: E402
from segany.export.onnx_split import CLICK_INPUTS, IMAGE_OUTPUTS, export_split_decoder  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import randomize_, tiny_config

    from segany.modeling.sam import Sam

    model = randomize_(Sam(tiny_config())).eval()
    paths = export_split_decoder(model, tmp_path_factory.mktemp("split"))
    image_sess, click_sess = ort.InferenceSession(str(paths["image"])), ort.InferenceSession(str(paths["click"]))
    # the contract the app relies on: it feeds the image graph's outputs to the click graph by name
    assert [o.name for o in image_sess.get_outputs()] == list(IMAGE_OUTPUTS)
    assert [i.name for i in click_sess.get_inputs()] == list(CLICK_INPUTS)
    return model, image_sess, click_sess


def _torch(model, emb, coords, labels, mask):
    with torch.no_grad():
        pe = model.prompt_encoder
        real = labels[0] != -1
        pts = (coords[:, real], labels[:, real].long())
        boxes = None
        if (labels == 2).any():  # box corners, as the prompt encoder's box input
            pts = (coords[:, real & (labels[0] < 2)], labels[:, real & (labels[0] < 2)].long())
            boxes = coords[:, labels[0] >= 2].reshape(1, 4)
            if pts[0].shape[1] == 0:
                pts = None
        sparse, dense = pe(points=pts, boxes=boxes, masks=mask)
        return model.mask_decoder(emb, pe.get_dense_pe(), sparse, dense, True)


@pytest.mark.parametrize("prompt", ["one_point", "three_points", "box", "points_and_box"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_split_graphs_match_torch(split, prompt, with_mask):
    model, image_sess, click_sess = split
    g, c = model.cfg.embed_size, model.cfg.prompt.embed_dim
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(1, c, g, g, generator=gen)
    s = float(model.img_size)
    pts = {"one_point": ([[0.3 * s, 0.4 * s]], [1.0]), "three_points": ([[10, 20], [0.7 * s, 0.2 * s], [40, 0.9 * s]], [1, 0, 1]),
           "box": ([], []), "points_and_box": ([[0.5 * s, 0.5 * s]], [0.0])}[prompt]
    coords, labels = list(pts[0]), list(pts[1])
    if "box" in prompt:
        coords += [[0.1 * s, 0.2 * s], [0.6 * s, 0.8 * s]]
        labels += [2.0, 3.0]
    else:
        coords.append([0.0, 0.0])
        labels.append(-1.0)
    coords_t = torch.tensor([coords], dtype=torch.float32)
    labels_t = torch.tensor([labels], dtype=torch.float32)
    mask = torch.randn(1, 1, 4 * g, 4 * g, generator=gen) * 4 if with_mask else None
    low_ref, iou_ref = _torch(model, emb, coords_t, labels_t, mask)

    outs = image_sess.run(list(IMAGE_OUTPUTS), {"image_embeddings": emb.numpy()})
    image_side = dict(zip(IMAGE_OUTPUTS, outs, strict=True))
    iou, low = click_sess.run(["iou_predictions", "low_res_masks"], {
        **image_side, "point_coords": coords_t.numpy(), "point_labels": labels_t.numpy(),
        "mask_input": (mask if mask is not None else torch.zeros(1, 1, 4 * g, 4 * g)).numpy(),
        "has_mask_input": np.array([1.0 if with_mask else 0.0], np.float32)})
    assert low.shape == (1, 3, 4 * g, 4 * g) and iou.shape == (1, 3)
    np.testing.assert_allclose(low, low_ref.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(iou, iou_ref.numpy(), atol=ATOL, rtol=0)


def _app_upscale(low: np.ndarray, img_size: int, H: int, W: int) -> np.ndarray:
    """app.js upscaleMask in numpy: one bilinear sample per output pixel."""
    L = low.shape[-1]
    scale = img_size / max(H, W)
    hin, win = int(np.floor(H * scale + 0.5)), int(np.floor(W * scale + 0.5))

    def axis(n, in_n):
        f = np.clip((np.arange(n) + 0.5) * in_n / n * L / img_size - 0.5, 0, L - 1)
        a = np.floor(f).astype(int)
        return a, np.minimum(a + 1, L - 1), f - a

    x0, x1, wx = axis(W, win)
    y0, y1, wy = axis(H, hin)
    top = low[y0][:, x0] * (1 - wx) + low[y0][:, x1] * wx
    bot = low[y1][:, x0] * (1 - wx) + low[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


def test_app_resize_close_to_exact_postprocess():
    gen = torch.Generator().manual_seed(0)
    low = torch.nn.functional.interpolate(torch.randn(1, 1, 4, 4, generator=gen), (64, 64), mode="bilinear")  # mask-like: few boundaries
    H, W = 426, 640
    exact = postprocess_masks(low, 256, (171, 256), (H, W))[0, 0].numpy()
    approx = _app_upscale(low[0, 0].numpy(), 256, H, W)
    rng = np.abs(exact).max()
    assert np.abs(approx - exact).max() < 0.03 * rng  # one bilinear vs a bilinear of a bilinear, edge clamping
    # thresholded masks differ only where the logit is within 3% of the range from the threshold
    assert (((approx > 0) == (exact > 0)) | (np.abs(exact) < 0.03 * rng)).all()
