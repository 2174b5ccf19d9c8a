"""Which pack records a training run uses, checked before the model is built.

The config names a pack folder and some of its datasets; a typo, a pack made elsewhere (a user's own
``mydata``) or a missing folder must fail at once with the names that do exist, not minutes later inside
the data loader with "no image with masks".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from segany.data.formats.common import InstanceRecord
from segany.errors import InputError
from segany.train.config import DataSection

log = logging.getLogger(__name__)

MANIFEST = "manifest.json.gz"


def check_pack_folder(pack: str) -> Path:
    """The pack folder, or InputError when it (or its manifest) is missing; reads nothing else."""
    root = Path(pack)
    if not root.is_dir():
        raise InputError(f"data.pack {pack!r} does not exist; make a pack with `segany data pack --out {pack}` "
                         "or point -o data.pack=FOLDER at one")
    if not (root / MANIFEST).is_file():
        raise InputError(f"data.pack {pack!r} is not a segany pack (no {MANIFEST}); make one with "
                         f"`segany data pack --out {pack}` or point -o data.pack=FOLDER at one")
    return root


def _select(records: Sequence[InstanceRecord], datasets: Sequence[str], pack: str, split: str
            ) -> list[InstanceRecord]:
    """Records of ``datasets``; every name must be in the pack (a typo must not drop a dataset silently)."""
    present = sorted({r.dataset for r in records})
    missing = [d for d in datasets if d not in present]
    if missing:
        what = (f"none of data.datasets ({', '.join(datasets)}) is" if len(missing) == len(datasets) else
                f"data.datasets {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not")
        raise InputError(f"{what} in the {split} split of pack {pack!r}, which holds "
                         f"{', '.join(present) or 'no datasets'}; pass -o data.datasets=[{', '.join(present)}]")
    wanted = set(datasets)
    return [r for r in records if r.dataset in wanted]


def train_records(data: DataSection) -> list[InstanceRecord]:
    """The training records of the pack's ``data.datasets`` (before ``data.repeat``)."""
    from segany.data.pack import load_pack

    check_pack_folder(data.pack)
    return _select(load_pack(data.pack, split="train"), data.datasets, data.pack, "train")


def val_records(data: DataSection) -> list[InstanceRecord]:
    """The held-out records of ``data.datasets``; InputError when there are none (validation was asked for)."""
    from segany.data.pack import load_pack

    records = [r for r in load_pack(data.pack, split="val") if r.dataset in set(data.datasets)]
    if not records:
        raise InputError(f"run.val_every is set but pack {data.pack!r} has no held-out (val) images of "
                         f"{', '.join(data.datasets)}; pack a val split or set run.val_every=0")
    return records


def effective_repeat(records: Sequence[InstanceRecord], repeat: Mapping[str, float] | None
                     ) -> tuple[dict[str, float], list[str]]:
    """``repeat`` restricted to datasets the records hold, and the names it ignored.

    A shipped config rebalances the shared datasets; on a pack of other datasets those entries mean
    nothing and are dropped (the caller says so) rather than stopping the run.
    """
    present = {r.dataset for r in records}
    kept = {k: v for k, v in (repeat or {}).items() if k in present}
    ignored = sorted(k for k in (repeat or {}) if k not in present)
    if records and not any(kept.get(r.dataset, 1.0) > 0 for r in records):
        zero = ", ".join(f"{k}: {v:g}" for k, v in sorted(kept.items()))
        raise InputError(f"data.repeat {{{zero}}} leaves no training images of {', '.join(sorted(present))}; "
                         "give at least one of them a factor > 0")
    return kept, ignored
