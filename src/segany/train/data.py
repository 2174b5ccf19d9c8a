"""Which pack records a training run uses, checked before the model is built.

The config names a pack folder and some of its datasets; a typo, a pack made elsewhere (a user's own
``mydata``) or a missing folder must fail at once with the names that do exist, not minutes later inside
the data loader with "no image with masks".
"""

from __future__ import annotations

import hashlib
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
        if present:
            fix = f"pass -o data.datasets=[{', '.join(present)}]"
        else:  # -o data.datasets=[] is refused: say what would give this split some data
            fix = (f"its {split} split is empty: pack the data again with a smaller --val-fraction"
                   if split == "train" else "pack the data again with a --val-fraction above 0")
        raise InputError(f"{what} in the {split} split of pack {pack!r}, which holds "
                         f"{', '.join(present) or 'no datasets'}; {fix}")
    wanted = set(datasets)
    return [r for r in records if r.dataset in wanted]


def train_records(data: DataSection) -> list[InstanceRecord]:
    """The training records of the pack's ``data.datasets`` (before ``data.repeat``)."""
    check_pack_folder(data.pack)
    # Only its own datasets are read: another dataset of the pack left unfinished by a re-pack is not its business.
    return _select(_load_known(data, "train"), data.datasets, data.pack, "train")


def _pack_val(data: DataSection) -> list[InstanceRecord]:
    """The pack's held-out records of ``data.datasets`` (possibly none)."""
    return [r for r in _load_known(data, "val") if r.dataset in set(data.datasets)]


def _load_known(data: DataSection, split: str) -> list[InstanceRecord]:
    """The pack's records of ``split`` among ``data.datasets`` that the pack holds (:func:`_select` names the
    rest), or all of them when it holds none of those (for that function's message)."""
    from segany.data.pack import load_pack, pack_datasets

    held, unfinished = pack_datasets(data.pack)
    if set(data.datasets) & set(unfinished):  # load_pack says which and how to finish the pack
        return load_pack(data.pack, split=split, datasets=data.datasets)
    wanted = [d for d in data.datasets if d in held]
    return load_pack(data.pack, split=split, datasets=wanted or None)


def val_records(data: DataSection) -> list[InstanceRecord]:
    """The held-out records of ``data.datasets``; InputError when there are none (validation was asked for)."""
    records = _pack_val(data)
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


def records_fingerprint(records: Sequence[InstanceRecord]) -> str:
    """sha256 over the records' ids, sizes and masks, in a fixed order: equal exactly when the data is."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: (r.dataset, str(r.image_id))):
        h.update(f"{r.dataset}\0{r.image_id}\0{tuple(r.size_hw)}\0".encode())
        for m in r.masks:
            counts = m.get("counts") if isinstance(m, Mapping) else m
            h.update(counts if isinstance(counts, bytes) else str(counts).encode())
            h.update(b"\n")
    return h.hexdigest()


def data_fingerprint(data: DataSection, train: Sequence[InstanceRecord] | None = None) -> dict[str, object]:
    """What a run trains and validates on, for ``--resume`` to check: a pack rebuilt under the run (other
    images, another split) would otherwise be continued silently, validating on images already trained on.
    ``train``: the records the run was given (else the pack's); the val part is the pack's held-out split of
    ``data.datasets`` when ``data.pack`` is a pack (the engine's runs train on records of their own)."""
    rec = list(train) if train is not None else train_records(data)
    out: dict[str, object] = {"train": records_fingerprint(rec), "train_images": len(rec)}
    if (Path(data.pack) / MANIFEST).is_file():
        val = _pack_val(data)
        out.update(val=records_fingerprint(val), val_images=len(val))
    return out


def check_same_data(saved: Mapping[str, object] | None, now: Mapping[str, object], where: str) -> None:
    """InputError when the data a resumed run would see is not what it saw (``saved`` None: an older state)."""
    if not saved:
        return
    changed = [part for part in ("train", "val") if part in saved and part in now and saved[part] != now[part]]
    if changed:
        what = "; ".join(f"{part}: {saved.get(part + '_images')} images then, {now.get(part + '_images')} now"
                         f"{' (same count, other content)' if saved.get(part + '_images') == now.get(part + '_images') else ''}"
                         for part in changed)
        raise InputError(f"--resume: the data of the run in {where} changed since it started ({what}); the pack "
                         "was rebuilt or data.pack points elsewhere. Continue only on the same data: restore the "
                         "pack, or start a new run with -o run.out_dir=FOLDER")
