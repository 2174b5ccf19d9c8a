"""Claims on a project for long engine jobs (``job_locks``), so two runs do not each compute every image.

A claim names its owner (``host:pid``) and is refreshed by a heartbeat while its run lives (:func:`held_claim`),
also while one slow image is being processed. A second run is refused while the owner lives; a claim whose
process is gone on this host is taken over at once, and one from another host after :data:`LOCK_STALE_SECONDS`
without a heartbeat (its run is presumed dead: no process table to ask).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from segany.errors import InputError

LOCK_STALE_SECONDS = 600.0


class ProjectBusyError(InputError):
    """Another run of the same job holds the project."""


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str) -> bool:
    """False when ``owner`` ran on this host and its process is gone; True when it may still run."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_project(store: Any, project: dict[str, Any], kind: str) -> str:
    """Claim ``project`` for a ``kind`` job (``auto`` = ``segany engine auto``), taking over a stale claim;
    returns the owner string to pass to :func:`touch_claim` and :func:`release_project`.

    Raises:
        ProjectBusyError: another live run holds it.
    """
    from sqlalchemy import delete, select
    from sqlalchemy.exc import IntegrityError

    from segany.engine.db import JobLock, utcnow

    me = _owner()
    for _ in range(3):
        try:
            with store.transaction() as s:
                lock = s.scalar(select(JobLock).where(JobLock.project_id == project["id"], JobLock.kind == kind))
                if lock is not None:
                    age = (utcnow() - lock.heartbeat_at).total_seconds()
                    if _owner_alive(lock.owner) and age < LOCK_STALE_SECONDS:
                        raise ProjectBusyError(
                            f"project {project['name']!r} is being processed by another `engine {kind}` run "
                            f"({lock.owner}, last result {age:.0f} s ago); wait for it to finish, or stop it "
                            "and rerun (the new run resumes where it stopped; a claim left by a run killed on "
                            f"another machine is taken over after {LOCK_STALE_SECONDS / 60:.0f} minutes)")
                    s.execute(delete(JobLock).where(JobLock.id == lock.id))
                    s.flush()
                s.add(JobLock(project_id=project["id"], kind=kind, owner=me, heartbeat_at=utcnow()))
            return me
        except IntegrityError:  # another run claimed it between our read and insert: look again
            continue
    raise ProjectBusyError(f"project {project['name']!r} is being claimed by another `engine {kind}` run; "
                           "wait for it to finish and rerun")


def touch_claim(store: Any, project_id: int, kind: str, owner: str) -> None:
    """Refresh the claim's heartbeat: the run is alive and still working."""
    from sqlalchemy import update

    from segany.engine.db import JobLock, utcnow

    with store.transaction() as s:
        s.execute(update(JobLock).where(JobLock.project_id == project_id, JobLock.kind == kind,
                                        JobLock.owner == owner).values(heartbeat_at=utcnow()))


def release_project(store: Any, project_id: int, kind: str, owner: str) -> None:
    from sqlalchemy import delete

    from segany.engine.db import JobLock

    with store.transaction() as s:
        s.execute(delete(JobLock).where(JobLock.project_id == project_id, JobLock.kind == kind,
                                        JobLock.owner == owner))


HEARTBEAT_SECONDS = 60.0


@contextmanager
def held_claim(store: Any, project: dict[str, Any], kind: str, *,
               every: float = HEARTBEAT_SECONDS) -> Iterator[str]:
    """Claim ``project`` for the ``with`` block, refreshing the claim every ``every`` seconds from a daemon
    thread, and release it at the end. Refreshing only as results arrive let a driver on another host take
    over a live run whose current image took longer than :data:`LOCK_STALE_SECONDS`."""
    owner = claim_project(store, project, kind)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                touch_claim(store, project["id"], kind, owner)
            except Exception:  # noqa: BLE001 - a failed beat must not kill the run; the next one retries
                continue

    thread = threading.Thread(target=beat, name=f"segany-claim-{project['id']}", daemon=True)
    thread.start()
    try:
        yield owner
    finally:
        stop.set()
        thread.join(timeout=5)
        release_project(store, project["id"], kind, owner)
