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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segany.amg.config import AmgConfig
from segany.engine.locks import ClaimLostError, check_claim, held_claim, touch_claim
from segany.errors import InputError

log = logging.getLogger(__name__)

AUTO_KIND = "auto"
# Project setting holding an unfinished ``--redo`` ({settings_hash, model_version_id, started}): a rerun
# finishes it instead of starting over or leaving two settings' masks mixed.
REDO_KEY = "auto_redo"
# Project setting mapping a settings hash to those settings (the last KEEP_SETTINGS runs' ones), so a refusal
# names the values that changed instead of two hashes.
SETTINGS_KEY = "auto_settings"
KEEP_SETTINGS = 16
# Annotation uuids of stage 3 are uuid5(namespace, "<image id>:<generation>:<index>"): the image id makes them
# unique per project (two projects may hold the same file), the generation (how many times stage 3 wrote the
# image, kept on its done marker) keeps a redo off the ids of masks people kept, and a rewrite of the same
# generation produces the same keys.
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
    # The precision the model ran at (fp32, bf16, fp16): bf16 and fp32 masks differ beyond rounding, so it is a
    # setting like the thresholds. :func:`run_auto` fills it in from the ModelSpec once ``auto`` is decided; leave
    # it None. None is also what older segany versions recorded (their hash lacks it): which precision made those
    # masks is unknown, and they count as made with this run's.
    precision: str | None = None

    def __post_init__(self) -> None:
        if ":" not in self.generator:
            raise InputError(f"generator must be 'module:Class', got {self.generator!r}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise InputError(f"precision must be the one that ran (fp32, bf16 or fp16) or None, got "
                             f"{self.precision!r}; leave it None and pass ModelSpec(precision=...)")
        if self.review_state not in ("accepted", "pending"):
            raise InputError(f"review_state must be 'accepted' or 'pending', got {self.review_state!r}")
        if self.max_masks is not None and self.max_masks < 1:
            raise InputError(f"max_masks must be >= 1, got {self.max_masks} (leave it unset to keep every mask)")
        AmgConfig(**self.generator_kwargs())  # the same checks and messages as the generator's own
        for name in ("pred_iou_thresh", "stability_score_thresh"):  # AmgConfig allows any float here
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {v}")

    def generator_kwargs(self) -> dict[str, Any]:
        own = ("max_masks", "review_state", "generator", "precision")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in own}

    def digest(self) -> str:
        """The hash recorded on each done marker. Without a precision it is the hash older segany versions
        recorded for the same values (they had no precision field)."""
        values = dataclasses.asdict(self)
        if values["precision"] is None:
            del values["precision"]
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """Which model a worker builds: a registered name and optionally a checkpoint (path or bytes)."""

    model: str = "segany_tiny"
    checkpoint: str | None = None
    device: str = "cpu"
    # Checkpoint content, for workers on other machines that cannot read ``checkpoint`` (Ray ships it).
    checkpoint_bytes: bytes | None = field(default=None, repr=False)
    # "auto": bf16 on CUDA and on CPUs that multiply bf16 in hardware (segany.fast.cpu_has_native_bf16), else
    # fp32 with the folded decoder; "fp32" keeps a run exact everywhere. run_auto decides "auto" once, on the
    # driver (:func:`decide_precision`), and sends the workers what it decided: workers deciding on their own
    # machines could run two precisions in one project, and the one recorded would not be the one that ran.
    precision: str = "auto"
    # The folded fp32 mask decoder (equal to the exact one to rounding): what "auto" runs on CPUs without bf16.
    fast_decoder: bool = False

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
        """The weights' model-version name (:func:`segany.engine.versions.model_version_name`, shared with serve)."""
        from segany.engine.versions import model_version_name

        return model_version_name(self.model, self.checkpoint, checkpoint_bytes=self.checkpoint_bytes)


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
    error: str | None = None  # why the image could not be read (no masks then; the image stays to do)


class AutoWorker:
    """One model replica and its automatic mask generator; ``process`` maps an image to its masks."""

    def __init__(self, spec: ModelSpec, settings: AutoSettings, *, threads: int | None = None) -> None:
        if threads is not None:  # None: torch's own choice (OMP_NUM_THREADS where set)
            from segany.fast import configure_cpu_threads

            configure_cpu_threads(threads)
        self.spec = spec
        self.settings = settings
        self.sam = spec.build()
        self.generator = make_generator(self.sam, settings)
        self.precision, fast_decoder = worker_precision(spec)
        cuda = spec.device.startswith("cuda")
        if hasattr(self.generator, "predictor") and (self.precision != ("bf16" if cuda else "fp32") or fast_decoder):
            from segany.predictor import SamPredictor

            self.generator.predictor = SamPredictor(self.sam, precision=self.precision,
                                                    fast_decoder=True if fast_decoder else None)
        self.name = f"pid{os.getpid()}"

    def process(self, task: ImageTask) -> ImageResult:
        import numpy as np

        from segany.engine.masks import encode_mask, rle_area_bbox

        t0 = time.perf_counter()
        try:
            image = _read_task_image(task)
        except Exception as exc:  # one bad file must not stop the run: it is reported and left to do
            return ImageResult(task.image_id, task.sha256, [], time.perf_counter() - t0, self.name,
                               error=describe_unreadable(task, exc))
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


class ImageChangedError(Exception):
    """The file's bytes are not those registered: masks of other pixels must not be stored against the image."""


def _read_task_image(task: ImageTask) -> Any:
    """The task's image as RGB uint8, from its shipped bytes or its path, checked against the registered sha256
    (a file replaced by another of the same size would otherwise get the new picture's masks)."""
    from segany.data.images import load_image, load_image_bytes

    data = task.data
    if data is None:
        if not Path(task.path).is_file():
            return load_image(task.path)  # raises the missing-file error describe_unreadable words
        data = Path(task.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != task.sha256:
        raise ImageChangedError(task.path)
    return load_image_bytes(data, task.path)  # the very bytes checked, not a second read of the path


def describe_unreadable(task: ImageTask, exc: BaseException) -> str:
    """Why a registered image cannot be processed, in the words a user can act on.

    Load errors advise on file formats, which is wrong for a file that was registered fine: what happened
    is that it went missing or changed afterwards.
    """
    p = Path(task.path)
    if task.data is None and not p.exists():
        return (f"missing: {task.path} no longer exists; restore it, or remove the image from the project "
                f"(segany project remove-images PROJECT {task.image_id})")
    if isinstance(exc, ImageChangedError):  # _read_task_image compared the bytes with the registered sha256
        return (f"changed: {task.path} is not the file that was registered (its sha256 differs); restore the "
                f"original, or remove the image (segany project remove-images PROJECT {task.image_id}) and add the "
                "new file")
    return f"unreadable: {task.path} ({type(exc).__name__}: {exc})"


def worker_precision(spec: ModelSpec) -> tuple[str, bool]:
    """The precision a worker runs and whether it takes the folded decoder: ``spec.precision`` with ``auto``
    decided on this machine, as on the command line (:func:`segany.fast.machine_auto`; run_auto's workers get
    it decided already)."""
    from segany.fast import machine_auto, resolve_precision

    precision, fast_decoder = machine_auto(spec.precision, spec.device)
    return resolve_precision(precision, spec.device), fast_decoder or spec.fast_decoder


def decide_precision(spec: ModelSpec) -> ModelSpec:
    """``spec`` with the precision it runs at (fp32, bf16 or fp16, plus the folded decoder where ``auto`` takes
    it), decided here, on the driver, by the rule ``segany auto`` uses (:func:`segany.fast.machine_auto`).

    Every worker then runs that precision whatever its own CPU, and it is recorded with the settings: a later
    run where ``auto`` decides otherwise is refused as a change of settings instead of mixing two precisions'
    masks unrecorded. ``spec.device`` must be the workers' device (cpu or cuda), not ``auto``.
    """
    precision, fast_decoder = worker_precision(spec)
    return dataclasses.replace(spec, precision=precision, fast_decoder=fast_decoder)


def check_weights(spec: ModelSpec) -> None:
    """Raise :class:`segany.errors.CheckpointError` here, on the driver, when ``spec``'s weights do not fit its
    model. A worker process or actor that fails to build its model is started again by its pool, so a wrong
    file made ``--workers 2`` hang instead of failing with the reason (one worker builds in-process and
    raises by itself).

    Only names and shapes are checked, on a memory-mapped read: the tensors stay in the file, so a 2.5 GB
    ViT-H checkpoint is not read whole here before every worker reads it again."""
    if spec.checkpoint is not None and spec.checkpoint_bytes is None:
        from segany.checkpoints import read_checked

        read_checked(spec.model, spec.checkpoint, mmap=True)


def make_generator(sam: Any, settings: AutoSettings) -> Any:
    """The automatic mask generator (``segany.amg`` unless settings name another) configured for stage 3."""
    import importlib

    module, _, name = settings.generator.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        why = f"stage 3 needs the mask generator {settings.generator!r}, which cannot be imported ({exc}); "
        raise InputError(f"{why}update segany or pass another AutoSettings(generator='module:Class')",
                         cli=f"{why}update segany or pass another --generator module:Class") from exc
    return cls(sam, output_mode="binary_mask", **settings.generator_kwargs())


# ------------------------------------------------------------------------------------------ store side
def pending_tasks(store: Any, project_id: int, *, redo: bool = False, ship_bytes: bool = False,
                  redo_after: float | None = None) -> tuple[list[ImageTask], int]:
    """Images of the project to do, and how many are already done.

    To do: images without an ``auto`` done marker; with ``redo``, all of them; with ``redo_after`` (a
    ``time.time()``, the start of a ``--redo`` being finished), also those whose marker is older. With
    ``ship_bytes`` each task carries the file's bytes (Ray actors may not see the path); an image whose file
    cannot be read then still becomes a task, without bytes, and its worker reports it.
    """
    from sqlalchemy import select

    from segany.engine.db import Image, ImageRun

    cutoff = _naive_utc(redo_after) if redo_after is not None else None
    with store.transaction(write=False) as s:
        images = list(s.execute(select(Image.id, Image.path, Image.sha256)
                                .where(Image.project_id == project_id).order_by(Image.id)))
        done = dict(s.execute(select(ImageRun.image_id, ImageRun.finished_at).join(Image, Image.id == ImageRun.image_id)
                              .where(Image.project_id == project_id, ImageRun.kind == AUTO_KIND)).all())
    todo = [im for im in images
            if redo or im.id not in done or (cutoff is not None and done[im.id] < cutoff)]
    tasks = [ImageTask(im.id, im.path, im.sha256, _read_bytes(im.path) if ship_bytes else None) for im in todo]
    return tasks, len(images) - len(todo)


def _read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None when it cannot be read (the worker then names the problem)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _naive_utc(timestamp: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).replace(tzinfo=None)


def machine_uuid(image_id: int, generation: int, index: int) -> str:
    """The uuid of stage 3's ``index``-th mask of ``image_id`` in ``generation`` (see AUTO_NAMESPACE)."""
    return str(uuid_lib.uuid5(AUTO_NAMESPACE, f"image{image_id}:gen{generation}:{index}"))


def write_result(store: Any, result: ImageResult, *, model_version_id: int | None, settings: AutoSettings,
                 redo_after: float | None = None, owner: str | None = None) -> bool:
    """Write one image's masks and its done marker in one transaction; False if it was already done or the image
    is gone (removed from the project while the job ran).

    The image's unreviewed automatic masks (``source=auto``, ``pending``, or ``accepted`` by nobody) are
    replaced, so writing an image again never adds a second set. Masks people accepted or rejected stay,
    and the new masks get the next generation's uuids, so they never collide with them. ``redo_after`` (a
    ``time.time()``): a marker older than that is replaced instead of treated as done (``--redo``).

    The image row is locked first (``FOR NO KEY UPDATE`` on PostgreSQL; SQLite's writers run one at a time
    anyway), so the marker is read and written by one writer of the image at a time: a second driver writing the
    same image (a run that took over a claim) waits, then finds the first one's marker, and a removal of the
    image either waits for the write or has finished (the image is gone). Without it, both drivers passed the
    marker check and the second failed on the marker's unique key, and masks written for an image being
    removed failed on its foreign key; either error ended the whole run.

    ``owner``: the run's claim on the project (:func:`segany.engine.locks.check_claim`), checked and held in
    this transaction, so a run whose claim was taken over writes nothing more.

    Raises:
        InputError: a mask's size differs from the image's (the file changed after it was registered).
        ClaimLostError: ``owner`` no longer holds the project's ``auto`` claim; nothing was written.
    """
    from sqlalchemy import delete, select
    from sqlalchemy.exc import IntegrityError

    from segany.engine.db import Annotation, Image, ImageRun, utcnow
    from segany.engine.masks import rle_area_bbox
    from segany.engine.store import check_finite  # a broken model's NaN score never reaches the database

    try:
        with store.transaction() as s:
            im = _lock_image(s, result.image_id)
            if im is None:  # removed while the job ran
                return False
            if owner is not None:
                check_claim(s, im.project_id, AUTO_KIND, owner)
            run = s.scalar(select(ImageRun).where(ImageRun.image_id == im.id, ImageRun.kind == AUTO_KIND))
            if _done(run, redo_after):
                return False
            # Only masks no person has touched: a rejected one keeps no annotator but has a reviewer, and stays
            # for retraining.
            s.execute(delete(Annotation).where(Annotation.image_id == im.id, Annotation.source == "auto",
                                               Annotation.annotator_id.is_(None), Annotation.reviewer_id.is_(None))
                      .execution_options(synchronize_session=False))
            kept = set(s.scalars(select(Annotation.uuid).where(Annotation.image_id == im.id)))
            generation = _free_generation(im.id, (run.generation or 1) + 1 if run is not None else 1,
                                          len(result.masks), kept)
            for i, m in enumerate(result.masks):
                if tuple(m.rle["size"]) != (im.height, im.width):
                    raise InputError(f"mask size {m.rle['size']} does not match image {im.id} "
                                     f"[{im.height}, {im.width}]; the image file changed after it was registered")
                area, bbox = rle_area_bbox(m.rle)
                s.add(Annotation(
                    uuid=machine_uuid(im.id, generation, i), image_id=im.id, label="object",
                    rle_counts=m.rle["counts"], height=im.height, width=im.width, area=area, bbox_xywh=bbox,
                    source="auto", review_state=settings.review_state, model_version_id=model_version_id,
                    prompts={"point_coords": m.point_coords, "crop_box": m.crop_box}, annotator_id=None,
                    seconds_spent=None, predicted_iou=check_finite("predicted_iou", m.predicted_iou),
                    stability_score=check_finite("stability_score", m.stability_score), revision=1))
            if run is None:
                run = ImageRun(image_id=im.id, kind=AUTO_KIND)
                s.add(run)
            run.model_version_id = model_version_id
            run.num_masks = len(result.masks)
            run.settings_hash = settings.digest()
            run.seconds = result.seconds
            run.finished_at = utcnow()
            run.generation = generation
    except IntegrityError:
        # The lock above keeps these from happening; a database that ignores it still must not end the run over
        # an image that another writer finished or that was removed meanwhile.
        with store.transaction(write=False) as s:
            gone = s.get(Image, result.image_id) is None
            run = s.scalar(select(ImageRun).where(ImageRun.image_id == result.image_id, ImageRun.kind == AUTO_KIND))
            if gone or _done(run, redo_after):
                log.info("image %d: %s meanwhile; result dropped", result.image_id,
                         "removed" if gone else "written by another run")
                return False
        raise
    return True


def _lock_image(s: Any, image_id: int) -> Any:
    """The image row, locked for this transaction against removal and against another writer of its result
    (``FOR NO KEY UPDATE``: saves of annotations on it, whose foreign key takes ``FOR KEY SHARE``, go on)."""
    from segany.engine.db import Image

    return s.get(Image, image_id, with_for_update={"key_share": True})


def _done(run: Any, redo_after: float | None) -> bool:
    """Whether a done marker (or None) counts as done: any marker, or with a redo one from after its start."""
    return run is not None and (redo_after is None or run.finished_at >= _naive_utc(redo_after))


def _free_generation(image_id: int, start: int, n: int, taken: set[str]) -> int:
    """The first generation from ``start`` whose ``n`` uuids are all free (a lost marker restarts at 1)."""
    generation = start
    while any(machine_uuid(image_id, generation, i) in taken for i in range(n)):
        generation += 1
    return generation


def register_model(store: Any, spec: ModelSpec, meta: dict[str, Any] | None = None) -> int:
    """The store's model-version id for ``spec`` (created on first use)."""
    from segany.engine.versions import weights_sha256

    sha = weights_sha256(spec.checkpoint) if spec.checkpoint else None
    return int(store.register_model_version(spec.version_name(), spec.model, spec.checkpoint, checkpoint_sha256=sha,
                                            meta=dict(meta or {})))


# ----------------------------------------------------------------------------- settings and redo plan
class SettingsMismatchError(InputError):
    """A plain rerun would mix masks of two settings in one project."""


@dataclass(frozen=True)
class AutoPlan:
    """What a run does: ``redo_after`` is None for a plain run, else the start of the redo it belongs to.
    ``kept_other_model`` counts done images whose masks another model made and that this plain run leaves as
    they are; ``other_model`` names that model (the most common one when several)."""

    redo_after: float | None
    resumed_redo: bool = False
    kept_other_model: int = 0
    other_model: str | None = None


def plan_run(store: Any, project: dict[str, Any], settings: AutoSettings, model_version_id: int, *,
             redo: bool, requested_precision: str | None = None) -> AutoPlan:
    """Decide how this run relates to earlier ones; refuse one that would mix settings.

    * An unfinished redo (``redo=True``, ``--redo``) with the same settings and model is finished (by a redo or
      a plain rerun): only images it had not rewritten yet are done.
    * A redo otherwise starts a new redo of every image.
    * A plain run refuses when an unfinished redo used other settings or another model, or when images were
      done with other settings (:func:`done_differently`; the precision that ran is one of them), and says to
      pass ``redo=True`` / ``--redo`` (or to rerun with the settings used): silently skipping them would report
      "already done" for masks of other settings, and silently redoing them would replace masks the user did
      not ask to replace. ``requested_precision`` (ModelSpec's, before ``auto`` was decided) words the fix
      when the precision is what changed.
    * Images done with another model (weights of other content) are not a reason to refuse: that is the data
      engine's loop, where ``retrain`` promotes a model and the next plain run gives it only the new images.
      Every mask records its model version, so the two models' masks stay told apart; the plan counts the
      images kept so the run's summary can say so and name ``--redo``.

    Raises:
        SettingsMismatchError: its message words the fix for Python callers, its ``cli_message()`` for the
            command line.
    """
    digest = settings.digest()
    unknown_precision = dataclasses.replace(settings, precision=None).digest()  # as older segany recorded it
    open_redo = (project["settings"] or {}).get(REDO_KEY)
    same = bool(open_redo) and open_redo.get("settings_hash") in (digest, unknown_precision) and \
        open_redo.get("model_version_id") == model_version_id
    if same:
        return AutoPlan(float(open_redo["started"]), resumed_redo=True)
    if redo:
        started = time.time()
        store.update_project(project["id"], settings={REDO_KEY: {
            "settings_hash": digest, "model_version_id": model_version_id, "started": started}})
        return AutoPlan(started)
    if open_redo:
        other_model = open_redo.get("model_version_id") != model_version_id
        used_hash = str(open_redo.get("settings_hash"))
        if other_model:
            what = what_cli = f"another model (it ran {_describe_model(store, open_redo.get('model_version_id'))})"
            py = cli = ("", "")
        else:
            change = _settings_change(project, used_hash, settings)
            py, cli = _precision_words(project, used_hash, settings, requested_precision)
            what, what_cli = f"other settings ({change}{py[0]})", f"other settings ({change}{cli[0]})"
        fix = "to redo every image with these settings and this model, or with the settings and model it used"
        raise SettingsMismatchError(
            f"an interrupted run_auto(..., redo=True) with {what} is unfinished; rerun with redo=True {fix}{py[1]}",
            cli=f"an interrupted `engine auto --redo` with {what_cli} is unfinished; rerun with --redo {fix}{cli[1]}")
    settings_used, models_used = done_differently(store, project["id"], digest, model_version_id,
                                                  unknown_precision=unknown_precision)
    if settings_used:
        used_hash = settings_used.most_common(1)[0][0]
        n = sum(settings_used.values())
        change = _settings_change(project, used_hash, settings)
        py, cli = _precision_words(project, used_hash, settings, requested_precision)
        raise SettingsMismatchError(
            f"{n} images were done with other settings ({change}{py[0]}); pass redo=True to redo them with these "
            f"settings, or rerun with the settings used before{py[1]}",
            cli=f"{n} images were done with other settings ({change}{cli[0]}); pass --redo to redo them with "
                f"these settings, or rerun with the settings used before{cli[1]}")
    if models_used:
        return AutoPlan(None, kept_other_model=sum(models_used.values()),
                        other_model=_describe_model(store, models_used.most_common(1)[0][0]))
    return AutoPlan(None)


def _model_version(store: Any, model_version_id: int | None) -> Any:
    from segany.engine.db import ModelVersion

    if model_version_id is None:
        return None
    with store.transaction(write=False) as s:
        mv = s.get(ModelVersion, model_version_id)
        if mv is not None:
            s.expunge(mv)
        return mv


def _describe_model(store: Any, model_version_id: int | None) -> str:
    """``vit_b:1a2b... (weights /x/y.pt)``: a model version's name and its file, for refusals."""
    mv = _model_version(store, model_version_id)
    if mv is None:
        return f"model version {model_version_id} (no longer registered)"
    return mv.name + (f" from {mv.checkpoint_path}" if mv.checkpoint_path else "")


def remember_settings(store: Any, project: dict[str, Any], settings: AutoSettings) -> None:
    """Keep this run's settings under their hash in the project, so a later refusal can say what changed."""
    known = dict((project["settings"] or {}).get(SETTINGS_KEY) or {})
    known[settings.digest()] = dataclasses.asdict(settings)
    store.update_project(project["id"], settings={SETTINGS_KEY: dict(list(known.items())[-KEEP_SETTINGS:])})


def _recorded_settings(project: dict[str, Any], settings_hash: str) -> dict[str, Any]:
    """The settings remembered under ``settings_hash`` (:func:`remember_settings`); empty when unknown."""
    return dict(((project["settings"] or {}).get(SETTINGS_KEY) or {}).get(settings_hash) or {})


def _precision_words(project: dict[str, Any], used_hash: str, now: AutoSettings, requested_precision: str | None
                     ) -> tuple[tuple[str, str], tuple[str, str]]:
    """For a refusal whose settings differ in precision: (why it changed, the precision to rerun with), worded
    for Python and for the command line; empty strings when the precision did not change or is not known."""
    was = _recorded_settings(project, used_hash).get("precision")
    if was is None or was == now.precision:
        return ("", ""), ("", "")
    auto = requested_precision == "auto"
    return ((f"; precision='auto' runs {now.precision} on this machine" if auto else "",
             f" (ModelSpec(precision={was!r}))"),
            (f"; --precision auto runs {now.precision} on this machine" if auto else "", f" (--precision {was})"))


def _settings_change(project: dict[str, Any], used_hash: str, now: AutoSettings) -> str:
    """``points_per_side 32 -> 8, ...`` from the settings remembered under ``used_hash``; the hashes when a run
    older than that record made them. A record without a precision (an older segany) does not know it, so the
    precision is not named as a change."""
    before = _recorded_settings(project, used_hash)
    if not before:
        return f"settings hash {used_hash[:12]} then, {now.digest()[:12]} now"
    after = json.loads(json.dumps(dataclasses.asdict(now)))
    diffs = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in after.items()
             if before.get(k) != v and (k in before or k != "precision")]
    return ", ".join(diffs) or "same values, other settings version"


def done_differently(store: Any, project_id: int, digest: str, model_version_id: int, *,
                     unknown_precision: str | None = None) -> tuple[Counter[str], Counter[int]]:
    """The project's done markers that record other settings than ``digest``, counted per settings hash, and
    those that record another model than ``model_version_id``, counted per model version id.

    ``unknown_precision``: the hash of the same settings without their precision, which an older segany recorded
    (it had no precision field); such markers count as matching, since the precision that made them is unknown.

    The model is its weights' content: a version registered under another model name with the same
    checkpoint sha256 (a segany file loaded as ``--model segany_tiny`` or ``vit_b`` builds the architecture it
    embeds) is the same model. A marker without a hash or model (an older segany, a deleted model version)
    counts as matching in that respect, since what made it is unknown.
    """
    from sqlalchemy import func, select

    from segany.engine.db import Image, ImageRun, ModelVersion

    with store.transaction(write=False) as s:
        me = s.get(ModelVersion, model_version_id)
        sha = me.checkpoint_sha256 if me is not None else None
        rows = s.execute(select(ImageRun.settings_hash, ImageRun.model_version_id, ModelVersion.checkpoint_sha256,
                                func.count())
                         .join(Image, Image.id == ImageRun.image_id)
                         .outerjoin(ModelVersion, ModelVersion.id == ImageRun.model_version_id)
                         .where(Image.project_id == project_id, ImageRun.kind == AUTO_KIND)
                         .group_by(ImageRun.settings_hash, ImageRun.model_version_id, ModelVersion.checkpoint_sha256))
        settings_used: Counter[str] = Counter()
        models_used: Counter[int] = Counter()
        for h, mv, mv_sha, n in rows:
            if h is not None and h not in (digest, unknown_precision):
                settings_used[str(h)] += int(n)
            if mv is not None and mv != model_version_id and not (sha and mv_sha == sha):
                models_used[int(mv)] += int(n)
        return settings_used, models_used


# ------------------------------------------------------------------------------------------------ run
@dataclass
class AutoSummary:
    images_total: int = 0
    images_skipped: int = 0  # already done before this run
    images_written: int = 0
    images_failed: int = 0  # could not be read (missing, changed, corrupt): left to do, listed in ``failures``
    duplicates_dropped: int = 0  # results that arrived for an image already written
    masks_written: int = 0
    seconds: float = 0.0
    model_version_id: int | None = None
    backend: str = "local"
    workers: int = 1
    precision: str | None = None  # the precision every worker ran (ModelSpec's, ``auto`` decided on the driver)
    worker_seconds: float = 0.0
    resumed_redo: bool = False  # this run finished an interrupted --redo
    kept_other_model: int = 0  # of images_skipped: done before by another model, whose masks stay
    other_model: str | None = None  # that model (the most common one), for the summary line
    failures: list[dict[str, Any]] = field(default_factory=list)  # {image_id, path, reason}

    @property
    def images_per_hour(self) -> float:
        return 3600.0 * self.images_written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images_per_hour": round(self.images_per_hour, 1)}


def run_auto(store: Any, project: str | None, spec: ModelSpec, settings: AutoSettings, *, backend: str = "local",
             workers: int = 1, ray_address: str | None = None, redo: bool = False, threads: int | None = None,
             on_start: Callable[[int, int], None] | None = None,
             on_result: Callable[[ImageResult, bool], None] | None = None,
             runner_hook: Callable[[Any], None] | None = None) -> AutoSummary:
    """Run stage 3 over the project's images that are not done yet.

    Images that cannot be read are skipped and listed in ``summary.failures`` (they stay to do); the others
    are done. A plain run refuses images done with other settings (:func:`plan_run`), the precision that runs
    among them (``spec.precision="auto"`` is decided once, here: :func:`decide_precision`); an interrupted
    redo is finished by the next run with the same settings. One run at a time holds the project.

    Args:
        store: an open :class:`segany.engine.store.Store`.
        project: project name (None: the first project).
        backend: ``local`` (in-process for 1 worker, else a process pool) or ``ray``.
        workers: model replicas (processes or actors); for Ray, 0 = one per GPU, else one per CPU.
        ray_address: ``local`` starts a Ray cluster on this machine; otherwise the address to join.
        redo: run every image again, replacing its automatic masks no person kept (needed to change settings
            on a project already done).
        threads: torch CPU threads of this process and of each worker process or actor (None: this process
            keeps torch's choice, local workers split the cores, Ray CPU actors the cluster's CPUs). Masks do
            not depend on it, so it is not a setting.
        on_start: called with (images to do, images already done) before work starts.
        on_result: called after each result with (result, written?) — progress bars.
        runner_hook: called with the runner once it has started (tests use it to kill a worker).
    """
    from segany.engine import jobs

    jobs.check_workers(backend, workers)
    if threads is not None:  # this process's own threads (the in-process worker's); refuses < 1 before anything
        from segany.fast import configure_cpu_threads

        configure_cpu_threads(threads)
    if backend != "local" or workers != 1:  # before anything is recorded (a --redo, the model version)
        check_weights(spec)
    requested_precision = spec.precision
    proj = store.get_project(project)
    with held_claim(store, proj, AUTO_KIND) as owner:  # a heartbeat keeps it while a slow image runs
        # No model loads yet; Ray is joined, since its cluster decides the device and so what ``auto`` runs.
        runner = jobs.make_runner(backend, spec, settings, workers=workers, address=ray_address, threads=threads)
        try:
            spec = runner.spec  # the device and precision every worker runs, decided once (decide_precision)
            settings = _with_precision(settings, spec.precision)
            mv = register_model(store, spec, meta={"device": spec.device})
            plan = plan_run(store, proj, settings, mv, redo=redo, requested_precision=requested_precision)
            remember_settings(store, proj, settings)
            tasks, skipped = pending_tasks(store, proj["id"], ship_bytes=backend == "ray",
                                           redo_after=plan.redo_after)
            summary = AutoSummary(images_total=len(tasks) + skipped, images_skipped=skipped, model_version_id=mv,
                                  backend=backend, workers=runner.workers, precision=spec.precision,
                                  resumed_redo=plan.resumed_redo, kept_other_model=plan.kept_other_model,
                                  other_model=plan.other_model)
            if on_start:
                on_start(len(tasks), skipped)
            t0 = time.perf_counter()
            if tasks:
                _run_tasks(store, proj["id"], owner, runner, tasks, summary, settings, plan, on_result=on_result,
                           runner_hook=runner_hook)
        finally:
            runner.close()
        if plan.redo_after is not None and not summary.failures:
            store.update_project(proj["id"], settings={REDO_KEY: None})  # the redo is complete
        summary.seconds = time.perf_counter() - t0
        return summary


def _with_precision(settings: AutoSettings, precision: str) -> AutoSettings:
    """``settings`` recording the precision that runs (a caller's own value must agree with it)."""
    if settings.precision not in (None, precision):
        raise InputError(f"AutoSettings.precision is the precision that runs, got {settings.precision!r} while "
                         f"the model runs {precision}; leave it None and pass ModelSpec(precision=...)")
    return dataclasses.replace(settings, precision=precision)


def _run_tasks(store: Any, project_id: int, owner: str, runner: Any, tasks: list[ImageTask],
               summary: AutoSummary, settings: AutoSettings, plan: AutoPlan, *,
               on_result: Callable[[ImageResult, bool], None] | None,
               runner_hook: Callable[[Any], None] | None) -> None:
    """Start the runner's workers, run the tasks and write each result as it arrives (counting it into
    ``summary``)."""
    paths = {t.image_id: t.path for t in tasks}
    runner.start()
    if runner_hook:
        runner_hook(runner)
    for result in runner.run(tasks):
        summary.worker_seconds += result.seconds
        written = False
        if result.error is None:
            try:
                written = write_result(store, result, model_version_id=summary.model_version_id,
                                       settings=settings, redo_after=plan.redo_after, owner=owner)
            except ClaimLostError:  # another run holds the project now: stop (it is an InputError too)
                raise
            except InputError as exc:  # the file changed under the run: this image fails, not the run
                result.error = f"changed: {paths.get(result.image_id)} ({exc})"
        if result.error is not None:
            log.info("image %d skipped: %s", result.image_id, result.error)
            summary.images_failed += 1
            summary.failures.append({"image_id": result.image_id, "path": paths.get(result.image_id),
                                     "reason": result.error})
        elif written:
            summary.images_written += 1
            summary.masks_written += len(result.masks)
        else:
            summary.duplicates_dropped += 1
        touch_claim(store, project_id, AUTO_KIND, owner)  # still alive: keeps other runs from taking the project over
        if on_result:
            on_result(result, written)


def count_sets(store: Any, project_id: int) -> dict[int, tuple[int, int | None]]:
    """Per image: (automatic masks stored, masks its done marker says were written; None without marker)."""
    from sqlalchemy import func, select

    from segany.engine.db import Annotation, Image, ImageRun

    with store.transaction(write=False) as s:
        ids = list(s.scalars(select(Image.id).where(Image.project_id == project_id)))
        n = dict(s.execute(select(Annotation.image_id, func.count()).where(Annotation.source == "auto",
                                                                           Annotation.image_id.in_(ids))
                           .group_by(Annotation.image_id)).all())
        runs = dict(s.execute(select(ImageRun.image_id, ImageRun.num_masks).where(ImageRun.kind == AUTO_KIND,
                                                                                  ImageRun.image_id.in_(ids))).all())
    return {i: (int(n.get(i, 0)), runs.get(i)) for i in ids}
