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
    """app.js upscaleMask in numpy: per axis the two resizes composed into three low-res taps, one pass."""
    L = low.shape[-1]
    scale = img_size / max(H, W)
    hin, win = int(np.floor(H * scale + 0.5)), int(np.floor(W * scale + 0.5))

    def src(x: int, n: int, in_n: int) -> tuple[int, int, float]:
        f = max((x + 0.5) * in_n / n - 0.5, 0.0)
        a = int(np.floor(f))
        return a, min(a + 1, in_n - 1), f - a

    def axis(n: int, in_n: int) -> np.ndarray:
        taps = np.zeros((n, L), np.float64)  # dense here; app.js keeps the three nonzero columns
        for x in range(n):
            j0, j1, a = src(x, n, in_n)
            for j, wj in ((j0, 1 - a), (j1, a)):
                ka, kb, b = src(j, img_size, L)
                taps[x, ka] += wj * (1 - b)
                taps[x, kb] += wj * b
            assert np.ptp(np.flatnonzero(taps[x])) <= 2  # three consecutive taps suffice
        return taps

    return axis(H, hin) @ low.astype(np.float64) @ axis(W, win).T


@pytest.mark.parametrize("size", [(426, 640), (640, 427), (1500, 2250), (100, 100)])
def test_app_resize_equals_the_two_pass_postprocess(size: tuple[int, int]) -> None:
    """The page shows what the server would save: its one-pass resize is the two-pass one, not an approximation
    (the one-bilinear shortcut it replaced cost ~0.02 mask IoU)."""
    gen = torch.Generator().manual_seed(0)
    low = torch.nn.functional.interpolate(torch.randn(1, 1, 4, 4, generator=gen), (64, 64), mode="bilinear")
    H, W = size
    scale = 256 / max(H, W)
    input_size = (int(np.floor(H * scale + 0.5)), int(np.floor(W * scale + 0.5)))
    exact = postprocess_masks(low, 256, input_size, (H, W))[0, 0].numpy()
    mine = _app_upscale(low[0, 0].numpy(), 256, H, W)
    np.testing.assert_allclose(mine, exact, atol=1e-5 * np.abs(exact).max(), rtol=0)
    assert (((mine > 0) == (exact > 0)) | (np.abs(exact) < 1e-5)).all()
