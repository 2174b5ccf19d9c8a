"""Near-duplicate images stay on one side of a dataset version's split (segany.engine.near_dupes,
retrain.split_images).

A photo's resized, re-encoded copy is built in tmp_path and saved (as PNG, with a text chunk counting tries) until
its content hash falls on the side of the split the test needs: hashed alone, the pair would be split apart.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_fixtures import SAMPLES, box_mask, make_project
from PIL import Image
from PIL.PngImagePlugin import PngInfo

FRACTION = 0.5


# ------------------------------------------------------------------------------------------- images
def _photo(k: int, flip: bool = False) -> np.ndarray:
    """Bundled sample ``k`` as a (H, W, 3) uint8 thumbnail (long side 200), mirrored with ``flip``."""
    with Image.open(sorted(SAMPLES.glob("*.jpg"))[k]) as im:
        im = im.convert("RGB")
        im.thumbnail((200, 200))
        arr = np.asarray(im)
    return np.ascontiguousarray(arr[:, ::-1]) if flip else arr


def _near_copy(arr: np.ndarray) -> np.ndarray:
    """Resized to 3/4 and re-encoded as JPEG (quality 70): a different file the dHash sees as the same image."""
    h, w = arr.shape[:2]
    buf = io.BytesIO()
    Image.fromarray(arr).resize((w * 3 // 4, h * 3 // 4), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=70)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _on_side(arr: np.ndarray, path: Path, held: bool) -> Path:
    """Save ``arr`` as a PNG whose sha256 alone would put it on the held-out side (``held``) or the train side."""
    from segany.engine.retrain import held_out_image
    from segany.engine.store import file_sha256

    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(200):
        info = PngInfo()
        info.add_text("try", str(k))
        Image.fromarray(arr).save(path, pnginfo=info)
        if held_out_image(file_sha256(path), FRACTION) == held:
            return path
    raise AssertionError("no PNG text chunk put the image on the wanted side")


def _add(store: Any, proj: dict, paths: list[Path]) -> list[int]:
    """Register ``paths`` with one accepted mask each; their image ids, in order."""
    ids = []
    for p in paths:
        (im,) = store.add_images(proj["id"], [p])
        store.save_annotation(im["id"], mask=box_mask(im["height"], im["width"]), source="manual")
        ids.append(im["id"])
    return ids


def _sides(dv: dict) -> dict[int, str]:
    return {**{i: "train" for i in dv["train_image_ids"]}, **{i: "held" for i in dv["held_out_image_ids"]}}


def _meta(store: Any, dv_id: int) -> dict:
    from segany.engine.db import DatasetVersion

    with store.transaction(write=False) as s:
        return dict(s.get(DatasetVersion, dv_id).meta)


def _groups_of(keys: list[int], pairs: list[tuple[int, int, int]]) -> list[list[int]]:
    """Connected components of ``pairs`` over ``keys``, by a plain union-find."""
    root = {k: k for k in keys}

    def find(k: int) -> int:
        while root[k] != k:
            k = root[k]
        return k

    for a, b, _ in pairs:
        root[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for k in keys:
        groups.setdefault(find(k), []).append(k)
    return sorted(groups.values())


# --------------------------------------------------------------------------------------------- tests
def test_groups_join_chains_and_equal_hashes_in_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectorised pairs and union-find agree with a plain loop, across block edges (blocks of a few rows)."""
    from segany.engine import near_dupes

    rng = random.Random(0)
    hashes = {rng.randrange(10**6): rng.getrandbits(64) for _ in range(150)}
    keys = list(hashes)
    for a, b in zip(keys[::3], keys[1::3], strict=False):  # near-copies, 0-4 bits apart, some in chains
        hashes[a] = hashes[b] ^ sum(1 << rng.randrange(64) for _ in range(rng.randrange(5)))
    hashes[keys[-1]] = hashes[keys[0]]  # equal hashes
    for block_cells in (7, 400, 1 << 20):
        monkeypatch.setattr(near_dupes, "_BLOCK_CELLS", block_cells)
        for bits in (0, 6):
            want = [(a, b, (hashes[a] ^ hashes[b]).bit_count()) for a, b in itertools.combinations(sorted(hashes), 2)
                    if (hashes[a] ^ hashes[b]).bit_count() <= bits]
            assert near_dupes.near_duplicate_pairs(hashes, bits) == want
            assert near_dupes.near_duplicate_groups(hashes, bits) == _groups_of(sorted(hashes), want)
    assert near_dupes.near_duplicate_groups({}) == [] and near_dupes.near_duplicate_pairs({5: 1}) == []


def test_pairs_within_counts_every_pair_and_lists_only_the_first() -> None:
    """The report's view of a group: 2,000 equal hashes are 1,999,000 pairs, counted in blocks, 5 of them built."""
    from segany.engine import near_dupes

    pairs, total = near_dupes.pairs_within(dict.fromkeys(range(2000), 7), 6, limit=5)
    assert total == 1999 * 1000 and pairs == [(0, j, 0) for j in range(1, 6)]
    hashes = {1: 0b1111, 2: 0, 3: 1 << 40}
    assert near_dupes.pairs_within(hashes, 4) == ([(1, 2, 4), (2, 3, 1)], 2)
    assert near_dupes.near_any([0b111, 1 << 63], [0, 2**64 - 1], 3).tolist() == [True, True]
    assert near_dupes.near_any([0b1111], [0], 3).tolist() == [False] and not len(near_dupes.near_any([], [1]))


def _synthetic(n: int, k: int) -> tuple[dict[int, str], list[list[int]]]:
    """``n`` images with fixed sha256s in groups of ``k`` consecutive ids."""
    import hashlib

    images = {i: hashlib.sha256(f"img{i}".encode()).hexdigest() for i in range(n)}
    return images, [list(range(g, min(g + k, n))) for g in range(0, n, k)]


def test_the_held_out_share_stays_near_the_fraction_whatever_the_group_size() -> None:
    """A fresh group went held out by its smallest sha256, which has the smallest prefix: a group of k was held
    out with probability 1 - (1 - f)^k (36% of images in pairs, 89% in 10-frame clips at f = 0.2). A group of 2
    or more now goes by a re-hash of its smallest sha256; an image alone still by its own."""
    from segany.engine.retrain import split_images

    splits = {}
    for k in (1, 2, 5, 10):
        images, groups = _synthetic(4000, k)
        splits[k] = (images, groups, split_images(images, 0.2, {}, groups))
    shares = {k: round(len(split.held) / len(images), 3) for k, (images, _, split) in splits.items()}
    assert all(abs(share - 0.2) < 0.05 for share in shares.values()), shares  # sd over 400 groups of 10: 0.02

    from segany.engine.retrain import held_out_group, held_out_image

    for images, groups, split in splits.values():
        for g in groups[:50]:  # each group whole on one side, as held_out_group says
            assert all((i in split.held) == held_out_group([images[j] for j in g], 0.2) for i in g)
    images, _ = _synthetic(50, 1)
    assert all(held_out_group([sha], 0.3) == held_out_image(sha, 0.3) for sha in images.values())


def test_a_new_image_linking_a_trained_and_a_held_out_image_is_left_out() -> None:
    """v1 trained on A and held out B, which are not near each other. C is near both, so one group: C trained
    (as the group had a trained-on image), and held-out B gained a near-copy in training that it never had.
    Holding C out would test on a near-copy of A. C is left out of both sides; A and B stay."""
    from segany.engine.retrain import split_images

    images, _ = _synthetic(3, 1)
    split = split_images(images, 0.5, {0: False, 1: True}, [[0, 1, 2]])
    assert (split.train, split.held) == ([0], [1])
    assert (split.left_out, split.groups, split.groups_split) == ([2], 1, 1)
    # the same when A is not in this version (its masks rejected, or the image removed: a key of its own)
    split = split_images({1: images[1], 2: images[2]}, 0.5, {-1: False, 1: True}, [[-1, 1, 2]])
    assert (split.train, split.held, split.left_out) == ([], [1], [2])
    # a group with earlier images on one side takes its newcomers there, removed trained-on images included
    assert split_images({2: images[2]}, 0.5, {-1: False}, [[-1, 2]]).train == [2]
    assert split_images({1: images[1], 2: images[2]}, 0.5, {1: True}, [[1, 2]]).held == [1, 2]


def test_removed_images_keep_their_side_by_snapshot_order() -> None:
    """Sides are remembered with the content they were frozen with. A removed image's snapshot rows lose their
    image id; the snapshot holds images in image-id order, which gives each its id's side back; where that order
    does not hold, a version's removed images count as trained on unless all it lost were held out."""
    from segany.engine.retrain import remembered_sides

    v1 = (1, {"train_image_ids": [1, 3], "held_out_image_ids": [2, 4]})
    rows = [(1, None, "s1", "p1", 10), (1, 2, "s2", "p2", 11), (1, None, "s3", "p3", 13), (1, None, "s4", "p4", 20)]
    rem = remembered_sides([v1], rows)
    assert rem.in_project == {(2, "s2"): True} and rem.removed == {"s1": False, "s3": False, "s4": True}
    assert (rem.side(2, "s2"), rem.side(2, "reused id, other content"), rem.paths["s3"]) == (True, None, "p3")
    shuffled = [(1, 2, "s2", "p2", 5), *rows[:1], *rows[2:]]  # rows in annotation order (older versions)
    assert remembered_sides([v1], shuffled).removed == {"s1": False, "s3": False, "s4": False}
    held_only = [(1, 1, "s1", "p1", 1), (1, 2, "s2", "p2", 2), (1, 3, "s3", "p3", 3), (1, None, "s4", "p4", 0)]
    assert remembered_sides([v1], held_only).removed == {"s4": True}
    # trained on in any version wins; a version without a snapshot is remembered by image id alone
    v2 = (2, {"train_image_ids": [4], "held_out_image_ids": [5]})
    rem = remembered_sides([v1, v2], [*rows, (2, None, "s4", "p4", 30), (3, 9, "s9", "p9", 31)])
    assert rem.removed["s4"] is False
    assert remembered_sides([v2], []).side(5, "anything") is True


def test_later_near_copies_join_the_side_their_group_had(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v1 trains on a photo and holds out another. v2 adds a near-copy of each whose own hash says the other
    side, and the first photo's masks are rejected (it is no longer in v2, but a model trained on it): the copies
    join their originals' sides. dHashes are cached in the versions' meta by sha256: v3 hashes only its new image."""
    from segany.engine.retrain import freeze_dataset_version
    from segany.engine.store import file_sha256

    trained = _on_side(_photo(0), tmp_path / "im" / "trained.png", held=False)
    held = _on_side(_photo(1), tmp_path / "im" / "held.png", held=True)
    other = _on_side(_photo(2), tmp_path / "im" / "other.png", held=False)
    store, proj = make_project(tmp_path / "proj", [])
    try:
        t_id, h_id, o_id = _add(store, proj, [trained, held, other])
        v1 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert (_sides(v1)[t_id], _sides(v1)[h_id]) == ("train", "held")

        copies = [_on_side(_near_copy(_photo(0)), tmp_path / "im" / "copy_of_trained.png", held=True),
                  _on_side(_near_copy(_photo(1)), tmp_path / "im" / "copy_of_held.png", held=False)]
        ct_id, ch_id = _add(store, proj, copies)
        (ann,) = store.list_annotations(image_id=t_id)
        store.update_annotation(ann["id"], project_id=proj["id"], review_state="rejected")
        v2 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert t_id not in _sides(v2)
        assert (_sides(v2)[ct_id], _sides(v2)[ch_id], _sides(v2)[h_id]) == ("train", "held", "held")

        from segany.engine import near_dupes

        assert set(_meta(store, v1["id"])["image_dhash"]) == {file_sha256(p) for p in (trained, held, other)}
        assert set(_meta(store, v2["id"])["image_dhash"]) == {file_sha256(p) for p in copies}  # the new ones
        hashed: list[str] = []
        real_dhash = near_dupes.dhash
        monkeypatch.setattr(near_dupes, "dhash", lambda path: hashed.append(Path(path).name) or real_dhash(path))
        _add(store, proj, [_on_side(_photo(3), tmp_path / "im" / "new.png", held=False)])
        freeze_dataset_version(store, None, held_out=FRACTION)
        assert hashed == ["new.png"]
    finally:
        store.close()


def test_groups_earlier_versions_split_stay_and_new_copies_are_left_out(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A version frozen before groups were kept together trained on a photo and held out its copy. Sides never
    move: both stay; a third copy goes to neither side (training on it gives the held-out copy one more
    near-copy to learn from, holding it out tests on a near-copy of the trained photo). The version records and
    says how many groups have both sides, the images left out and the held-out images near a trained one, naming
    `segany engine report`, which lists each group once with its pairs."""
    from segany.engine.db import DatasetVersion
    from segany.engine.retrain import freeze_dataset_version
    from segany.engine.versions import list_versions

    photo = _on_side(_photo(0), tmp_path / "im" / "photo.png", held=False)
    copy = _on_side(_near_copy(_photo(0)), tmp_path / "im" / "copy.png", held=True)
    other = _on_side(_photo(1), tmp_path / "im" / "other.png", held=True)
    store, proj = make_project(tmp_path / "proj", [])
    try:
        p_id, c_id, o_id = _add(store, proj, [photo, copy, other])
        v1 = freeze_dataset_version(store, None, held_out=FRACTION)
        with store.transaction() as s:  # what the split by each image's own hash gave
            dv = s.get(DatasetVersion, v1["id"])
            dv.meta = {**dv.meta, "train_image_ids": [p_id], "held_out_image_ids": [c_id, o_id]}
        third = _on_side(_near_copy(_near_copy(_photo(0))), tmp_path / "im" / "third.png", held=True)
        (t_id,) = _add(store, proj, [third])
        with caplog.at_level(logging.WARNING, logger="segany.engine.retrain"):
            v2 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert (v2["train_image_ids"], v2["held_out_image_ids"]) == ([p_id], [c_id, o_id])  # third: neither
        assert v2["near_duplicate_left_out"] == [t_id]
        assert (v2["near_duplicate_groups_split"], v2["near_duplicate_held_out_near_trained"]) == (1, 1)
        assert _meta(store, v2["id"])["near_duplicate_left_out_image_ids"] == [t_id]
        assert "1 near-duplicate image group has images on both sides" in caplog.text
        assert "1 new image is left out of both sides" in caplog.text and "may be optimistic" in caplog.text
        assert "`segany engine report`" in caplog.text
        assert list_versions(store, None)[-1]["near_duplicate_groups_split"] == 1
        assert list_versions(store, None)[-1]["near_duplicate_left_out"] == 1

        # The report lists the group once, from the hashes the versions cached (no image is read again).
        from segany.engine import near_dupes, report
        from segany.engine.report import ReportSettings, build_report

        monkeypatch.setattr(near_dupes, "dhash", lambda path: pytest.fail(f"{path} was hashed again"))
        monkeypatch.setattr(report, "_plots", lambda *a: [])  # plots are not what this checks (matplotlib: ~4 s)
        monkeypatch.setattr(report, "_throughput_plot", lambda *a: None)
        flagged = build_report(store, None, tmp_path / "report", ReportSettings())["report"]
        (group,) = flagged["image_flags"]
        assert group["image_ids"] == [p_id, c_id, t_id] and group["pairs_left_out"] == 0
        assert {(f["image_id"], f["duplicate_of"]) for f in group["pairs"]} == {(p_id, c_id), (p_id, t_id),
                                                                                (c_id, t_id)}
        assert all("image_dhash" not in v["meta"] for v in flagged["versions"])  # a cache, not a description
    finally:
        store.close()


def test_a_near_copy_of_a_removed_trained_on_image_is_not_held_out(tmp_path: Path) -> None:
    """v1 trained on a photo, which was then removed from the project and its file deleted; a near-copy imported
    later, whose own hash says held out, formed a group of its own and was held out: the v1 model was judged on
    a near-copy of its training image. Removed images a version trained on are grouped too (their dHash from
    v1's meta), so the copy trains."""
    from segany.engine.retrain import freeze_dataset_version

    photo = _on_side(_photo(0), tmp_path / "im" / "photo.png", held=False)
    other = _on_side(_photo(1), tmp_path / "im" / "other.png", held=True)
    store, proj = make_project(tmp_path / "proj", [])
    try:
        p_id, o_id = _add(store, proj, [photo, other])
        v1 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert (_sides(v1)[p_id], _sides(v1)[o_id]) == ("train", "held")
        store.remove_images(proj["id"], [str(p_id)])
        photo.unlink()
        (c_id,) = _add(store, proj, [_on_side(_near_copy(_photo(0)), tmp_path / "im" / "copy.png", held=True)])
        v2 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert (_sides(v2)[c_id], _sides(v2)[o_id]) == ("train", "held")
        assert v2["near_duplicate_groups"] == 1 and v2["near_duplicate_unreadable"] == []
    finally:
        store.close()


def test_a_new_image_given_a_removed_images_id_does_not_take_its_side(tmp_path: Path) -> None:
    """SQLite gives a removed image's id to the next image added (no AUTOINCREMENT), and earlier sides were
    remembered by image id alone: a new image inherited the removed one's held-out side. Sides are remembered with
    the content (sha256) they were given to, so the new image goes by its own hash."""
    from segany.engine.retrain import freeze_dataset_version

    store, proj = make_project(tmp_path / "proj", [])
    try:
        a_id, b_id, x_id = _add(store, proj, [_on_side(_photo(k), tmp_path / "im" / f"{k}.png", held=k > 0)
                                              for k in range(3)])
        v1 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert [_sides(v1)[i] for i in (a_id, b_id, x_id)] == ["train", "held", "held"]
        store.remove_images(proj["id"], [str(x_id)])
        (y_id,) = _add(store, proj, [_on_side(_photo(3), tmp_path / "im" / "new.png", held=False)])
        assert y_id == x_id  # the removed image's id, given again
        v2 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert [_sides(v2)[i] for i in (a_id, b_id, y_id)] == ["train", "held", "train"]
    finally:
        store.close()


def test_images_are_grouped_outside_the_write_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouping all pairs ran inside the write transaction, where SQLite holds the app's saves (about 13 s for
    100,000 images). It runs after the read pass now; the write pass groups again only when the images changed
    in between: here a near-copy accepted meanwhile, which then joins its group's side."""
    from contextlib import contextmanager

    from segany.engine import near_dupes
    from segany.engine.retrain import freeze_dataset_version

    paths = [tmp_path / "im" / f"{name}.png" for name in ("photo", "copy", "other", "late")]
    paths[0].parent.mkdir(parents=True)
    for path, arr in zip(paths, (_photo(0), _near_copy(_photo(0)), _photo(1), _near_copy(_photo(0)[10:])),
                         strict=True):
        Image.fromarray(arr).save(path)
    store, proj = make_project(tmp_path / "proj", [])
    writing, grouped_in = [False], []
    real_transaction, real_groups = store.transaction, near_dupes.near_duplicate_groups

    @contextmanager
    def transaction(*, write: bool = True):  # type: ignore[no-untyped-def]
        with real_transaction(write=write) as s:
            writing[0] = write
            try:
                yield s
            finally:
                writing[0] = False

    monkeypatch.setattr(store, "transaction", transaction)
    monkeypatch.setattr(near_dupes, "near_duplicate_groups",
                        lambda *a: grouped_in.append(writing[0]) or real_groups(*a))
    try:
        p_id, c_id, o_id = _add(store, proj, paths[:3])
        v1 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert grouped_in == [False]  # once, with no write transaction open
        assert _sides(v1)[p_id] == _sides(v1)[c_id] and v1["near_duplicate_groups"] == 1  # a fresh pair: whole

        late: list[int] = []
        real_dhashes = near_dupes.dhashes_for

        def then_accept_one_more(*args: Any) -> Any:
            out = real_dhashes(*args)
            if not late:  # after the read pass, before the write pass
                late.extend(_add(store, proj, paths[3:]))
            return out

        monkeypatch.setattr(near_dupes, "dhashes_for", then_accept_one_more)
        (ann,) = store.list_annotations(image_id=o_id)
        store.update_annotation(ann["id"], project_id=proj["id"], label="changed")  # a new version's content
        v2 = freeze_dataset_version(store, None, held_out=FRACTION)
        assert grouped_in == [False, False, True]  # the write pass saw an image the read pass did not
        assert _sides(v2)[late[0]] == _sides(v1)[p_id] and v2["near_duplicate_groups"] == 1
    finally:
        store.close()


def test_retrain_without_a_log_callback_warns_through_the_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """retrain() passed its no-op log as the freeze's ``say``, so a Python caller lost the freeze's warnings."""
    import segany.checkpoints
    import segany.engine.auto
    from segany.engine import retrain as retrain_mod

    class Frozen(Exception):
        pass

    def stop(*args: Any) -> None:
        raise Frozen

    monkeypatch.setattr(segany.checkpoints, "build_sam", lambda *a, **k: object())  # no model needed here
    monkeypatch.setattr(segany.engine.auto, "register_model", lambda *a: None)
    monkeypatch.setattr(retrain_mod, "dataset_records", stop)  # stop once the version is frozen
    broken = _on_side(_photo(0), tmp_path / "im" / "broken.png", held=True)
    store, proj = make_project(tmp_path / "proj", [])
    try:
        _add(store, proj, [broken, _on_side(_photo(1), tmp_path / "im" / "fine.png", held=False)])
        broken.write_bytes(b"not an image any more")
        (tmp_path / "w.pt").write_bytes(b"weights")
        with caplog.at_level(logging.WARNING, logger="segany.engine.retrain"), pytest.raises(Frozen):
            retrain_mod.retrain(store, None, retrain_mod.RetrainSettings(held_out=FRACTION), model="vit_b",
                                checkpoint=str(tmp_path / "w.pt"))
        assert "could not be read for the near-duplicate check" in caplog.text
    finally:
        store.close()


def test_an_unreadable_image_is_a_group_of_its_own(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file broken after it was registered: the freeze says so and goes on, the image going by its own hash."""
    from segany.engine.retrain import freeze_dataset_version

    broken = _on_side(_photo(0), tmp_path / "im" / "broken.png", held=True)
    fine = _on_side(_photo(1), tmp_path / "im" / "fine.png", held=False)
    store, proj = make_project(tmp_path / "proj", [])
    try:
        b_id, f_id = _add(store, proj, [broken, fine])
        broken.write_bytes(b"not an image any more")
        with caplog.at_level(logging.WARNING, logger="segany.engine.retrain"):
            dv = freeze_dataset_version(store, None, held_out=FRACTION)
        assert (_sides(dv)[b_id], _sides(dv)[f_id]) == ("held", "train")
        assert dv["near_duplicate_unreadable"] == [b_id]
        assert f"image {b_id} ({broken})" in caplog.text and "keeps a group of its own" in caplog.text
        assert list(_meta(store, dv["id"])["image_dhash"]) == [store.get_image(proj["id"], f_id)["sha256"]]  # retried next time
    finally:
        store.close()
