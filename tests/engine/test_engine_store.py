"""The store: migrations, idempotent saves, edits, dataset versions, tokens."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from segany.engine.db import Base
from segany.engine.masks import decode_rle
from segany.engine.store import ConflictError, NotFoundError, StoreError, open_store, resolve_target
from segany.errors import InputError

SAMPLE = REPO / "src" / "segany" / "assets" / "samples" / "coco_000000000025.jpg"


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = open_store(tmp_path / "p", create=True)
    yield s
    s.close()


def test_orm_matches_migrations(store) -> None:  # type: ignore[no-untyped-def]
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0008"  # head: edits keep their key
        fks = {row[3]: row for row in conn.exec_driver_sql("PRAGMA foreign_key_list(annotations)")}
    # 0004 adds reviewer_id's foreign key inline (ADD COLUMN ... REFERENCES), whose ON DELETE SQLAlchemy's SQLite
    # reflection does not read, so alembic sees it as a different key; check it from PRAGMA instead.
    assert (fks["reviewer_id"][2], fks["reviewer_id"][4], fks["reviewer_id"][6]) == ("annotators", "id", "SET NULL")
    diffs = [d for d in diffs if not (isinstance(d, tuple) and d[0] in ("remove_fk", "add_fk")
                                      and [c.name for c in d[1].columns] == ["reviewer_id"])]
    assert diffs == [], "db.py and the migrations disagree: write a new migration"


def test_open_requires_project_and_resolves_targets(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="project create"):
        open_store(tmp_path / "missing")
    assert resolve_target("postgresql://u@h/db")[0].startswith("postgresql+psycopg://")
    assert resolve_target(tmp_path / "x.db") == (f"sqlite:///{tmp_path / 'x.db'}", tmp_path)


def test_sqlite_pragmas(store) -> None:  # type: ignore[no-untyped-def]
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1



def test_declared_label_is_checked_after_the_replay(store) -> None:  # type: ignore[no-untyped-def]
    """``declared_label``: a new save under an undeclared label is refused before the mask's own checks; a replay
    of a stored uuid is answered with its row whatever the label (a model proposal's, accepted as proposed)."""
    from segany.engine.store import InvalidAnnotationError

    p = store.create_project("declared", labels=["person"])
    im = store.add_images(p["id"], [SAMPLE])[0]
    m = np.zeros((im["height"], im["width"]), bool)
    m[5:15, 10:30] = True
    key = str(uuid.uuid4())
    a, _ = store.save_annotation(im["id"], mask=m, uuid=key, label="dog", source="semi")  # as proposed
    b, created = store.save_annotation(im["id"], mask=m, uuid=key, label="dog", declared_label=True)
    assert not created and b == a
    for mask in (m, np.zeros_like(m), np.ones((4, 4), bool)):  # before "mask is empty" and the size check
        with pytest.raises(InvalidAnnotationError, match=r"label 'dog' is not one of this project's labels \(person\)"):
            store.save_annotation(im["id"], mask=mask, label=" dog ", declared_label=True)
    assert store.save_annotation(im["id"], mask=m, label="person", declared_label=True)[1]
    assert store.count_annotations() == 2

def test_save_idempotent_edit_delete(store) -> None:  # type: ignore[no-untyped-def]
    p = store.create_project("demo")
    im = store.add_images(p["id"], [SAMPLE])[0]
    assert store.add_images(p["id"], [SAMPLE]) == []  # same content is not added twice
    m = np.zeros((im["height"], im["width"]), bool)
    m[5:15, 10:30] = True
    key = str(uuid.uuid4())
    a, created = store.save_annotation(im["id"], mask=m, uuid=key, prompts={"points": [[12, 8]]})
    b, created2 = store.save_annotation(im["id"], mask=m, uuid=key)
    assert created and not created2 and a["id"] == b["id"] and store.count_annotations() == 1
    assert (decode_rle(a["segmentation"]) == m).all() and a["area"] == 200
    e = store.update_annotation(a["id"], label="cup", review_state="rejected", expected_revision=1)
    assert (e["label"], e["review_state"], e["revision"]) == ("cup", "rejected", 2)
    with pytest.raises(ConflictError, match="revision"):
        store.update_annotation(a["id"], label="x", expected_revision=1)
    with pytest.raises(InputError, match="source must be one of"):
        store.save_annotation(im["id"], mask=m, source="robot")
    with pytest.raises(InputError, match="does not match image"):
        store.save_annotation(im["id"], mask=np.ones((4, 4), bool))
    semi, _ = store.save_annotation(im["id"], mask=m, source="semi")
    assert semi["review_state"] == "pending"
    store.delete_annotation(a["id"])
    with pytest.raises(NotFoundError):
        store.get_annotation(a["id"])


def test_tokens_and_model_and_dataset_versions(store) -> None:  # type: ignore[no-untyped-def]
    p = store.create_project("demo")
    im = store.add_images(p["id"], [SAMPLE])[0]
    tok = store.add_annotator("bob")
    assert store.authenticate(tok)["name"] == "bob" and store.authenticate("nope") is None
    new = store.rotate_token("bob")
    assert store.authenticate(tok) is None and store.authenticate(new)["name"] == "bob"
    with pytest.raises(ConflictError):
        store.add_annotator("bob")
    v1 = store.register_model_version("vit_b:abc", "vit_b")
    assert store.register_model_version("vit_b:abc", "vit_b") == v1
    m = np.zeros((im["height"], im["width"]), bool)
    m[:10, :10] = True
    a, _ = store.save_annotation(im["id"], mask=m, model_version_id=v1)
    store.save_annotation(im["id"], mask=m, source="auto")  # pending: not in the dataset
    dv = store.create_dataset_version(p["id"], "v1")
    assert store.dataset_version_annotation_ids(dv) == [a["id"]]
    v2 = store.register_model_version("vit_b:def", "vit_b", parent_id=v1, trained_on_id=dv)
    lineage = {m["id"]: m for m in store.list_model_versions()}
    assert lineage[v2]["parent_id"] == v1 and lineage[v2]["trained_on_id"] == dv


def test_upgrade_to_roles_keeps_users_as_admins(tmp_path: Path) -> None:
    """A store made before roles (migration 0002) upgrades in place: its users, their tokens and the
    authorship of their annotations stay, and they become admins so nobody is locked out."""
    from sqlalchemy import text

    from segany.engine.store import hash_token, make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'p' / 'segany.db'}")
    (tmp_path / "p").mkdir()
    migrate(engine, "0002")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO annotators (name, token_hash, active, created_at) "
                          "VALUES ('old', :h, 1, '2025-01-01')"), {"h": hash_token("old-token")})
        conn.execute(text("INSERT INTO projects (name, stage, labels, settings, created_at) "
                          "VALUES ('demo', 'manual', '[]', '{}', '2025-01-01')"))
        conn.execute(text("INSERT INTO images (project_id, path, file_name, width, height, sha256, created_at) "
                          "VALUES (1, 'x.jpg', 'x.jpg', 4, 4, 'abc', '2025-01-01')"))
        conn.execute(text("INSERT INTO annotations (uuid, image_id, label, rle_counts, height, width, area, "
                          "bbox_xywh, source, review_state, prompts, annotator_id, revision, created_at, "
                          "updated_at) VALUES ('u', 1, 'o', '4', 4, 4, 0, '[]', 'manual', 'accepted', '{}', 1, "
                          "1, '2025-01-01', '2025-01-01')"))
    engine.dispose()
    store = open_store(tmp_path / "p")
    try:
        assert store.list_annotators() == [{"id": 1, "name": "old", "active": True, "role": "admin"}]
        assert store.authenticate("old-token") == {"id": 1, "name": "old", "role": "admin"}
        assert [a["annotator_id"] for a in store.list_annotations()] == [1]  # no table rebuild nulled it
        store.add_annotator("new")  # users made after the upgrade start with the least rights
        assert store.list_annotators()[1]["role"] == "annotator"
    finally:
        store.close()


def _fill_0003(url: str) -> None:
    """A store as migration 0003 left it: two users, one annotation each, and a machine proposal."""
    from sqlalchemy import text

    from segany.engine.store import make_engine, migrate

    engine = make_engine(url)
    try:
        migrate(engine, "0003")
        with engine.begin() as conn:
            for name in ("ann", "rev"):
                conn.execute(text("INSERT INTO annotators (name, token_hash, active, role, created_at) "
                                  "VALUES (:n, :n, true, 'admin', '2025-01-01')"), {"n": name})
            conn.execute(text("INSERT INTO projects (name, stage, labels, settings, created_at) "
                              "VALUES ('demo', 'manual', '[]', '{}', '2025-01-01')"))
            conn.execute(text("INSERT INTO images (project_id, path, file_name, width, height, sha256, created_at) "
                              "VALUES (1, 'x.jpg', 'x.jpg', 4, 4, 'abc', '2025-01-01')"))
            for uid, annotator, state in (("u1", 1, "accepted"), ("u2", 2, "rejected"), ("u3", None, "pending")):
                conn.execute(text("INSERT INTO annotations (uuid, image_id, label, rle_counts, height, width, area, "
                                  "bbox_xywh, source, review_state, prompts, annotator_id, revision, created_at, "
                                  "updated_at) VALUES (:u, 1, 'o', '4', 4, 4, 0, '[]', 'semi', :s, '{}', :a, 1, "
                                  "'2025-01-01', '2025-01-01')"), {"u": uid, "a": annotator, "s": state})
    finally:
        engine.dispose()


def check_upgrade_to_reviewers(target: str) -> None:
    """After ``_fill_0003``: opening migrates to 0004, every row and its annotator stay, reviewers are NULL,
    and the new column's foreign key works."""
    store = open_store(target)
    try:
        anns = store.list_annotations()
        assert [(a["uuid"], a["annotator_id"], a["review_state"]) for a in anns] == [
            ("u1", 1, "accepted"), ("u2", 2, "rejected"), ("u3", None, "pending")]  # no table rebuild lost them
        assert all(a["reviewer_id"] is None and a["reviewed_at"] is None for a in anns)
        done = store.update_annotation(anns[2]["id"], review_state="rejected", by=2)
        assert (done["annotator_id"], done["reviewer_id"]) == (None, 2) and done["reviewed_at"]
        with pytest.raises(Exception, match="(?i)foreign key"):
            store.update_annotation(anns[0]["id"], label="x", by=99)  # no annotator 99
    finally:
        store.close()


def test_upgrade_to_reviewers_keeps_rows(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    _fill_0003(f"sqlite:///{tmp_path / 'p' / 'segany.db'}")
    check_upgrade_to_reviewers(str(tmp_path / "p"))


def test_review_keeps_the_annotator(store) -> None:  # type: ignore[no-untyped-def]
    """Reviewing records the reviewer beside the annotator; only accepting a machine proposal takes it."""
    p = store.create_project("demo")
    im = store.add_images(p["id"], [SAMPLE])[0]
    store.add_annotator("alice")
    store.add_annotator("rita", role="reviewer")
    alice, rita = (u["id"] for u in store.list_annotators())
    m = np.zeros((im["height"], im["width"]), bool)
    m[5:15, 10:30] = True
    drawn, _ = store.save_annotation(im["id"], mask=m, annotator_id=alice, seconds_spent=10.0)
    assert drawn["reviewer_id"] is None and drawn["reviewed_at"] is None
    r = store.update_annotation(drawn["id"], review_state="rejected", by=rita, seconds_spent=4.0)
    assert (r["annotator_id"], r["reviewer_id"], r["review_state"]) == (alice, rita, "rejected")
    assert r["reviewed_at"] and r["seconds_spent"] == 10.0  # the reviewer's time is not the annotator's
    assert r["reviewed_at"] == r["updated_at"]
    r = store.update_annotation(drawn["id"], mask=m[::-1], by=rita)  # a reviewer fixing the mask
    assert (r["annotator_id"], r["reviewer_id"]) == (alice, rita)
    own = store.update_annotation(drawn["id"], label="cup", by=alice, seconds_spent=2.0)  # own edit: no review
    assert (own["annotator_id"], own["reviewer_id"], own["reviewed_at"]) == (alice, rita, r["reviewed_at"])
    assert own["seconds_spent"] == 12.0
    # Machine proposals (stage 2): accepting one makes it the accepter's; rejecting one blames nobody.
    prop, _ = store.save_annotation(im["id"], mask=m, source="semi")
    other, _ = store.save_annotation(im["id"], mask=m[::-1], source="semi")
    assert prop["annotator_id"] is None and prop["review_state"] == "pending"
    a = store.update_annotation(prop["id"], review_state="accepted", by=alice, seconds_spent=1.5)
    assert (a["annotator_id"], a["reviewer_id"], a["seconds_spent"]) == (alice, alice, 1.5) and a["reviewed_at"]
    x = store.update_annotation(other["id"], review_state="rejected", by=alice, seconds_spent=1.0)
    assert (x["annotator_id"], x["reviewer_id"], x["seconds_spent"]) == (None, alice, None)
    back = store.update_annotation(a["id"], review_state="rejected", by=rita)
    assert (back["annotator_id"], back["reviewer_id"]) == (alice, rita)


def test_roles(store) -> None:  # type: ignore[no-untyped-def]
    tok = store.add_annotator("rev", role="reviewer")
    assert store.authenticate(tok)["role"] == "reviewer"
    assert store.set_role("rev", "admin")["role"] == "admin" and store.authenticate(tok)["role"] == "admin"
    with pytest.raises(InputError, match="role must be one of annotator, reviewer, admin, got 'boss'"):
        store.add_annotator("x", role="boss")
    with pytest.raises(InputError, match="role must be one of"):
        store.set_role("rev", "root")
    with pytest.raises(NotFoundError, match="no annotator named 'zed' .known: rev"):
        store.set_role("zed", "admin")


def test_annotator_names_that_print_alike_are_refused(store) -> None:  # type: ignore[no-untyped-def]
    # "alice", "Alice" and "alice " were three people: two rows looked the same, and set-role changed one of them.
    store.add_annotator("alice")
    with pytest.raises(ConflictError, match="'alice' already exists, 'Alice' differs only by case"):
        store.add_annotator("Alice")
    for spaced in ("alice ", " bob"):
        with pytest.raises(InputError, match="starts or ends with spaces"):
            store.add_annotator(spaced)
    store.add_annotator("bob")
    assert [a["name"] for a in store.list_annotators()] == ["alice", "bob"]
