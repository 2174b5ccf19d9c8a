"""Near-duplicate images stay on one side of a dataset version's split (segany.engine.near_dupes, retrain._split).

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


def test_a_near_copy_goes_with_its_original_by_the_smaller_hash(tmp_path: Path) -> None:
    """A resized, re-encoded copy whose own hash says held-out while the photo's says train: both took their own
    side, and the model was evaluated on a near-copy of an image it trained on."""
    from segany.engine.retrain import freeze_dataset_version, held_out_image
    from segany.engine.store import file_sha256

    photo = _on_side(_photo(0), tmp_path / "im" / "photo.png", held=False)
    copy = _on_side(_near_copy(_photo(0)), tmp_path / "im" / "copy.png", held=True)
    alone = [_on_side(_photo(1), tmp_path / "im" / "a.png", held=True),
             _on_side(_photo(2), tmp_path / "im" / "b.png", held=False)]
    store, proj = make_project(tmp_path / "proj", [])
    try:
        ids = _add(store, proj, [photo, copy, *alone])
        dv = freeze_dataset_version(store, None, held_out=FRACTION)
        side = "held" if held_out_image(min(file_sha256(photo), file_sha256(copy)), FRACTION) else "train"
        assert [_sides(dv)[i] for i in ids] == [side, side, "held", "train"]
        assert (dv["near_duplicate_groups"], dv["near_duplicate_groups_split"]) == (1, 0)
        from segany.engine.near_dupes import DEFAULT_MAX_BITS, dhash

        assert (dhash(str(photo)) ^ dhash(str(copy))).bit_count() <= DEFAULT_MAX_BITS  # the report flags them too
    finally:
        store.close()


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


def test_groups_earlier_versions_split_stay_and_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A version frozen before groups were kept together trained on a photo and held out its copy. Sides never
    move: both stay, a new copy trains (a trained-on copy is never added to the held-out side), and the version
    records and says how many groups are split, naming `segany engine report`, which lists the images."""
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
        assert [_sides(v2)[i] for i in (p_id, c_id, t_id, o_id)] == ["train", "held", "train", "held"]
        assert v2["near_duplicate_groups_split"] == 1 and _meta(store, v2["id"])["near_duplicate_groups_split"] == 1
        assert "1 near-duplicate image group is on both sides" in caplog.text
        assert "`segany engine report`" in caplog.text
        assert list_versions(store, None)[-1]["near_duplicate_groups_split"] == 1

        # The report lists them, from the hashes the versions cached (no image is read again).
        from segany.engine import near_dupes, report
        from segany.engine.report import ReportSettings, build_report

        monkeypatch.setattr(near_dupes, "dhash", lambda path: pytest.fail(f"{path} was hashed again"))
        monkeypatch.setattr(report, "_plots", lambda *a: [])  # plots are not what this checks (matplotlib: ~4 s)
        monkeypatch.setattr(report, "_throughput_plot", lambda *a: None)
        flagged = build_report(store, None, tmp_path / "report", ReportSettings())["report"]
        assert {(f["image_id"], f["duplicate_of"]) for f in flagged["image_flags"]} == {
            (p_id, c_id), (p_id, t_id), (c_id, t_id)}
        assert all("image_dhash" not in v["meta"] for v in flagged["versions"])  # a cache, not a description
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
