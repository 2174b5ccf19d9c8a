"""Which outputs of an earlier ``segany auto`` run ``--resume`` may keep.

An output is only kept when the settings that made it (model, weights file, generator options, format,
labels, the precision that ran and quantization) equal this run's: resuming a folder with another model would
otherwise leave the old model's masks in place under a manifest that names the new one, and ``--precision auto``
resumed on another machine would mix bf16 and fp32 masks. ``run.json`` in the output folder records the settings
(and ``requested``, the precision options as given); its modification time is the moment outputs with these
settings began to be written. A run without ``--resume`` redoes every image, so it rewrites run.json at its
start; outputs older than that belong to a replaced run (one killed before it reached them) and a later
``--resume`` redoes them too. A resume with the same settings leaves run.json as it is.

``image_ids.json`` maps each image's output key to its image id and to the image file behind it (path, size,
mtime). Ids are handed out once, in listing order, before any image is processed, and a resume keeps them, so
an image keeps its id when others are added or removed, and a killed-and-resumed run writes the same files as
an uninterrupted one. A resume redoes an image whose file changed, or whose key now names another file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segany.cli._util import atomic_write_bytes
from segany.data.formats.auto_files import (  # noqa: F401 - re-exported: segany.cli.auto imports them from here
    BOOKKEEPING,
    COCO_IMAGES_FILE,
    COCO_RESULTS_FILE,
    IDS_FILE,
    MANIFEST_FILE,
    RUN_FILE,
    recorded_settings,
)
from segany.errors import InputError

# SA-1B annotation ids are unique over the whole output: image_id * ANN_ID_STRIDE + the mask's index. The
# prompt limit of ``segany auto`` (3 masks per prompt at most) keeps every index below the stride.
ANN_ID_STRIDE = 1_000_000
_RESERVED = {n.casefold() for n in BOOKKEEPING} | {n.removesuffix(".json").casefold() for n in BOOKKEEPING}


def is_reserved_key(key: str) -> bool:
    """Whether an image key would name a bookkeeping file: KEY.json (sa1b, coco) or the folder KEY (png).

    Case-insensitive, because on macOS and Windows ``Run.json`` and ``run.json`` are one file. A hidden
    name ending in ``.tmp`` (the png folder ``.x.tmp``) looks like a killed write that the next run removes.
    """
    name = key.rsplit("/", 1)[-1]
    return key.casefold() in _RESERVED or (name.startswith(".") and name.endswith(".tmp"))


def checkpoint_identity(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Path, size and modification time of the weights: cheap even for multi-GB files, and a file
    replaced in place changes at least its mtime."""
    if path is None:
        return None
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def run_settings(model: str, checkpoint: str | os.PathLike[str] | None, fmt: str, options: dict[str, Any],
                 labels: list[str] | None, *, precision: str = "fp32", quantize: str | None = None
                 ) -> dict[str, Any]:
    """Everything that changes what an output holds. ``precision`` is the one that runs (``--precision auto``
    resolved on this machine: bf16 and fp32 masks differ beyond rounding); the device does not count, nor does
    the folded fp32 decoder, equal to the exact one to rounding."""
    return {"model": model, "checkpoint": checkpoint_identity(checkpoint), "format": fmt,
            "options": options, "labels": labels, "precision": precision, "quantize": quantize}


def _upgrade(before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """Settings an older segany recorded, in this one's terms. It kept ``predictor`` (the precision and quantize
    the user set) only when they were not the defaults, and never what ``--precision auto`` resolved to: that is
    unknown, so it counts as this run's, as it did then."""
    if "precision" in before:
        return before
    upgraded = dict(before)
    asked = upgraded.pop("predictor", None) or {}
    upgraded["precision"] = asked.get("precision", now.get("precision"))
    upgraded["quantize"] = asked.get("quantize")
    return upgraded


def check_resume(out: Path, settings: dict[str, Any], resume: bool, has_outputs: Callable[[], bool], *,
                 requested_precision: str | None = None) -> bool:
    """Whether this run keeps the outputs of the recorded one (``--resume`` with the same settings).

    Reads only, so it can run before the model loads; ``has_outputs`` is asked only when resuming into a
    folder without run.json. ``requested_precision`` (``--precision``) words the fix when the precision that
    runs differs from the recorded one.

    Raises:
        InputError: ``--resume`` into a folder made with other settings, or whose outputs have no record.
    """
    if not resume:
        return False
    path = out / RUN_FILE
    if not path.exists():
        if has_outputs():
            raise InputError(f"--resume: {str(out)!r} holds outputs but no {RUN_FILE}, so which model and settings "
                             "made them is unknown; rerun without --resume and with --overwrite to replace them, or "
                             "pick a new --out")
        return False
    try:
        before = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--resume: {str(path)!r} is unreadable ({exc}); rerun without --resume and with "
                         "--overwrite to replace the outputs, or pick a new --out") from exc
    now = json.loads(json.dumps(settings))  # compare as JSON round-trips them (tuples, floats)
    if isinstance(before, dict):
        before = _upgrade(before, now)
        before, now = _without_batch(before), _without_batch(now)
    if before != now:
        changed = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
        detail = ", ".join(_describe(k, before.get(k), now.get(k)) for k in changed)
        fix = ""
        if "precision" in changed:  # the one setting a machine can change by itself (--precision auto)
            why = (f" (--precision auto runs {now['precision']} on this machine)" if requested_precision == "auto"
                   else "")
            fix = f"resume with --precision {before['precision']}, which made them{why}, or "
        raise InputError(f"--resume: {str(out)!r} was made with other settings ({detail}); {fix}rerun without "
                         "--resume to replace its outputs, or pick a new --out")
    return True


def _without_batch(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without ``options.points_per_batch``: how many prompts run at once changes memory, not the
    masks (equal to rounding), so a run resumed with a smaller batch after running out of memory keeps its
    finished images."""
    options = settings.get("options")
    if not isinstance(options, dict) or "points_per_batch" not in options:
        return settings
    return {**settings, "options": {k: v for k, v in options.items() if k != "points_per_batch"}}


def _describe(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict) and key == "options":
        return ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in sorted({*old, *new})
                         if old.get(k) != new.get(k))
    if key == "checkpoint":
        o = old.get("path") if isinstance(old, dict) else old
        n = new.get("path") if isinstance(new, dict) else new
        return f"checkpoint {o!r} → {n!r}" + (" (same path, file changed)" if o == n else "")
    return f"{key} {old!r} → {new!r}"


def record_run(out: Path, settings: dict[str, Any], keep: bool, requested: dict[str, Any] | None = None) -> int:
    """The time (ns) from which outputs count as made with ``settings``: run.json's mtime, on the same clock
    as the outputs' mtimes that :func:`is_current` compares with it. A fresh start rewrites run.json first.
    ``requested``: the options as the user gave them (``--precision auto``), kept beside the settings they
    resolved to for the reader; a resume compares only the settings."""
    path = out / RUN_FILE
    if not keep:
        record = {"settings": settings, **({"requested": requested} if requested is not None else {})}
        atomic_write_bytes(path, json.dumps(record, indent=2).encode("utf-8"))
    return path.stat().st_mtime_ns


def is_current(output: Path, since: int) -> bool:
    """Whether ``output`` exists and was written under the recorded settings."""
    try:
        return output.stat().st_mtime_ns >= since
    except FileNotFoundError:
        return False


def source_stamp(path: Path) -> dict[str, Any] | None:
    """The image file an output was made from: absolute path, size and modification time (None when it
    cannot be read). Cheap for any number of images, and a file replaced in place changes its mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class ImageRecord:
    """``image_ids.json``: each output key's image id and the image file (:func:`source_stamp`) behind it.

    ``changed`` lists the keys whose recorded file is not the one listed now (another path, or the same path
    with another size or mtime): their outputs belong to another image and must be redone.
    """

    ids: dict[str, int]
    sources: dict[str, dict[str, Any] | None]
    next_id: int
    changed: list[str] = field(default_factory=list)


def plan_images(out: Path, images: list[tuple[Path, str]], keep: bool) -> ImageRecord:
    """Each listed image's id and source, keeping the recorded ones when resuming; reads only.

    Ids are handed out once, in listing order. A key now naming another file gets a fresh id (the old image
    is gone; its id is never reused); the same file changed in place keeps its id. A key recorded without a
    source (an older segany) counts as changed, since which image made its output is unknown.

    Raises:
        InputError: ``image_ids.json`` exists but cannot be read while resuming.
    """
    path = out / IDS_FILE
    ids, sources, next_id = _read_ids(path) if keep and path.exists() else ({}, {}, 1)
    ids, sources = dict(ids), dict(sources)
    changed = []
    for image, key in images:
        stamp = source_stamp(image)
        if key in ids and sources.get(key) != stamp:
            changed.append(key)
            old = sources.get(key)
            if old is None or old.get("path") != (stamp or {}).get("path", os.path.abspath(image)):
                del ids[key]  # another image under this name: a new id
        if key not in ids:
            ids[key] = next_id
            next_id += 1
        sources[key] = stamp
    return ImageRecord(ids, sources, next_id, changed)


def recorded_keys(out: Path) -> dict[str, str]:
    """Absolute image path -> the output key the recorded run gave it ({} when there is no readable record)."""
    path = out / IDS_FILE
    try:
        _, sources, _ = _read_ids(path) if path.exists() else ({}, {}, 1)
    except InputError:
        return {}
    return {src["path"]: key for key, src in sources.items() if isinstance(src, dict) and "path" in src}


def write_images(out: Path, record: ImageRecord) -> None:
    """Write ``image_ids.json`` atomically, before any image is processed, so a killed run resumes with the
    same ids; call it only once the outputs of ``record.changed`` are removed, so a stale output is never
    recorded as its new image's."""
    data = {"ids": record.ids, "sources": record.sources, "next_id": record.next_id}
    atomic_write_bytes(out / IDS_FILE, json.dumps(data, indent=1).encode("utf-8"))


def previous_outputs(out: Path) -> tuple[str | None, list[str]]:
    """The format and output keys of the run recorded in ``out`` (None and [] when there is none), so a fresh
    run removes exactly what that run wrote and never a file it did not."""
    fmt = (recorded_settings(out) or {}).get("format")
    try:
        keys = list(_read_ids(out / IDS_FILE)[0]) if (out / IDS_FILE).exists() else []
    except InputError:
        keys = []
    return (fmt if isinstance(fmt, str) else None), keys


def _read_ids(path: Path) -> tuple[dict[str, int], dict[str, Any], int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ids, sources = data["ids"], data.get("sources", {})
        if not all(isinstance(k, str) and type(v) is int and v > 0 for k, v in ids.items()):
            raise ValueError("ids must map output names to positive integers")
        if not isinstance(sources, dict):
            raise ValueError("sources must map output names to image files")
        next_id = max([int(data.get("next_id", 1)), *(v + 1 for v in ids.values())])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"--resume: {str(path)!r} is unreadable ({exc}); rerun without --resume and with "
                         "--overwrite to replace the outputs, or pick a new --out") from exc
    return dict(ids), dict(sources), next_id
