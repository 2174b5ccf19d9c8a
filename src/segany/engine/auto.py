"""Data-engine stage 3, fully automatic annotation (SAM §4 "Fully automatic stage").

The automatic mask generator runs over every image of a project that has no done marker yet. Each
image's result is written by the driver in **one transaction** with the image's done marker (an
``image_runs`` row): the image's previous unreviewed automatic masks are replaced (an image-level
upsert) and the marker is inserted. A job killed at any moment therefore leaves, per image, either
the old state or the new masks plus marker; never half a set and never two sets. A result that
arrives twice (a retried Ray task, a resumed run racing an old one) finds the marker and is dropped.

Where the model runs is the job runner's business (:mod:`segany.engine.jobs`: in-process, a pool
of worker processes, or Ray actors); this module holds what every runner shares: the settings, the
worker that turns an image into compact RLE records, and the driver that writes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid as uuid_lib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segany.amg.config import AmgConfig
from segany.errors import InputError

log = logging.getLogger(__name__)

AUTO_KIND = "auto"
# Annotation uuids of stage 3 are uuid5(namespace, "<image sha256>:<model version>:<index>"), so a
# rewrite of the same result produces the same keys.
AUTO_NAMESPACE = uuid_lib.UUID("5e6a0000-0000-4000-8000-000000000003")


@dataclass(frozen=True)
class AutoSettings:
    """Automatic mask generator settings for stage 3 (SAM used 32×32 points plus crops on 11 M images).

    The generator is pluggable (``generator``), so these are the keyword arguments every generator takes
    (SamAutomaticMaskGenerator's), not an :class:`AmgConfig`; their defaults are AmgConfig's, and their
    values are checked by AmgConfig itself whichever generator runs. They are stored flat because their
    hash is recorded with every stage-3 run.
    """

    points_per_side: int = 32
    points_per_batch: int = AmgConfig.points_per_batch
    pred_iou_thresh: float = AmgConfig.pred_iou_thresh
    stability_score_thresh: float = AmgConfig.stability_score_thresh
    stability_score_offset: float = AmgConfig.stability_score_offset
    box_nms_thresh: float = AmgConfig.box_nms_thresh
    crop_n_layers: int = AmgConfig.crop_n_layers
    min_mask_region_area: int = AmgConfig.min_mask_region_area
    max_masks: int | None = None  # keep only the best masks by predicted IoU (None: all)
    review_state: str = "accepted"  # SA-1B kept stage-3 masks without review; "pending" queues them
    # ``module:Class`` of the generator: anything built as Class(sam, output_mode=..., **generator_kwargs())
    # with a ``generate(image) -> list[record]`` method in SamAutomaticMaskGenerator's record format.
    generator: str = "segany.amg:SamAutomaticMaskGenerator"

    def __post_init__(self) -> None:
        if ":" not in self.generator:
            raise InputError(f"generator must be 'module:Class', got {self.generator!r}")
        if self.review_state not in ("accepted", "pending"):
            raise InputError(f"review_state must be 'accepted' or 'pending', got {self.review_state!r}")
        if self.max_masks is not None and self.max_masks < 1:
            raise InputError(f"max_masks must be >= 1 or None, got {self.max_masks}")
        AmgConfig(**self.generator_kwargs())  # the same checks and messages as the generator's own
        for name in ("pred_iou_thresh", "stability_score_thresh"):  # AmgConfig allows any float here
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {v}")

    def generator_kwargs(self) -> dict[str, Any]:
        own = ("max_masks", "review_state", "generator")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in own}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """Which model a worker builds: a registered name and optionally a checkpoint (path or bytes)."""

    model: str = "segany_tiny"
    checkpoint: str | None = None
    device: str = "cpu"
    # Checkpoint content, for workers on other machines that cannot read ``checkpoint`` (Ray ships it).
    checkpoint_bytes: bytes | None = field(default=None, repr=False)
    # "auto": bf16 on CUDA and on CPUs that multiply bf16 in hardware, resolved on each worker's own machine
    # (segany.fast.cpu_has_native_bf16); "fp32" keeps a run exact everywhere.
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):  # fail on the driver, not in every worker
            raise InputError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")

    def build(self) -> Any:
        from segany.checkpoints import build_sam

        if self.checkpoint_bytes is not None:
            with tempfile.TemporaryDirectory(prefix="segany-ckpt-") as tmp:
                path = Path(tmp) / "model.pt"
                path.write_bytes(self.checkpoint_bytes)
                return build_sam(self.model, path, device=self.device)
        return build_sam(self.model, self.checkpoint, device=self.device)

    def version_name(self) -> str:
        """Stable model-version name: the model plus the checkpoint's sha256 (or ``random-init``)."""
        if self.checkpoint_bytes is not None:
            return f"{self.model}:{hashlib.sha256(self.checkpoint_bytes).hexdigest()[:16]}"
        if self.checkpoint:
            from segany.engine.store import file_sha256

            return f"{self.model}:{file_sha256(Path(self.checkpoint))[:16]}"
        return f"{self.model}:random-init"


@dataclass(frozen=True)
class ImageTask:
    image_id: int
    path: str
    sha256: str
    data: bytes | None = field(default=None, repr=False)  # the file's bytes when workers cannot read path


@dataclass
class MaskRecord:
    """One automatic mask as it travels from a worker to the driver (compact: RLE, not pixels)."""

    rle: dict[str, Any]
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]]
    crop_box: list[float]


@dataclass
class ImageResult:
    image_id: int
    sha256: str
    masks: list[MaskRecord]
    seconds: float
    worker: str = ""


class AutoWorker:
    """One model replica and its automatic mask generator; ``process`` maps an image to its masks."""

    def __init__(self, spec: ModelSpec, settings: AutoSettings, *, threads: int | None = None) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(max(1, threads))
        self.spec = spec
        self.settings = settings
        self.sam = spec.build()
        self.generator = make_generator(self.sam, settings)
        self.precision = worker_precision(spec)
        if hasattr(self.generator, "predictor") and self.precision != ("bf16" if spec.device.startswith("cuda")
                                                                      else "fp32"):
            from segany.predictor import SamPredictor

            self.generator.predictor = SamPredictor(self.sam, precision=self.precision)
        self.name = f"pid{os.getpid()}"

    def process(self, task: ImageTask) -> ImageResult:
        import numpy as np

        from segany.data.images import load_image
        from segany.engine.masks import encode_mask, rle_area_bbox

        t0 = time.perf_counter()
        if task.data is not None:
            with tempfile.NamedTemporaryFile(suffix=Path(task.path).suffix or ".img") as f:
                f.write(task.data)
                f.flush()
                image = load_image(f.name)
        else:
            image = load_image(task.path)
        records = self.generator.generate(image)
        records.sort(key=lambda r: -float(r.get("predicted_iou", 0.0)))
        if self.settings.max_masks is not None:
            records = records[: self.settings.max_masks]
        masks = []
        for r in records:
            seg = r["segmentation"]
            if isinstance(seg, np.ndarray):
                rle = encode_mask(seg)
            else:  # an RLE already (output_mode="coco_rle")
                from segany.engine.masks import normalize_rle

                rle = normalize_rle(seg)
            if not rle_area_bbox(rle)[0]:  # an empty mask annotates nothing
                continue
            masks.append(MaskRecord(
                rle=rle, predicted_iou=float(r.get("predicted_iou", 0.0)),
                stability_score=float(r.get("stability_score", 0.0)),
                point_coords=np.asarray(r.get("point_coords", []), dtype=float).reshape(-1, 2).tolist(),
                crop_box=[float(v) for v in np.asarray(r.get("crop_box", []), dtype=float).ravel()]))
        return ImageResult(task.image_id, task.sha256, masks, time.perf_counter() - t0, self.name)


def worker_precision(spec: ModelSpec) -> str:
    """The precision a worker runs: ``spec.precision``, with ``auto`` resolved on this machine."""
    from segany.fast import cpu_has_native_bf16, resolve_precision

    if spec.precision == "auto" and not spec.device.startswith("cuda") and cpu_has_native_bf16():
        return "bf16"
    return resolve_precision(spec.precision, spec.device)


def make_generator(sam: Any, settings: AutoSettings) -> Any:
    """The automatic mask generator (``segany.amg`` unless settings name another) configured for stage 3."""
    import importlib

    module, _, name = settings.generator.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"stage 3 needs the mask generator {settings.generator!r}, which cannot be imported "
                         f"({exc}); update segany or pass another --generator module:Class") from exc
    return cls(sam, output_mode="binary_mask", **settings.generator_kwargs())


# ------------------------------------------------------------------------------------------ store side
def pending_tasks(store: Any, project_id: int, *, redo: bool = False, ship_bytes: bool = False
                  ) -> tuple[list[ImageTask], int]:
    """Images of the project without an ``auto`` done marker (all of them with ``redo``); and how many
    already have one."""
    from sqlalchemy import select

    from segany.engine.db import Image, ImageRun

    with store.transaction() as s:
        images = list(s.execute(select(Image.id, Image.path, Image.sha256)
                                .where(Image.project_id == project_id).order_by(Image.id)))
        done = set(s.scalars(select(ImageRun.image_id).join(Image, Image.id == ImageRun.image_id)
                             .where(Image.project_id == project_id, ImageRun.kind == AUTO_KIND)))
    todo = [im for im in images if redo or im.id not in done]
    tasks = [ImageTask(im.id, im.path, im.sha256, Path(im.path).read_bytes() if ship_bytes else None)
             for im in todo]
    return tasks, len(images) - len(todo)


def write_result(store: Any, result: ImageResult, *, model_version_id: int | None, settings: AutoSettings,
                 redo_after: float | None = None) -> bool:
    """Write one image's masks and its done marker in one transaction; False if it was already done.

    The image's unreviewed automatic masks (``source=auto``, ``pending``, or ``accepted`` by nobody) are
    replaced, so writing an image again never adds a second set. ``redo_after`` (a ``time.time()``):
    a marker older than that is replaced instead of treated as done (``--redo``).
    """
    import datetime as dt

    from sqlalchemy import delete, select

    from segany.engine.db import Annotation, Image, ImageRun, utcnow
    from segany.engine.masks import rle_area_bbox

    with store.transaction() as s:
        run = s.scalar(select(ImageRun).where(ImageRun.image_id == result.image_id, ImageRun.kind == AUTO_KIND))
        if run is not None:
            fresh = redo_after is None or run.finished_at >= dt.datetime.fromtimestamp(
                redo_after, dt.timezone.utc).replace(tzinfo=None)
            if fresh:
                return False
        im = s.get(Image, result.image_id)
        if im is None:  # deleted while the job ran
            return False
        # Only masks no person has touched: a rejected one keeps no annotator but has a reviewer, and stays
        # for retraining.
        s.execute(delete(Annotation).where(Annotation.image_id == im.id, Annotation.source == "auto",
                                           Annotation.annotator_id.is_(None), Annotation.reviewer_id.is_(None))
                  .execution_options(synchronize_session=False))
        for i, m in enumerate(result.masks):
            if tuple(m.rle["size"]) != (im.height, im.width):
                raise InputError(f"mask size {m.rle['size']} does not match image {im.id} "
                                 f"[{im.height}, {im.width}]; the image file changed after it was registered")
            area, bbox = rle_area_bbox(m.rle)
            key = uuid_lib.uuid5(AUTO_NAMESPACE, f"{im.sha256}:{model_version_id}:{i}")
            s.add(Annotation(
                uuid=str(key), image_id=im.id, label="object", rle_counts=m.rle["counts"], height=im.height,
                width=im.width, area=area, bbox_xywh=bbox, source="auto", review_state=settings.review_state,
                model_version_id=model_version_id, prompts={"point_coords": m.point_coords, "crop_box": m.crop_box},
                annotator_id=None, seconds_spent=None, predicted_iou=m.predicted_iou,
                stability_score=m.stability_score, revision=1))
        if run is None:
            s.add(ImageRun(image_id=im.id, kind=AUTO_KIND, model_version_id=model_version_id,
                           num_masks=len(result.masks), settings_hash=settings.digest(), seconds=result.seconds,
                           finished_at=utcnow()))
        else:
            run.model_version_id = model_version_id
            run.num_masks = len(result.masks)
            run.settings_hash = settings.digest()
            run.seconds = result.seconds
            run.finished_at = utcnow()
    return True


def register_model(store: Any, spec: ModelSpec, meta: dict[str, Any] | None = None) -> int:
    """The store's model-version id for ``spec`` (created on first use)."""
    from segany.engine.store import file_sha256

    sha = None
    if spec.checkpoint:
        sha = file_sha256(Path(spec.checkpoint))
    return int(store.register_model_version(spec.version_name(), spec.model, spec.checkpoint, checkpoint_sha256=sha,
                                            meta=dict(meta or {})))


@dataclass
class AutoSummary:
    images_total: int = 0
    images_skipped: int = 0  # already done before this run
    images_written: int = 0
    duplicates_dropped: int = 0  # results that arrived for an image already written
    masks_written: int = 0
    seconds: float = 0.0
    model_version_id: int | None = None
    backend: str = "local"
    workers: int = 1
    worker_seconds: float = 0.0

    @property
    def images_per_hour(self) -> float:
        return 3600.0 * self.images_written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images_per_hour": round(self.images_per_hour, 1)}


def run_auto(store: Any, project: str | None, spec: ModelSpec, settings: AutoSettings, *, backend: str = "local",
             workers: int = 1, ray_address: str | None = None, redo: bool = False,
             on_start: Callable[[int, int], None] | None = None,
             on_result: Callable[[ImageResult, bool], None] | None = None,
             runner_hook: Callable[[Any], None] | None = None) -> AutoSummary:
    """Run stage 3 over the project's images that are not done yet.

    Args:
        store: an open :class:`segany.engine.store.Store`.
        project: project name (None: the first project).
        backend: ``local`` (in-process for 1 worker, else a process pool) or ``ray``.
        workers: model replicas (processes or actors); for Ray, 0 = one per GPU, else one per CPU.
        ray_address: ``local`` starts a Ray cluster on this machine; otherwise the address to join.
        on_start: called with (images to do, images already done) before work starts.
        on_result: called after each result with (result, written?) — progress bars.
        runner_hook: called with the runner once it has started (tests use it to kill a worker).
    """
    from segany.engine import jobs

    proj = store.get_project(project)
    mv = register_model(store, spec, meta={"device": spec.device})
    tasks, skipped = pending_tasks(store, proj["id"], redo=redo, ship_bytes=backend == "ray")
    summary = AutoSummary(images_total=len(tasks) + skipped, images_skipped=skipped, model_version_id=mv,
                          backend=backend, workers=workers)
    if on_start:
        on_start(len(tasks), skipped)
    redo_after = time.time() if redo else None
    t0 = time.perf_counter()
    if tasks:
        runner = jobs.make_runner(backend, spec, settings, workers=workers, address=ray_address)
        summary.workers = runner.workers
        try:
            if runner_hook:
                runner_hook(runner)
            for result in runner.run(tasks):
                written = write_result(store, result, model_version_id=mv, settings=settings, redo_after=redo_after)
                summary.worker_seconds += result.seconds
                if written:
                    summary.images_written += 1
                    summary.masks_written += len(result.masks)
                else:
                    summary.duplicates_dropped += 1
                if on_result:
                    on_result(result, written)
        finally:
            runner.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def count_sets(store: Any, project_id: int) -> dict[int, tuple[int, int | None]]:
    """Per image: (automatic masks stored, masks its done marker says were written; None without marker)."""
    from sqlalchemy import func, select

    from segany.engine.db import Annotation, Image, ImageRun

    with store.transaction() as s:
        ids = list(s.scalars(select(Image.id).where(Image.project_id == project_id)))
        n = dict(s.execute(select(Annotation.image_id, func.count()).where(Annotation.source == "auto",
                                                                           Annotation.image_id.in_(ids))
                           .group_by(Annotation.image_id)).all())
        runs = dict(s.execute(select(ImageRun.image_id, ImageRun.num_masks).where(ImageRun.kind == AUTO_KIND,
                                                                                  ImageRun.image_id.in_(ids))).all())
    return {i: (int(n.get(i, 0)), runs.get(i)) for i in ids}
