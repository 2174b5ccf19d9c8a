"""Class-head files: a label model shipped as a small head over another model's weights (issue 10).

``segany_tiny_labels`` is the shipped ``segany_tiny`` with all of SAM frozen plus a class head trained on
top (``scripts/train_label_head.sh``). Only the head ships (a few hundred KB, fp16) in a *head file*::

    {"format": "segany-class-head-v1",
     "base_model": "segany_tiny",     # registered architecture the head sits on
     "base_weights": "segany_tiny",   # registered weights it was trained on ...
     "base_sha256": "<hex>",          # ... and their exact bytes
     "classes": {class_names, hidden_dim, num_layers, clip_dim},   # ClassHeadConfig
     "head": {name: tensor},          # ClassHead state dict (no "class_head." prefix)
     "meta": {...}}                   # how it was trained

:func:`segany.checkpoints.read_checkpoint` expands a head file into a whole checkpoint (base weights +
head, base config + classes), so ``build_sam`` and ``--checkpoint`` take one like any other file. A head is
only valid on the weights it was trained on (their mask tokens are its input), so the base's sha256 is
checked on every load and a mismatch says how to retrain.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from segany.errors import CheckpointError
from segany.modeling.config import ClassHeadConfig, SamConfig
from segany.registry import WeightsInfo, get_config, register_model, register_weights

HEAD_FORMAT = "segany-class-head-v1"
HEAD_LAYOUT = "segany_head"  # WeightsInfo.layout of head files
RETRAIN_COMMAND = "bash scripts/train_label_head.sh"
LABEL_MODEL = "segany_tiny_labels"
LABEL_HEAD_FILE = "segany_tiny_labels_head.pt"

_DIGESTS: dict[tuple[str, int, int], str] = {}


def base_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime) so repeated loads hash it once."""
    from segany.hashing import file_digest

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


def save_head(model: torch.nn.Module, path: str | os.PathLike[str], *, base_model: str, base_weights: str,
              base_path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Write ``model.class_head`` (fp16) as a head file over ``base_weights`` (the file at ``base_path``).

    Written atomically (readable like the other packaged files); a ``<name>.sha256`` sidecar is written beside it like the other bundled files.
    """
    import hashlib
    import io

    head = getattr(model, "class_head", None)
    cfg: SamConfig | None = getattr(model, "cfg", None)
    if head is None or cfg is None or cfg.classes is None:
        raise CheckpointError("save_head needs a Sam with a class head (build it from with_labels(config, names))")
    blob = {
        "format": HEAD_FORMAT, "base_model": base_model, "base_weights": base_weights,
        "base_sha256": base_digest(base_path),
        "classes": {**asdict(cfg.classes), "class_names": list(cfg.classes.class_names)},
        "head": {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in head.state_dict().items()},
        # Plain JSON types only, so the file loads with torch.load(weights_only=True).
        "meta": json.loads(json.dumps(dict(meta or {}), default=str)),
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    data = buf.getvalue()
    from segany.cli._util import atomic_write_bytes

    out = Path(path)
    atomic_write_bytes(out, data)
    atomic_write_bytes(out.with_name(out.name + ".sha256"), (hashlib.sha256(data).hexdigest() + "\n").encode())
    return out


def is_head_blob(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("format") == HEAD_FORMAT


def expand_head(raw: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], SamConfig, dict[str, Any]]:
    """A loaded head file → (whole state dict, config with classes, metadata), base weights checked.

    Raises :class:`CheckpointError` when the base weights are missing or are not the ones the head was
    trained on; the message names the retrain command.
    """
    from segany.checkpoints import find_weights, read_checkpoint

    try:
        base_model, base_weights = str(raw["base_model"]), str(raw["base_weights"])
        want = str(raw["base_sha256"])
        classes = dict(raw["classes"])
        head: dict[str, torch.Tensor] = raw["head"]
    except KeyError as exc:
        raise CheckpointError(f"{source!r} is a class-head file without {exc.args[0]!r}; it is damaged: "
                              f"retrain it with `{RETRAIN_COMMAND}`") from None
    base_path = find_weights(base_weights)
    if base_path is None:
        raise CheckpointError(f"class head {source!r} sits on {base_weights!r} weights, which are not installed; "
                              f"run `segany download {base_weights}`")
    got = base_digest(base_path)
    if got != want:
        raise CheckpointError(
            f"class head {source!r} was trained on {base_weights!r} weights with sha256 {want[:12]}…, but the "
            f"installed {base_weights!r} weights ({base_path}) have sha256 {got[:12]}…: a head only fits the "
            f"weights it was trained on. Retrain it on the new weights with `{RETRAIN_COMMAND}`")
    base_sd, embedded, _ = read_checkpoint(base_path)
    cfg = embedded or get_config(base_model)
    classes["class_names"] = tuple(classes["class_names"])
    cfg = replace(cfg, classes=ClassHeadConfig(**classes))
    sd = dict(base_sd)
    sd.update({f"class_head.{k}": v for k, v in head.items()})
    meta = {**dict(raw.get("meta", {})), "base_model": base_model, "base_weights": base_weights,
            "base_sha256": want, "base_path": str(base_path)}
    return sd, cfg, meta


def read_head(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw head-file dict (tensors on CPU); raises :class:`CheckpointError` if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"class-head file {str(p)!r} does not exist; create it with `{RETRAIN_COMMAND}`")
    raw = torch.load(p, map_location="cpu", weights_only=True)
    if not is_head_blob(raw):
        raise CheckpointError(f"{str(p)!r} is not a segany class-head file (format {HEAD_FORMAT!r})")
    return raw


def shipped_head_path(weights: str = LABEL_MODEL) -> Path:
    """Path of the packaged head file of weights entry ``weights``, or a :class:`CheckpointError`."""
    from segany.bundled import bundled_path
    from segany.registry import get_weights_info

    info = get_weights_info(weights)
    path = bundled_path(info.filename)
    if path is None:
        raise CheckpointError(f"the class head {info.filename} is not in segany/assets/weights/; create it with "
                              f"`{RETRAIN_COMMAND}`")
    return path


_CONFIGS: dict[tuple[str, int], SamConfig] = {}


def shipped_config(weights: str = LABEL_MODEL) -> SamConfig:
    """The base config plus the classes of the shipped head (read once per file version)."""
    path = shipped_head_path(weights)
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _CONFIGS:
        raw = read_head(path)
        classes = dict(raw["classes"])
        classes["class_names"] = tuple(classes["class_names"])
        _CONFIGS[key] = replace(get_config(str(raw["base_model"])), classes=ClassHeadConfig(**classes))
    return _CONFIGS[key]


register_weights(WeightsInfo(
    name=LABEL_MODEL, model=LABEL_MODEL, url="", filename=LABEL_HEAD_FILE, layout=HEAD_LAYOUT,
    description="class head over segany_tiny (all of SAM frozen), shipped in the package; "
                f"retrain with `{RETRAIN_COMMAND}`",
))


@register_model(LABEL_MODEL, weights=LABEL_MODEL,
                description="segany_tiny + a class head (coco128-seg classes): --text person, auto --labels")
def segany_tiny_labels() -> SamConfig:
    return shipped_config(LABEL_MODEL)
