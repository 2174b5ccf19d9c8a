"""Reading, checking, writing and downloading checkpoints.

Accepted files: official SAM ``.pth``, MobileSAM ``.pt``, Hugging Face ``SamModel`` weights
(``.safetensors`` or ``.bin``) and segany's own files, which embed their :class:`SamConfig`.
Loading is always strict: a file that does not fit the model raises :class:`CheckpointError`
naming the first missing/unexpected keys and the variant the file looks like.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segany import hf_layout
from segany.atomic import atomic_write, current_umask
from segany.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DownloadError,
    InputError,
    UnknownModelError,
)
from segany.hashing import file_digest
from segany.modeling.config import SamConfig
from segany.modeling.sam import Sam
from segany.registry import WeightsInfo, get_config, get_weights_info, list_models

log = logging.getLogger(__name__)

SEGANY_FORMAT = "segany-checkpoint-v1"
BUNDLED = "bundled"  # checkpoint= value meaning the weights that ship inside the package (segany_tiny's)
TRAIN_STATE_FORMAT = "segany-train-state-v1"  # segany.train.trainer.STATE_FORMAT (not imported: that pulls in training)


def weights_home() -> Path:
    """Cache folder for downloaded weights: ``$SEGANY_HOME`` or ``~/.cache/segany``. An empty SEGANY_HOME counts
    as unset (it made the cache a relative ``weights`` folder of wherever segany ran)."""
    home = Path(os.environ.get("SEGANY_HOME", "").strip() or Path.home() / ".cache" / "segany").expanduser()
    if home.exists() and not home.is_dir():
        where = "SEGANY_HOME" if "SEGANY_HOME" in os.environ else "segany's cache folder"
        raise InputError(f"{where} {str(home)!r} is a file; point SEGANY_HOME at a folder (created if missing)")
    return home


def cached_path(info: WeightsInfo) -> Path:
    return weights_home() / "weights" / info.filename


def _shards(folder: Path) -> list[Path] | None:
    """The shard files a ``*.index.json`` of ``folder`` lists (Hugging Face's sharded layout), else None.

    Reading only the first file of a sharded folder found a fraction of the keys and named the wrong problem.
    """
    import json

    for index in sorted(folder.glob("*.index.json")):
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{str(index)!r} is not a readable shard index ({exc}); download the folder "
                                  "again") from exc
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{str(folder)!r} is a sharded checkpoint but lacks {', '.join(missing[:3])}"
                                  f"{' ...' if len(missing) > 3 else ''} (listed in {index.name}); download the "
                                  "missing shards")
        return [folder / n for n in names]
    return None


# The weights file of a save_pretrained (or Accelerate) folder, by the names those tools give it.
_MODEL_FILES = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin", "model.bin")


def _model_file(folder: Path, candidates: list[Path]) -> Path:
    """The folder's weights file: the one of a known name, else its only candidate; several are refused (an
    Accelerate state holds optimizer.bin and scheduler.bin too, and the first by name was read)."""
    for name in _MODEL_FILES:
        if (folder / name).is_file():
            return folder / name
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(p.name for p in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
    raise CheckpointError(f"{str(folder)!r} holds several weight files ({names}) and none named "
                          f"{' or '.join(_MODEL_FILES[::2])}; pass the model's file itself")


def _read_raw(path: Path, *, mmap: bool = False) -> Any:
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path or run "
                                      "`segany download NAME`")
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        if not candidates:
            run = [n for n in ("best_fp16.pt", "model_fp16.pt", "last.pt") if (path / n).is_file()]
            hint = f" (a `segany train` run: pass {str(path / run[0])!r})" if run else ""
            raise CheckpointError(f"{str(path)!r} is a folder without .safetensors/.bin weights; pass the file "
                                  f"itself{hint}")
        shards = _shards(path)
        if shards is not None:  # a sharded save_pretrained folder: every file its index lists
            merged: dict[str, Any] = {}
            for shard in shards:
                merged.update(_read_raw(shard, mmap=mmap))
            return merged
        path = _model_file(path, candidates)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc}); the file may be "
                                  "truncated: download it again") from exc
    try:
        # torch maps only zip-format files (a legacy torch.save one is read whole, not refused)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - pickle raises nearly anything (KeyError('h') for a text file)
        text = str(exc)
        low = text.lower()
        if "unsupported global" in low or "is blocked" in low:  # objects besides tensors (or code to run); never
            # repeat torch's hint to unpickle them
            raise CheckpointError(
                f"{str(path)!r} holds Python objects besides tensors, which segany does not unpickle (that would "
                "run code from the file); re-save only the weights: torch.save(model.state_dict(), path)"
            ) from exc
        if "Weights only load failed" in text:  # not a torch.save file at all (text, a plain pickle, garbage)
            text = "not a torch.save file"
        first = (text.splitlines() or [""])[0][:200] or type(exc).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first}); "
            "it may be truncated or not a checkpoint at all: download it again (`segany download NAME`)"
        ) from exc


def _embedded_config(raw: dict[str, Any], key: str, path: str | os.PathLike[str]) -> SamConfig:
    """The config a segany file embeds, or a CheckpointError: a newer segany's extra field, or a damaged entry,
    was an "unexpected error" (TypeError from the dataclass)."""
    try:
        return SamConfig.from_dict(raw[key])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{str(path)!r} embeds a model config this segany cannot read ({type(exc).__name__}: "
                              f"{exc}); it may come from a newer segany (update segany) or be damaged") from exc


def _embedded_model(raw: dict[str, Any], path: str | os.PathLike[str]) -> Any:
    if not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{str(path)!r} is a segany file without its 'model' weights; it is damaged: write "
                              "or download it again")
    return raw["model"]


def read_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False
                    ) -> tuple[dict[str, torch.Tensor], SamConfig | None, dict[str, Any]]:
    """Read a checkpoint file into (state dict in segany names, embedded config or None, metadata).

    ``mmap``: the tensors stay in the file (memory-mapped) until read, so checking names and shapes of a
    2.5 GB file costs megabytes (safetensors files are mapped either way)."""
    raw = _read_raw(Path(path), mmap=mmap)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(raw).__name__}, not a state dict")
    config: SamConfig | None = None
    meta: dict[str, Any] = {}
    from segany.text.label_model import expand_head, is_head_blob

    if is_head_blob(raw):  # a class head over another model's weights (segany_tiny_labels): base + head
        return expand_head(raw, str(path))
    if raw.get("format") == SEGANY_FORMAT:
        config = _embedded_config(raw, "config", path)
        meta = dict(raw.get("meta") or {})
        sd = _embedded_model(raw, path)
    elif raw.get("format") == TRAIN_STATE_FORMAT and isinstance(raw.get("model_config"), dict):
        # `segany train`'s last.pt: the model inside the training state loads like a checkpoint, so a run can
        # be tried (predict, eval) mid-way without first exporting model_fp16.pt.
        config = _embedded_config(raw, "model_config", path)
        meta = {"training_step": int(raw.get("step", 0))}
        sd = _embedded_model(raw, path)
    elif "model" in raw and isinstance(raw["model"], dict) and "config" not in raw:
        sd = raw["model"]  # training checkpoints of other tools
    elif "state_dict" in raw and isinstance(raw["state_dict"], dict):
        sd = raw["state_dict"]
    else:
        sd = raw
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{str(path)!r} is not a model state dict (entry {bad[0]!r} is not a tensor)")
    sd = _unwrap(sd, str(path))
    if hf_layout.is_hf(sd):
        sd = hf_layout.from_hf(sd)
    return sd, config, meta


# The first names of a model's keys: segany/official SAM ones, then Hugging Face SamModel's own.
_MODEL_PARTS = frozenset({"image_encoder", "prompt_encoder", "mask_decoder", "class_head", "vision_encoder",
                          "shared_image_embedding"})
# Attributes that wrap a model whole when it is saved: DDP/DataParallel's ``module``, ``model`` (a Lightning
# module's or a training loop's ``self.model``) and torch.compile's ``_orig_mod``. A file whose model keys all
# sit under a chain of these (``model.module.``) holds one model, and stripping them is all it needs.
WRAPPER_NAMES = ("module", "model", "_orig_mod")


def model_prefixes(state_dict: dict[str, Any]) -> dict[str, int]:
    """How many keys each prefix holds a model part under (``""``: the model's own keys), most first.

    ``model.image_encoder.x`` is under ``"model."``; a key naming no model part (``epoch``, a loss's buffer)
    counts nowhere.
    """
    counts: dict[str, int] = {}
    for key in state_dict:
        parts = key.split(".")
        i = next((i for i, part in enumerate(parts[:-1]) if part in _MODEL_PARTS), None)
        if i is not None:
            prefix = "".join(part + "." for part in parts[:i])
            counts[prefix] = counts.get(prefix, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _unwrap(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The state dict without a wrapper's prefix, when that is unambiguous: every model key sits under one
    chain of :data:`WRAPPER_NAMES`. Entries outside it (a loss's buffer, a step counter) are left out, which
    is logged. Any other layout (an unknown prefix, two copies of the model such as ``model.`` beside
    ``ema_model.``) is returned as it is, and :func:`check_state_dict` names the prefixes found."""
    prefixes = model_prefixes(sd)
    if len(prefixes) != 1:
        return sd
    (prefix,) = prefixes
    if not prefix or any(part not in WRAPPER_NAMES for part in prefix[:-1].split(".")):
        return sd
    inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    left = [k for k in sd if not k.startswith(prefix)]
    log.info("%s holds a wrapped model (keys under %r); loaded with the prefix stripped%s", source, prefix,
             f", leaving out {len(left)} other entries (first: {', '.join(left[:3])})" if left else "")
    return inner


def _prefix_hint(state_dict: dict[str, torch.Tensor]) -> str | None:
    """What to do about model keys under a prefix that :func:`_unwrap` did not strip, or None."""
    counts = model_prefixes(state_dict)
    prefixes = [p for p in counts if p]
    if not prefixes:
        return None
    found = " and ".join(repr(p) for p in prefixes[:3]) + (" ..." if len(prefixes) > 3 else "")
    if "" in counts:  # the model itself plus copies under a prefix (EMA, a teacher)
        drop = prefixes[0] if len(prefixes) == 1 else tuple(prefixes)
        return (f"besides the model's own keys the file holds model weights under {found}; keep only the model's "
                f"and save them again: sd = {{k: v for k, v in sd.items() if not k.startswith({drop!r})}}")
    p = prefixes[0]
    strip = f"sd = {{k.removeprefix({p!r}): v for k, v in sd.items() if k.startswith({p!r})}}"
    if len(prefixes) == 1:
        return (f"the model's keys sit under {p!r}, a wrapper segany strips by itself only when it is made of "
                f"{', '.join(n + '.' for n in WRAPPER_NAMES)}; strip it and save the weights again: {strip}")
    return (f"the file holds model weights under several prefixes ({found}, e.g. a model and its EMA copy), so "
            f"which one to load is unclear; keep one and save it again, e.g. {strip}")


@functools.lru_cache(maxsize=32)
def _shapes(config: SamConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a model of ``config``, kept per config: building even a meta-device ViT-H
    takes 0.3–0.7 s, and every check before a model is built needs them (a server's startup check, then the
    build itself; each engine run)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Sam(config).state_dict().items()}


def _config_shapes(config: SamConfig) -> dict[str, tuple[int, ...]]:
    """:func:`_shapes`, also for a config holding an unhashable value (built each time then)."""
    try:
        return _shapes(config)
    except TypeError:
        return _shapes.__wrapped__(config)


def guess_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name the registered model whose parameter names and shapes match ``state_dict`` best."""
    best, best_score = None, -1.0
    for name in list_models():
        ref = _shapes(get_config(name))
        same = sum(1 for k, v in ref.items() if k in state_dict and tuple(state_dict[k].shape) == v)
        score = same / max(len(ref), len(state_dict))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.5 else None


def check_state_dict(model: torch.nn.Module | dict[str, tuple[int, ...]], state_dict: dict[str, torch.Tensor],
                     model_name: str, source: str) -> None:
    """Raise a readable :class:`CheckpointError` unless ``state_dict`` fits ``model`` (a module, or its
    state dict's names and shapes) exactly."""
    expected = ({k: tuple(v.shape) for k, v in model.state_dict().items()} if isinstance(model, torch.nn.Module)
                else model)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {v}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != v
    ]
    if not (missing or unexpected or shapes):
        return
    parts: list[str] = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:3])})")
    head = f"checkpoint {source!r} does not fit model {model_name!r}: " + "; ".join(parts)
    wrapped = _prefix_hint(state_dict)
    guess = None if wrapped else guess_variant(state_dict)
    if wrapped:
        raise CheckpointMismatchError(f"{head}; {wrapped}")
    if guess and guess != model_name:
        # The fix is the model to build: a Python call for API callers, --model on the command line.
        diagnosis = f"{head}; the file looks like a {guess!r} checkpoint: "
        error = CheckpointMismatchError(
            f"{diagnosis}build that model, e.g. build_sam({guess!r}, checkpoint={source!r}) "
            f"or sam_model_registry[{guess!r}](checkpoint={source!r})")
        error.looks_like, error.diagnosis = guess, diagnosis
        error.with_cli_fix(f"use --model {guess}")
        raise error
    if missing and not unexpected:
        head += "; the file may be truncated or partial: download it again"
    raise CheckpointMismatchError(head)


def load_weights(model: Sam, path: str | os.PathLike[str], model_name: str = "model") -> dict[str, Any]:
    """Load ``path`` into ``model`` strictly; returns the checkpoint's metadata."""
    sd, _, meta = read_checkpoint(path)
    check_state_dict(model, sd, model_name, str(path))
    model.load_state_dict(sd, strict=True)
    return meta


def _looks_like_path(name: str) -> bool:
    """Whether ``build_sam(name)`` names a checkpoint rather than a model: an existing file or folder, or a
    string shaped like a path. A missing file then fails as the reference's does (FileNotFoundError), not with
    "unknown model"."""
    p = Path(name)
    return p.exists() or os.sep in name or "/" in name or p.suffix in (".pth", ".pt", ".bin", ".safetensors",
                                                                          ".ckpt")


def build_sam(name: str | os.PathLike[str] | None = "vit_h", checkpoint: str | os.PathLike[str] | None = None,
              device: str | torch.device = "cpu") -> Sam:
    """Build a registered model, optionally loading weights, in eval mode.

    A segany checkpoint carries its own config; its variant name then need not be given exactly,
    and the embedded config wins (logged at INFO; `sam_model_registry[name]` refuses another architecture).

    Without ``checkpoint`` the model is randomly initialised, as ``sam_model_registry[name]()`` is in
    ``segment_anything``, and training from scratch relies on that. This holds for ``segany_tiny`` too,
    although its weights ship with segany: pass ``checkpoint="bundled"`` to get them. The exception
    is a class-head model (``segany_tiny_labels``), which is meaningless without its shipped head.

    ``build_sam("weights.pth")`` (a file, not a model name, as the reference's ``build_sam`` is called)
    loads that file, taking the variant from its embedded config or its tensor shapes; so does a ``Path``.
    ``build_sam(None)`` is the reference's ``build_sam(checkpoint=None)``: a randomly initialised ViT-H.
    """
    if name is None:
        name = "vit_h"
    elif not isinstance(name, str):  # a Path (the reference's build_sam takes the checkpoint first)
        name = os.fspath(name)
        if checkpoint is None:
            checkpoint = name
            return _build_from_file(name, checkpoint, device)
    if checkpoint == BUNDLED:
        checkpoint = bundled_weights(name)
    path_first = checkpoint is None and _config_or_none(name) is None and _looks_like_path(name)
    if path_first:
        checkpoint = name
    elif checkpoint is None:
        checkpoint = _shipped_head(name)
    if checkpoint is not None:
        return _build_from_file(name, checkpoint, device, guess_name=path_first)
    return Sam(get_config(name)).to(device).eval()


def _build_from_file(name: str, checkpoint: str | os.PathLike[str], device: str | torch.device, *,
                     guess_name: bool = True) -> Sam:
    sd, config = read_checked(name, checkpoint, guess_name=guess_name)
    model = Sam(config)
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


def read_checked(name: str, checkpoint: str | os.PathLike[str], *, guess_name: bool = False, mmap: bool = False
                 ) -> tuple[dict[str, torch.Tensor], SamConfig]:
    """Read ``checkpoint`` and check its keys and shapes against the model it describes; returns the state dict
    and that model's config, or raises :class:`CheckpointError` naming what does not fit.

    The config is the one the file embeds, else ``name``'s (with ``guess_name``, the variant its shapes look
    like). The check runs on a meta-device shell, so a wrong file fails before a full-size model is built;
    a server uses this alone to refuse bad weights at startup. ``mmap``: see :func:`read_checkpoint` (for a
    check alone, whose state dict is dropped).
    """
    sd, embedded, _ = read_checkpoint(checkpoint, mmap=mmap)
    if guess_name:
        name = guess_variant(sd) or "vit_h"
    config = embedded or get_config(name)
    if embedded is not None and embedded != _config_or_none(name):
        log.info("%s embeds its own config, which is used instead of %r's", checkpoint, name)
    check_state_dict(_config_shapes(config), sd, name, str(checkpoint))
    return sd, config


def _shipped_head(name: str) -> Path | None:
    """The shipped head file of a model that is a class head over another model's weights, else None.

    Such a model (segany_tiny_labels) loads its weights by default: its class names live in the head file,
    and a random head over random weights is not that model at all.
    """
    from segany.registry import weights_for_model
    from segany.text.label_model import HEAD_LAYOUT

    try:
        info = weights_for_model(name)
    except UnknownModelError:
        return None  # build_sam reports the unknown name with suggestions below
    return find_weights(info.name) if info is not None and info.layout == HEAD_LAYOUT else None


def bundled_weights(name: str) -> Path:
    """The weights file shipped (or downloaded) for model ``name``: what ``checkpoint="bundled"`` means, in
    ``build_sam`` and in a training config's ``model.checkpoint``."""
    from segany.registry import weights_for_model

    info = weights_for_model(name)  # unknown names raise with suggestions
    found = find_weights(info.name) if info is not None else None
    if found is None:
        have = [m for m in list_models() if _has_bundled(m)]
        raise CheckpointError(f"model {name!r} has no weights shipped with segany (checkpoint='bundled'); models "
                              f"that have: {', '.join(have) or 'none'}; otherwise pass a weights file")
    return found


def _has_bundled(name: str) -> bool:
    from segany.bundled import bundled_path
    from segany.registry import weights_for_model

    info = weights_for_model(name)
    return info is not None and bundled_path(info.filename) is not None


def _config_or_none(name: str) -> SamConfig | None:
    try:
        return get_config(name)
    except UnknownModelError:
        return None


def save_checkpoint(model: Sam, path: str | os.PathLike[str], meta: dict[str, Any] | None = None,
                    half: bool = False) -> Path:
    """Write a self-describing segany checkpoint atomically (``half`` stores floats as fp16)."""
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    blob = {"format": SEGANY_FORMAT, "config": model.cfg.to_dict(), "model": sd, "meta": dict(meta or {})}
    out = Path(path)
    # Through atomic_write: torch.save reports a full disk as an opaque RuntimeError ("unexpected pos …"),
    # path or file alike; atomic_write raises the file's own OSError(ENOSPC) instead, which callers word as
    # "the disk is full".
    atomic_write(out, lambda f: torch.save(blob, f))
    return out


def verify_file(path: Path, info: WeightsInfo, *, fetched_from: str | None = None) -> None:
    """Check size and every published hash of ``info``; raise :class:`DownloadError` on mismatch.

    An entry without any (MobileSAM's publisher gives none) must at least be a PyTorch file: a cut-off
    transfer or an HTML error page was cached as the weights and then never fetched again.
    ``fetched_from``: the URL just downloaded (the message then says so, not to delete a temporary file).
    """
    what = f"the download of {info.name} from {fetched_from}" if fetched_from else str(path)
    fix = (f"run `segany download {info.name}` again" if fetched_from
           else f"download it again: `segany download {info.name} --force`")
    size = path.stat().st_size
    if info.size is not None and size != info.size:
        raise DownloadError(f"{what} has {size} bytes but {info.name} should have {info.size}: the transfer was "
                            f"cut off or the file is another one; {fix}")
    for algo in ("sha256", "md5"):
        want = getattr(info, algo)
        if want and file_digest(path, algo) != want.lower():
            raise DownloadError(f"{what} fails its {algo} check for {info.name} (expected {want}); {fix}")
    if info.size is None and not info.sha256 and not info.md5 and not _is_torch_file(path):
        raise DownloadError(f"{what} is not a PyTorch checkpoint ({size} bytes; a cut-off transfer or an error "
                            f"page); {fix}")


def _is_torch_file(path: Path) -> bool:
    """A torch.save file: a zip with its central directory (the end a cut-off file lacks), or the legacy pickle."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(2) == b"\x80\x02"  # protocol-2 pickle, torch's format before 1.6


# A temporary download file untouched this long belongs to a download that was killed, not to one in progress.
STALE_DOWNLOAD_SECONDS = 600


def download(name: str, *, force: bool = False, timeout: float = 30.0,
             progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch registered weights into the cache, verify them and return the path.

    Offline or on any network error, raises :class:`DownloadError` saying where to put the file by hand.
    """
    info = get_weights_info(name)
    dest = cached_path(info)
    if not info.url:  # e.g. weights shipped inside the package: nothing to fetch
        found = find_weights(name)
        if found is not None:
            return found
        what = f"weights {name!r} have no download URL; put the file at {dest} (or pass its path "
        raise DownloadError(what + "as build_sam(..., checkpoint=PATH))", cli=what + "with --checkpoint)")
    damaged = None  # the cached file found damaged, as it was then: not hashed again under the lock
    if dest.exists() and not force:
        try:
            verify_file(dest, info)
            return dest
        except DownloadError as exc:  # a damaged cached file: fetched again, not kept
            log.warning("%s; downloading it again", exc)
            damaged = _file_key(dest)
    _sweep_stale_downloads(dest)
    from segany.fetch import PartBusyError, TransferError, fetch_into, finished, locked_part, part_path

    part = part_path(dest)
    try:
        with locked_part(part) as out:
            if dest.exists() and not force and _file_key(dest) != damaged and _whole(dest, info):
                return dest  # another download finished it meanwhile
            # A part is continued without the server's validator only when the joined file can be checked.
            checked = info.size is not None or bool(info.sha256 or info.md5)
            got = fetch_into(info.url, part, out, timeout=timeout, resume_unchecked=checked, progress=progress)
            if got.resumed_from:
                log.info("continued %s from byte %d", info.name, got.resumed_from)
            if got.total is not None and got.size != got.total:
                raise DownloadError(f"the download of {info.name} from {info.url} stopped after {got.size} of "
                                    f"{got.total} bytes; run `segany download {info.name}` again: it continues "
                                    "from there")
            try:
                verify_file(part, info, fetched_from=info.url)
            except DownloadError:
                part.unlink(missing_ok=True)  # a whole file that fails its check is not continued, but fetched anew
                finished(part)
                raise
            os.chmod(part, 0o666 & ~current_umask())
            os.replace(part, dest)
            finished(part)
    except TransferError as exc:
        raise _network_error(info, dest, exc.cause, kept=exc.kept) from exc.cause
    except PartBusyError:
        raise DownloadError(f"another `segany download {info.name}` is writing {part}; wait for it to finish "
                            "(or stop it) and run again") from None
    return dest


def _file_key(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of ``path``: changes when another process puts a new file there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _whole(path: Path, info: WeightsInfo) -> bool:
    try:
        verify_file(path, info)
    except DownloadError:
        return False
    return True


def _network_error(info: Any, dest: Path, exc: BaseException, *, kept: int = 0) -> DownloadError:
    again = (f"; the {kept} bytes received are kept, and `segany download {info.name}` continues from them"
             if kept else "")
    what = (f"could not download {info.name} from {info.url} ({getattr(exc, 'reason', exc)!s:.200}){again}. If "
            f"this machine is offline, fetch the file elsewhere and put it at {dest} (or pass its path ")
    return DownloadError(what + "as build_sam(..., checkpoint=PATH))", cli=what + "with --checkpoint)")


def _sweep_stale_downloads(dest: Path) -> None:
    """Remove the temporary files of downloads of ``dest`` that were killed (up to 2.5 GB each for ViT-H);
    a download in progress writes its file every second, so only ones idle for long go."""
    import time

    for tmp in dest.parent.glob(f".{dest.name}.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_DOWNLOAD_SECONDS:
                tmp.unlink()
        except OSError:
            continue


def find_weights(name: str) -> Path | None:
    """Path of cached weights ``name`` if present (not verified: verification reads the whole file)."""
    info = get_weights_info(name)
    from segany.bundled import bundled_path  # weights shipped inside the package win over the cache

    packaged = bundled_path(info.filename)
    if packaged is not None:
        return packaged
    path = cached_path(info)
    return path if path.exists() else None
