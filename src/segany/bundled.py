"""Weights shipped inside the package (``segany/assets/weights/``).

A file may be stored whole (``NAME.pt``) or split into parts ``NAME.pt.part0``, ``NAME.pt.part1``, …
(so each stays under repository file-size limits) with ``NAME.pt.sha256`` beside them. Parts are joined
once into the weights cache, checked against the hash, and that path is returned.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from segany.atomic import atomic_path
from segany.errors import CheckpointError
from segany.hashing import file_digest

BUNDLE_DIR = Path(__file__).resolve().parent / "assets" / "weights"
PART_BYTES = 15 * 1000 * 1000




def parts_of(path: Path) -> list[Path]:
    parts = []
    i = 0
    while (p := path.with_name(f"{path.name}.part{i}")).exists():
        parts.append(p)
        i += 1
    return parts


def split_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
               part_bytes: int = PART_BYTES) -> list[Path]:
    """Split ``path`` into ``<name>.part<i>`` files of at most ``part_bytes`` plus ``<name>.sha256``."""
    src = Path(path)
    dest = Path(out_dir) if out_dir is not None else src.parent
    dest.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    out = []
    for i in range(0, max(1, len(data)), part_bytes):
        p = dest / f"{src.name}.part{i // part_bytes}"
        p.write_bytes(data[i : i + part_bytes])
        out.append(p)
    (dest / f"{src.name}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    return out


def join_parts(first: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Join ``X.part0, X.part1, …`` (``first`` is X or X.part0) into ``dest``, verifying ``X.sha256`` if present."""
    base = Path(first)
    if base.name.endswith(".part0"):
        base = base.with_name(base.name[: -len(".part0")])
    parts = parts_of(base)
    if not parts:
        raise CheckpointError(f"no parts {base}.part0, .part1, … found; pass the checkpoint file itself")
    out = Path(dest)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        sha_file = base.with_name(base.name + ".sha256")
        if sha_file.exists():
            want = sha_file.read_text().split()[0]
            if file_digest(tmp) != want:
                raise CheckpointError(f"joined parts of {base.name} fail their sha256 check; a part is missing or "
                                      "corrupt: reinstall segany or fetch the parts again")
    return out


def resolve_parts(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it exists, else the joined file of its ``.part*`` pieces (cached beside the cache)."""
    p = Path(path)
    if p.exists() and not p.name.endswith(".part0"):
        return p
    base = p.with_name(p.name[: -len(".part0")]) if p.name.endswith(".part0") else p
    if not parts_of(base):
        return p
    from segany.checkpoints import weights_home

    sha_file = base.with_name(base.name + ".sha256")
    if sha_file.exists():
        # Keyed by content: a checkout with other weights never reuses a stale join, whatever the mtimes.
        # The joined file only appears (atomically) after its sha256 matched, so it can be trusted as is.
        dest = weights_home() / "joined" / f"{sha_file.read_text().split()[0][:16]}-{base.name}"
        if not dest.exists():
            join_parts(base, dest)
        return dest
    digest = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:12]
    dest = weights_home() / "joined" / f"{digest}-{base.name}"
    if not dest.exists() or dest.stat().st_mtime < parts_of(base)[-1].stat().st_mtime:
        join_parts(base, dest)
    return dest


def bundled_path(filename: str) -> Path | None:
    """Path of the packaged weights file ``filename`` (joined from parts if needed), or None if not shipped."""
    base = BUNDLE_DIR / filename
    if base.exists():
        return base
    if not parts_of(base):
        return None
    return resolve_parts(base)
