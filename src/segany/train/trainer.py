"""The SAM interactive training loop (SAM §3 "Training algorithm", appendix A "Training").

Per image, up to K instance masks. Round 0 prompts each mask with a foreground point or a jittered
box (equal chance); for single-point prompts the decoder's three ambiguity masks are scored and only
the best one takes the loss. Each later round adds a click drawn uniformly from the error region of the
previous prediction, on the image part of the input (not its padding), and feeds back its low-res logits
as the mask prompt; of three ambiguity masks, the one passed on is the one with the highest predicted IoU,
as at inference. The last rounds feed the mask only. Loss: 20·focal + dice per mask, plus MSE between the
IoU head and the true IoU, averaged over rounds. A batch whose crops left no mask makes no update.

Runs on CPU, one GPU, or many through torchrun (DDP when WORLD_SIZE > 1; the processes agree on the clock
and on Ctrl-C before every step, and tests run two CPU processes over gloo). Checkpoints hold model,
optimizer, schedule, RNG states and step, and are written atomically; prompts are drawn from a generator
seeded by (seed, step, rank), and batches are a function of the step, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segany.atomic import append_whole, atomic_write, atomic_write_text, disk_full_as
from segany.errors import InputError, SeganyError, UnknownModelError
from segany.modeling.sam import Sam
from segany.train.config import PROVENANCE, RecipeSection, TrainConfig
from segany.train.init_weights import resolve_init_checkpoint
from segany.train.losses import mask_iou, mask_losses
from segany.train.optim import lr_factor, param_groups, set_lr
from segany.train.prompts import error_points, jitter_boxes, mask_boxes_xyxy, sample_points

log = logging.getLogger(__name__)

STATE_FORMAT = "segany-train-state-v1"
# The files a run writes in run.out_dir (each through a ``.NAME.XXXX.tmp`` that a kill mid-write leaves behind).
RUN_FILES = ("last.pt", "best.pt", "best_fp16.pt", "model_fp16.pt", "config.json", "log.jsonl", "summary.json")
# Below this many validation objects a score moves by chance more than by training (one object is 1/n of it).
MIN_VAL_OBJECTS = 10


class TrainingError(SeganyError, RuntimeError):
    """Training cannot go on (the loss or the weights went non-finite); the message says why and what to do."""


def json_safe(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with NaN and inf floats (top level) as None: JSON has no NaN, and a bare ``NaN`` made
    summary.json and log.jsonl unreadable to strict parsers."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}


class InteractiveRecipe(nn.Module):
    """Wraps a :class:`Sam` so one ``forward`` runs every round and returns the loss (DDP-friendly)."""

    def __init__(self, sam: Sam, recipe: RecipeSection) -> None:
        super().__init__()
        self.sam = sam
        self.recipe = recipe

    def _sparse(self, pts: torch.Tensor, labels: torch.Tensor, n_pts: int, use_box: torch.Tensor,
                boxes: torch.Tensor) -> torch.Tensor:
        """Sparse tokens for all masks: point-first rows use points[0..n_pts], box-first rows the box plus
        points[1..n_pts]; both give n_pts + 1 tokens (a padding token stands in for the box)."""
        pe = self.sam.prompt_encoder
        M = pts.shape[0]
        out: torch.Tensor | None = None
        for rows, is_box in ((torch.nonzero(~use_box).flatten(), False), (torch.nonzero(use_box).flatten(), True)):
            if len(rows) == 0:
                continue
            if is_box:
                p = (pts[rows, 1:n_pts], labels[rows, 1:n_pts]) if n_pts > 1 else None
                sp, _ = pe(p, boxes[rows], None)
            else:
                sp, _ = pe((pts[rows, :n_pts], labels[rows, :n_pts]), None, None)
            if out is None:
                out = sp.new_zeros((M, *sp.shape[1:]))
            out = out.index_copy(0, rows, sp.to(out.dtype))
        assert out is not None
        return out

    def forward(self, images: torch.Tensor, gt: torch.Tensor, img_idx: torch.Tensor, gen: torch.Generator,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for M masks.

        Args:
            images: (B, 3, S, S) normalized, padded.
            gt: (M, S, S) bool instance masks.
            img_idx: (M,) image of each mask.
            gen: generator for prompt sampling (on the masks' device).
            valid: (B, S, S) bool, the image (not padding) part of each input; corrective clicks are drawn
                there only, as a user can only click on the picture. None: the whole frame.
        """
        r = self.recipe
        sam = self.sam
        S = images.shape[-1]
        L = r.loss_size if 0 < r.loss_size < S else S
        M = gt.shape[0]
        if M == 0:  # the crops left no mask in this batch: a zero loss that still reaches every parameter,
            # so a DDP process with nothing to learn joins the others' gradient all-reduce
            params = [p for p in self.parameters() if p.requires_grad]
            return sum((p.sum() for p in params), images.new_zeros(())) * 0.0, {}
        emb = sam.image_encoder(images)[img_idx]  # (M, C, g, g)
        dense_pe = sam.prompt_encoder.get_dense_pe()
        # Targets at the loss grid: area-averaged soft masks (exact when L == S).
        target = gt.float() if L == S else F.interpolate(gt[:, None].float(), (L, L), mode="area")[:, 0]
        gt_l = target > 0.5
        on_image: torch.Tensor | None = None
        if valid is not None:
            v = valid[img_idx].float()
            on_image = (v if L == S else F.interpolate(v[:, None], (L, L), mode="area")[:, 0]) > 0.5
        to_model = S / L  # loss-grid pixel -> model-frame pixel centre
        use_box = torch.rand(M, generator=gen, device=gt.device) < r.box_prob
        boxes = jitter_boxes(mask_boxes_xyxy(gt), S, gen, r.box_noise, r.box_noise_max)
        first_xy, _ = sample_points(gt, gen)
        rounds = r.num_rounds
        pts = torch.zeros(M, 1 + r.point_rounds, 2, device=gt.device)
        labels = torch.full((M, 1 + r.point_rounds), -1, dtype=torch.long, device=gt.device)
        pts[:, 0], labels[:, 0] = first_xy, 1
        n_pts = 1
        prev_low: torch.Tensor | None = None
        pred: torch.Tensor | None = None
        total = gt.new_zeros((), dtype=torch.float32)
        stats: dict[str, float] = {}
        rows = torch.arange(M, device=gt.device)
        for rnd in range(rounds):
            if 1 <= rnd <= r.point_rounds:
                assert pred is not None
                # A prediction spilling into the padding is not an error a user could click on.
                xy, lab = error_points(pred if on_image is None else pred & on_image, gt_l, gen)
                pts[:, n_pts], labels[:, n_pts] = (xy + 0.5) * to_model - 0.5, lab
                n_pts += 1
            sparse = self._sparse(pts, labels, n_pts, use_box, boxes)
            if prev_low is None:
                dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                    M, -1, *sam.prompt_encoder.image_embedding_size)
            else:
                dense = sam.prompt_encoder.mask_downscaling(prev_low.to(emb.dtype))
            low, iou_pred = sam.mask_decoder.predict_masks(emb, dense_pe, sparse, dense)  # (M, 4, h, w), (M, 4)
            if rnd == 0:
                # Single points are ambiguous: score the 3 multimask outputs, train the best. Boxes: output 0.
                cand = torch.where(use_box[:, None, None, None], low[:, :1].expand(-1, 3, -1, -1), low[:, 1:])
                cand_iou = torch.where(use_box[:, None], iou_pred[:, :1].expand(-1, 3), iou_pred[:, 1:])
            else:
                cand, cand_iou = low[:, :1], iou_pred[:, :1]
            k = cand.shape[1]
            up = F.interpolate(cand.float(), (L, L), mode="bilinear", align_corners=False)  # (M, k, L, L)
            tgt = target[:, None].expand(-1, k, -1, -1).reshape(M * k, L, L)
            per = mask_losses(up.reshape(M * k, L, L), tgt, r.focal_weight, r.dice_weight).view(M, k)
            true_iou = mask_iou(up.detach().reshape(M * k, L, L), tgt).view(M, k)
            best = per.detach().argmin(1)
            mask_loss = per[rows, best].mean()
            iou_loss = F.mse_loss(cand_iou.float(), true_iou)
            total = total + mask_loss + r.iou_weight * iou_loss
            # The next round starts from the mask the model itself ranks first (highest predicted IoU), as
            # SAM's recipe and every click at inference do; the loss above trains the closest one.
            chosen = cand_iou.detach().argmax(1)
            prev_low = cand[rows, chosen][:, None].detach()
            pred = up.detach()[rows, chosen] > 0
            if rnd == 0:
                stats["iou_first"] = float(true_iou[rows, best].mean())
        stats["iou_last"] = float(true_iou[rows, best].mean())
        return total / rounds, stats


def _on_image(batch: dict[str, Any], images: torch.Tensor) -> torch.Tensor | None:
    """(B, S, S) bool: the top-left (h, w) of each input that holds its image, from ``batch["size_hw"]``."""
    sizes = batch.get("size_hw")
    if sizes is None:
        return None
    B, S = images.shape[0], images.shape[-1]
    out = torch.zeros(B, S, S, dtype=torch.bool, device=images.device)
    for b, (h, w) in enumerate(sizes):
        out[b, :h, :w] = True
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from segany.errors import InputError

        raise InputError(f"run.device={name} but this machine has no usable CUDA GPU; use run.device=cpu or auto")
    return torch.device(name)


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2] if py_state[2] is None else float(py_state[2])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # atomic_write raises the file's own OSError(ENOSPC) for a full disk, which torch.save makes into an opaque
    # RuntimeError ("unexpected pos 704 vs 598"); ``writing`` turns that into a clear message.
    atomic_write(path, lambda f: torch.save(obj, f), fsync=True)  # fsync: a resumed run trusts last.pt as whole


def tensor_bytes(obj: Any, half: bool = False) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists, tuples): about what torch.save writes; ``half``:
    floats counted at 2 bytes, as :func:`segany.checkpoints.save_checkpoint` stores them with ``half=True``."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * (2 if half and obj.is_floating_point() else obj.element_size())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, half) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, half) for v in obj)
    return 0


def writing(path: str | os.PathLike[str], needed: int | None,
            fix: str | Callable[[], str]) -> contextlib.AbstractContextManager[None]:
    """A full disk while writing ``path`` becomes one :class:`TrainingError` naming the file, the space it needs
    and ``fix`` (:func:`segany.atomic.disk_full_as`)."""
    return disk_full_as(TrainingError, path, fix, needed)


_LOCK_FDS: set[int] = set()  # the RunLock descriptors this process holds
_HELD_PATHS: set[str] = set()  # and their lock files, to say when the other holder is this process
_fork_hook_registered = False


def _close_lock_fds_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock descriptors: they share the open file
    whose flock is the lock, so they would keep it held after the run itself died. (Not LOCK_UN: that would
    release it for the parent too.)"""
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    _HELD_PATHS.clear()


class RunLock:
    """An exclusive hold on a run folder (``flock`` on ``OUT_DIR/.segany-train.lock``) while one run writes it.

    Why: a second run started on a folder a live one is writing would remove that run's in-flight temp files
    (the stale-temp cleanup at start) and then both would overwrite each other's ``last.pt`` and log. The
    second one is refused instead, before it removes or writes anything. The holder's pid is kept in the file
    for the message. The lock belongs to the open file, so the OS drops it when its process dies: a lock file a
    killed run left is simply taken again (the file itself is never removed: unlinking a lock file lets two
    processes lock two different files). Where ``fcntl`` is missing (Windows) or the file system refuses
    ``flock`` (some network mounts), runs are not locked. Under DDP only rank 0 writes, so only it locks.
    """

    NAME = ".segany-train.lock"  # not ".lock": the folder may be shared, and another tool's lock file emptied

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self._fd: int | None = None
        self._path = ""

    def acquire(self, *, create: bool = True) -> RunLock:
        """Take the lock (creating the folder and the lock file); a no-op when this object holds it already.
        Raises :class:`TrainingError` when another process holds it. ``create=False``: only where a lock file
        exists already (none: nobody holds it now, and nothing is created)."""
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked (docs/cli.md says so)
            return self
        path = self.out_dir / self.NAME
        if create:
            with writing(self.out_dir, None, "free space on that disk or pick another -o run.out_dir"):
                self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = self._open(path, create)
        if fd is None:
            return self
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    log.warning("cannot lock %s (%s): running without a lock on the run folder", path, exc)
                    os.close(fd)
                    return self
                raise TrainingError(self._busy(holder, str(path.resolve()) in _HELD_PATHS)) from None
            with contextlib.suppress(OSError):  # the pid is for messages only; a full disk must not stop the run
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            if fd not in _LOCK_FDS:
                os.close(fd)  # never keep a descriptor (and with it the flock) of a lock not taken
            raise
        global _fork_hook_registered
        if not _fork_hook_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_close_lock_fds_in_child)
            _fork_hook_registered = True
        _LOCK_FDS.add(fd)
        self._fd = fd
        self._path = str(path.resolve())
        _HELD_PATHS.add(self._path)
        return self

    @staticmethod
    def _open(path: Path, create: bool) -> int | None:
        """The lock file's descriptor (None: no lock file and ``create`` is False). No O_TRUNC: the holder's
        pid must survive this open. Mode 0666 under the umask, as every other run file; a file others may
        only read is locked through a read-only descriptor (flock needs no write access)."""
        flags = os.O_CREAT if create else 0
        try:
            return os.open(path, os.O_RDWR | flags, 0o666)
        except FileNotFoundError:
            if create:
                raise
            return None
        except PermissionError:
            return os.open(path, os.O_RDONLY)

    def _busy(self, holder: str, here: bool) -> str:
        if here:
            return (f"run.out_dir {str(self.out_dir)!r} is being written by another run in this process "
                    f"(pid {os.getpid()}): let it finish first, or give this run another run.out_dir")
        by = f" (pid {holder})" if holder.isdigit() else ""
        # The holder may be `segany train` or an engine retrain (which calls fit() itself): word it for both.
        return (f"run.out_dir {str(self.out_dir)!r} is being written by another training run{by} (`segany train` "
                "or `segany engine retrain`): wait for it to finish (`segany train --resume` then continues it), "
                "or start this run in another folder (-o run.out_dir=NEW_FOLDER)")

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _LOCK_FDS.discard(fd)
            _HELD_PATHS.discard(self._path)
            os.close(fd)  # closing the last descriptor of the open file drops the flock


def trim_log(path: Path, step: int) -> int:
    """Drop ``log.jsonl`` lines past ``step`` (and any torn last line), atomically; returns lines dropped.

    A run killed after its last checkpoint logged steps it will now train again; without this, a resumed
    run's log would hold those steps twice.
    """
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and isinstance(entry, dict) and int(entry.get("step", 0)) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))
    return len(lines) - len(keep)


class _DeferredInterrupt:
    """Holds a Ctrl-C until the current step ends, so the state saved on interrupt is a whole step's.

    A second Ctrl-C interrupts at once (and nothing is saved). Only the main thread can take signals;
    elsewhere this does nothing and Ctrl-C behaves as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing this step and saving; press Ctrl-C again to stop at once")

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _describe(config: Any) -> str:
    enc = config.encoder
    if enc.kind == "vit":
        return f"a ViT model ({enc.img_size} px, depth {enc.depth}, width {enc.embed_dim})"
    return f"a {enc.kind} model ({enc.img_size} px)"


def check_init_architecture(name: str, checkpoint: str | os.PathLike[str], loaded: Any) -> None:
    """Refuse initial weights of another architecture than ``model.name``'s.

    ``build_sam`` takes a file's embedded config over the name's (right for inference, where the file says what
    it is), so training silently went on with the file's model while the banner, config.json and every later
    ``segany eval`` named ``model.name``'s: a 5 M parameter ViT trained as "segany_tiny" (9.8 M, TinyViT).
    ``loaded`` is the config of the model built from the file, so the file is read once.
    """
    from segany.registry import get_config

    try:
        want = get_config(name)
    except UnknownModelError:
        return
    if loaded != want:
        raise InputError(f"model.checkpoint {str(checkpoint)!r} holds {_describe(loaded)}, but model.name "
                         f"{name!r} is {_describe(want)}; set model.arch to the file's architecture (its run's "
                         "config.json has it) or model.name to the model it was trained as, or pick another "
                         "model.checkpoint")


@contextlib.contextmanager
def _train_wording() -> Iterator[None]:
    """Word a checkpoint error's command-line fix for ``segany train``, which names its model by
    ``-o model.name=...``: the generic wording says ``--model``, a flag train does not have."""
    from segany.errors import CheckpointError

    try:
        yield
    except CheckpointError as exc:
        if exc.looks_like:
            exc.with_cli_fix(f"train that model: -o model.name={exc.looks_like}")
        raise


class Trainer:
    """Owns the model, optimizer and schedule; ``fit`` runs the loop, ``save``/``load`` checkpoint it."""

    def __init__(self, cfg: TrainConfig, *, sam: Sam | None = None, train_records: list | None = None,
                 run_lock: RunLock | None = None) -> None:
        """``run_lock``: a :class:`RunLock` on ``run.out_dir`` the caller holds past :meth:`fit` (the CLI, through
        its export); without one, rank 0's ``fit`` locks the folder for its own duration."""
        from segany.checkpoints import build_sam

        self.cfg = cfg
        self.rank, self.world, local = init_distributed()
        dev = resolve_device(cfg.run.device)
        if dev.type == "cuda" and self.world > 1:
            dev = torch.device("cuda", local)
        self.device = dev
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.run.seed)
        # The file the initial weights came from (None: random init, or a model passed in).
        self.init_checkpoint = resolve_init_checkpoint(cfg.model) if sam is None else None
        # Recorded in provenance(): a model passed in (the engine's fine-tunes) came from no file we know of.
        self._init_kind = "model" if sam is not None else "random" if self.init_checkpoint is None else "checkpoint"
        if sam is None and cfg.model.arch is not None:
            from segany.modeling.config import SamConfig

            sam = Sam(SamConfig.from_dict(cfg.model.arch))
            if self.init_checkpoint is not None:
                from segany.checkpoints import load_weights

                with _train_wording():
                    load_weights(sam, self.init_checkpoint, cfg.model.name)
        if sam is None:
            with _train_wording():
                sam = build_sam(cfg.model.name, checkpoint=self.init_checkpoint)
            if self.init_checkpoint is not None:
                check_init_architecture(cfg.model.name, self.init_checkpoint, sam.cfg)
        self.sam = sam.to(dev)
        if cfg.run.grad_checkpointing:
            for m in self.sam.image_encoder.modules():
                if hasattr(m, "gradient_checkpointing"):
                    m.gradient_checkpointing = True
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        self.net: nn.Module = InteractiveRecipe(self.sam, cfg.recipe)
        self.set_train_mode()
        self.ddp: nn.Module = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # The TinyViT classifier norm and frozen parts get no gradient: let DDP skip them.
            self.ddp = DistributedDataParallel(self.net, device_ids=[local] if dev.type == "cuda" else None,
                                               find_unused_parameters=True)
        betas = tuple(cfg.optim.betas)
        self.optimizer = torch.optim.AdamW(param_groups(self.sam, cfg.optim), lr=cfg.optim.lr,
                                           betas=betas)  # type: ignore[arg-type]
        self.step = 0
        self.elapsed = 0.0  # training seconds before this process (resumed runs)
        self.progress = 0.0
        self.first_loss: float | None = None  # the run's first loss, kept across resumes for summary.json
        self.last_loss: float | None = None  # and its latest: a resume of a finished run trains no step
        self.best_val: float | None = None  # best validation score of a step so far
        # Validation score of the starting weights (a fine-tune from model.checkpoint, taken at step 0): best.pt
        # is only written by a step that beats it, as the starting weights are already a file.
        self.base_val: float | None = None
        self.saved_state: tuple[Path, int] | None = None  # (file, step) of the last state saved or loaded
        self._finite_key: tuple | None = None  # the weights' _weights_key when a scan last found them all finite
        self._val_objects: list | None = None
        self._last_val_step = -1
        self.train_records = train_records
        self._data_fp: dict[str, Any] | None = None
        self._init_fp: dict[str, Any] | None = None
        self.out_dir = Path(cfg.run.out_dir)
        self.run_lock = run_lock
        self.amp = cfg.run.amp and dev.type == "cuda"
        self.resume_notes: list[str] = []  # what ``load`` wants the user told (printed by `segany train`)

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters of the parts ``optim.freeze_*`` keeps fixed."""
        return [p for m in self.frozen_modules() for p in m.parameters()]

    def frozen_modules(self) -> list[nn.Module]:
        o = self.cfg.optim
        return [m for m, frozen in ((self.sam.image_encoder, o.freeze_image_encoder),
                                    (self.sam.prompt_encoder, o.freeze_prompt_encoder)) if frozen]

    def set_train_mode(self) -> None:
        """Train mode, except frozen parts: their BatchNorm statistics and dropout must not change either."""
        self.net.train()
        for m in self.frozen_modules():
            m.eval()

    def _write_log(self, entry: dict[str, Any], log_path: Path, on_log: Callable[[dict[str, Any]], None] | None
                   ) -> None:
        if self.rank == 0:
            line = (json.dumps(json_safe(entry), allow_nan=False) + "\n").encode()
            with self.writing(log_path, len(line)):
                append_whole(log_path, line)
            if on_log:
                on_log(entry)

    def _step_entry(self, stats: dict[str, float], since_t: float, since_step: int) -> dict[str, Any]:
        imgs = (self.step - since_step) * self.cfg.run.batch_size * self.world
        # Six significant digits, not five decimals: a warm-up learning rate of 2e-6 was logged as 0.0.
        entry = {"step": self.step, "time_s": round(self.elapsed, 1), **{k: float(f"{v:.6g}") for k, v in stats.items()},
                 "images_per_s": round(imgs / max(time.time() - since_t, 1e-9), 2)}
        if self.device.type == "cuda":
            entry["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        log.info("step %d loss %.4f", self.step, stats["loss"])
        return entry

    def _loop(self, next_batch: Callable[[], dict[str, Any]], interrupt: _DeferredInterrupt, t0: float,
              budget: float, log_path: Path, on_log: Callable[[dict[str, Any]], None] | None
              ) -> dict[str, float]:
        """Train steps until the budget ends; returns the last step's stats.

        The last step is always logged (and validated, when validation is on), whatever its number.
        """
        run = self.cfg.run
        last_t, last_step = time.time(), self.step
        saved_at = self.elapsed  # training seconds at the last save (or at this process's start)
        stats: dict[str, float] = {}
        while self.step < run.max_steps:
            elapsed, interrupted = self._agree(time.time() - t0, interrupt.requested)
            if interrupted:
                self._save_on_interrupt()
            if elapsed >= budget:
                break
            try:
                batch = next_batch()
            except Exception:
                if interrupt.requested:  # loader workers took the same Ctrl-C and exited
                    self._save_on_interrupt(agreed=False)  # this process's own flag: the others may be mid-step
                raise
            stats = self.train_step(batch, elapsed=elapsed)
            if self.first_loss is None and stats.get("masks"):  # not a batch the crops emptied
                self.first_loss = stats["loss"]
            self.last_loss = stats["loss"]
            self.elapsed = time.time() - t0
            if self.step % run.log_every == 0 or self.step == 1:
                self._log_step(stats, last_t, last_step, log_path, on_log)
                last_t, last_step = time.time(), self.step
            if run.val_every and self.step % run.val_every == 0:
                self._validate_and_log(log_path, on_log)
            # ``elapsed`` was agreed before the step, so every process takes the same decision.
            if (run.ckpt_every and self.step % run.ckpt_every == 0) or (
                    run.ckpt_minutes and elapsed - saved_at >= 60.0 * run.ckpt_minutes):
                self.save()
                saved_at = elapsed
        if stats and last_step != self.step:  # the budget ended between log steps: log where it stopped
            self._log_step(stats, last_t, last_step, log_path, on_log)
        if run.val_every and stats and self._last_val_step != self.step:
            self._validate_and_log(log_path, on_log)
        if interrupt.requested:  # after the last agreement: this process's own flag
            self._save_on_interrupt(agreed=False)
        return stats

    def _agree(self, elapsed: float, interrupted: bool) -> tuple[float, bool]:
        """Every process's latest clock reading and whether any of them was interrupted, the same on all.

        Why: under DDP each process must take the same number of steps with the same learning rate. With its
        own clock, one process could end a ``run.max_minutes`` budget a step before another, which then waits
        forever in its gradient all-reduce; and the schedule's progress (hence the learning rate) would differ
        by a few milliseconds between processes, so their weights would drift apart. A Ctrl-C seen by one
        process stops all of them after the same step.
        """
        if self.world == 1:
            return elapsed, interrupted
        import torch.distributed as dist

        both = torch.tensor([elapsed, float(interrupted)], dtype=torch.float64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return float(both[0]), bool(both[1] > 0)

    def _max_over_ranks(self, values: list[float]) -> list[float]:
        """Each value's maximum over all processes (one all-reduce), the same on every one of them."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def _any_rank(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (so all of them stop after the same step)."""
        return self._max_over_ranks([float(flag)])[0] > 0

    def _diverged(self, step: int, what: str) -> TrainingError:
        lr = self.cfg.optim.lr
        if self.saved_state is not None:
            good = (f"the last good state is {self.saved_state[0]} (step {self.saved_state[1]}): --resume continues "
                    "from it, but with the same optim.lr (a resume cannot change it) it will likely diverge again")
        else:
            good = "no checkpoint was saved before it"
        return TrainingError(
            f"training diverged at step {step}: {what} is not finite, so the run stopped without saving or "
            f"exporting those weights. The likely cause is a learning rate too high for this model and batch "
            f"(optim.lr={lr:g}): lower it, e.g. -o optim.lr={lr / 10:g}, and start a new run with "
            f"-o run.out_dir=NEW_FOLDER; {good}")

    def nonfinite_weights(self, state: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Names of the model's float tensors that hold NaN or inf (``state``: the model's state_dict, if at hand).

        One device sync per device the weights are on (one, in practice), not one per tensor: each tensor's flag
        stays on its device until all are stacked and read together.
        """
        state = self.sam.state_dict() if state is None else state
        flags: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
        for k, v in state.items():
            if v.is_floating_point():
                names, finite = flags.setdefault(v.device, ([], []))
                names.append(k)
                finite.append(v.isfinite().all())
        bad = set()
        for names, finite in flags.values():
            bad.update(k for k, ok in zip(names, torch.stack(finite).tolist(), strict=True) if not ok)
        return [k for k in state if k in bad]

    def _weights_key(self, state: dict[str, torch.Tensor]) -> tuple | None:
        """What the weights' values depend on, read without a device sync: the optimizer step and each tensor's
        storage and in-place version counter (which an optimizer step, ``load_state_dict`` and an in-place edit
        under ``no_grad`` all bump). None (not cacheable) for inference tensors, which keep no version counter.
        Not seen: an edit through ``.data`` between two checks at the same step (``.data`` has its own counter)."""
        if any(v.is_inference() for v in state.values()):
            return None
        return (self.step, tuple((k, v.data_ptr(), v._version) for k, v in state.items()))

    def _check_weights(self, doing: str, *, all_ranks: bool = False) -> None:
        """Refuse ``doing`` (writing a file) from non-finite weights: a NaN model loaded everywhere and scored NaN.

        ``all_ranks``: every process calls this at the same point and all raise the same error when any of them
        holds a non-finite weight (one all-reduce, as for the loss). Under DDP rank 0 alone writes; checking there
        alone would stop it and leave the others to fail on a lost connection at their next all-reduce.

        The weights are scanned once per change: a run's end checks them for validation, best.pt, best_fp16.pt,
        last.pt and the CLI's export, and a pass is remembered (:meth:`_weights_key`) until a step or an in-place
        write changes them. That memory is this process's own, so it only spares the scan: the all-reduce of
        ``all_ranks`` runs every time, and every process takes part in the same collectives in the same order.
        """
        state = self.sam.state_dict()
        names = list(state)
        key = self._weights_key(state)
        if key is not None and key == self._finite_key:
            bad: set[str] = set()  # unchanged since a scan that found them all finite
        else:
            bad = set(self.nonfinite_weights(state))
            self._finite_key = key if not bad else None
        first = next((i for i, k in enumerate(names) if k in bad), len(names))
        if all_ranks:  # the count and the first name (by index: the same model everywhere) agreed on, so the
            count, neg_first = self._max_over_ranks([float(len(bad)), -float(first)])  # message is the same too
            n, first = int(count), int(-neg_first)
        else:
            n = len(bad)
        if n:
            raise TrainingError(f"{doing}: {n} weight tensor(s) at step {self.step} hold NaN or inf (first: "
                                f"{names[first]}); training diverged: lower optim.lr (now {self.cfg.optim.lr:g}) "
                                "and start a new run with -o run.out_dir=NEW_FOLDER")

    def _log_step(self, stats: dict[str, float], since_t: float, since_step: int, log_path: Path,
                  on_log: Callable[[dict[str, Any]], None] | None) -> None:
        self._write_log(self._step_entry(stats, since_t, since_step), log_path, on_log)

    def _validate_and_log(self, log_path: Path, on_log: Callable[[dict[str, Any]], None] | None) -> None:
        self._last_val_step = self.step
        # Checked by every process here, as validation (and its best.pt) is rank 0's alone.
        self._check_weights(f"not validating step {self.step} (nor writing best.pt)", all_ranks=True)
        if self.rank == 0:  # the other processes wait at their next gradient all-reduce
            self._write_log(self.validate(), log_path, on_log)

    def _save_on_interrupt(self, *, agreed: bool = True) -> None:
        """Checkpoint the state after the last whole step (as a periodic save would) and stop. ``agreed``: every
        process reached this at the same step (see :meth:`save`)."""
        self.interrupt_checkpoint = self.save(agreed=agreed)
        raise KeyboardInterrupt

    # ------------------------------------------------------------------ one step
    def _progress(self, elapsed: float) -> float:
        p = self.step / max(1, self.cfg.run.max_steps)
        if self.cfg.run.max_minutes:
            p = max(p, elapsed / (60.0 * self.cfg.run.max_minutes))
        return min(p, 1.0)

    def generator(self) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.cfg.run.seed * 1_000_003 + self.step * 7_919 + self.rank)
        return gen

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["masks"].to(self.device, non_blocking=True)
        n = batch["num_masks"].to(self.device)
        K = masks.shape[1]
        valid = torch.arange(K, device=self.device)[None] < n[:, None]
        img_idx = valid.nonzero()[:, 0]
        gt = masks[valid]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss, stats = self.ddp(images, gt, img_idx, self.generator(), _on_image(batch, images))
        stats["masks"] = float(gt.shape[0])
        return loss, stats

    def train_step(self, batch: dict[str, Any], elapsed: float = 0.0) -> dict[str, float]:
        self.progress = self._progress(elapsed)
        lr = set_lr(self.optimizer, self.cfg.optim.lr, lr_factor(self.step, self.progress, self.cfg.optim))
        self.set_train_mode()
        loss, stats = self.compute_loss(batch)
        if stats["masks"] == 0 and self.world == 1:  # nothing to learn: no update (AdamW would still move
            self.step += 1  # the weights by momentum and decay); under DDP the zero loss joins the all-reduce
            stats.update(loss=0.0, lr=lr)
            return stats
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.optim.grad_clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip))
            grad_norm = stats["grad_norm"]
        else:  # no clipping: the norm is still what tells a NaN gradient before it reaches the weights
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        loss_value = float(loss.detach())
        # A NaN loss (or gradient) only spreads: stop before the update, on every process at the same step
        # (DDP's all-reduce would otherwise wait for a process that stopped alone).
        what = (f"the loss ({loss_value:g})" if not math.isfinite(loss_value) else
                f"the gradient norm ({grad_norm:g})" if not math.isfinite(grad_norm) else None)
        if self._any_rank(what is not None):
            raise self._diverged(self.step + 1, what or "another process's loss or gradient")
        self.optimizer.step()
        self.step += 1
        stats.update(loss=loss_value, lr=lr)
        return stats

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "step": self.step, "elapsed": self.elapsed, "progress": self.progress,
                "model": self.sam.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": _rng_state(),
                "config": self.cfg.to_dict(), "model_config": self.sam.cfg.to_dict(),
                "first_loss": self.first_loss, "last_loss": self.last_loss, "best_val": self.best_val,
                "base_val": self.base_val,
                "data": self.data_fingerprint(), "device_type": self.device.type, "world_size": self.world,
                PROVENANCE: self.provenance()}

    def provenance(self) -> dict[str, Any]:
        """What this run's outputs come from, recorded in config.json, last.pt and every exported checkpoint's
        metadata (key ``provenance``): the segany and torch versions, the start weights (``init``: random,
        checkpoint or model, the one passed in; the file and its sha256 for a checkpoint, else None) and the
        data (:meth:`data_fingerprint`: sha256 over the train and val records, and their image counts; None for a
        Trainer given no records and no pack).

        The start weights are hashed once (a resumed run keeps its first start's, read from last.pt).
        """
        if self._init_fp is None:
            from segany.hashing import weights_digest

            ckpt = self.init_checkpoint
            self._init_fp = {"init": self._init_kind, "init_checkpoint": None if ckpt is None else str(ckpt),
                             "init_sha256": None if ckpt is None else weights_digest(ckpt)}
        import segany

        try:
            data: dict[str, Any] | None = self.data_fingerprint()
        except InputError:  # a Trainer driven from Python with batches of its own and no pack: no data to name
            data = None
        # str(): torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses to unpickle.
        return {"segany_version": segany.__version__, "torch_version": str(torch.__version__), **self._init_fp,
                "data": data}

    def writing(self, path: str | os.PathLike[str], needed: int | None = None, *,
                option: str = "-o run.out_dir") -> contextlib.AbstractContextManager[None]:
        """A full disk while writing ``path`` becomes one TrainingError saying what to do: free space and
        ``--resume`` from the last good last.pt, or pick another ``option`` (see :func:`writing`).

        The fix is worded only when the disk is full: it looks for last.pt on disk, and every log line and
        checkpoint is written through here."""
        return writing(path, needed, lambda: self._disk_full_fix(option))

    def _disk_full_fix(self, option: str) -> str:
        last = self.saved_state
        if last is not None and last[0].name == "last.pt" and last[0].is_file():
            return (f"Free space on that disk (or move {self.out_dir} to another disk and point -o run.out_dir at "
                    f"it), then rerun with --resume: it continues from the last good {last[0]} (step {last[1]})")
        return (f"Free space on that disk or pick another {option}, then run again (no last.pt was saved yet: "
                "--resume has nothing to continue)")

    def data_fingerprint(self) -> dict[str, Any]:
        """What this run trains and validates on (computed once), kept in ``last.pt`` for ``--resume``."""
        if self._data_fp is None:
            from segany.train.data import data_fingerprint

            self._data_fp = data_fingerprint(self.cfg.data, self.train_records)
        return self._data_fp

    def save(self, path: str | os.PathLike[str] | None = None, *, agreed: bool = True) -> Path:
        """Write the full training state atomically (rank 0 writes it); returns its path. Under DDP every
        process must call it at the same step: they agree first that the weights are finite. ``agreed=False``
        (a process saving on its own, e.g. on its own Ctrl-C while the others may be mid-step): no collective,
        rank 0 checks its own weights."""
        p = Path(path) if path is not None else self.out_dir / "last.pt"
        if agreed:
            self._check_weights(f"not writing {p}", all_ranks=True)  # every process calls save(), each step alike
        elif self.rank == 0:
            self._check_weights(f"not writing {p}")
        if self.rank == 0:
            state = self.state_dict()
            with self.writing(p, tensor_bytes(state)):
                _atomic_torch_save(state, p)
        self.saved_state = (p, self.step)
        return p

    def load(self, path: str | os.PathLike[str]) -> None:
        from segany.errors import CheckpointError

        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"no training state at {str(p)!r}; start without --resume or pass the right run")
        state = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{str(p)!r} is not a segany training state (written by `segany train`)")
        from segany.checkpoints import check_state_dict
        from segany.train.resume import check_resume_config

        # Another lr, dataset or model would make this one run's files describe two; only budgets may grow.
        check_resume_config(state.get("config") or {}, self.cfg, str(p.parent))
        check_state_dict(self.sam, state["model"], self.cfg.model.name, str(p))  # one line, not torch's kBs
        from segany.train.data import check_same_data

        check_same_data(state.get("data"), self.data_fingerprint(), str(p.parent))
        world = state.get("world_size")
        if world is not None and int(world) != self.world:
            raise CheckpointError(
                f"{str(p)!r} was trained by {world} process(es) and this resume runs {self.world}: the global batch "
                "and the data order depend on that count, so it would not be this run continued. Resume with "
                f"{world} ({'segany train' if int(world) == 1 else f'torchrun --nproc-per-node {world}'} ... "
                f"--resume), or start a new run from its weights with -o model.checkpoint={p}")
        self.sam.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.progress = float(state.get("progress", 0.0))
        self.first_loss = state.get("first_loss")
        self.last_loss = state.get("last_loss")
        self.best_val = state.get("best_val")
        self.base_val = state.get("base_val")  # taken once, at step 0 of the run: a resume does not redo it
        started = state.get(PROVENANCE) or {}
        if "init_sha256" in started:  # the run's own start weights, not whatever that path holds now
            self._init_fp = {k: started.get(k) for k in ("init", "init_checkpoint", "init_sha256")}
        self.saved_state = (p, self.step)
        _set_rng_state(state["rng"])
        was = state.get("device_type")
        if was is not None and was != self.device.type:  # allowed (a GPU lease ends), but not the same maths
            self.resume_notes.append(
                f"note: this run trained on {was} and continues on {self.device.type}: from here on the prompts "
                "come from that device's random stream and bf16 autocast is "
                f"{'on' if self.amp else 'off'}, so it is not the exact continuation a resume on {was} would be")

    def export(self, path: str | os.PathLike[str], half: bool = True, meta: dict[str, Any] | None = None, *,
               option: str = "-o run.out_dir") -> Path:
        """Write inference weights (a self-describing segany checkpoint; fp16 by default). ``option``: what the
        user sets to write elsewhere, named when the disk is full."""
        from segany.checkpoints import save_checkpoint

        # Rank 0's alone (validation, the CLI's export after fit): the weights were agreed on just before.
        self._check_weights(f"not writing {Path(path)}")
        info = {"trained_steps": self.step, "train_seconds": round(self.elapsed, 1), **(meta or {}),
                PROVENANCE: self.provenance()}
        with self.writing(path, tensor_bytes(self.sam.state_dict(), half), option=option):
            return save_checkpoint(self.sam, path, meta=info, half=half)

    # ------------------------------------------------------------------ loop
    def build_loader(self) -> torch.utils.data.DataLoader:
        from segany.data.datasets import (
            AugmentConfig,
            SegmentationDataset,
            StepBatchSampler,
            collate,
        )

        d = self.cfg.data
        records = self.epoch_records()
        aug = AugmentConfig(hflip=d.hflip, scale_min=d.scale_min, scale_max=d.scale_max,
                            min_mask_area=d.min_mask_area)
        ds = SegmentationDataset(records, img_size=self.sam.img_size, max_masks=d.max_masks, augment=aug,
                                 seed=self.cfg.run.seed, pixel_mean=self.sam.cfg.pixel_mean,
                                 pixel_std=self.sam.cfg.pixel_std)
        self.num_train_images = len(ds)
        sampler = StepBatchSampler(len(ds), self.cfg.run.batch_size, seed=self.cfg.run.seed, start_step=self.step,
                                   rank=self.rank, world_size=self.world)
        nw = d.num_workers
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=nw, collate_fn=collate,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False,
                                           prefetch_factor=4 if nw > 0 else None)

    def epoch_records(self) -> list:
        """Training records with ``data.repeat`` applied; repeat entries for absent datasets are noted, not fatal."""
        from segany.data.datasets import repeat_records
        from segany.train.data import effective_repeat, train_records

        records = self.train_records if self.train_records is not None else train_records(self.cfg.data)
        repeat, ignored = effective_repeat(records, self.cfg.data.repeat)
        if ignored and self.rank == 0:
            log.info("data.repeat names %s, not among the training datasets (%s); ignored", ", ".join(ignored),
                        ", ".join(sorted({r.dataset for r in records})))
        return repeat_records(records, repeat, seed=self.cfg.run.seed)

    # ------------------------------------------------------------------ validation
    def validate(self, base: bool = False) -> dict[str, Any]:
        """Box and 1-click mIoU on the held-out split (segany.eval's protocol); keeps best.pt on a new best.

        The score is the mean of the two. Runs on rank 0 only and in eval mode; prompts there are
        deterministic, so validating does not change the training that follows. ``base``: this scores the
        starting weights (step 0 of a fine-tune); a step must beat them to write best.pt.
        """
        from segany.eval.interactive import evaluate_model, summarize

        objects = self.validation_objects()
        t = time.time()
        self.sam.eval()
        try:
            with torch.no_grad():
                results = evaluate_model(self.sam, objects, max_clicks=1,
                                         predictor_options={"precision": "fp32"})
        finally:
            self.set_train_mode()
        s = summarize(results, max_clicks=1)["all"]
        score = round((s["box_miou"] + s["miou_1"]) / 2, 4)
        entry: dict[str, Any] = {"step": self.step, "val_box_miou": s["box_miou"], "val_miou_1": s["miou_1"],
                                 "val_score": score, "val_objects": len(results), "val_s": round(time.time() - t, 1)}
        if base:
            self.base_val = score
            entry["base"] = True
            return entry
        new_best = self.best_val is None or score > self.best_val
        if new_best:
            self.best_val = score
        if new_best and (self.base_val is None or score > self.base_val):
            entry["best"] = True
            meta = {"best_step": self.step, "val_score": score, "config": self.cfg.to_dict()}
            self.export(self.out_dir / "best.pt", half=False, meta=meta)
            self.export(self.out_dir / "best_fp16.pt", half=True, meta=meta)
        return entry

    def validation_note(self) -> str | None:
        """A warning when validation is on but holds too few objects for best.pt to mean much, else None."""
        if not self.cfg.run.val_every:
            return None
        n = sum(len(masks) for _, masks in self.validation_objects())
        if n >= MIN_VAL_OBJECTS:
            return None
        return (f"warning: validation has only {n} object(s) (run.val_objects={self.cfg.run.val_objects}): a score "
                "on so few moves by chance, so best.pt may be picked on noise; hold out more images in the pack's "
                f"val split (at least {MIN_VAL_OBJECTS} objects)")

    def remove_stale_temps(self) -> list[Path]:
        """Remove the temp files of this run's own outputs that a kill mid-write left in ``run.out_dir``."""
        gone = []
        for name in RUN_FILES:
            for tmp in self.out_dir.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
                gone.append(tmp)
        return gone

    def validation_objects(self) -> list:
        """``run.val_objects`` objects of the held-out images, taken from each dataset in turn so a small cap
        still covers them all; loaded once, the same every time."""
        if self._val_objects is None:
            from itertools import chain, zip_longest

            from segany.eval.interactive import eval_objects
            from segany.train.data import val_records

            by_ds: dict[str, list] = {}
            for rec, masks in eval_objects(val_records(self.cfg.data)):
                by_ds.setdefault(rec.dataset, []).append((rec, masks))
            left, objects = self.cfg.run.val_objects, []
            for item in chain.from_iterable(zip_longest(*by_ds.values())):  # one image per dataset in turn
                if item is not None and left > 0:
                    objects.append((item[0], item[1][:left]))
                    left -= len(objects[-1][1])
            self._val_objects = objects
        return self._val_objects

    def build_batches(self) -> Callable[[], dict[str, Any]]:
        """A function returning the next batch: worker processes, or the accelerator-resident cache."""
        d = self.cfg.data
        if not d.device_cache:
            it = iter(self.build_loader())
            return lambda: next(it)
        from segany.data.datasets import AugmentConfig
        from segany.data.device_batches import DeviceBatcher

        records = self.epoch_records()
        aug = AugmentConfig(hflip=d.hflip, scale_min=d.scale_min, scale_max=d.scale_max,
                            min_mask_area=d.min_mask_area)
        batcher = DeviceBatcher(records, img_size=self.sam.img_size, max_masks=d.max_masks,
                                batch_size=self.cfg.run.batch_size, augment=aug, seed=self.cfg.run.seed,
                                pixel_mean=self.sam.cfg.pixel_mean, pixel_std=self.sam.cfg.pixel_std,
                                device=self.device, workers=max(1, d.num_workers), rank=self.rank,
                                world_size=self.world)
        self.num_train_images = len(batcher)
        return lambda: batcher.batch(self.step)

    def fit(self, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train until ``run.max_steps`` or ``run.max_minutes``; checkpoint periodically and at the end.

        Ctrl-C ends the current step, saves ``last.pt`` and raises KeyboardInterrupt (a second one stops at once).
        Rank 0 holds ``run.out_dir``'s :class:`RunLock` throughout (taken first: before any cleanup or write), so
        a run started on a folder another one is writing stops with a TrainingError having touched nothing.
        """
        if self.rank != 0:
            return self._fit(on_log)
        own = self.run_lock is None  # else the caller's, held beyond this call
        lock = RunLock(self.out_dir) if self.run_lock is None else self.run_lock
        lock.acquire()
        try:
            return self._fit(on_log)
        finally:
            if own:
                lock.release()

    def _fit(self, on_log: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        run = self.cfg.run
        next_batch = self.build_batches()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.time() - self.elapsed
        log_path = self.out_dir / "log.jsonl"
        if self.rank == 0:
            with self.writing(self.out_dir, None):
                self.out_dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.remove_stale_temps():  # a kill during an earlier save left them (never read)
                log.info("removed %s, left by an interrupted write", tmp)
            # The settings, and (``provenance``) the weights, data and versions the run starts from.
            text = json.dumps({**self.cfg.to_dict(), PROVENANCE: self.provenance()}, indent=1)
            with self.writing(self.out_dir / "config.json", len(text)):
                atomic_write_text(self.out_dir / "config.json", text)
            # One clean history: steps logged after the checkpoint we start from are about to be redone, and a
            # fresh start (nothing trained, no base score kept) drops a killed run's step-0 base line as well.
            with self.writing(log_path, None):
                trim_log(log_path, -1 if self.step == 0 and self.base_val is None else self.step)
            if run.val_every and self.step == 0 and self.init_checkpoint is not None and self.base_val is None:
                # A fine-tune must beat the weights it started from, or it only made them worse.
                self._write_log(self.validate(base=True), log_path, on_log)
        budget = 60.0 * run.max_minutes if run.max_minutes else float("inf")
        self.interrupt_checkpoint: Path | None = None  # set when Ctrl-C stopped the run and its state was saved
        with _DeferredInterrupt() as interrupt:
            stats = self._loop(next_batch, interrupt, t0, budget, log_path, on_log)
        self.save()
        summary = {"steps": self.step, "train_seconds": round(self.elapsed, 1), "first_loss": self.first_loss,
                   "last_loss": stats.get("loss", self.last_loss), "world_size": self.world, "batch_size": run.batch_size,
                   "images_seen": self.step * run.batch_size * self.world,
                   "images_per_s": round(self.step * run.batch_size * self.world / max(self.elapsed, 1e-9), 2),
                   "device": str(self.device), "train_images": getattr(self, "num_train_images", None)}
        if self.device.type == "cuda":
            summary["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            summary["gpu"] = torch.cuda.get_device_name(self.device)
        if self.best_val is not None:
            summary["best_val_score"] = self.best_val
        if self.base_val is not None:
            summary["base_val_score"] = self.base_val
            if self.best_val is None or self.best_val <= self.base_val:
                best = "no step validated" if self.best_val is None else f"best {self.best_val:.4f}"
                summary["no_improvement"] = (
                    f"no step beat the starting weights (val {self.base_val:.4f} vs {best}), so no best.pt was "
                    f"written: keep using them ({self.init_checkpoint}); try a lower optim.lr or more data")
        return summary
