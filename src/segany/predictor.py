"""Interactive prediction on one image: embed once, then decode many prompts quickly.

A drop-in for ``segment_anything.SamPredictor``: same methods, arguments and return values.
``predict`` is the numpy edge (prompts in original-image pixels), ``predict_torch`` the tensor
core (prompts already in the model's resized frame, batched). Prompts are validated here, so a
wrong shape or an out-of-image click raises :class:`PromptError` instead of a silent bad mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from segany.data.images import to_rgb_uint8
from segany.errors import InputError, PromptError, StateError
from segany.modeling.sam import Sam
from segany.transforms import ResizeLongestSide

if TYPE_CHECKING:  # segany.fast imports this module's helpers; the class is imported where it is built
    from segany.fast import FastPath

_SET_IMAGE_FIRST = "no image is set: call set_image(image) before predict"


def host_arrays(*tensors: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Tensors → numpy arrays. From a GPU, every copy goes into pinned memory without blocking and the
    stream is synchronised once: a pageable ``.cpu()`` per tensor stages each copy through a driver
    buffer and waits three times, which is a visible share of a ~2 ms click."""
    if not tensors or not all(t.is_cuda for t in tensors):
        return tuple(t.detach().cpu().numpy() for t in tensors)
    # Fresh tensors from torch's caching host allocator: the arrays handed out own their memory, and a
    # block is reused only after the user drops the array (and its copy has finished).
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(host, tensors, strict=True):
        dst.copy_(src.detach(), non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return tuple(h.numpy() for h in host)


def check_points(coords: np.ndarray | None, labels: np.ndarray | None, size_hw: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Validated (N, 2) float pixel coords and (N,) int labels for an image of ``size_hw``, or None.

    Module-level so the CLI can reject a bad click before it loads a model and embeds the image, and so
    the ONNX predictor shares it; raises :class:`PromptError` naming the problem.
    """
    if coords is None and labels is None:
        return None
    if coords is None or labels is None:
        raise PromptError("point_coords and point_labels must be given together; labels are 1 (foreground) "
                          "or 0 (background)")
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(labels)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise PromptError(f"point_coords must have shape (N, 2), got {coords.shape}; pass [[x, y], ...]")
    if labels.ndim != 1 or labels.shape[0] != coords.shape[0]:
        raise PromptError(f"point_labels must have shape (N,) matching point_coords' N={coords.shape[0]}, got "
                          f"{labels.shape}; give one label per point")
    if coords.shape[0] == 0:
        raise PromptError("point_coords is empty; pass at least one point or use None")
    if not np.isfinite(coords).all():
        raise PromptError("point_coords contains NaN or infinite values")
    bad_labels = sorted(set(labels.tolist()) - {-1, 0, 1})
    if bad_labels:
        raise PromptError(f"point_labels must be 1 (foreground), 0 (background) or -1 (ignore), got {bad_labels}")
    h, w = size_hw
    outside = (coords[:, 0] < 0) | (coords[:, 0] > w) | (coords[:, 1] < 0) | (coords[:, 1] > h)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise PromptError(f"point {coords[i].tolist()} lies outside the {w}x{h} (width x height) image; "
                          "coordinates are (x, y) pixels of the original image")
    return coords, labels.astype(np.int64)


def check_mask_input(mask_input: np.ndarray | None, side: int) -> np.ndarray | None:
    """Validated (1, side, side) float32 low-res logits, or None; shared with the ONNX predictor.

    Non-finite values are refused: a NaN logit gives NaN through the whole decoder, so every mask came back
    empty with a NaN score, and nothing said why.
    """
    if mask_input is None:
        return None
    m = np.asarray(mask_input, dtype=np.float32)
    if m.shape == (side, side):
        m = m[None]
    if m.shape != (1, side, side):
        raise PromptError(f"mask_input must have shape (1, {side}, {side}) (low-res logits from a previous "
                          f"predict), got {m.shape}")
    if not np.isfinite(m).all():
        raise PromptError("mask_input contains NaN or infinite values; pass the low-res logits a previous predict "
                          "returned")
    return m


def check_some_prompt(pts: tuple[np.ndarray, np.ndarray] | None, box: np.ndarray | None,
                      mask: np.ndarray | None) -> None:
    """Refuse an empty prompt (the reference decodes one silently; it is never what a user meant): nothing
    given, or only points labelled -1, which the model ignores."""
    if box is not None or mask is not None:
        return
    if pts is None:
        raise PromptError("no prompt given: pass point_coords/point_labels, box or mask_input")
    if (pts[1] == -1).all():
        raise PromptError("every point is labelled -1 (ignored), so nothing is prompted: label points 1 "
                          "(foreground) or 0 (background), or pass a box or mask_input")


def check_box(box: np.ndarray | None, size_hw: tuple[int, int], *, inside: bool = False) -> np.ndarray | None:
    """A validated box as (1, 4) xyxy pixels, or None.

    A box partly outside the image is passed on as it is, not clipped: the reference package does the
    same, and a detector's box that sticks out gives the same mask in both. ``inside=True`` (the command
    line, where a person typed the numbers) also refuses a box that reaches past the image.
    """
    if box is None:
        return None
    box = np.asarray(box, dtype=np.float64)
    if box.shape not in ((4,), (1, 4)):
        raise PromptError(f"box must have shape (4,) as [x0, y0, x1, y1], got {box.shape}; "
                          "for many boxes use predict_torch")
    box = box.reshape(4)
    if not np.isfinite(box).all():
        raise PromptError("box contains NaN or infinite values")
    h, w = size_hw
    if box[2] <= box[0] or box[3] <= box[1]:
        raise PromptError(f"box {box.tolist()} must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    if box[2] <= 0 or box[3] <= 0 or box[0] >= w or box[1] >= h:
        raise PromptError(f"box {box.tolist()} lies entirely outside the {w}x{h} (width x height) image")
    if inside and (box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h):
        raise PromptError(f"box {box.tolist()} reaches outside the {w}x{h} (width x height) image; keep x in "
                          f"0..{w} and y in 0..{h}")
    return box[None]


class SamPredictor:
    def __init__(self, sam_model: Sam, precision: str = "auto", compile: bool | str = False,
                 quantize: str | None = None, *, fast_path: FastPath | None = None,
                 fast_decoder: bool | None = None) -> None:
        """``precision``: ``"auto"`` (bf16 fast path on CUDA, exact fp32 on CPU), ``"fp32"``, ``"bf16"``,
        ``"fp16"``; ``compile`` torch.compiles encoder and decoder; ``quantize="int8"|"fp8"`` runs the
        encoder's GEMMs in 8 bits with ``precision="bf16"``, trading accuracy for speed (see :mod:`segany.fast`).

        ``fast_decoder=True`` with fp32 runs :class:`~segany.fast.FastMaskDecoder`: the same maths, equal to
        the reference to rounding (~1e-6) rather than bit for bit, and about half the time per click on a
        CPU. The default (None) keeps fp32 exact and reduced precisions fast.

        ``fast_path``: an existing :class:`~segany.fast.FastPath` of ``sam_model`` to share (the other
        options are then its own). Building one copies and casts the encoder, so code that makes many
        predictors, like a server making one per request, builds it once. A shared fast path keeps
        per-image caches and CUDA graphs, so callers serialise the predictors that use it.
        """
        if not hasattr(sam_model, "img_size"):  # e.g. a segment_anything model in a half-ported script
            kind = f"{type(sam_model).__module__}.{type(sam_model).__name__}"
            raise InputError(f"SamPredictor needs a segany model, got {kind}; build it with segany: "
                             "segany.sam_model_registry[name](checkpoint=...) or segany.build_sam(name, checkpoint) "
                             "(both read the official SAM checkpoint files)")
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.img_size)
        from segany.fast import FastPath, resolve_precision

        if fast_path is not None:
            if fast_path.model is not sam_model:
                raise InputError("fast_path was built for another model; build it with FastPath(sam_model, ...)")
            self.fast: FastPath | None = fast_path
        else:
            # Plain fp32 eager stays on the reference modules, so its numbers are exactly the reference's.
            wants_fast = resolve_precision(precision, sam_model.device) != "fp32" or bool(compile) or bool(quantize)
            wants_fast = wants_fast or sam_model.device.type == "cuda" or bool(fast_decoder)  # CUDA: graphs
            self.fast = (FastPath(sam_model, precision=precision, compile=compile, quantize=quantize,
                                  fast_decoder=fast_decoder) if wants_fast else None)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    # The reference's per-image size attribute names, as views of original_size / input_size (None before
    # set_image). The reference declares them and its reset_image sets them to None, so code written for it (a
    # subclass's reset_image) assigns them: None is accepted (the sizes follow original_size / input_size), a
    # number sets that side of the size it views.
    def _size_part(self, which: str, i: int) -> int | None:
        size = getattr(self, which)
        return None if size is None else size[i]

    def _set_size_part(self, which: str, i: int, value: int | None) -> None:
        if value is None:
            return
        size = getattr(self, which)
        if size is None:
            raise StateError(f"cannot set one side of {which} before set_image; call set_image first")
        parts = list(size)
        parts[i] = int(value)
        setattr(self, which, tuple(parts))

    orig_h = property(lambda self: self._size_part("original_size", 0),
                      lambda self, v: self._set_size_part("original_size", 0, v))
    orig_w = property(lambda self: self._size_part("original_size", 1),
                      lambda self, v: self._set_size_part("original_size", 1, v))
    input_h = property(lambda self: self._size_part("input_size", 0),
                       lambda self, v: self._set_size_part("input_size", 0, v))
    input_w = property(lambda self: self._size_part("input_size", 1),
                       lambda self, v: self._set_size_part("input_size", 1, v))

    # ------------------------------------------------------------------ image
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the embedding of an (H, W, C) image.

        Args:
            image: uint8 RGB or BGR (grayscale, RGBA, 16-bit and float images are converted; see
                :func:`segany.data.images.to_rgb_uint8` for how floats are read).
            image_format: ``"RGB"`` or ``"BGR"`` (OpenCV order). The channels are reversed when it is not the
                model's ``image_format`` (RGB for every shipped and official model), as in the reference.
        """
        if image_format not in ("RGB", "BGR"):
            raise InputError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not isinstance(image, np.ndarray):
            raise InputError(f"set_image expects a numpy array (H, W, 3), got {type(image).__name__}; "
                             "load files with segany.data.images.load_image")
        flip = image_format != getattr(self.model, "image_format", "RGB") and image.ndim == 3 and image.shape[2] in (3, 4)
        image = to_rgb_uint8(image)
        if flip:
            image = np.ascontiguousarray(image[..., ::-1])
        resized = self.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Embed a (1, 3, h, w) image already resized so its long side is the model's input size."""
        s = self.model.img_size
        if transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3) or max(transformed_image.shape[2:]) != s:
            raise InputError(f"set_torch_image expects (1, 3, h, w) with max(h, w) == {s}, got "
                             f"{tuple(transformed_image.shape)}; resize with predictor.transform.apply_image_torch")
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[2]), int(transformed_image.shape[3]))
        x = self.model.preprocess(transformed_image.to(self.device, torch.float32))
        self.features = self.fast.encode(x) if self.fast is not None else self.model.image_encoder(x)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The (1, 256, 64, 64) embedding of the current image."""
        if not self.is_image_set or self.features is None:
            raise StateError("no image is set: call set_image(image) before get_image_embedding")
        return self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    # --------------------------------------------------------------- prompts
    def _check_mask_input(self, mask_input: np.ndarray | None) -> np.ndarray | None:
        return check_mask_input(mask_input, 4 * self.model.cfg.embed_size)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set, in original-image pixels.

        ``text`` (models with a text token or class head, see :mod:`segany.text.prompting`): with
        clicks/box the candidates are scored by how much each is the named thing (predicted IoU × the
        class head's probability of it) and come back best first, so ``masks[0]`` is the pick; alone, with a
        class head, it returns every instance of it (N masks, best first; N may be 0), otherwise the text
        token's object.

        Returns:
            masks (C, H, W) bool (float logits if ``return_logits``), scores (C,), low-res logits
            (C, 256, 256); C is 3 with ``multimask_output`` and 1 without.
        """
        if not self.is_image_set:
            raise StateError(_SET_IMAGE_FIRST)
        assert self.original_size is not None
        pts = check_points(point_coords, point_labels, self.original_size)
        box_np = check_box(box, self.original_size)
        mask_np = self._check_mask_input(mask_input)
        if text is not None:
            from segany.text.prompting import predict_text

            t = self.transform
            return predict_text(
                self, text,
                None if pts is None else torch.as_tensor(t.apply_coords(pts[0], self.original_size),
                                                         dtype=torch.float32, device=self.device)[None],
                None if pts is None else torch.as_tensor(pts[1], device=self.device)[None],
                None if box_np is None else torch.as_tensor(t.apply_boxes(box_np, self.original_size),
                                                            dtype=torch.float32, device=self.device),
                None if mask_np is None else torch.as_tensor(mask_np, device=self.device)[None],
                multimask_output, return_logits)
        check_some_prompt(pts, box_np, mask_np)
        dev = self.device
        coords_t = labels_t = box_t = mask_t = None
        if pts is not None:
            coords_t = torch.as_tensor(self.transform.apply_coords(pts[0], self.original_size), dtype=torch.float32,
                                       device=dev)[None]
            labels_t = torch.as_tensor(pts[1], dtype=torch.int64, device=dev)[None]
        if box_np is not None:
            box_t = torch.as_tensor(self.transform.apply_boxes(box_np, self.original_size), dtype=torch.float32,
                                    device=dev)
        if mask_np is not None:
            mask_t = torch.as_tensor(mask_np, dtype=torch.float32, device=dev)[None]
        masks, scores, low_res = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output, return_logits)
        return host_arrays(masks[0], scores[0].float(), low_res[0].float())  # type: ignore[return-value]

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction; prompts are in the resized model frame (use ``predictor.transform``).

        Args:
            point_coords: (B, N, 2) XY; point_labels: (B, N).
            boxes: (B, 4) or (B, 1, 4) XYXY. mask_input: (B, 1, 256, 256) logits, or (1, 1, 256, 256)
                shared by the B prompts.

        Returns:
            masks (B, C, H, W), iou predictions (B, C), low-res logits (B, C, 256, 256).
        """
        if not self.is_image_set or self.features is None:
            raise StateError(_SET_IMAGE_FIRST)
        assert self.input_size is not None and self.original_size is not None
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise PromptError("point_labels is required with point_coords")
            if point_coords.ndim != 3 or point_coords.shape[-1] != 2 or point_labels.shape != point_coords.shape[:2]:
                raise PromptError(f"point_coords must be (B, N, 2) and point_labels (B, N), got "
                                  f"{tuple(point_coords.shape)} and {tuple(point_labels.shape)}")
            points = (point_coords.to(self.device), point_labels.to(self.device))
        if boxes is not None:
            if boxes.ndim == 3 and boxes.shape[1] == 1:  # (B, 1, 4): the shape the reference's predict() passes
                boxes = boxes[:, 0]
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise PromptError(f"boxes must be (B, 4) or (B, 1, 4) XYXY, got {tuple(boxes.shape)}")
            boxes = boxes.to(self.device)
        prompt_batch = {t.shape[0] for t in (point_coords, boxes) if t is not None}
        if len(prompt_batch) > 1:
            raise PromptError(f"point_coords and boxes must share the batch size, got sizes {sorted(prompt_batch)}")
        side = 4 * self.model.cfg.embed_size
        if mask_input is not None and (mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, side, side)):
            raise PromptError(f"mask_input must be (B, 1, {side}, {side}) low-res logits (or (1, 1, {side}, {side}) "
                              f"for every prompt), got {tuple(mask_input.shape)}")
        if 0 in prompt_batch or (not prompt_batch and mask_input is not None and mask_input.shape[0] == 0):
            # No prompt at all (a detector that found nothing): empty results. On the fast path a zero batch
            # also left an empty image cache behind, which broke every later click on the image.
            return self._no_masks(multimask_output, return_logits)
        if mask_input is not None:
            mask_input = mask_input.to(self.device)
            if prompt_batch and mask_input.shape[0] == 1:  # one mask for every prompt, as the reference allows
                mask_input = mask_input.expand(prompt_batch.pop(), *mask_input.shape[1:])
            elif prompt_batch and mask_input.shape[0] not in prompt_batch:
                raise PromptError(f"mask_input must have batch size 1 or that of the prompts ({prompt_batch.pop()}), "
                                  f"got {mask_input.shape[0]}")
        if self.fast is not None:
            return self.fast.decode(self.features, points, boxes, mask_input, multimask_output, self.input_size,
                                    self.original_size, return_logits)
        pe = self.model.prompt_encoder
        sparse, dense = pe(points, boxes, mask_input)
        low_res, iou = self.model.mask_decoder(self.features, pe.get_dense_pe(), sparse, dense, multimask_output)
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def _no_masks(self, multimask_output: bool, return_logits: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`predict_torch`'s outputs for a batch of no prompts, with the shapes of any other batch."""
        assert self.original_size is not None
        c = self.model.mask_decoder.num_multimask_outputs if multimask_output else 1
        side = 4 * self.model.cfg.embed_size
        masks = torch.zeros(0, c, *self.original_size, device=self.device,
                            dtype=torch.float32 if return_logits else torch.bool)
        return masks, torch.zeros(0, c, device=self.device), torch.zeros(0, c, side, side, device=self.device)
