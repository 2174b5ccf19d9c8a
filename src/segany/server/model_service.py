"""The model behind the server: image embeddings (LRU-cached, next image prefetched), server-side
prompt decoding (the fallback when the browser cannot run ONNX), the browser's ONNX decoder file,
stage-2 pre-fill masks and masks proposed for a phrase (text prompts, models with a class head or CLIP).

The model is built on first use, not at startup, so the server answers (and the store works)
while weights load. Embeddings are computed one at a time on one worker thread: the encoder
already uses every core (or the GPU), and a prefetch queued behind a user's request must not
compete with it.

On CUDA every use of the shared fast path runs on one of two threads, wherever the request came in: the
embedding worker (embeddings, stage-2 pre-fill) and one decode thread (clicks, text proposals). torch keeps a
compiled function's CUDA graphs per thread (Inductor's cudagraph trees live in thread-local storage), so
clicks decoded in the web server's pool of request threads would record the decoder's graphs, with a memory
pool each, once per thread that happened to serve a click, and a pre-fill would record the encoder's again.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from segany.errors import InputError, SeganyError
from segany.server.schemas import MAX_DECODE_POINTS
from segany.text.vocab import TEXT_MIN_SCORE

log = logging.getLogger(__name__)

PrefillFn = Callable[[np.ndarray], list[dict[str, Any]]]
T = TypeVar("T")


class DecodeExpiredError(SeganyError, LookupError):
    """A decode named as ``previous`` is not (or no longer) held by the server: send the clicks again."""


@dataclass(frozen=True)
class TextProposal:
    """One mask proposed for a phrase: (H, W) bool in image pixels, its score and the label it was given."""

    mask: np.ndarray
    score: float  # predicted IoU × probability of the label (class head), or predicted IoU (text token only)
    label: str


@dataclass(frozen=True)
class Embedding:
    """Image embedding (1, C, g, g) float32 on CPU plus the frames needed to decode against it."""

    features: torch.Tensor
    original_size: tuple[int, int]  # (H, W) of the image file
    input_size: tuple[int, int]  # (h, w) after resize-longest-side, before padding


@dataclass(frozen=True)
class PrefillSettings:
    """Strict automatic-generator thresholds: stage 2 only pre-fills masks the model is sure of."""

    points_per_side: int = 16
    pred_iou_thresh: float = 0.92
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 100
    max_masks: int = 50
    extra: dict[str, Any] = field(default_factory=dict)


def proposal_label(text: str, class_names: Sequence[str], declared: Sequence[str]) -> str:
    """The label of the masks proposed for ``text``: the model's class the phrase names, else the phrase itself
    (hyphens kept: 't-shirt', not 't shirt'); then, when the project declares labels, the declared one it reads
    as ('Dogs' for a project's 'dog', 'T-shirts' for its 'T-shirt'), so an accepted proposal never starts a
    second spelling of a class the project already has."""
    from segany.text.vocab import phrase_label, resolve_label

    label = phrase_label(text)
    if class_names:
        with contextlib.suppress(InputError):
            label = class_names[resolve_label(text, class_names)]
    if declared:
        with contextlib.suppress(InputError):
            label = declared[resolve_label(label, declared)]
    return label


class ModelService:
    def __init__(self, model_type: str = "vit_b", checkpoint: str | None = None, *, device: str | None = None,
                 cache_size: int = 16, cache_dir: Path | None = None, sam: Any = None,
                 prefill: PrefillFn | None = None, prefill_settings: PrefillSettings | None = None,
                 text_min_score: float = TEXT_MIN_SCORE, predictor_options: dict[str, Any] | None = None,
                 decode_cache_size: int = 32) -> None:
        """
        Args:
            model_type: registered model name (``segany.list_models()``).
            checkpoint: weights file; without it (and without ``sam``) the model has random weights,
                which is only useful for trying the app.
            device: ``cuda`` when available unless given.
            cache_size: embeddings kept in memory (a ViT-H embedding is 4 MiB).
            cache_dir: where the exported ONNX decoder is kept between runs.
            sam: an already built model (tests pass a tiny one).
            prefill: replace the stage-2 generator (a function image → list of SAM-style records).
            text_min_score: default threshold of text proposals (predicted IoU × label probability).
            predictor_options: ``SamPredictor`` options (``precision``, ``quantize``, ``compile``). The
                fast path they make is built once, with the model, and shared by every request.
            decode_cache_size: server decodes whose low-res logits are kept for a next click to refine
                (:meth:`remember_decode`); one SAM decode holds 3 x 256 x 256 float32 = 768 KiB.
        """
        self.model_type = model_type
        from segany.checkpoints import BUNDLED

        # Absolute: it is stored with the model version this server registers, and read back from other folders
        # (the path as typed, links kept; build_sam's "bundled" is a name, not a path).
        self.checkpoint = checkpoint if checkpoint in (None, BUNDLED) else os.path.abspath(checkpoint)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cache_size = max(1, cache_size)
        self.cache_dir = cache_dir
        self._sam = sam
        self._version: str | None = None  # see version_name
        self._prefill = prefill
        if prefill_settings is None:  # strict on the model's own scale (SAM's thresholds suit SAM's heads)
            from segany.amg.model_defaults import prefill_defaults

            prefill_settings = PrefillSettings(**prefill_defaults(model_type))
        self.prefill_settings = prefill_settings
        self.text_min_score = text_min_score
        self._clip: Any = None  # the CLIP text encoder of a model with a text token, loaded on first use
        self.predictor_options = dict(predictor_options or {})
        self._fast: Any = None  # the shared FastPath (None: the exact fp32 modules need none)
        self._fast_built = False
        # A shared fast path keeps per-image decoder caches and CUDA graphs: one request at a time uses it.
        # On CUDA the encoder takes the lock too, since a graph capture must not see other threads' work.
        self._fast_lock = threading.RLock()
        # Text prompts one at a time (they share the loaded CLIP); they do not use the fast path, so they take
        # this, not _fast_lock: a class head's search takes seconds on CPU, and every click waited for it.
        self._text_lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._cache: collections.OrderedDict[Any, Embedding] = collections.OrderedDict()
        self._inflight: dict[Any, Future[Embedding]] = {}
        self._cache_lock = threading.Lock()
        self._role = threading.local()  # which of this service's threads the current one is (see _on)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segany-embed",
                                          initializer=self._name_thread, initargs=("embed",))
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segany-decode",
                                           initializer=self._name_thread, initargs=("decode",))
        self._onnx_lock = threading.Lock()
        self._prefill_lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "prefetches": 0}
        self.decode_cache_size = max(1, decode_cache_size)
        self._decodes: collections.OrderedDict[str, tuple[int, np.ndarray]] = collections.OrderedDict()
        self._decodes_lock = threading.Lock()

    # ------------------------------------------------------------------------------------ identity
    @property
    def version_name(self) -> str:
        """Stable name of the weights this service runs, for the store's ``model_versions`` table and the keys of
        its caches (decoder exports, the browser's embeddings); worked out once, when the model is built.

        Not per call: the checkpoint file was hashed again on every call, so a file replaced while serving (a
        ``best.pt`` a running training rewrites) filed the old model's decoder graphs under the new weights'
        name. An in-memory or random model is named by a hash of its whole state dict (the first 4 KiB of 8
        tensors, all encoder BatchNorm entries for segany_tiny, missed a changed decoder).
        """
        self.sam  # noqa: B018 - builds the model, which names it
        assert self._version is not None
        return self._version

    def _name_weights(self, sam: Any) -> str:
        if self.checkpoint:
            # By content, with the engine's own function: the weights `engine retrain` registered (with their
            # parent and dataset version) are found by name, not registered again without lineage.
            from segany.engine.versions import model_version_name

            return model_version_name(self.model_type, self.checkpoint)
        digest = hashlib.sha256()
        for k, v in sorted(sam.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{self.model_type}:inmemory-{digest.hexdigest()[:12]}"

    @property
    def sam(self) -> Any:
        if self._sam is None or self._version is None:
            with self._build_lock:
                if self._sam is None:
                    from segany.checkpoints import build_sam

                    log.info("building %s from %s on %s", self.model_type, self.checkpoint or "random init",
                             self.device)
                    # Named first: a file replaced between the two would otherwise name other weights.
                    version = self._name_weights(None) if self.checkpoint else None
                    self._sam = build_sam(self.model_type, self.checkpoint, device=self.device)
                    self._version = version
                if self._version is None:
                    self._version = self._name_weights(self._sam)
        return self._sam

    def check_weights(self) -> None:
        """Raise :class:`CheckpointError` now if the checkpoint is missing, unreadable or does not fit the model.

        The model itself is still built on first use; this maps the file (its tensors are not read: 2.5 GB for
        ViT-H) and checks keys and shapes against a meta-device shell, so a bad file fails at startup instead of
        on every request.
        """
        if self._sam is not None or self.checkpoint is None:
            return
        from segany.checkpoints import read_checked

        read_checked(self.model_type, self.checkpoint, mmap=True)

    def _ensure_fast(self) -> Any:
        """The shared fast path, built on first use (None when the options need none, e.g. CPU fp32)."""
        from segany.predictor import SamPredictor

        sam = self.sam
        if not self._fast_built:
            with self._build_lock:
                if not self._fast_built:
                    self._fast = SamPredictor(sam, **self.predictor_options).fast
                    self._fast_built = True
        return self._fast

    def _new_predictor(self) -> Any:
        """A ``SamPredictor`` on the shared fast path: the encoder and decoder copies are made once."""
        from segany.predictor import SamPredictor

        fast = self._ensure_fast()
        return SamPredictor(self.sam, fast_path=fast) if fast is not None else SamPredictor(self.sam)

    def _exclusive(self, *, encoder: bool = False) -> Any:
        """Held while a predictor on the shared fast path runs: its decoder caches and CUDA graphs serve one
        request at a time. The encoder takes it only on CUDA, where a graph capture must not see another
        thread's work; on CPU clicks keep flowing while an encoder runs for seconds."""
        import contextlib

        if self._ensure_fast() is None or (encoder and not str(self.device).startswith("cuda")):
            return contextlib.nullcontext()
        return self._fast_lock

    def _name_thread(self, role: str) -> None:
        self._role.name = role

    def _device_threads(self) -> bool:
        """Whether fast-path work must run on this service's own threads (see the module docstring): on CUDA.
        On CPU there are no graphs to keep, and a click runs at once in its request thread while an embedding is
        computed on the worker."""
        return str(self.device).startswith("cuda") and self._ensure_fast() is not None

    def _on(self, role: str, fn: Callable[[], T]) -> T:
        """``fn()`` on the ``"embed"`` or ``"decode"`` thread when :meth:`_device_threads`, else here; its
        exception is raised here as it is."""
        if getattr(self._role, "name", None) == role or not self._device_threads():
            return fn()
        return (self._worker if role == "embed" else self._decoder).submit(fn).result()

    def info(self) -> dict[str, Any]:
        sam = self.sam
        return {"model_type": self.model_type, "img_size": sam.img_size, "embed_size": sam.cfg.embed_size,
                "embed_dim": sam.cfg.decoder.transformer_dim, "mask_threshold": float(sam.mask_threshold),
                "device": str(self.device), "version": self.version_name,
                # text prompts need a class head or a CLIP text token (the app hides its text box otherwise)
                "text": sam.cfg.text is not None or sam.class_head is not None}

    # ---------------------------------------------------------------------------------- embeddings
    def _compute(self, path: str) -> Embedding:
        from segany.data.images import load_image

        image = load_image(path)
        pred = self._new_predictor()
        with self._exclusive(encoder=True):
            pred.set_image(image)
            feats = pred.get_image_embedding().detach().to("cpu", torch.float32).contiguous()
        assert pred.original_size is not None and pred.input_size is not None
        return Embedding(feats, pred.original_size, pred.input_size)

    def _submit(self, key: Any, path: str) -> Future[Embedding]:
        with self._cache_lock:
            if key in self._cache:
                fut: Future[Embedding] = Future()
                self._cache.move_to_end(key)
                fut.set_result(self._cache[key])
                return fut
            if key in self._inflight:
                return self._inflight[key]
            fut = self._worker.submit(self._compute, path)
            self._inflight[key] = fut

        def done(f: Future[Embedding]) -> None:
            with self._cache_lock:
                self._inflight.pop(key, None)
                if f.exception() is None:
                    self._cache[key] = f.result()
                    self._cache.move_to_end(key)
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)

        fut.add_done_callback(done)
        return fut

    @staticmethod
    def _key(image_id: int, path: str) -> tuple[Any, ...]:
        """The cache key of an image's embedding: its id and its file as it is now. The id alone served a file
        replaced on disk (or an id the database reused after a removal) with the old picture's embedding."""
        try:
            st = os.stat(path)
        except OSError:
            return (image_id, path)  # computing it raises the image's own error
        return (image_id, path, st.st_mtime_ns, st.st_size, st.st_ino)

    def embedding(self, image_id: int, path: str, *, prefetch: tuple[int, str] | None = None) -> Embedding:
        """Embedding of one image (cached); ``prefetch`` = (id, path) of the image likely needed next."""
        key = self._key(image_id, path)
        with self._cache_lock:
            hit = key in self._cache
            self.stats["hits" if hit else "misses"] += 1
        fut = self._submit(key, path)
        if prefetch is not None:
            next_key = self._key(*prefetch)
            with self._cache_lock:
                queued = next_key in self._cache or next_key in self._inflight
            if not queued:
                self.stats["prefetches"] += 1
                self._submit(next_key, prefetch[1])
        return fut.result()

    def cached_ids(self) -> list[int]:
        with self._cache_lock:
            return [key[0] for key in self._cache]

    # ----------------------------------------------------------------------------- server decoding
    def _predictor(self, emb: Embedding) -> Any:
        """A ``SamPredictor`` on the cached embedding (the encoder does not run again); decode through it
        inside :meth:`_exclusive` (its fast path is shared), except text prompts, which do not use that path."""
        pred = self._new_predictor()
        pred.features = emb.features.to(pred.device)
        pred.original_size = emb.original_size
        pred.input_size = emb.input_size
        pred.is_image_set = True
        return pred

    def decode(self, emb: Embedding, *, points_xy: Sequence[Sequence[float]] | None = None,
               labels: Sequence[int] | None = None, box_xyxy: Sequence[float] | None = None,
               mask_input: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Three candidate masks (3, H, W) bool, their predicted IoU (3,) and low-res logits (3, 4g, 4g).

        ``points_xy``: at most ``MAX_DECODE_POINTS`` [x, y] original-image pixels with one label each;
        anything else raises :class:`InputError` (the predictor checks values, this the shape numpy needs).
        """
        pc, pl = _click_arrays(points_xy, labels)
        box = np.asarray(box_xyxy, dtype=np.float64) if box_xyxy is not None else None

        def run() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            with self._exclusive():
                return self._predictor(emb).predict(pc, pl, box, mask_input, multimask_output=True)

        return self._on("decode", run)

    # Multi-click refinement. SAM refines a click set from the previous step's chosen low-res logits (its
    # mask_input), as the browser's ONNX decoder does and segany.eval.interactive evaluates; a server decode
    # must do the same or the two modes give different masks. The logits stay here, named by a short id,
    # rather than travelling with every click: as base64 float16 one candidate is 175 KB for SAM
    # (256 x 256) and 44 KB for segany_tiny (128 x 128), and a response would carry three of them, against
    # ~20 bytes for an id. Kept as exact float32 too (float16 would move pixels near the threshold). The
    # cost is state: an id expires once `decode_cache_size` newer decodes (of any image) came after it, or
    # when the server restarts, and the client then replays the clicks that made it (see app.js).
    def remember_decode(self, image_id: int, low_res_logits: np.ndarray) -> str:
        """Keep one decode's low-res logits (C, L, L) for a later click; returns its ``decode_id``."""
        import secrets

        decode_id = secrets.token_urlsafe(9)  # 12 characters, unguessable: ids are not shared between users
        logits = np.ascontiguousarray(low_res_logits, dtype=np.float32)
        with self._decodes_lock:
            self._decodes[decode_id] = (image_id, logits)
            while len(self._decodes) > self.decode_cache_size:
                self._decodes.popitem(last=False)
        return decode_id

    def previous_logits(self, image_id: int, decode_id: str, index: int) -> np.ndarray:
        """Candidate ``index``'s low-res logits (1, L, L) of a kept decode of this image: the ``mask_input``
        of the next click.

        Raises:
            DecodeExpiredError: the id is unknown or expired (the client sends the clicks again).
            InputError: the id belongs to another image, or ``index`` names no candidate.
        """
        with self._decodes_lock:
            hit = self._decodes.get(decode_id)
            if hit is not None:
                self._decodes.move_to_end(decode_id)
        if hit is None:
            raise DecodeExpiredError(
                f"decode_id {decode_id!r} is unknown or expired (the server keeps its last "
                f"{self.decode_cache_size} decodes); decode the clicks again, each naming the decode before it")
        owner, logits = hit
        if owner != image_id:
            raise InputError(f"decode_id {decode_id!r} belongs to image {owner}, not image {image_id}; name a "
                             "decode of this image")
        if not 0 <= index < logits.shape[0]:
            raise InputError(f"previous index {index} names no candidate: decode {decode_id!r} has "
                             f"{logits.shape[0]} (0 to {logits.shape[0] - 1})")
        return logits[index][None]

    # ---------------------------------------------------------------------------------- text prompts
    def text_proposals(self, emb: Embedding, text: str, *, max_masks: int = 20, min_score: float | None = None,
                       labels: Sequence[str] = ()) -> tuple[str, list[TextProposal]]:
        """Masks of ``text`` in the image, best first: ``(label, proposals)``.

        With a class head, every instance of the class ("segment every <class>",
        :func:`segany.text.prompting.segment_every`); with only a CLIP text token, the token's one object
        (``SamPredictor.predict(text=...)``). A model with neither, an empty phrase or a label outside a
        closed vocabulary raise :class:`segany.errors.PromptError` whose message says what to do. The label is
        :func:`proposal_label`'s: one of the project's ``labels`` when the phrase names one.
        """
        from segany.text.vocab import check_text

        text = check_text(text)
        return self._on("decode", lambda: self._text_proposals(emb, text, max_masks, min_score, labels))

    def _text_proposals(self, emb: Embedding, text: str, max_masks: int, min_score: float | None,
                        labels: Sequence[str]) -> tuple[str, list[TextProposal]]:
        from segany.text.prompting import segment_every

        # On CUDA also the fast path's lock: no kernel of this may run while the encoder records its graphs (there
        # it costs nothing, text and clicks share the decode thread anyway).
        gpu = self._fast_lock if self._device_threads() else contextlib.nullcontext()
        with self._text_lock, gpu:
            pred = self._predictor(emb)
            if self._clip is not None:
                pred.clip = self._clip
            model = self.sam
            threshold = self.text_min_score if min_score is None else min_score
            if model.class_head is not None:
                masks, scores, _ = segment_every(pred, text, min_score=threshold, max_instances=max_masks)
                label = proposal_label(text, model.class_head.class_names, labels)
            else:  # text token only (or no text path at all: predict raises the error naming the model to use)
                masks, scores, _ = pred.predict(text=text, multimask_output=False)
                keep = [i for i in np.argsort(-scores) if scores[i] >= threshold and masks[i].any()][:max_masks]
                masks, scores = masks[keep], scores[keep]
                label = proposal_label(text, (), labels)
            if getattr(pred, "clip", None) is not None:
                self._clip = pred.clip  # keep the loaded CLIP for the next phrase
            # An empty mask is nothing to accept, whichever path proposed it.
            return label, [TextProposal(np.asarray(m, dtype=bool), float(s), label)
                           for m, s in zip(masks, scores, strict=True) if m.any()]

    # -------------------------------------------------------------------------------- ONNX decoder
    def _onnx_cache(self) -> tuple[Path, str]:
        """(folder of exported decoders, this model version's name made safe for a file name)."""
        import tempfile

        base = self.cache_dir or Path(tempfile.gettempdir()) / "segany-onnx"
        return base, self.version_name.replace(":", "-").replace("/", "_")

    def onnx_decoder_path(self) -> Path:
        """The browser decoder for this model, exported on first request and kept in ``cache_dir``."""
        base, safe = self._onnx_cache()
        path = base / f"decoder-{safe}.onnx"
        with self._onnx_lock:
            if not path.exists():
                log.info("exporting the browser decoder to %s", path)
                path.parent.mkdir(parents=True, exist_ok=True)
                from segany.export.onnx import export_decoder  # the `segany export onnx` graph

                export_decoder(self.sam, path, multimask=True)
        return path

    def onnx_split_decoder_path(self, part: str) -> Path:
        """``decoder_image.onnx`` (run once per embedding) or ``decoder_click.onnx`` (per click) for this
        model, both exported on first request and kept in ``cache_dir``; what the browser app runs."""
        from segany.export.onnx_split import CLICK_FILE, FORMAT_VERSION, IMAGE_FILE, export_split_decoder

        files = {"image": IMAGE_FILE, "click": CLICK_FILE}
        if part not in files:
            raise InputError(f"unknown decoder part {part!r}; use 'image' or 'click'")
        base, safe = self._onnx_cache()
        folder = base / f"split{FORMAT_VERSION}-{safe}"  # a new graph format never reuses old files
        with self._onnx_lock:
            if not all((folder / f).exists() for f in files.values()):
                log.info("exporting the browser's split decoder to %s", folder)
                export_split_decoder(self.sam, folder)
        return folder / files[part]

    # ----------------------------------------------------------------------------- stage-2 pre-fill
    def prefill(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Confident automatic masks for one image: records with ``segmentation`` (H, W) bool,
        ``predicted_iou``, ``stability_score`` and ``point_coords``."""
        with self._prefill_lock:  # the generator holds per-image state and uses all cores
            if self._prefill is not None:
                return self._prefill(image)

            def run() -> list[dict[str, Any]]:
                with self._exclusive():
                    return default_prefill(self.sam, image, self.prefill_settings,
                                           predictor=self._new_predictor())

            return self._on("embed", run)  # it encodes: where the encoder's graphs are


def _click_arrays(points_xy: Sequence[Sequence[float]] | None, labels: Sequence[int] | None
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(N, 2) float64 points and (N,) labels for the predictor, or (None, None) without points.

    The count is capped because the decoder's work grows with it (the HTTP schema refuses more too, this
    guards other callers), and the conversion is checked because numpy raises a bare ValueError on a ragged
    list ([[1, 2], [5]]), which would surface as a server error instead of the caller's mistake.
    """
    if not points_xy:
        return None, None
    if len(points_xy) > MAX_DECODE_POINTS:
        raise InputError(f"a decode takes at most {MAX_DECODE_POINTS} points (the clicks on one object), got "
                         f"{len(points_xy)}; send the clicks of one object")
    try:
        pc = np.asarray(points_xy, dtype=np.float64)
        pl = np.asarray(labels if labels is not None else [], dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"points must be [[x, y], ...] with two numbers each and labels one integer (1, 0 or -1) "
                         f"per point; could not read them ({exc})") from exc
    if pc.ndim != 2 or pc.shape[1] != 2:
        raise InputError(f"points must be [[x, y], ...] (shape (N, 2)), got shape {pc.shape}")
    return pc, pl


def default_prefill(sam: Any, image: np.ndarray, s: PrefillSettings, predictor: Any = None) -> list[dict[str, Any]]:
    """Run ``SamAutomaticMaskGenerator`` with strict thresholds (imported lazily: it is optional).

    ``predictor``: the one the generator uses (e.g. on a shared fast path); default: its own.
    """
    try:
        from segany.amg import SamAutomaticMaskGenerator  # type: ignore[attr-defined]
    except ImportError as exc:
        raise InputError("stage-2 pre-fill needs segany.amg.SamAutomaticMaskGenerator, which this install "
                         "lacks; update segany") from exc
    gen = SamAutomaticMaskGenerator(
        sam, points_per_side=s.points_per_side, pred_iou_thresh=s.pred_iou_thresh,
        stability_score_thresh=s.stability_score_thresh, box_nms_thresh=s.box_nms_thresh,
        min_mask_region_area=s.min_mask_region_area, output_mode="binary_mask", **s.extra,
    )
    if predictor is not None:
        gen.predictor = predictor
    records = gen.generate(image)
    records.sort(key=lambda r: -float(r.get("predicted_iou", 0.0)))
    return records[: s.max_masks]
