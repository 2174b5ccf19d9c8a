"""Bad inputs, as a table: each case names the exception type and a fragment of its message.

The same mistakes through the CLI must exit non-zero with one line on stderr (no traceback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGE, randomize_, tiny_config
from PIL import Image

from segany.checkpoints import build_sam, save_checkpoint
from segany.cli.main import main
from segany.data.images import load_image, to_rgb_uint8
from segany.errors import CheckpointError, ImageLoadError, InputError, PromptError, SeganyError, StateError
from segany.modeling.sam import Sam
from segany.predictor import SamPredictor
from segany.registry import get_config


@dataclass
class Files:
    text: Path
    truncated_jpeg: Path
    corrupt_png: Path
    empty: Path
    tiny_ckpt: Path
    vit_t_ckpt: Path
    truncated_ckpt: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("not an image\n")
    jpeg = SAMPLE_IMAGE.read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    (d / "empty.png").write_bytes(b"")
    tiny = save_checkpoint(randomize_(Sam(tiny_config()), seed=1), d / "tiny.pt")
    vit_t = d / "mobile_sam.pt"
    torch.save(Sam(get_config("vit_t")).state_dict(), vit_t)
    data = vit_t.read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    return Files(d / "notes.txt", d / "truncated.jpg", d / "corrupt.png", d / "empty.png", tiny, vit_t,
                 d / "truncated.pt")


@pytest.fixture(scope="module")
def predictor(files: Files) -> SamPredictor:
    p = SamPredictor(build_sam("vit_b", checkpoint=files.tiny_ckpt))  # the file's own (tiny) config is used
    p.set_image(load_image(SAMPLE_IMAGE))  # 640x425
    return p


@pytest.fixture(scope="module")
def fresh(files: Files) -> SamPredictor:
    return SamPredictor(build_sam("vit_b", checkpoint=files.tiny_ckpt))


Case = tuple[str, Callable[[Files, SamPredictor, SamPredictor], Any], type[Exception], str]
ONE = np.array([1])
XY = np.array([[100.0, 100.0]])

CASES: list[Case] = [
    # images
    ("non_image_file", lambda f, p, q: load_image(f.text), ImageLoadError, "as an image"),
    ("truncated_jpeg", lambda f, p, q: load_image(f.truncated_jpeg), ImageLoadError, "truncated"),
    ("corrupt_png", lambda f, p, q: load_image(f.corrupt_png), ImageLoadError, "could not read"),
    ("empty_file", lambda f, p, q: load_image(f.empty), ImageLoadError, "could not read"),
    ("missing_image", lambda f, p, q: load_image(f.text.parent / "nope.jpg"), ImageLoadError, "does not exist"),
    ("folder_as_image", lambda f, p, q: load_image(f.text.parent), ImageLoadError, "is a folder"),
    ("image_wrong_shape", lambda f, p, q: q.set_image(np.zeros((4, 5, 2), np.uint8)), InputError,
     "must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got (4, 5, 2)"),
    ("image_not_array", lambda f, p, q: q.set_image([[0, 1]]), InputError, "expects a numpy array"),
    ("image_nan", lambda f, p, q: to_rgb_uint8(np.full((4, 4, 3), np.nan)), InputError, "NaN"),
    ("image_int64", lambda f, p, q: to_rgb_uint8(np.zeros((4, 4, 3), np.int64)), InputError, "dtype int64"),
    ("image_format", lambda f, p, q: q.set_image(np.zeros((4, 4, 3), np.uint8), "RGBA"), InputError,
     "image_format must be 'RGB' or 'BGR'"),
    # call order
    ("predict_before_set_image", lambda f, p, q: q.predict(XY, ONE), StateError, "call set_image(image) before"),
    ("embedding_before_set_image", lambda f, p, q: q.get_image_embedding(), StateError, "no image is set"),
    ("predict_torch_before_set_image", lambda f, p, q: q.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1)),
     StateError, "no image is set"),
    # prompts (image is 640 wide, 425 high)
    ("point_outside", lambda f, p, q: p.predict(np.array([[700.0, 10.0]]), ONE), PromptError,
     "lies outside the 640x425"),
    ("point_negative", lambda f, p, q: p.predict(np.array([[-1.0, 10.0]]), ONE), PromptError, "lies outside"),
    ("points_labels_mismatch", lambda f, p, q: p.predict(np.array([[1.0, 2], [3, 4]]), ONE), PromptError,
     "point_labels must have shape (N,) matching point_coords' N=2"),
    ("points_wrong_shape", lambda f, p, q: p.predict(np.array([1.0, 2.0, 3.0]), ONE), PromptError,
     "point_coords must have shape (N, 2), got (3,)"),
    ("points_without_labels", lambda f, p, q: p.predict(XY), PromptError, "must be given together"),
    ("bad_label", lambda f, p, q: p.predict(XY, np.array([5])), PromptError, "got [5]"),
    ("nan_point", lambda f, p, q: p.predict(np.array([[np.nan, 1.0]]), ONE), PromptError, "NaN"),
    ("no_prompt", lambda f, p, q: p.predict(), PromptError, "no prompt given"),
    ("only_ignored_points", lambda f, p, q: p.predict(XY, np.array([-1])), PromptError,
     "every point is labelled -1 (ignored)"),
    ("nan_mask_input", lambda f, p, q: p.predict(XY, ONE, mask_input=np.full((1, 64, 64), np.nan)), PromptError,
     "mask_input contains NaN"),
    ("box_x1_lt_x0", lambda f, p, q: p.predict(box=np.array([300, 10, 200, 100])), PromptError,
     "x1 > x0 and y1 > y0"),
    ("box_wrong_shape", lambda f, p, q: p.predict(box=np.array([1, 2, 3])), PromptError,
     "box must have shape (4,)"),
    ("box_outside", lambda f, p, q: p.predict(box=np.array([700, 10, 800, 100])), PromptError,
     "entirely outside"),
    ("mask_input_shape", lambda f, p, q: p.predict(XY, ONE, mask_input=np.zeros((1, 256, 256))), PromptError,
     "mask_input must have shape (1, 64, 64)"),
    ("predict_torch_batch_mismatch", lambda f, p, q: p.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 1),
                                                                     boxes=torch.zeros(3, 4)),
     PromptError, "share the batch size, got sizes [2, 3]"),
    ("predict_torch_points_shape", lambda f, p, q: p.predict_torch(torch.zeros(1, 2), torch.ones(1, 2)),
     PromptError, "point_coords must be (B, N, 2)"),
    # checkpoints
    ("wrong_checkpoint", lambda f, p, q: build_sam("vit_b", checkpoint=f.vit_t_ckpt), CheckpointError,
     "looks like a 'vit_t' checkpoint"),
    ("truncated_checkpoint", lambda f, p, q: build_sam("vit_t", checkpoint=f.truncated_ckpt), CheckpointError,
     "may be truncated"),
    ("image_as_checkpoint", lambda f, p, q: build_sam("vit_t", checkpoint=SAMPLE_IMAGE), CheckpointError,
     "not a readable PyTorch checkpoint"),
    ("missing_checkpoint", lambda f, p, q: build_sam("vit_t", checkpoint=f.text.parent / "x.pt"), CheckpointError,
     "does not exist"),
    ("unknown_model", lambda f, p, q: build_sam("vit_bb"), KeyError, "did you mean vit_b"),
]


@pytest.mark.parametrize(("fn", "exc_type", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(files: Files, predictor: SamPredictor, fresh: SamPredictor, fn: Any, exc_type: type[Exception],
                   fragment: str) -> None:
    with pytest.raises(exc_type) as info:
        fn(files, predictor, fresh)
    assert isinstance(info.value, SeganyError), f"{type(info.value).__name__} is not a SeganyError"
    assert fragment in str(info.value)


def test_errors_leave_the_predictor_usable(predictor: SamPredictor) -> None:
    with pytest.raises(PromptError):
        predictor.predict(np.array([[700.0, 10.0]]), ONE)
    masks, scores, _ = predictor.predict(XY, ONE, multimask_output=False)
    assert masks.shape == (1, 425, 640) and scores.shape == (1,)


# ------------------------------------------------------------------ odd but valid images
def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode) if mode else Image.fromarray(array)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)
    return path


def test_grayscale_png_is_replicated(tmp_path: Path) -> None:
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    img = load_image(_save(tmp_path / "g.png", gray))
    assert img.shape == (6, 10, 3) and img.dtype == np.uint8
    assert all(np.array_equal(img[..., c], gray) for c in range(3))


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    img = load_image(_save(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(img, rgba[..., :3])


def test_16bit_png_is_scaled_to_8bit(tmp_path: Path) -> None:
    g16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = load_image(_save(tmp_path / "g16.png", g16))
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img[0, :, 0], [0, 1, 128, 255])
    assert (img[..., 0] == img[..., 2]).all()


def test_palette_and_arrays(tmp_path: Path) -> None:
    pal = Image.fromarray(np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)).convert("P")
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (4, 4, 3)
    assert to_rgb_uint8(np.ones((2, 2), bool))[0, 0].tolist() == [255, 255, 255]
    assert to_rgb_uint8(np.full((2, 2, 1), 0.5))[0, 0].tolist() == [127, 127, 127]  # 127.5 truncated, as the reference


def test_image_bytes_decode_as_the_file_does(tmp_path: Path) -> None:
    """load_image_bytes (the data engine decodes the bytes whose sha256 it checked) equals load_image,
    EXIF rotation included, and its errors name the file the bytes came from."""
    from segany.data.images import load_image_bytes

    arr = np.random.default_rng(2).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: a 6x10 stored frame is shown 10x6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    from_bytes = load_image_bytes(path.read_bytes(), str(path))
    assert from_bytes.shape == (10, 6, 3)
    np.testing.assert_array_equal(from_bytes, load_image(path))
    np.testing.assert_array_equal(load_image_bytes(path.read_bytes(), "x", apply_exif=False),
                                  load_image(path, apply_exif=False))
    with pytest.raises(ImageLoadError, match="'/data/a.jpg'.*as an image"):
        load_image_bytes(b"not an image", "/data/a.jpg")


def test_bgr_input_matches_rgb(predictor: SamPredictor, fresh: SamPredictor) -> None:
    rgb = load_image(SAMPLE_IMAGE)
    fresh.set_image(np.ascontiguousarray(rgb[..., ::-1]), image_format="BGR")
    try:
        torch.testing.assert_close(fresh.get_image_embedding(), predictor.get_image_embedding())
    finally:
        fresh.reset_image()


# ------------------------------------------------------------------ the same through the CLI
CLI_CASES: list[tuple[str, Callable[[Files], list[str]], str]] = [
    ("non_image_file", lambda f: [str(f.text), "--point", "1,1"], "as an image"),
    ("truncated_jpeg", lambda f: [str(f.truncated_jpeg), "--point", "1,1"], "truncated"),
    ("missing_image", lambda f: [str(f.text.parent / "nope.jpg"), "--point", "1,1"], "does not exist"),
    ("point_outside", lambda f: [str(SAMPLE_IMAGE), "--point", "900,10"], "lies outside the 640x425"),
    # Checked against the image before the model: the missing checkpoint is never reached.
    ("point_outside_before_model", lambda f: [str(SAMPLE_IMAGE), "--point", "900,10", "--checkpoint", "/nope.pt"],
     "lies outside the 640x425"),
    ("box_outside_before_model", lambda f: [str(SAMPLE_IMAGE), "--box", "700,10,800,100", "--checkpoint",
                                            "/nope.pt"], "lies entirely outside the 640x425"),
    ("point_format", lambda f: [str(SAMPLE_IMAGE), "--point", "10;20"], "write it as X,Y or X,Y,LABEL"),
    ("point_label", lambda f: [str(SAMPLE_IMAGE), "--point", "10,20,2"], "use 1 (foreground) or 0"),
    ("box_x1_lt_x0", lambda f: [str(SAMPLE_IMAGE), "--box", "300,10,200,100"], "x1 > x0"),
    ("box_format", lambda f: [str(SAMPLE_IMAGE), "--box", "1,2,3"], "write it as X0,Y0,X1,Y1"),
    ("no_prompt", lambda f: [str(SAMPLE_IMAGE)], "no prompt given"),
    ("wrong_checkpoint", lambda f: [str(SAMPLE_IMAGE), "--point", "1,1", "--checkpoint", str(f.vit_t_ckpt),
                                    "--model", "vit_b"], "use --model vit_t"),
    ("truncated_checkpoint", lambda f: [str(SAMPLE_IMAGE), "--point", "1,1", "--checkpoint",
                                        str(f.truncated_ckpt), "--model", "vit_t"], "may be truncated"),
    ("missing_checkpoint", lambda f: [str(SAMPLE_IMAGE), "--point", "1,1", "--checkpoint", "/nope.pt"],
     "does not exist"),
    ("unknown_model", lambda f: [str(SAMPLE_IMAGE), "--point", "1,1", "--model", "vit_bb"], "did you mean vit_b"),
    ("out_is_a_file", lambda f: [str(SAMPLE_IMAGE), "--point", "1,1", "--out", str(f.text)], "is an existing file, not a folder"),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("cuda_unavailable", lambda f: [str(SAMPLE_IMAGE), "--point", "1,1", "--checkpoint",
                                                     str(f.tiny_ckpt), "--device", "cuda"],
                      "CUDA is not available"))


@pytest.mark.parametrize(("make_args", "fragment"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch, make_args: Any, fragment: str) -> None:
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))
    args = make_args(files)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    if "--checkpoint" not in args and "--model" not in args:
        args += ["--checkpoint", str(files.tiny_ckpt)]
    code = main(["predict", "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1, err
    assert err[0].startswith("segany: error: ") and fragment in err[0], err[0]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_an_empty_prompt_batch_gives_empty_results_and_later_clicks_still_work() -> None:
    # A detector that found nothing passes boxes of shape (0, 4). On the fast path (the CLI's, serve's and auto's
    # default on CPU) that cached an empty image side, and every later click on the image failed with IndexError.
    model = randomize_(Sam(tiny_config()), seed=1).eval()
    for fast in (False, True):
        p = SamPredictor(model, fast_decoder=fast)
        p.set_image(np.zeros((30, 40, 3), np.uint8))
        masks, iou, low = p.predict_torch(None, None, boxes=torch.zeros(0, 4))
        side = 4 * model.cfg.embed_size
        assert masks.shape == (0, 3, 30, 40) and masks.dtype == torch.bool and iou.shape == (0, 3)
        assert low.shape == (0, 3, side, side)
        masks, _, _ = p.predict_torch(torch.zeros(0, 1, 2), torch.ones(0, 1), multimask_output=False,
                                      return_logits=True)
        assert masks.shape == (0, 1, 30, 40) and masks.dtype == torch.float32
        assert p.predict(np.array([[5.0, 5.0]]), np.array([1]))[0].shape == (3, 30, 40)
        with pytest.raises(PromptError, match=rf"mask_input must be \(B, 1, {side}, {side}\)"):
            p.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1), mask_input=torch.zeros(1, 1, 16, 16))
