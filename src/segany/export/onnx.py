"""ONNX export of the image encoder and the prompt decoder, and a predictor that runs them in ONNX Runtime.

Two graphs are written (SAM paper §3: the heavy encoder runs once per image, the light decoder once
per prompt, which is what makes a browser or a laptop CPU interactive):

``encoder.onnx``
    input ``image`` float32 (B, 3, h, w): RGB 0–255, already resized so that max(h, w) equals the
    model's ``img_size`` (normalization and bottom/right zero padding happen in the graph);
    output ``image_embeddings`` float32 (B, 256, S/16, S/16).

``decoder.onnx`` (the input/output contract of SAM's published ONNX decoder, so web clients work as-is)
    inputs ``image_embeddings`` (1, 256, g, g) with g = S/16 (64 for SAM's 1024 px, 32 for segany_tiny's
    512 px); ``point_coords`` float32 (1, N, 2) XY in the resized
    model frame (``ResizeLongestSide.apply_coords``); ``point_labels`` float32 (1, N): 1 foreground,
    0 background, 2/3 box top-left/bottom-right, -1 padding (add one (0, 0)/-1 point when there is no
    box); ``mask_input`` (1, 1, 4g, 4g) low-res logits (256×256 for SAM); ``has_mask_input`` (1,) 1 or 0;
    ``orig_im_size`` float32 (2,) as (H, W). N is dynamic.
    outputs ``masks`` float32 (1, K, H, W) logits at the original size (threshold at 0),
    ``iou_predictions`` (1, K), ``low_res_masks`` (1, K, 4g, 4g); K is 1 by default: for a prompt
    with a single real point (ambiguous) the best of the three multimask outputs by predicted IoU,
    otherwise the single-mask output. With ``multimask=True`` K is 3 (the three multimask outputs).
    These three are the file's outputs, as in SAM's ONNX example (``masks, scores, low_res = run(None, ...)``).
    Two tensors inside the graph, ``all_low_res_masks`` (1, 4, 4g, 4g) and ``all_iou_predictions`` (1, 4),
    hold all four decoder masks; :class:`OnnxPredictor` makes them outputs when it loads the file.

``--quantize`` additionally writes ``encoder.int8.onnx`` and ``decoder.int8.onnx`` with dynamic int8
weights (ONNX Runtime's ``quantize_dynamic``): smaller and faster on CPUs, slightly less accurate.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segany.atomic import atomic_path, atomic_write_json
from segany.errors import InputError, StateError, UnknownModelError, require
from segany.modeling.config import SamConfig
from segany.modeling.sam import Sam
from segany.transforms import ResizeLongestSide

log = logging.getLogger(__name__)

OPSET = 17
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
META_FILE = "segany_onnx.json"
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
# Named tensors inside decoder.onnx that OnnxPredictor reads (all four masks); not outputs of the file, which
# keeps SAM's three, so code written for SAM's exported decoder unpacks its outputs unchanged.
DECODER_INNER = ("all_low_res_masks", "all_iou_predictions")


class EncoderGraph(nn.Module):
    """Resized RGB 0–255 image (B, 3, h, w) → embeddings; normalizes and pads like ``Sam.preprocess``."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.image_encoder(self.model.preprocess(image))


def pick_mask(low_res: torch.Tensor, iou: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``idx[b]`` of each prompt: (B, K, h, w) and (B, K) → (B, 1, h, w) and (B, 1), traceable.

    Indexed by (batch, mask) pairs rather than gathered along an expanded index: a traced ``gather`` leaves the
    exported output's mask dimension symbolic, where indexing then adding the axis back gives ONNX a fixed 1,
    as the reference's export declares for ``low_res_masks``.
    """
    rows = torch.arange(low_res.shape[0], device=low_res.device)
    return low_res[rows, idx].unsqueeze(1), iou[rows, idx].unsqueeze(1)


class DecoderGraph(nn.Module):
    """SAM-ONNX-style decoder: prompt embedding, mask decoding, mask choice and resizing in one graph."""

    def __init__(self, model: Sam, multimask: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multimask = multimask
        self.img_size = model.img_size

    def _sparse(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # No automatic padding point: the caller sends padding explicitly (label -1), as SAM's ONNX
        # contract expects.
        return self.model.prompt_encoder._embed_points(coords, labels, pad=False)

    def _decode(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits and IoU of all mask tokens; ``has_mask_input`` (0/1) blends the previous mask's
        dense embedding with the no-mask one inside the graph, so one graph serves both cases."""
        pe = self.model.prompt_encoder
        has = has_mask_input.reshape(-1, 1, 1, 1)
        dense = pe.mask_downscaling(mask_input) * has + pe.no_mask_embed.weight.reshape(1, -1, 1, 1) * (1 - has)
        low_res, iou = self.model.mask_decoder.predict_masks(image_embeddings, pe.get_dense_pe(), sparse, dense)[:2]
        return low_res, iou

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor, orig_im_size: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        low_res, iou = self._decode(image_embeddings, self._sparse(point_coords, point_labels), mask_input,
                                    has_mask_input)
        if self.multimask:
            sel_low, sel_iou = low_res[:, 1:], iou[:, 1:]
        else:
            real_points = (point_labels != -1).sum(dim=1)  # (B,)
            best_multi = iou[:, 1:].argmax(dim=1) + 1
            idx = torch.where(real_points <= 1, best_multi, torch.zeros_like(best_multi))  # (B,)
            sel_low, sel_iou = pick_mask(low_res, iou, idx)
        masks = self._upscale(sel_low, orig_im_size)
        return masks, sel_iou, sel_low, low_res, iou

    def _upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        up = F.interpolate(low_res, (s, s), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.int64)
        # preprocess_shape: round half up of the scaled sides.
        scale = s / torch.max(orig_im_size)
        input_hw = torch.floor(orig_im_size * scale + 0.5).to(torch.int64)
        up = up[..., : input_hw[0], : input_hw[1]]
        return F.interpolate(up, size=(size[0], size[1]), mode="bilinear", align_corners=False)


def model_for_export(model: Any) -> Sam:
    """The model to trace: ``model`` itself when it is already float32, on the CPU and in eval mode, else a
    copy made so. Exporting must not touch the caller's model: ``model.float().eval()`` in place turned a
    bf16 model in training into an fp32 one in eval mode (and moved a served CUDA model to the CPU)."""
    if not isinstance(model, Sam):
        raise InputError(f"export needs a segany Sam model, got {type(model).__name__}; build one with "
                         "segany.build_sam(name, checkpoint)")
    tensors = [*model.parameters(), *model.buffers()]
    ready = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors)
    if ready and not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).cpu().float().eval()


def _check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; pass a folder for encoder.onnx and decoder.onnx")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _legacy_export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                   output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Write ``module`` to ``path`` atomically with the TorchScript-based exporter.

    The decoder resizes masks to ``orig_im_size``, a value read from an input tensor; the tracing
    exporter records that as a dynamic Resize, which torch.export (dynamo) refuses as data-dependent.
    """
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python ints, deprecation notes
            torch.onnx.export(module, args, str(work / path.name), dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
        place_onnx(work, path)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def external_data_name(path: Path) -> str:
    """The one weights file beside a graph over protobuf's 2 GiB limit (ViT-H's encoder): ``<graph>.data``."""
    return f"{path.name}.data"


def place_onnx(work: Path, path: Path) -> None:
    """Move the graph exported as ``work/<path.name>`` to ``path``, atomically.

    Over 2 GiB, torch writes every weight as its own file beside the graph (hundreds, named after tensors):
    those are gathered into :func:`external_data_name`'s one file, renamed into place before the graph, so a
    graph never points at missing weights. A graph with its weights inside removes such a file left by an
    earlier, larger export.
    """
    graph = work / path.name
    data = path.parent / external_data_name(path)
    if not any(f != graph for f in work.iterdir()):
        data.unlink(missing_ok=True)
        os.replace(graph, path)
        return
    import onnx

    model = onnx.load(str(graph))  # reads the loose weights beside it
    packed = work / "packed"
    packed.mkdir()
    onnx.save_model(model, str(packed / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=external_data_name(path), size_threshold=1024)
    del model
    if (packed / external_data_name(path)).exists():
        os.replace(packed / external_data_name(path), data)
    else:  # every tensor was small enough to sit inside the graph
        data.unlink(missing_ok=True)
    os.replace(packed / path.name, path)


def _unlist_export(path: Path) -> None:
    """Remove the meta file of an export that lists ``path``, which a lone graph is about to replace.

    :func:`export_encoder` or :func:`export_decoder` called alone over a graph of an exported folder left the
    folder's meta naming the earlier model's config and its other graph: ``OnnxPredictor`` then paired graphs
    of two models without a word. Without the meta, it refuses the folder and says to export again.
    """
    meta_path = path.parent / META_FILE
    try:
        listed = json.loads(meta_path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):  # none, or not a meta this code wrote: nothing lists the graph
        return
    if isinstance(listed, dict) and path.name in listed.values():
        meta_path.unlink(missing_ok=True)
        log.warning("%s replaces a graph of the export in %s, whose %s was removed: run export_onnx (or `segany "
                    "export onnx`) to make that folder an export again", path.name, path.parent, META_FILE)


def export_encoder(model: Sam, path: str | os.PathLike[str]) -> Path:
    model = model_for_export(model)
    require("onnx", "onnx")
    s = model.img_size
    out = Path(path)
    _unlist_export(out)
    example = torch.randint(0, 256, (1, 3, s, s * 3 // 4), dtype=torch.float32)
    with torch.no_grad():
        _legacy_export(EncoderGraph(model).eval(), (example,), out, ["image"], ["image_embeddings"],
                       {"image": {0: "batch", 2: "height", 3: "width"}, "image_embeddings": {0: "batch"}})
    return out


def export_decoder(model: Sam, path: str | os.PathLike[str], multimask: bool = False) -> Path:
    model = model_for_export(model)
    require("onnx", "onnx")
    g = model.cfg.embed_size
    c = model.cfg.prompt.embed_dim
    out = Path(path)
    _unlist_export(out)
    example = (
        torch.randn(1, c, g, g),
        torch.randint(0, model.img_size, (1, 3, 2)).float(),
        torch.tensor([[1.0, 0.0, -1.0]]),
        torch.randn(1, 1, 4 * g, 4 * g),
        torch.tensor([1.0]),
        torch.tensor([float(model.img_size) * 0.75, float(model.img_size)]),
    )
    with torch.no_grad():
        _legacy_export(DecoderGraph(model, multimask).eval(), example, out, list(DECODER_INPUTS),
                       list(DECODER_OUTPUTS + DECODER_INNER),
                       {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
                        "masks": {2: "height", 3: "width"}})
    _set_outputs(out, DECODER_OUTPUTS)
    return out


def _set_outputs(path: Path, names: tuple[str, ...]) -> None:
    """Keep only ``names`` as the graph outputs of ``path`` (atomically); the other tensors stay inside it."""
    import onnx

    graph_model = onnx.load(str(path))
    kept = [o for o in graph_model.graph.output if o.name in names]
    del graph_model.graph.output[:]
    graph_model.graph.output.extend(kept)
    with atomic_path(path) as tmp:
        onnx.save(graph_model, str(tmp))


def _with_inner_outputs(path: Path) -> bytes:
    """``path``'s graph with :data:`DECODER_INNER` as outputs too (serialized), for :class:`OnnxPredictor`."""
    import onnx

    graph_model = onnx.load(str(path))
    have = {o.name for o in graph_model.graph.output}
    made = {n for node in graph_model.graph.node for n in node.output}
    missing = [n for n in DECODER_INNER if n not in made]
    if missing:
        raise InputError(f"{str(path)!r} has no {', '.join(missing)} inside (not a segany decoder export, or one "
                         "of an older format); export again: segany export onnx --model M --checkpoint C --out DIR")
    graph_model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in DECODER_INNER
                                    if n not in have)
    return graph_model.SerializeToString()


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Dynamic int8 weight quantization (MatMul/Gemm) with ONNX Runtime, written atomically."""
    require("onnxruntime", "onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(dst)
    _unlist_export(out)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run shape inference first goes to the root logger on every call
    try:
        with atomic_path(out) as tmp:
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    return out


def export_onnx(model: Sam, out_dir: str | os.PathLike[str], *, quantize_int8: bool = False,
                multimask: bool = False, model_name: str | None = None,
                weights: dict[str, Any] | None = None) -> dict[str, Path]:
    """Export encoder and decoder into ``out_dir``; returns the written paths by role.

    ``weights`` (e.g. ``{"checkpoint": path, "sha256": ...}`` or ``{"random_weights": True}``) goes into the
    meta file, so graphs of random weights cannot pass for trained ones. ``model_name`` is recorded only when
    it is registered with ``model``'s own config (else null, never a false name): pass the name of what the
    weights built, which ``segany export onnx`` finds from the checkpoint's embedded config.
    """
    model = model_for_export(model)
    out = _check_out_dir(out_dir)
    # The meta file is what makes a folder an export (OnnxPredictor refuses one without it), and it is
    # written last: removed before the first graph is replaced, an export interrupted midway leaves a folder
    # that is refused, never new graphs beside an old decoder listed by the old meta.
    (out / META_FILE).unlink(missing_ok=True)
    paths = {"encoder": export_encoder(model, out / ENCODER_FILE),
             "decoder": export_decoder(model, out / DECODER_FILE, multimask=multimask)}
    if quantize_int8:
        paths["encoder_int8"] = quantize(paths["encoder"], out / "encoder.int8.onnx")
        paths["decoder_int8"] = quantize(paths["decoder"], out / "decoder.int8.onnx")
    else:  # int8 graphs of an earlier export are of other weights: none may survive beside these
        for stale in ("encoder.int8.onnx", "decoder.int8.onnx"):
            (out / stale).unlink(missing_ok=True)
    registered = _registered_config(model_name) if model_name is not None else None
    if registered is not None and registered != model.cfg:
        model_name = None  # the weights file's own config won (e.g. --model vit_b with a TinyViT file): no false name
    for role in ("encoder", "decoder"):  # a graph over 2 GiB keeps its weights in one file beside it
        data = out / external_data_name(paths[role])
        if data.exists():
            paths[f"{role}_data"] = data
    meta = {"format": "segany-onnx-v1", "model": model_name, "config": model.cfg.to_dict(), "opset": OPSET,
            "multimask": multimask, "files": {k: v.name for k, v in paths.items()}, "weights": weights}
    paths["meta"] = atomic_write_json(out / META_FILE, meta, indent=2)
    return paths


def _registered_config(name: str) -> SamConfig | None:
    from segany.registry import get_config

    try:
        return get_config(name)
    except UnknownModelError:
        return None


# ----------------------------------------------------------------------------------- runtime
def _session(path: Path | bytes, num_threads: int | None) -> Any:
    ort = require("onnxruntime", "onnx")
    opts = ort.SessionOptions()  # type: ignore[attr-defined]
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # type: ignore[attr-defined]
    if num_threads:
        opts.intra_op_num_threads = num_threads
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


class OnnxPredictor:
    """The :class:`segany.SamPredictor` API running exported graphs in ONNX Runtime (no torch model needed).

    Args:
        onnx_dir: folder written by ``segany export onnx``.
        quantized: use the ``*.int8.onnx`` files (export with ``--quantize``).
        num_threads: ONNX Runtime intra-op threads (default: its own choice, the physical cores).
    """

    def __init__(self, onnx_dir: str | os.PathLike[str], *, quantized: bool = False,
                 num_threads: int | None = None) -> None:
        folder = Path(onnx_dir)
        meta_path = folder / META_FILE
        if not meta_path.exists():
            raise InputError(f"{str(folder)!r} has no {META_FILE} (no export, or one that did not finish); export "
                             f"first: segany export onnx --model M --checkpoint C --out {folder}")
        meta = json.loads(meta_path.read_text())
        self.config = SamConfig.from_dict(meta["config"])
        # Only the files this export wrote (its meta lists them): graphs left by an earlier export are not used.
        roles = ("encoder_int8", "decoder_int8") if quantized else ("encoder", "decoder")
        listed = meta.get("files", {})
        missing = [r for r in roles if r not in listed]
        if missing:
            hint = "export again with --quantize" if quantized else "export again"
            raise InputError(f"{str(meta_path)!r} lists no {' or '.join(missing)} graph: {hint}")
        enc, dec = folder / listed[roles[0]], folder / listed[roles[1]]
        for p in (enc, dec):
            if not p.exists():
                raise InputError(f"{str(p)!r} is missing (listed in {META_FILE}): export again into {str(folder)!r}")
        self.encoder = _session(enc, num_threads)
        self.decoder = _session(_with_inner_outputs(dec), num_threads)
        self.img_size = self.config.img_size
        self.mask_threshold = self.config.mask_threshold
        self.transform = ResizeLongestSide(self.img_size)
        self.reset_image()

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: np.ndarray | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an (H, W, 3) uint8 image (same conversions as ``SamPredictor.set_image``)."""
        from segany.data.images import to_rgb_uint8

        if image_format not in ("RGB", "BGR"):
            raise InputError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not isinstance(image, np.ndarray):
            raise InputError(f"set_image expects a numpy array (H, W, 3), got {type(image).__name__}")
        was_bgr = image_format == "BGR" and image.ndim == 3 and image.shape[2] in (3, 4)
        image = to_rgb_uint8(image)
        if was_bgr:
            image = np.ascontiguousarray(image[..., ::-1])
        resized = self.transform.apply_image(image)
        x = np.ascontiguousarray(resized.transpose(2, 0, 1)[None].astype(np.float32))
        self.reset_image()
        (self.features,) = self.encoder.run(["image_embeddings"], {"image": x})
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.input_size = (int(resized.shape[0]), int(resized.shape[1]))
        self.is_image_set = True

    def get_image_embedding(self) -> np.ndarray:
        if not self.is_image_set or self.features is None:
            raise StateError("no image is set: call set_image(image) before get_image_embedding")
        return self.features

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None, multimask_output: bool = True,
                return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same contract as ``SamPredictor.predict``: masks (C, H, W), scores (C,), low-res logits (C, 4g, 4g) with
        g = img_size / 16 (256 × 256 for SAM's 1024-pixel models, 128 × 128 for segany_tiny)."""
        from segany.predictor import check_box, check_mask_input, check_points, check_some_prompt

        if not self.is_image_set or self.features is None:
            raise StateError("no image is set: call set_image(image) before predict")
        assert self.original_size is not None and self.input_size is not None
        pts = check_points(point_coords, point_labels, self.original_size)
        box_np = check_box(box, self.original_size)
        side = 4 * self.config.embed_size
        mask_np = check_mask_input(mask_input, side)
        check_some_prompt(pts, box_np, mask_np)
        coords_l, labels_l = [], []
        if pts is not None:
            coords_l.append(self.transform.apply_coords(pts[0], self.original_size))
            labels_l.append(pts[1].astype(np.float32))
        if box_np is not None:
            coords_l.append(self.transform.apply_boxes(box_np, self.original_size).reshape(2, 2))
            labels_l.append(np.array([2.0, 3.0], dtype=np.float32))
        else:
            coords_l.append(np.zeros((1, 2)))
            labels_l.append(np.array([-1.0], dtype=np.float32))
        feeds = {
            "image_embeddings": self.features,
            "point_coords": np.concatenate(coords_l).astype(np.float32)[None],
            "point_labels": np.concatenate(labels_l).astype(np.float32)[None],
            "mask_input": (mask_np if mask_np is not None else np.zeros((1, side, side), np.float32))[None],
            "has_mask_input": np.array([1.0 if mask_np is not None else 0.0], dtype=np.float32),
            "orig_im_size": np.array(self.original_size, dtype=np.float32),
        }
        low_all, iou_all = self.decoder.run(["all_low_res_masks", "all_iou_predictions"], feeds)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        low_res = torch.from_numpy(low_all[:, sel])
        masks = postprocess_masks(low_res, self.img_size, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks[0].numpy(), iou_all[0, sel], low_all[0, sel]


def postprocess_masks(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int],
                      original_size: tuple[int, int]) -> torch.Tensor:
    """Same resizing as ``Sam.postprocess_masks`` without a model: (B, C, 256, 256) → (B, C, H, W)."""
    masks = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


__all__ = ["export_onnx", "export_encoder", "export_decoder", "quantize", "OnnxPredictor", "EncoderGraph",
           "DecoderGraph", "postprocess_masks"]
