"""What ``--resume`` may change: the budget and bookkeeping, never the maths of the run being continued.

A resumed run's checkpoint, log and exported weights describe one training run. Changing its learning
rate, data or model halfway and keeping its name would make ``config.json`` and ``summary.json`` lie, so
only the keys below may differ from the saved config; anything else needs a new ``run.out_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segany.errors import CheckpointError, InputError
from segany.train.config import TrainConfig

# Keys a resume may change. Budgets (max_steps, max_minutes) extend the run (the lr schedule follows them,
# as it would have had they been set from the start); the rest change where or how often things are written,
# not the updates. The device is the exception: moving a run between CPU and GPU changes its prompt random
# stream and bf16 autocast, so the trainer says so when it happens (Trainer.load); it is allowed because a
# GPU lease can end mid-run. out_dir may be spelled differently (relative vs absolute).
RESUMABLE_KEYS = frozenset({
    "run.max_steps", "run.max_minutes", "run.log_every", "run.ckpt_every", "run.ckpt_minutes", "run.val_every",
    "run.val_objects",
    "run.out_dir", "run.device", "data.num_workers",
})


def _flat(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` with tuples as lists, so a saved and a parsed config compare equal."""
    plain = json.loads(json.dumps(cfg))
    return {f"{sec}.{k}": v for sec, values in plain.items() for k, v in (values or {}).items()}


def changed_keys(saved: dict[str, Any], new: TrainConfig) -> list[str]:
    """Keys whose value in ``new`` differs from ``saved`` (a key the saved config lacks counts as its default)."""
    old, now, default = _flat(saved), _flat(new.to_dict()), _flat(TrainConfig().to_dict())
    return sorted(k for k, v in now.items() if old.get(k, default.get(k)) != v)


def check_resume_config(saved: dict[str, Any], new: TrainConfig, where: str) -> list[str]:
    """Raise InputError naming the keys that a resume may not change; returns the allowed ones that changed."""
    changed = changed_keys(saved, new)
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        old, now, default = _flat(saved), _flat(new.to_dict()), _flat(TrainConfig().to_dict())
        diffs = ", ".join(f"{k} {old.get(k, default.get(k))!r} -> {now[k]!r}" for k in refused)
        raise InputError(f"--resume would change {diffs} of the run in {where}; a resume may only change "
                         f"{', '.join(sorted(RESUMABLE_KEYS))}: drop those overrides, or start a new run with "
                         "-o run.out_dir=FOLDER")
    return [k for k in changed if k in RESUMABLE_KEYS]


def saved_config(path: str | Path) -> dict[str, Any]:
    """The config stored in a training state, read without loading its tensors into memory (mmap)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a torn or foreign file: say which and what to do, not torch's internals
        raise CheckpointError(f"cannot read training state {str(path)!r} ({type(exc).__name__}); it is damaged: "
                              "start a new run with -o run.out_dir=FOLDER") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{str(path)!r} is not a segany training state (written by `segany train`)")
    return state["config"]
