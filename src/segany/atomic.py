"""Atomic file writes: a reader, or a resumed run, sees the old file or the complete new one, never a part.

Every writer in segany goes through :func:`atomic_path` (but the weights download, whose hidden ``.part`` is
kept across attempts on purpose, see :mod:`segany.fetch`), so three properties hold everywhere:

* the data lands in a temp file beside the target and is renamed over it (``os.replace`` is atomic on one
  file system), so a crash or Ctrl-C mid-write leaves the previous file, or none;
* the temp file is removed on any failure, Ctrl-C included, so no ``.name.XXXX.tmp`` is left behind;
* the new file gets the permissions any other new file gets under the process's umask (``mkstemp`` makes
  0600 files, which other users, a web server or a container mount then cannot read).

Logs that grow line by line are not rewritten whole: :func:`append_whole` adds a record or nothing, so a
full disk never leaves a torn last line for the next reader (or a resumed run) to trip on.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

# The errors a full disk gives, and how a message words them.
NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (its nearest existing folder), None if unknown."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextmanager
def disk_full_as(error: type[Exception], path: str | os.PathLike[str], fix: str | Callable[[], str],
                 needed: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one ``error`` naming the file, the space it needs
    (``needed`` bytes, when known) and ``fix``; any other error passes unchanged. ``fix`` may be a function,
    called only when the disk is full: for a wording that costs something (a look on disk) around writes
    that are frequent (every line of a log).

    For commands whose writers inside leave nothing partial (these atomic writes; appends that cut a failed
    line back off), so the message can say so. Those writers report a full disk as OSError(ENOSPC/EDQUOT)
    (:func:`atomic_write` even when torch.save made it a RuntimeError); nothing else is guessed to be one.
    """
    target = Path(path)
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        room = ""
        if needed:
            free = _free_bytes(target)
            room = f" (it needs about {_size(needed)}" + (f", {_size(free)} free there)" if free is not None
                                                          and free < needed else ")")
        raise error(f"{NO_SPACE[exc.errno]}: could not write {target}{room}; nothing partial was left. "
                    f"{fix() if callable(fix) else fix}") from exc


def current_umask() -> int:
    """The process umask (to give files made 0600/0700 by mkstemp/mkdtemp the usual permissions)."""
    mask = os.umask(0)  # the only portable way to read it is to set it; restore at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder to write to; on success it replaces ``path``.

    For writers that take a file name (``torch.save``, ``torch.onnx.export``, ONNX Runtime's quantizer).
    ``fsync`` flushes the data to disk before the rename, for files a resumed run trusts as complete.
    The parent folder is created if missing.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        # Named after the file the caller asked for, not the temp file (which is removed below): a full disk
        # is reported as "could not write results.json", not ".results.json.k3j2x.tmp".
        err = OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(target))
        err.partial_removed = True  # type: ignore[attr-defined] - what a message may promise (segany.cli.main)
        raise err from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # after a successful replace there is nothing left to remove


class _KeepsWriteErrors:
    """A binary file that remembers the first OSError its ``write``/``flush`` raised.

    Why: ``torch.save`` into a file object turns the file's OSError (a full disk, ENOSPC) into
    ``RuntimeError("... unexpected pos ...")``, with nothing to say it was the disk; the writer below raises
    the remembered OSError instead. Every other attribute is the file's own; special methods are not
    forwarded (no ``with``, iteration or ``isinstance(f, io.IOBase)``), which no writer here needs.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object], *,
                 fsync: bool = False) -> Path:
    """Write ``path`` atomically through ``write(binary_file)``; returns the path. If ``write`` fails after
    the file refused a write (a full disk), the file's OSError is raised, whatever ``write`` made of it."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as raw:
        f = _KeepsWriteErrors(raw)
        try:
            write(f)  # type: ignore[arg-type]
        except Exception as exc:
            if f.error is not None and exc is not f.error:
                raise f.error from exc
            raise
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, fsync: bool = False, **dumps: Any) -> Path:
    """``json.dumps(data, **dumps)`` written atomically (UTF-8)."""
    return atomic_write_text(path, json.dumps(data, **dumps), fsync=fsync)


def append_whole(path: str | os.PathLike[str], data: bytes) -> None:
    """Append ``data`` to ``path`` whole or not at all: a write that fails partway (a full disk, Ctrl-C) is
    cut back off before the error goes on, so a line-per-record log never ends in a torn line. For a file with
    one writer: the cut would also drop a line another process appended meanwhile."""
    with open(path, "ab", buffering=0) as f:
        start = f.tell()
        try:
            view = memoryview(data)
            while view:
                n = f.write(view)
                if not n:
                    raise OSError(errno.EIO, f"could not append to {path}")
                view = view[n:]
        except BaseException:
            with suppress(OSError):
                f.truncate(start)
            raise
