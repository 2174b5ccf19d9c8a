"""Claims on a project for long engine jobs (``job_locks``), so two runs do not each compute every image.

A claim names its owner (``host:pid``) and is refreshed by a heartbeat while its run lives (:func:`held_claim`),
also while one slow image is being processed. A second run is refused while the owner lives; a claim whose
process is gone on this host is taken over at once, and one from another host after :data:`LOCK_STALE_SECONDS`
without a heartbeat (its run is presumed dead: no process table to ask).

Heartbeats are written and aged by the database's clock (:func:`db_utcnow`), never the hosts': a driver whose
clock runs ten minutes ahead would otherwise find a live run on another host stale and take its project over.
A run whose claim was taken over anyway (its heartbeats stopped for longer than the limit: a suspended laptop,
a network split) learns it at its next :func:`touch_claim`, which raises :class:`ClaimLostError`, so it stops
instead of writing beside the run that now holds the project.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from segany.errors import InputError

log = logging.getLogger(__name__)

LOCK_STALE_SECONDS = 600.0


class ProjectBusyError(InputError):
    """Another run of the same job holds the project."""


class ClaimLostError(ProjectBusyError):
    """This run's claim is gone (another run took the project over, or the claim was removed): stop writing."""


def db_utcnow(session: Any) -> dt.datetime:
    """The database server's current time as a naive UTC datetime (the ``DateTime`` columns' convention).

    PostgreSQL: ``now()`` (the transaction's start) in UTC; SQLite: its own clock, which is this host's."""
    from sqlalchemy import func, select, text

    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return session.scalar(select(func.timezone("UTC", func.now())))
    if dialect == "sqlite":
        return dt.datetime.fromisoformat(session.scalar(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")))
    from segany.engine.db import utcnow

    return utcnow()


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


def _rerun_note(kind: str) -> str:
    """What a rerun after stopping the holder does: `engine auto` keeps every image it finished; a retrain
    reuses the frozen dataset version and continues its fine-tuning from the last saved training state."""
    if kind == "retrain":
        return ("the new run reuses the frozen dataset version and, with the same settings, continues the "
                "fine-tuning from its last save")
    return "the new run resumes where it stopped"


def claim_project(store: Any, project: dict[str, Any], kind: str) -> str:
    """Claim ``project`` for a ``kind`` job (``auto`` = ``segany engine auto``), taking over a stale claim;
    returns the owner string to pass to :func:`touch_claim` and :func:`release_project`.

    Raises:
        ProjectBusyError: another live run holds it.
    """
    from sqlalchemy import delete, select
    from sqlalchemy.exc import IntegrityError

    from segany.engine.db import JobLock

    me = _owner()
    for _ in range(3):
        try:
            with store.transaction() as s:
                now = db_utcnow(s)
                lock = s.scalar(select(JobLock).where(JobLock.project_id == project["id"], JobLock.kind == kind))
                if lock is not None:
                    age = (now - lock.heartbeat_at).total_seconds()
                    if _owner_alive(lock.owner) and age < LOCK_STALE_SECONDS:
                        raise ProjectBusyError(
                            f"project {project['name']!r} is being processed by another `engine {kind}` run "
                            f"({lock.owner}, last result {age:.0f} s ago); wait for it to finish, or stop it "
                            f"and rerun ({_rerun_note(kind)}; a claim left by a run killed on another machine is "
                            f"taken over after {LOCK_STALE_SECONDS / 60:.0f} minutes)")
                    s.execute(delete(JobLock).where(JobLock.id == lock.id))
                    s.flush()
                s.add(JobLock(project_id=project["id"], kind=kind, owner=me, heartbeat_at=now))
            return me
        except IntegrityError:  # another run claimed it between our read and insert: look again
            continue
    raise ProjectBusyError(f"project {project['name']!r} is being claimed by another `engine {kind}` run; "
                           "wait for it to finish and rerun")


def touch_claim(store: Any, project_id: int, kind: str, owner: str) -> None:
    """Refresh the claim's heartbeat: the run is alive and still working.

    Raises:
        ClaimLostError: the claim is no longer ``owner``'s (another run took the project over after this run's
            heartbeats stopped for :data:`LOCK_STALE_SECONDS`, or the claim was removed). The caller must stop
            writing: the project's other run now owns its results.
    """
    from sqlalchemy import update

    from segany.engine.db import JobLock

    with store.transaction() as s:
        done = s.execute(update(JobLock).where(JobLock.project_id == project_id, JobLock.kind == kind,
                                               JobLock.owner == owner).values(heartbeat_at=db_utcnow(s)))
        if done.rowcount == 0:
            raise _lost(project_id, kind, owner)


def check_claim(session: Any, project_id: int, kind: str, owner: str) -> None:
    """Inside a write transaction (``session``): raise :class:`ClaimLostError` unless ``owner`` still holds the
    claim, and keep it held until that transaction ends.

    Call it in the transaction that writes a result, so the check and the write are one: on PostgreSQL the claim
    row is read ``FOR SHARE``, so a takeover (which deletes it) waits for the write to commit, and a write after
    a takeover is refused before anything is written. (SQLite's write transactions run one at a time anyway.)
    """
    from sqlalchemy import select

    from segany.engine.db import JobLock

    held = session.scalar(select(JobLock.id).where(JobLock.project_id == project_id, JobLock.kind == kind,
                                                   JobLock.owner == owner).with_for_update(read=True))
    if held is None:
        raise _lost(project_id, kind, owner)


def _lost(project_id: int, kind: str, owner: str) -> ClaimLostError:
    return ClaimLostError(
        f"this `engine {kind}` run ({owner}) lost its claim on project {project_id}: another run took it over "
        f"after no heartbeat for {LOCK_STALE_SECONDS / 60:.0f} minutes (or the claim was removed), so this run "
        "stopped; what it wrote is kept, and the other run (or a rerun once it is done) does the rest")


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
            except ClaimLostError as exc:  # beating on would refresh nothing; the run's own touch stops it
                log.warning("%s", exc)
                return
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
