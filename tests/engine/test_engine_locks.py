"""Claims of engine jobs on a project (segany.engine.locks): aged by the database's clock, and a run whose claim
was taken over finds out at its next heartbeat instead of writing on beside the run that took it."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from segany.engine import db, locks
from segany.engine.db import JobLock
from segany.engine.store import Store, open_store


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = open_store(tmp_path / "p", create=True)
    yield s
    s.close()


def _claims(store: Store) -> list[tuple[str, dt.datetime]]:
    with store.transaction() as s:
        return [(lock.owner, lock.heartbeat_at) for lock in s.query(JobLock).order_by(JobLock.id)]


def test_staleness_is_judged_by_the_database_clock(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live run on another host beat just now (by the database's clock). A driver whose own clock runs 20
    minutes ahead used to find that claim 20 minutes old, older than the 10-minute limit, and take it over."""
    proj = store.create_project("p")
    with store.transaction() as s:
        s.execute(text("INSERT INTO job_locks (project_id, kind, owner, heartbeat_at) "
                       "VALUES (:p, 'auto', 'other-host:4242', strftime('%Y-%m-%d %H:%M:%f', 'now'))"),
                  {"p": proj["id"]})
    real = db.utcnow
    monkeypatch.setattr(db, "utcnow", lambda: real() + dt.timedelta(minutes=20))
    with pytest.raises(locks.ProjectBusyError, match="other-host:4242"):
        locks.claim_project(store, proj, "auto")
    assert [owner for owner, _ in _claims(store)] == ["other-host:4242"]


def test_a_run_whose_claim_was_taken_over_is_told_at_its_next_heartbeat(store: Store) -> None:
    proj = store.create_project("p")
    owner = locks.claim_project(store, proj, "auto")
    before = _claims(store)[0][1]
    time.sleep(0.01)
    locks.touch_claim(store, proj["id"], "auto", owner)  # still ours: refreshed
    assert _claims(store)[0][1] > before
    with store.transaction() as s:  # a driver elsewhere found the claim stale and took the project over
        s.query(JobLock).update({"owner": "other-host:4242"})
    with pytest.raises(locks.ClaimLostError, match="lost its claim") as info:
        locks.touch_claim(store, proj["id"], "auto", owner)
    assert isinstance(info.value, locks.ProjectBusyError)  # a SeganyError: the CLI prints its one line
    assert [o for o, _ in _claims(store)] == ["other-host:4242"]  # the new owner's claim is left alone
    with pytest.raises(locks.ClaimLostError), store.transaction() as s:  # a result's write checks it too
        locks.check_claim(s, proj["id"], "auto", owner)
    locks.release_project(store, proj["id"], "auto", owner)  # and releasing ours does not remove theirs
    assert [o for o, _ in _claims(store)] == ["other-host:4242"]
    with store.transaction() as s:
        locks.check_claim(s, proj["id"], "auto", "other-host:4242")  # the holder passes


def test_the_heartbeat_thread_stops_when_the_claim_is_lost(store: Store) -> None:
    proj = store.create_project("p")
    with locks.held_claim(store, proj, "auto", every=0.02):
        with store.transaction() as s:
            s.query(JobLock).update({"owner": "other-host:4242", "heartbeat_at": dt.datetime(2000, 1, 1)})
        deadline = time.monotonic() + 5
        while _beating(proj["id"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _beating(proj["id"]), "the heartbeat thread beats on for a claim that is no longer its own"
        assert _claims(store) == [("other-host:4242", dt.datetime(2000, 1, 1))]  # theirs, untouched


def _beating(project_id: int) -> bool:
    return any(t.name == f"segany-claim-{project_id}" for t in threading.enumerate())


@pytest.mark.parametrize("kind,after", [("auto", "resumes where it stopped"),
                                        ("retrain", "continues the fine-tuning from its last save")])
def test_the_busy_message_says_what_a_rerun_of_that_job_does(store: Store, kind: str, after: str) -> None:
    # Each job's rerun does its own thing: auto keeps finished images, a retrain continues its saved fine-tune.
    proj = store.create_project("p")
    locks.claim_project(store, proj, kind)
    with pytest.raises(locks.ProjectBusyError, match=after):
        locks.claim_project(store, proj, kind)
