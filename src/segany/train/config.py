"""Training configuration: frozen dataclasses, one per section, loaded from YAML with dotted overrides.

    model:  {name: segany_tiny, checkpoint: null}
    data:   {pack: out/packed, datasets: [coco128, pennfudan, kvasir, bsds], max_masks: 16, ...}
    optim:  {lr: 1e-3, weight_decay: 0.1, warmup_steps: 250, decay_at: [0.7, 0.9], ...}
    recipe: {point_rounds: 4, mask_only_rounds: 1, ...}
    run:    {out_dir: runs/x, max_steps: 1000, max_minutes: null, batch_size: 8, ...}

``--override optim.lr=3e-4`` sets one field; values parse as YAML (numbers, lists, booleans).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segany.errors import InputError, require
from segany.yaml_errors import safe_load_unique, yaml_problem


def _require(ok: bool, message: str) -> None:
    """Raise InputError(message) unless ``ok``; comparisons written as ``not x > 0`` also reject NaN."""
    if not ok:
        raise InputError(message)


# Upper bounds of settings that had none (an audit's 1e6 or 1e9 crashed or diverged the run after the model was
# built); generous next to SAM's own values (lr 8e-4, 64 masks, 8 click rounds, scale jitter 0.1-2).
MAX_LR = 1.0
MAX_MASKS = 1024
MAX_POINT_ROUNDS = 64
MAX_SCALE = 10.0
# recipe.loss_size: 0 means the model's img_size; a grid coarser than 16 px cannot hold a mask's shape, and any
# side above the img_size is the img_size (a loss grid is never finer than the input), so 4096 covers every model.
MIN_LOSS_SIZE = 16
MAX_LOSS_SIZE = 4096

BUNDLED = "bundled"  # model.checkpoint value meaning "the weights shipped in the package for model.name"
PROVENANCE = "provenance"  # the key of config.json (and checkpoint metadata) recording a run's inputs and versions


def bundled_configs() -> dict[str, Any]:
    """The configs shipped inside the package (``segany/configs/NAME.yaml``, copies of the repo's ``configs/``),
    by name; the values are importlib.resources traversables, readable from a wheel or a zip."""
    from importlib.resources import files

    folder = files("segany") / "configs"
    if not folder.is_dir():
        return {}
    return {f.name[: -len(".yaml")]: f for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def _is_bare_name(text: str) -> bool:
    """``segany_tiny_cpu_finetune``: no folder, no suffix; what ``--config`` takes for a bundled config."""
    return bool(re.fullmatch(r"[A-Za-z0-9_\-]+", text))


def _unknown_config(path: str) -> InputError:
    import difflib

    names = list(bundled_configs())
    close = difflib.get_close_matches(path, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return InputError(f"config {path!r} is not a file nor a bundled config; {hint}bundled configs: "
                      f"{', '.join(names) or 'none'}; pass one of those names or the path of a YAML file")


@dataclass(frozen=True)
class ModelSection:
    name: str = "segany_tiny"
    # Initial weights: null = random init (from scratch), "bundled" = the weights shipped with segany for
    # ``name`` (fine-tuning segany_tiny), or a checkpoint file.
    checkpoint: str | None = None
    # An explicit architecture in SamConfig.to_dict() form, for experiments with unregistered sizes.
    arch: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.arch is None:  # a typo must not train some other model (unknown names suggest close ones)
            from segany.registry import get_config

            get_config(self.name)
        if self.arch is not None:
            from segany.modeling.config import SamConfig

            SamConfig.checked_from_dict(self.arch, "model.arch")
        if self.checkpoint == BUNDLED and self.arch is not None:
            raise InputError("model.checkpoint=bundled needs a registered model.name, not model.arch; "
                             "pass a checkpoint file instead")


@dataclass(frozen=True)
class DataSection:
    pack: str = "out/packed"  # a folder written by scripts/pack_data.py
    datasets: tuple[str, ...] = ("coco128", "pennfudan", "kvasir", "bsds")
    max_masks: int = 16  # instance masks sampled per image
    hflip: float = 0.5
    scale_min: float = 0.6
    scale_max: float = 1.5
    min_mask_area: int = 64
    num_workers: int = 4
    device_cache: bool = False  # decode the whole pack once into accelerator memory and augment there
    # Per-dataset repeat factors, e.g. {bsds: 4, kvasir: 0.5}: rebalances what an epoch holds when one
    # dataset has many more images than the rest (kvasir is 70% of the packed training images). Missing = 1.
    repeat: dict[str, float] | None = None

    def __post_init__(self) -> None:
        # Names outside data.datasets (or the pack) are ignored with a note when the run starts, so one
        # config serves packs holding other datasets (see segany.train.data.effective_repeat).
        for name, factor in (self.repeat or {}).items():
            if not factor >= 0:
                raise InputError(f"data.repeat[{name!r}] must be >= 0, got {factor}")
        _require(bool(self.datasets), "data.datasets is empty; name at least one, e.g. [coco128, pennfudan]")
        # Upper bounds: an out-of-range value crashed a loader worker (out of memory) or a crop seconds in,
        # after the model was built, with a traceback that named no key.
        _require(1 <= self.max_masks <= MAX_MASKS,
                 f"data.max_masks must be in [1, {MAX_MASKS}] masks per image, got {self.max_masks}; "
                 "e.g. data.max_masks=16 (SAM: 64)")
        _require(0 <= self.hflip <= 1, f"data.hflip is a probability in [0, 1], got {self.hflip}")
        # 0 would keep masks the crop emptied: a foreground click at (0, 0) with an all-background target.
        _require(self.min_mask_area >= 1, f"data.min_mask_area must be >= 1 pixel, got {self.min_mask_area}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0 (0 loads in the main process), "
                                        f"got {self.num_workers}")
        if not 0 < self.scale_min <= self.scale_max:
            raise InputError(f"data.scale_min/scale_max must satisfy 0 < min <= max, got {self.scale_min}, "
                             f"{self.scale_max}")
        _require(self.scale_max <= MAX_SCALE,
                 f"data.scale_max must be <= {MAX_SCALE:g} (the image is resized by at most this before the crop), "
                 f"got {self.scale_max:g}; e.g. data.scale_max=1.5")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 250
    decay_at: tuple[float, ...] = (0.7, 0.9)  # fractions of the run (steps or wall-clock) where lr drops
    decay_gamma: float = 0.1
    layer_decay: float = 1.0  # lr scale per encoder layer from the top; 1.0 = none (from scratch)
    # A frozen part gets no gradient and no optimizer state, and stays in eval mode for the whole run
    # (TinyViT's BatchNorm running statistics do not move either). Both frozen = decoder-only fine-tuning.
    freeze_image_encoder: bool = False
    freeze_prompt_encoder: bool = False
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        # Above 1 AdamW moves every weight by about lr per step: the loss goes NaN within a step or two.
        _require(0 < self.lr <= MAX_LR, f"optim.lr must be > 0 and <= {MAX_LR:g}, got {self.lr:g}; e.g. optim.lr=3e-4")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}; e.g. [0.9, 0.999]")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(all(0 < f <= 1 for f in self.decay_at),
                 f"optim.decay_at holds fractions of the run in (0, 1], got {list(self.decay_at)}")
        _require(0 < self.decay_gamma <= 1, f"optim.decay_gamma is the factor lr is multiplied by at each "
                                            f"optim.decay_at and must be in (0, 1], got {self.decay_gamma:g}; "
                                            "e.g. optim.decay_gamma=0.1")
        _require(0 < self.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")


@dataclass(frozen=True)
class RecipeSection:
    point_rounds: int = 4  # corrective-click rounds after the first prompt (SAM: 8)
    mask_only_rounds: int = 1  # final rounds that feed back the mask without a new point (SAM: 2)
    box_prob: float = 0.5  # first prompt is a jittered box with this chance, else a foreground point
    box_noise: float = 0.1  # std of box-corner noise as a fraction of the box side ...
    box_noise_max: float = 20.0  # ... capped at this many pixels (SAM: 10%, 20 px)
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    # Side of the square grid where losses are computed and corrective clicks sampled (0 = img_size).
    # Logits are predicted at img_size/4 anyway; 256 keeps memory flat for large batches.
    loss_size: int = 256

    def __post_init__(self) -> None:
        for name in ("point_rounds", "mask_only_rounds", "loss_size"):
            value = getattr(self, name)
            _require(value >= 0, f"recipe.{name} must be >= 0, got {value}")
        # Each round is a decoder pass kept for backward: 1e6 rounds ran out of memory after the model was built.
        _require(self.point_rounds <= MAX_POINT_ROUNDS,
                 f"recipe.point_rounds must be <= {MAX_POINT_ROUNDS} corrective-click rounds, got "
                 f"{self.point_rounds}; e.g. recipe.point_rounds=4 (SAM: 8)")
        _require(self.loss_size == 0 or MIN_LOSS_SIZE <= self.loss_size <= MAX_LOSS_SIZE,
                 f"recipe.loss_size must be 0 (the model's img_size) or in [{MIN_LOSS_SIZE}, {MAX_LOSS_SIZE}] pixels, "
                 f"got {self.loss_size}; e.g. recipe.loss_size=256")
        _require(0 <= self.box_prob <= 1, f"recipe.box_prob is a probability in [0, 1], got {self.box_prob}")
        for name in ("box_noise", "box_noise_max", "focal_weight", "dice_weight", "iou_weight"):
            value = getattr(self, name)
            _require(value >= 0, f"recipe.{name} must be >= 0, got {value}")

    @property
    def num_rounds(self) -> int:
        return 1 + self.point_rounds + self.mask_only_rounds


@dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/train"
    max_steps: int = 1000
    max_minutes: float | None = None  # wall-clock budget; the lr schedule then follows elapsed time
    batch_size: int = 8  # images per GPU (or per process on CPU)
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    grad_checkpointing: bool = False
    log_every: int = 10
    ckpt_every: int = 500
    # Also save last.pt once this many minutes of training passed since the last save (None: off). The
    # processes decide on their agreed clock, so they save after the same step. Sized by time, a save costs
    # the same share of a run whatever the model: a ViT-H state is ~7.6 GB, a few seconds of disk per save.
    ckpt_minutes: float | None = None
    device: str = "auto"  # auto | cpu | cuda
    # Held-out validation every val_every steps (0 = off) on at most val_objects objects of the pack's
    # val split: box mIoU and 1-click mIoU (segany.eval); best.pt keeps the weights with the best mean.
    val_every: int = 0
    val_objects: int = 64

    def __post_init__(self) -> None:
        _require(bool(self.out_dir and str(self.out_dir).strip()), "run.out_dir is empty; name a folder for the run")
        _require(self.max_steps >= 1, f"run.max_steps must be >= 1, got {self.max_steps}")
        _require(self.max_minutes is None or self.max_minutes > 0,
                 f"run.max_minutes (--max-minutes) must be > 0, got {self.max_minutes}; "
                 "leave it unset (null) for no time limit")
        _require(self.batch_size >= 1, f"run.batch_size must be >= 1 image per process, got {self.batch_size}")
        _require(0 <= self.seed < 2**32, f"run.seed must be in [0, 2**32), got {self.seed}")  # prompt seeds are int64
        _require(self.log_every >= 1, f"run.log_every must be >= 1 step, got {self.log_every}")
        _require(self.ckpt_every >= 0, f"run.ckpt_every must be >= 0 (0 saves only at the end), got {self.ckpt_every}")
        _require(self.ckpt_minutes is None or self.ckpt_minutes > 0,
                 f"run.ckpt_minutes must be > 0, got {self.ckpt_minutes}; leave it unset (null) to save by steps only")
        _require(self.val_every >= 0, f"run.val_every must be >= 0 steps (0 turns validation off), got {self.val_every}")
        _require(self.val_objects >= 1, f"run.val_objects must be >= 1 object, got {self.val_objects}")
        _require(bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device)),
                 f"run.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    recipe: RecipeSection = field(default_factory=RecipeSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        # A run's config.json also records what the run started from (``provenance``): a record, not a setting,
        # so that file still loads as a config (to train again with the same settings).
        unknown = set(data) - set(sections) - {PROVENANCE}
        if unknown:
            raise InputError(f"unknown config sections {sorted(unknown)}; allowed: {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            sec_cls = f.default_factory  # type: ignore[misc]
            values = dict(data.get(f.name) or {})
            allowed = {g.name: g for g in dataclasses.fields(sec_cls)}
            bad = set(values) - set(allowed)
            if bad:
                raise InputError(f"unknown keys {sorted(bad)} in config section {f.name!r}; allowed: {sorted(allowed)}")
            values = {k: _coerce(f"{f.name}.{k}", allowed[k].type, v) for k, v in values.items()}
            kwargs[f.name] = sec_cls(**values)
        return cls(**kwargs)


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are valid but probably not meant, for the user to be told before the run starts."""
    notes = []
    if cfg.optim.warmup_steps >= cfg.run.max_steps:
        notes.append(f"warning: optim.warmup_steps={cfg.optim.warmup_steps} >= run.max_steps={cfg.run.max_steps}: "
                     "the learning rate is still warming up when the run ends (it never reaches optim.lr); "
                     f"e.g. optim.warmup_steps={max(0, cfg.run.max_steps // 10)}")
    return notes


def _finite(key: str, x: float) -> float:
    """``x`` unless it is inf or NaN, which no setting can use (they crashed or poisoned the run later)."""
    if not math.isfinite(x):
        raise InputError(f"config {key} must be a finite number, got {x}")
    return x


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Convert YAML values to the field's type (YAML reads ``1e-4`` as a string, lists as lists)."""
    ann = str(annotation)
    if value is None:
        if "None" not in ann:
            raise InputError(f"config {key} needs a value of type {ann}, got null")
        return None
    try:
        if ann.startswith("tuple[str") and isinstance(value, str):
            value = [value]  # data.datasets=foo means [foo]
        if ann.startswith("tuple") and not isinstance(value, (list, tuple)):
            raise ValueError(value)
        if ann.startswith(("int", "float")) and isinstance(value, bool):
            raise TypeError(value)  # bool is an int in Python: run.batch_size=true must not mean 1
        if ann.startswith("dict[str, float]"):
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): _finite(key, float(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple, dict)) and not ann.startswith(("tuple", "dict")):
            raise ValueError(value)  # data.pack=[a,b]: one value, not a list (it crashed later in a path call)
        if isinstance(value, (list, tuple)):
            if "tuple[float" in ann:
                return tuple(_finite(key, float(v)) for v in value)
            item = int if "tuple[int" in ann else str
            return tuple(item(v) for v in value)
        if ann.startswith("float"):
            return _finite(key, float(value))
        if ann.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if ann.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
                return bool(value)
            raise ValueError(value)  # 2 or 0.5 meant "yes" before: a slip, not a choice
        if ann.startswith("str"):
            return str(value)
    except InputError:  # _finite's own message (InputError is a ValueError)
        raise
    except (TypeError, ValueError) as exc:
        hint = ("a number, not true/false" if isinstance(value, bool) else
                "one value, not a list or mapping" if isinstance(value, (list, tuple, dict)) else f"a value of type {ann}")
        raise InputError(f"config {key} must be {ann}, got {value!r}; write {hint}") from exc
    return value


def _parse_value(key: str, text: str) -> Any:
    yaml: Any = require("yaml", "train")  # pyyaml: one install hint, not a bare ModuleNotFoundError

    try:
        return safe_load_unique(text)  # as the config file is read: {lr: 1, lr: 2} is a slip, not the last lr
    except yaml.constructor.ConstructorError as exc:
        problem, _ = yaml_problem(exc)
        raise InputError(f"override {key}={text!r}: {problem}") from None
    except yaml.YAMLError:
        raise InputError(f"override {key}={text!r}: the value is not valid YAML; quote strings, write lists as "
                         "[a, b]") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` entries on a nested dict (values parsed as YAML)."""
    for k, v in data.items():
        if v is not None and not isinstance(v, dict):
            raise InputError(f"config section {k!r} must be a mapping of key: value, got {v!r}")
    out = {k: dict(v or {}) for k, v in data.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise InputError(f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section == PROVENANCE:
            raise InputError(f"override {item!r}: {PROVENANCE} is what a run recorded (versions, start weights, "
                             "data), not a setting; drop it (a new run records its own)")
        out.setdefault(section, {})[name] = _parse_value(key, value)
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults) and apply dotted overrides.

    ``path`` is a YAML file, or the bare name of a config shipped with segany (``segany_tiny_cpu_finetune``:
    no folder, no suffix; a file of that name, if one exists, wins), listed by :func:`bundled_configs`.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        bundled = None
        if not p.exists() and _is_bare_name(str(path)):  # a bundled config by name, usable without a checkout
            bundled = bundled_configs().get(str(path))
            if bundled is None:
                raise _unknown_config(str(path))
        elif p.is_dir():
            raise InputError(f"config {str(p)!r} is a folder; pass a YAML file inside it, e.g. configs/tiny_cpu.yaml")
        elif not p.is_file():
            shipped = p.name[: -len(p.suffix)] if p.suffix in (".yaml", ".yml") else None
            if shipped in bundled_configs():  # configs/X.yaml outside a checkout: the same file ships as X
                raise InputError(f"config file {str(p)!r} does not exist; segany ships it: pass the bare name "
                                 f"{shipped!r} (no folder, no .yaml)")
            raise InputError(f"config file {str(p)!r} does not exist; pass a YAML file or a bundled config "
                             f"({', '.join(bundled_configs())})")
        yaml: Any = require("yaml", "train")  # pyyaml: one install hint, not a bare ModuleNotFoundError

        try:
            text = bundled.read_text(encoding="utf-8") if bundled is not None else p.read_text(encoding="utf-8")
            data = safe_load_unique(text) or {}
        except UnicodeDecodeError:
            raise InputError(f"config {str(p)!r} is not a text file (not UTF-8); pass a YAML config such as "
                             "configs/tiny_cpu.yaml") from None
        except OSError as exc:
            raise InputError(f"cannot read config {str(p)!r}: {exc.strerror}; check the path and its "
                             "permissions") from None
        except yaml.YAMLError as exc:
            problem, where = yaml_problem(exc)
            raise InputError(f"config {str(p)!r} is not valid YAML{where}: {problem}; fix the file "
                             "(see configs/ for examples)") from None
        if not isinstance(data, dict):
            raise InputError(f"{str(p)!r} must hold a mapping of sections (model, data, optim, recipe, run)")
    return TrainConfig.from_dict(apply_overrides(data, overrides or []))
