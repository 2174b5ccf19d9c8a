"""Weights shipped inside the package (``segany/assets/weights/``).

A file may be stored whole (``NAME.pt``) or split into parts ``NAME.pt.part0``, ``NAME.pt.part1``, …
(so each stays under repository file-size limits) with ``NAME.pt.sha256`` beside them. Parts are joined
once into the weights cache, checked against the hash, and that path is returned.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from segany.atomic import atomic_path, atomic_write_bytes, atomic_write_text
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
        atomic_write_bytes(p, data[i : i + part_bytes])
        out.append(p)
    atomic_write_text(dest / f"{src.name}.sha256", hashlib.sha256(data).hexdigest() + "\n")
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
        name, by_mtime = f"{sha_file.read_text().split()[0][:16]}-{base.name}", False
    else:
        name, by_mtime = f"{hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:12]}-{base.name}", True
    try:
        return _joined(base, weights_home() / "joined" / name, by_mtime)
    except OSError as exc:
        # A read-only or foreign cache (a container, another user's SEGANY_HOME) must not stop the weights
        # that ship with segany from loading: join them into this user's own temp folder instead.
        try:
            return _joined(base, _private_temp() / name, by_mtime)
        except OSError:
            raise CheckpointError(f"cannot join {base.name} in the cache {str(weights_home() / 'joined')!r} "
                                  f"({exc.strerror or exc}) nor in a temp folder; point SEGANY_HOME at a folder "
                                  "you can write to") from exc


def _joined(base: Path, dest: Path, by_mtime: bool) -> Path:
    """``dest``, joined from ``base``'s parts unless already there (and, ``by_mtime``, newer than them)."""
    if not dest.exists() or (by_mtime and dest.stat().st_mtime < parts_of(base)[-1].stat().st_mtime):
        join_parts(base, dest)
    return dest


def _private_temp() -> Path:
    """``$TMPDIR/segany-<uid>/joined``, made 0700 and refused unless it is this user's own real folder,
    so nobody else can plant a file there that would be loaded as the bundled weights."""
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else 0
    root = Path(tempfile.gettempdir()) / f"segany-{uid}"
    root.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != uid) or st.st_mode & 0o022:
        raise PermissionError(f"{root} is not a private folder of this user")
    folder = root / "joined"
    folder.mkdir(exist_ok=True)
    return folder


def bundled_path(filename: str) -> Path | None:
    """Path of the packaged weights file ``filename`` (joined from parts if needed), or None if not shipped."""
    base = BUNDLE_DIR / filename
    if base.exists():
        return base
    if not parts_of(base):
        return None
    return resolve_parts(base)
