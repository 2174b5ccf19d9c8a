"""The retraining loop of the data engine (SAM §4: the model was retrained after each stage, 6 times).

``retrain`` freezes the project's accepted annotations into a dataset version (a sorted list with a
content hash, stored in the DB, so the same data always gives the same version), fine-tunes the current
model on the training images with the interactive recipe of :mod:`segany.train.trainer`, evaluates old
and new on held-out images with the protocol of :mod:`segany.eval.interactive` (1- and 5-click mIoU,
box mIoU), registers the new model version with its metrics and lineage (parent, dataset version), and
makes it the project's current model when it is better. ``segany serve`` and ``segany engine auto``
load the current model unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segany.engine import near_dupes
from segany.engine.auto import ModelSpec
from segany.engine.near_dupes import DEFAULT_MAX_BITS
from segany.errors import InputError

log = logging.getLogger(__name__)

CURRENT_KEY = "current_model_version_id"
DEFAULT_MODEL = "segany_tiny"
# A fine-tune saves its training state after this many minutes of training since the last save, so a killed
# retrain loses at most that much (Ctrl-C saves at once). By time, not steps: a ViT-H state is ~7.6 GB, and ten
# saves a run cost a short GPU fine-tune more disk time than training. The states go once the model is registered.
CHECKPOINT_MINUTES = 10.0
# What a retrain writes beside its trainer's states: the parent model they fine-tune (its version name).
FINE_TUNE_FILE = "fine_tune.json"
DEFAULT_HELD_OUT = 0.2  # of a project's images kept out of a retrain's fine-tuning to compare old and new on


# ------------------------------------------------------------------------------------- current model
def current_model(store: Any, project: str | None) -> dict[str, Any] | None:
    """The project's current model version (a ``list_model_versions`` row) or None."""
    proj = store.get_project(project)
    mv_id = (proj["settings"] or {}).get(CURRENT_KEY)
    if mv_id is None:
        return None
    for mv in store.list_model_versions():
        if mv["id"] == mv_id:
            return mv
    return None


def set_current_model(store: Any, project: str | None, model_version_id: int) -> None:
    proj = store.get_project(project)
    store.update_project(proj["id"], settings={CURRENT_KEY: int(model_version_id)})


def model_spec_for(store: Any, project: str | None, *, model: str | None = None, checkpoint: str | None = None,
                   device: str = "cpu") -> ModelSpec:
    """What to run: explicit ``model``/``checkpoint``, else the project's current model, else ``segany_tiny``
    with its packaged or cached weights; refused when there are none."""
    if checkpoint is None and model is None:
        cur = current_model(store, project)
        if cur is not None and cur["checkpoint_path"]:
            if not Path(cur["checkpoint_path"]).is_file():
                raise InputError(f"the project's current model {cur['name']!r} points at "
                                 f"{cur['checkpoint_path']!r}, which is gone; pass --model and --checkpoint")
            return ModelSpec(cur["model_type"], cur["checkpoint_path"], device)
    name = model or DEFAULT_MODEL
    if checkpoint is None:
        from segany.checkpoints import find_weights
        from segany.registry import get_model_info

        info = get_model_info(name)
        found = find_weights(info.weights) if info.weights else None
        if found is None:  # refused: random weights would store meaningless masks, as accepted ones
            fetch = f"run `segany download {info.weights}` or " if info.weights else ""
            raise InputError(f"no weights for {name} were found: {fetch}pass --checkpoint FILE")
        checkpoint = str(found)
    elif not Path(checkpoint).is_file():
        raise InputError(f"--checkpoint {checkpoint!r} does not exist; check the path")
    # Absolute: the path is stored with the model version, and `serve` or `engine auto` run from another
    # folder read it back (a relative `--checkpoint tiny.pt` named a file that was not there).
    return ModelSpec(name, os.path.abspath(checkpoint), device)  # the path as typed, links kept


# ---------------------------------------------------------------------------------- dataset versions
def held_out_image(sha256: str, fraction: float) -> bool:
    """Deterministic split by image content: the same image is held out in every dataset version."""
    return int(sha256[:8], 16) / 0xFFFFFFFF < fraction


def held_out_group(shas: Iterable[str], fraction: float) -> bool:
    """Whether a group of near-duplicate images no earlier version put on a side is held out, by content.

    An image alone goes by its own hash (:func:`held_out_image`), as every image did before near-duplicates were
    grouped, so such splits stay as they were. A group of 2 or more goes by a hash of ``group\\0`` and its smallest
    sha256: the smallest sha256 of k images has the smallest prefix, so deciding on it held a group out with
    probability 1 - (1 - f)^k (89% of 10-frame clips at f = 0.2); the re-hash is uniform again, so about
    ``fraction`` of the images are held out whatever the groups' sizes.
    """
    ordered = sorted(shas)
    if len(ordered) == 1:
        return held_out_image(ordered[0], fraction)
    return held_out_image(hashlib.sha256(b"group\0" + ordered[0].encode()).hexdigest(), fraction)


def freeze_dataset_version(store: Any, project: str | None, *, held_out: float = DEFAULT_HELD_OUT,
                           states: tuple[str, ...] = ("accepted",), near_dup_bits: int = DEFAULT_MAX_BITS,
                           say: Callable[[str], None] | None = None, need_both_sides: bool = False
                           ) -> dict[str, Any]:
    """Freeze the project's annotations in ``states`` as a dataset version; reuse one with the same content.

    Freezing copies each mask (image id/sha256/path, RLE, label, source, annotation uuid) into the version's
    immutable snapshot (``dataset_version_items``): a model's ``trained_on_id`` must keep describing what it
    saw after reviewers relabel or delete the live annotations. The content hash covers, in annotation-uuid
    order, each annotation's uuid, image sha256, label and RLE, so it changes exactly when the data changes.
    Images are split as :func:`split_images` says, near-duplicates (dHash within ``near_dup_bits`` bits) kept on
    one side, with the images earlier versions put on a side (:func:`remembered_sides`: still in the project or
    removed since) grouped beside this version's. The dHashes are read from the project's earlier versions
    (their meta caches them by image sha256) or computed for the images no version hashed yet.

    Hashing and grouping run in a read-only pass, outside the write transaction (on SQLite it holds the app's
    saves: grouping 100,000 images takes seconds). The write pass groups again only when what it reads differs
    from what the read pass saw: an image's masks accepted or removed meanwhile, or another version frozen.

    Args:
        say: where the notes for a person go (images that could not be hashed, near-duplicate groups with images
            on both sides); the module's logger (warnings) when None.
        need_both_sides: refuse, before a new version is stored, a split that leaves no training images (or,
            with ``held_out`` > 0, no held-out ones): a retrain cannot run on it, and a version frozen for a run
            that never trained took a number and showed in `versions` and reports.

    Returns:
        ``{id, name, content_hash, annotations, images, train_image_ids, held_out_image_ids,
        near_duplicate_groups, near_duplicate_groups_split, near_duplicate_left_out,
        near_duplicate_held_out_near_trained, near_duplicate_unreadable}``.
    """
    from sqlalchemy import select

    from segany.engine.db import Annotation, DatasetVersion, DatasetVersionItem, Image

    say = say or log.warning
    proj = store.get_project(project)
    nothing = InputError(f"project {proj['name']!r} has no {'/'.join(states)} annotations to train on; "
                         "annotate or accept some first")
    # A read-only pass first: a freeze of unchanged data returns the version it already has, and the images no
    # version hashed yet are hashed and grouped after it, without the write lock.
    with store.transaction(write=False) as s:
        rows = s.execute(select(Annotation.uuid, Annotation.label, Annotation.height, Annotation.width,
                                Annotation.rle_counts, Image.id, Image.sha256, Image.path)
                         .join(Image, Image.id == Annotation.image_id)
                         .where(*_frozen_where(proj["id"], states)).order_by(Annotation.uuid)).all()
        earlier = list(s.scalars(select(DatasetVersion).where(DatasetVersion.project_id == proj["id"])
                                 .order_by(DatasetVersion.id)))
        if not rows:
            raise nothing
        reused = _same_version(earlier, _content_hash((r, r.sha256) for r in rows), held_out)
        if reused is not None:
            return reused
        cache = near_dupes.cache_from_metas(dv.meta for dv in earlier)
        seen = ([dv.id for dv in earlier], {r.id: (r.sha256, r.path) for r in rows})
        remembered = _remembered(s, earlier, held_out)
    grouping = _group(seen[1], remembered, cache, held_out, near_dup_bits)

    with store.transaction() as s:
        rows = list(s.execute(
            select(Annotation, Image).join(Image, Image.id == Annotation.image_id)
            .where(*_frozen_where(proj["id"], states)).order_by(Annotation.uuid)))
        if not rows:  # all rejected or deleted since the read
            raise nothing
        digest = _content_hash((a, im.sha256) for a, im in rows)
        earlier = list(s.scalars(select(DatasetVersion).where(DatasetVersion.project_id == proj["id"])
                                 .order_by(DatasetVersion.id)))
        reused = _same_version(earlier, digest, held_out)
        if reused is not None:
            return reused
        now = ([dv.id for dv in earlier], {a.image_id: (im.sha256, im.path) for a, im in rows})
        if now != seen:  # changed since the read pass: group again, hashing only the images it did not see
            if now[0] != seen[0]:
                cache = near_dupes.cache_from_metas(dv.meta for dv in earlier)
                remembered = _remembered(s, earlier, held_out)
            grouping = _group(now[1], remembered, {**cache, **grouping.by_sha}, held_out, near_dup_bits,
                              failed=grouping.failed)
        images = {i: sha for i, (sha, _) in now[1].items()}
        split = split_images(images, held_out, grouping.sides, grouping.groups)
        if need_both_sides:  # raised inside the transaction: nothing is stored
            check_split(len(split.train), len(split.held) if held_out > 0 else None, split.groups)
        near_trained = _held_out_near_trained(split, grouping, near_dup_bits)
        not_read = sorted(i for i in grouping.unreadable if i in images)
        _say_unreadable(say, {i: (now[1][i][1], grouping.unreadable[i]) for i in not_read})
        n = len(earlier) + 1
        dv = DatasetVersion(project_id=proj["id"], name=f"v{n}-{digest[:8]}", meta={
            "content_hash": digest, "states": list(states), "annotations": len(rows), "images": len(images),
            "held_out": held_out, "train_image_ids": split.train, "held_out_image_ids": split.held,
            "category_ids": category_ids(earlier, proj.get("labels") or [], {a.label for a, _ in rows}),
            "annotation_uuids_sha256": hashlib.sha256("\n".join(a.uuid for a, _ in rows).encode()).hexdigest(),
            **({"near_duplicate_bits": near_dup_bits, "near_duplicate_groups": split.groups,
                "near_duplicate_groups_split": split.groups_split,
                "near_duplicate_left_out_image_ids": split.left_out,
                "near_duplicate_held_out_near_trained": near_trained, "near_duplicate_unreadable": not_read,
                near_dupes.DHASH_META_KEY: near_dupes.to_meta({sha: h for sha, h in grouping.by_sha.items()
                                                               if sha not in cache})}
               if held_out > 0 else {})})
        dv.annotations = [a for a, _ in rows]
        dv.items = DatasetVersionItem.snapshot(rows)
        s.add(dv)
        s.flush()
        out = _dv_dict(dv)
    if out["near_duplicate_groups_split"]:
        say(near_duplicate_note(out["near_duplicate_groups_split"], len(out["near_duplicate_left_out"]),
                                out["near_duplicate_held_out_near_trained"]))
    return out


def near_duplicate_note(groups_split: int, left_out: int = 0, held_out_near_trained: int = 0) -> str:
    """The line freeze and retrain print when near-duplicate groups have images on both sides of the split."""
    groups = "group has" if groups_split == 1 else "groups have"
    images = "image is" if left_out == 1 else "images are"
    line = (f"{groups_split} near-duplicate image {groups} images on both sides of the split: an image never "
            "changes sides, and earlier dataset versions put these on their sides before groups were kept together "
            "or while no near-copy linked them yet. ")
    if left_out:
        it = "it" if left_out == 1 else "them"
        line += (f"{left_out} new {images} left out of both sides of this version (training on {it} would give a "
                 f"held-out image a near-copy to learn from, holding {it} out would test on a near-copy of a "
                 "trained-on image). ")
    if held_out_near_trained:
        one = held_out_near_trained == 1
        line += (f"{held_out_near_trained} held-out image{'' if one else 's'} {'is' if one else 'are'} within "
                 "the near-duplicate distance of a trained-on image, so held-out scores on "
                 f"{'it' if one else 'them'} may be optimistic. ")
    return line + "`segany engine report` lists the near-duplicate images"


def _say_unreadable(say: Callable[[str], None], failed: dict[int, tuple[str, str]]) -> None:
    if not failed:
        return
    shown = "; ".join(f"image {k} ({path}): {why}" for k, (path, why) in list(failed.items())[:5])
    more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
    say(f"{len(failed)} image(s) could not be read for the near-duplicate check, so each keeps a group of its "
        f"own (the freeze goes on): {shown}{more}")


def _frozen_where(project_id: int, states: tuple[str, ...]) -> tuple[Any, ...]:
    """What a version freezes: the project's annotations in ``states`` with pixels (an empty mask, stored
    before saves refused them, teaches nothing)."""
    from segany.engine.db import Annotation, Image

    return Image.project_id == project_id, Annotation.review_state.in_(list(states)), Annotation.area > 0


def _same_version(earlier: list[Any], digest: str, held_out: float) -> dict[str, Any] | None:
    for dv in earlier:
        if (dv.meta or {}).get("content_hash") == digest and (dv.meta or {}).get("held_out") == held_out:
            return _dv_dict(dv)
    return None


@dataclass(frozen=True)
class Remembered:
    """What the project's earlier dataset versions (of one held-out fraction) put on a side, by content.

    ``in_project``: (image id, sha256 it was frozen with) -> held out (True) or trained on (False), for images a
    version's snapshot still names (an image's removal sets its snapshot rows' image id to NULL); the sha256 is
    None for a version frozen without a snapshot, whose sides go by id alone. ``removed``: sha256 of an image
    since removed from the project -> held out; trained on wins where versions disagree. ``paths``: sha256 -> the
    path it was frozen with, to hash an image no version cached the dHash of.
    """

    in_project: dict[tuple[int, str | None], bool] = field(default_factory=dict)
    removed: dict[str, bool] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def side(self, image_id: int, sha256: str) -> bool | None:
        """The side an earlier version put this image on, if it is the same content; else None."""
        side = self.in_project.get((image_id, sha256))
        return self.in_project.get((image_id, None)) if side is None else side


def remembered_sides(versions: Iterable[tuple[int, Mapping[str, Any]]],
                     snapshot: Iterable[tuple[int, int | None, str, str, int]]) -> Remembered:
    """Earlier sides keyed by content, from versions' metas and snapshots.

    Args:
        versions: (version id, meta) of the versions of one fraction, oldest first; the meta lists the image ids
            of each side.
        snapshot: (version id, image id or None once removed, sha256, path, first snapshot row id) per image of
            those versions.

    A side is remembered with the sha256 the version froze its image with: SQLite gives a removed image's id to
    the next image added (no AUTOINCREMENT), and keyed by id alone that image inherited the removed one's side.
    A removed image's side comes from its place in the snapshot, which holds images in image-id order (the k-th
    image is the k-th smallest id of the version's sides). Where that order does not hold (versions frozen
    before it, in annotation order), the removed images of a version count as trained on unless every image of
    it that is gone was held out: a newcomer near them then trains, which leaks nothing.
    """
    out = Remembered()
    rows: dict[int, list[tuple[int | None, str, str, int]]] = {}
    for dv_id, image_id, sha, path, first in snapshot:
        rows.setdefault(dv_id, []).append((image_id, sha, path, first))
        out.paths.setdefault(sha, path)
    for dv_id, meta in versions:
        sides = {**{int(i): False for i in meta.get("train_image_ids", [])},
                 **{int(i): True for i in meta.get("held_out_image_ids", [])}}
        mine = sorted(rows.get(dv_id, []), key=lambda r: r[3])
        if not mine:  # frozen before snapshots, and none of its masks survived to be copied: ids only
            out.in_project.update({(i, None): held for i, held in sides.items()})
            continue
        for image_id, sha, _, _ in mine:
            if image_id is not None and image_id in sides:
                out.in_project[(image_id, sha)] = sides[image_id]
        gone = [sha for image_id, sha, _, _ in mine if image_id is None]
        if not gone:
            continue
        order = sorted(sides)
        if len(order) == len(mine) and all(r[0] in (None, i) for r, i in zip(mine, order, strict=True)):
            removed = {sha: sides[i] for (image_id, sha, _, _), i in zip(mine, order, strict=True)
                       if image_id is None}
        else:
            missing = set(sides) - {r[0] for r in mine}
            held = bool(missing) and all(sides[i] for i in missing)
            removed = dict.fromkeys(gone, held)
        for sha, held in removed.items():
            out.removed[sha] = out.removed.get(sha, True) and held
    return out


def _remembered(s: Any, earlier: list[Any], held_out: float) -> Remembered:
    """:func:`remembered_sides` of the earlier versions of fraction ``held_out`` (nothing when it is 0: every
    image trains)."""
    if held_out <= 0:
        return Remembered()
    from sqlalchemy import func, select

    from segany.engine.db import DatasetVersionItem as Item

    versions = [(dv.id, dv.meta or {}) for dv in earlier if (dv.meta or {}).get("held_out") == held_out]
    if not versions:
        return Remembered()
    snapshot: list[tuple[int, int | None, str, str, int]] = []
    ids = [v for v, _ in versions]
    for chunk in (ids[k:k + 500] for k in range(0, len(ids), 500)):  # bound the IN list
        snapshot += [(dv_id, image_id, sha, path, first) for dv_id, image_id, sha, path, first in s.execute(
            select(Item.dataset_version_id, Item.image_id, Item.image_sha256, func.min(Item.image_path),
                   func.min(Item.id))
            .where(Item.dataset_version_id.in_(chunk))
            .group_by(Item.dataset_version_id, Item.image_id, Item.image_sha256))]
    return remembered_sides(versions, snapshot)


@dataclass(frozen=True)
class _Grouping:
    """Near-duplicate groups of a version's images (positive keys: image ids) and of the images earlier versions
    put on a side that are not among them (negative keys), with what :func:`split_images` needs."""

    groups: list[list[int]] = field(default_factory=list)
    sides: dict[int, bool] = field(default_factory=dict)  # key -> held out, where an earlier version decided
    hashes: dict[int, int] = field(default_factory=dict)  # key -> dHash
    by_sha: dict[str, int] = field(default_factory=dict)  # sha256 -> dHash of every image hashed or cached here
    unreadable: dict[int, str] = field(default_factory=dict)  # key -> why its file could not be hashed
    failed: dict[str, str] = field(default_factory=dict)  # the same by sha256, not tried again in the write pass


def _group(files: dict[int, tuple[str, str]], remembered: Remembered, cache: Mapping[str, int], held_out: float,
           max_bits: int, failed: Mapping[str, str] | None = None) -> _Grouping:
    """Hash (through ``cache``) and group this version's images (``files``: image id -> (sha256, path)) with
    the images earlier versions put on a side: those still in the project but not in this version (one held
    out may come back with new masks; a newcomer near one trained on must not be held out) and those removed
    since that a version trained on (a near-copy imported later must not be held out). Removed held-out images
    are left out: no version can evaluate on them again. Nothing is hashed when ``held_out`` is 0."""
    if held_out <= 0:
        return _Grouping()
    failed = failed or {}
    nodes = dict(files)
    sides = {i: side for i, (sha, _) in files.items() if (side := remembered.side(i, sha)) is not None}
    others = sorted({*((sha, i, held) for (i, sha), held in remembered.in_project.items()
                       if sha is not None and files.get(i, ("",))[0] != sha),
                     *((sha, -1, held) for sha, held in remembered.removed.items() if not held)})
    for k, (sha, _, held) in enumerate(others):
        nodes[-1 - k] = (sha, remembered.paths.get(sha, ""))
        sides[-1 - k] = held
    tried = {k: f for k, f in nodes.items() if f[0] not in failed}
    hashes, _, unreadable = near_dupes.dhashes_for(tried, cache)
    unreadable.update({k: failed[f[0]] for k, f in nodes.items() if f[0] in failed})
    by_sha = {nodes[k][0]: h for k, h in hashes.items()}  # the ones hashed now included
    return _Grouping(groups=near_dupes.near_duplicate_groups(hashes, max_bits), sides=sides, hashes=hashes,
                     by_sha=by_sha, unreadable=unreadable,
                     failed={**failed, **{nodes[k][0]: why for k, why in unreadable.items()}})


def _held_out_near_trained(split: Split, grouping: _Grouping, max_bits: int) -> int:
    """How many of the version's held-out images are within ``max_bits`` of an image a model trains or trained
    on: only in groups with images on both sides, which earlier versions made."""
    held, train = set(split.held), set(split.train)
    n = 0
    for g in grouping.groups:
        h = [grouping.hashes[k] for k in g if k in held]
        t = [grouping.hashes[k] for k in g if k in train or (k < 0 and grouping.sides.get(k) is False)]
        if h and t:
            n += int(near_dupes.near_any(h, t, max_bits).sum())
    return n


def category_ids(earlier: list[Any], project_labels: list[str], labels: set[str]) -> dict[str, int]:
    """A version's label → COCO category id: the ids the project's latest earlier version gave, then new ids
    for the project's labels and this version's other labels (sorted) that have none yet.

    Kept with the version so ids never move: numbering only the labels present shifted them between versions
    (a new 'ant' moved 'bird' from 1 to 2), and a model trained elsewhere on v1 and v2 read one id as two classes.
    """
    ids: dict[str, int] = {}
    for dv in reversed(earlier):
        if (dv.meta or {}).get("category_ids"):
            ids = {str(k): int(v) for k, v in dv.meta["category_ids"].items()}
            break
    for name in [*project_labels, *sorted(labels - set(project_labels))]:
        if name not in ids:
            ids[name] = max(ids.values(), default=0) + 1
    return ids


def _content_hash(rows: Any) -> str:
    """sha256 over (annotation, image sha256) pairs already in uuid order."""
    h = hashlib.sha256()
    for a, sha in rows:
        h.update(f"{a.uuid}\0{sha}\0{a.label}\0{a.height}x{a.width}\0{a.rle_counts}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Split:
    """A dataset version's images by side, and counts of its near-duplicate groups."""

    train: list[int]
    held: list[int]
    groups: int = 0  # groups of 2 or more near-duplicates with an image in this version, earlier ones counted
    groups_split: int = 0  # those of them with images on both sides (earlier versions put them there; kept)
    left_out: list[int] = field(default_factory=list)  # new images of those groups: on neither side


def split_images(images: dict[int, str], held_out: float, earlier: Mapping[int, bool] | None = None,
                 groups: list[list[int]] | None = None) -> Split:
    """Train and held-out image ids, split by content so an image keeps its side in every version and
    near-duplicates share one.

    Args:
        images: image id -> sha256, the images of the version.
        held_out: the fraction to hold out.
        earlier: key -> held out (True) or trained on (False) in earlier versions, for this version's images
            that are the content an earlier version put on a side (:meth:`Remembered.side`) and for the other
            keys of ``groups``.
        groups: near-duplicate groups of keys (:func:`segany.engine.near_dupes.near_duplicate_groups`): this
            version's image ids, and keys of images earlier versions put on a side that are not in it (still in
            the project, or removed since), each with its side in ``earlier``; an image in none is alone.

    The rule, per group:

    * an image an earlier version put on a side stays there: a trained-on image never moves to held-out (its
      model would be judged on it), a held-out image never moves to train;
    * a group no earlier version put an image of on a side goes to one side whole, by content
      (:func:`held_out_group`): an image alone by its own hash, as before near-duplicates were grouped, a group
      of 2 or more by a re-hash of its smallest sha256, so about ``held_out`` of the images are held out
      whatever the groups' sizes;
    * a new image of a group that earlier versions put on one side joins that side: it trains if the group's
      images were trained on (a removed one included), else it is held out. So the held-out side never gains a
      near-copy of an image a model trained on;
    * a new image of a group with images on both sides (frozen before groups were kept together, or a new image
      near a trained-on image and a held-out one that are not near each other) is left out of both sides
      (``left_out``): training on it would give a held-out image a near-copy to learn from that it did not have,
      and holding it out would test on a near-copy of a trained-on image; either makes held-out scores
      optimistic. Its masks stay in the version's snapshot, and a later version places it once the group has
      images on one side only (the others removed). Such groups are counted in ``groups_split``.

    A tiny project where nothing falls under the fraction still holds out one group: among the groups no
    earlier version put on a side, the one of smallest sha256 that leaves an image to train on (picking the
    smallest hash each time moved a trained-on image to the held-out side once another image was removed). When
    every image has been trained on, or all are near-copies of each other, none is held out.
    """
    earlier = earlier or {}
    grouped = {i for g in groups or [] for i in g}
    all_groups = [list(g) for g in groups or []] + [[i] for i in sorted(images) if i not in grouped]
    held_set: set[int] = set()
    left_out: set[int] = set()
    fresh: list[list[int]] = []
    n_groups = n_split = 0
    for g in all_groups:
        here = [i for i in g if i in images]
        if not here:
            continue
        n_groups += len(g) > 1
        known = {earlier[i] for i in g if i in earlier}
        if not known:
            fresh.append(here)
            if held_out_group((images[i] for i in here), held_out):
                held_set.update(here)
            continue
        held_set.update(i for i in here if earlier.get(i) is True)
        if len(known) == 2:
            n_split += 1
            left_out.update(i for i in here if i not in earlier)
        elif known == {True}:
            held_set.update(here)
    trainable = len(images) - len(left_out)
    if held_out > 0 and not held_set and trainable >= 2:  # tiny projects: hold out one group anyway
        fits = [g for g in fresh if len(g) < trainable]
        if fits:
            held_set.update(min(fits, key=lambda g: min(images[i] for i in g)))
    return Split(train=sorted(i for i in images if i not in held_set and i not in left_out), held=sorted(held_set),
                 groups=n_groups, groups_split=n_split, left_out=sorted(left_out))


def _split(images: dict[int, str], held_out: float, earlier: dict[int, bool] | None = None,
           groups: list[list[int]] | None = None) -> tuple[list[int], list[int]]:
    """(train, held-out) image ids of :func:`split_images`."""
    split = split_images(images, held_out, earlier, groups)
    return split.train, split.held


def check_split(train: int, held: int | None, near_duplicate_groups: int) -> None:
    """Refuse a retrain's split with no images to train on, or none held out to evaluate on (``held`` None:
    evaluated on other data)."""
    if not train:
        raise InputError("no training images left after the held-out split; lower --held-out or add images"
                         + _near_copies_hint(near_duplicate_groups))
    if held is not None and not held:
        raise InputError("no held-out images to evaluate on; raise --held-out or pass --eval-data"
                         + _near_copies_hint(near_duplicate_groups))


def _near_copies_hint(near_duplicate_groups: int) -> str:
    """What to add to a split's refusal where near-duplicates were kept together (they may be why it is empty)."""
    if not near_duplicate_groups:
        return ""
    return (f" (near-duplicate images share a side, and this version has {near_duplicate_groups} groups of them: "
            "data made mostly of near-copies of a few images cannot be split; pass --eval-data)")


def _run_folder(given: Path | None, default: Path) -> Path:
    """Where this retrain writes: a registered model version names its ``model.pt``, so a folder that already
    holds one is never written again (a second run from the same version and parent used to overwrite the
    first's weights under its row). The default gets the next free ``-2``, ``-3``...; a given one is refused."""
    if given is not None:
        if (given / "model.pt").exists():
            raise InputError(f"--out {str(given)!r} already holds a retrained model.pt, which a model version may "
                             "name; pass an empty or new folder")
        return given
    base, k = default, 1
    while (base / "model.pt").exists():
        k += 1
        base = default.with_name(f"{default.name}-{k}")
    return base


def _dv_dict(dv: Any) -> dict[str, Any]:
    m = dv.meta or {}
    return {"id": dv.id, "name": dv.name, "content_hash": m.get("content_hash"), "annotations": m.get("annotations"),
            "images": m.get("images"), "train_image_ids": list(m.get("train_image_ids", [])),
            "held_out_image_ids": list(m.get("held_out_image_ids", [])),
            "near_duplicate_groups": int(m.get("near_duplicate_groups", 0)),
            "near_duplicate_groups_split": int(m.get("near_duplicate_groups_split", 0)),
            "near_duplicate_left_out": list(m.get("near_duplicate_left_out_image_ids", [])),
            "near_duplicate_held_out_near_trained": int(m.get("near_duplicate_held_out_near_trained", 0)),
            "near_duplicate_unreadable": list(m.get("near_duplicate_unreadable", []))}


def dataset_records(store: Any, dataset_version_id: int, image_ids: list[int], dataset: str = "project"
                    ) -> list[Any]:
    """Training/eval records (:class:`InstanceRecord`) of the given images, from the version's frozen snapshot."""
    from segany.data.formats.common import InstanceRecord
    from segany.engine.versions import snapshot_items

    wanted = set(image_ids)
    by_image: dict[int, InstanceRecord] = {}
    for it in snapshot_items(store, dataset_version_id):
        if it["image_id"] not in wanted:
            continue
        rec = by_image.get(it["image_id"])
        if rec is None:
            rec = by_image[it["image_id"]] = InstanceRecord(
                image_path=it["image_path"], size_hw=(it["height"], it["width"]), masks=[], class_names=[],
                image_id=str(it["image_id"]), dataset=dataset)
        rec.masks.append({"size": [it["height"], it["width"]], "counts": it["rle_counts"]})
        assert rec.class_names is not None
        rec.class_names.append(it["label"])
    return [by_image[i] for i in sorted(by_image)]


# ------------------------------------------------------------------------------------------ retrain
@dataclass(frozen=True)
class RetrainSettings:
    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-4
    # Fraction of the project's images kept out of training to evaluate on; None: DEFAULT_HELD_OUT, or none
    # with ``eval_data``. Given beside ``eval_data`` it is refused: it would be ignored.
    held_out: float | None = None
    eval_data: str | None = None  # evaluate on external data (pack or shared-data root) instead
    eval_datasets: tuple[str, ...] | None = None
    eval_images: int | None = None
    max_objects: int = 8
    max_clicks: int = 5  # 1- and 5-click mIoU are reported
    freeze_encoder: bool = False
    always_promote: bool = False
    # Promotion needs evidence: the new model's score (mean of 1-click, 5-click and box mIoU, in [0, 1]) must
    # beat the old one by at least ``min_gain`` on at least ``min_eval_objects`` held-out objects. A gain of a
    # few thousandths on a handful of objects is noise, and promoting on noise churns the project's model.
    min_gain: float = 0.01
    min_eval_objects: int = 20
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        from segany.train.config import MAX_LR

        if not 0.0 < self.lr <= MAX_LR:  # also refuses NaN; the trainer's own bound, checked before any work
            raise InputError(f"--lr must be > 0 and <= {MAX_LR:g} (e.g. 1e-4), got {self.lr}")
        if self.max_objects < 1:
            raise InputError(f"--max-objects must be >= 1, got {self.max_objects}")
        if self.eval_datasets and not self.eval_data:  # it was ignored: the held-out split ran instead
            raise InputError("--eval-datasets picks datasets of --eval-data; pass --eval-data PACK as well, or leave "
                             "--eval-datasets out to evaluate on held-out project images")
        if self.eval_images is not None and self.eval_images < 1:
            raise InputError(f"--eval-images must be >= 1 (leave it out to use all), got {self.eval_images}")
        if self.held_out is not None and not 0.0 <= self.held_out < 1.0:
            raise InputError(f"--held-out must be in [0, 1), got {self.held_out}")
        if self.held_out and self.eval_data:  # it was ignored: every project image trained
            raise InputError("--held-out splits the project's images for evaluation, and --eval-data evaluates on "
                             "other data, so every project image trains; pass one of them")
        if self.held_out == 0 and not self.eval_data:  # refused only after a version was frozen
            raise InputError("--held-out 0 holds no image out to evaluate the models on; pass a fraction such as "
                             "0.2, or --eval-data PACK")
        if not 0.0 <= self.min_gain < 1.0:
            raise InputError(f"--min-gain must be in [0, 1) (a score difference, e.g. 0.01), got {self.min_gain}")
        if self.min_eval_objects < 1:
            raise InputError(f"--min-eval-objects must be >= 1, got {self.min_eval_objects}")
        if self.max_clicks < 5:
            raise InputError(f"max_clicks must be >= 5 (5-click mIoU is reported), got {self.max_clicks}")

    @property
    def held_out_fraction(self) -> float:
        """The fraction of project images held out: none when evaluating on ``eval_data``."""
        if self.eval_data:
            return 0.0
        return DEFAULT_HELD_OUT if self.held_out is None else self.held_out


def score(metrics: dict[str, Any]) -> float:
    """One number to compare models: mean of 1-click, 5-click and box mIoU over all objects."""
    a = metrics["all"]
    return float((a["miou_1"] + a["miou_5"] + a["box_miou"]) / 3.0)


def evaluate(sam: Any, records: list[Any], *, max_objects: int, max_clicks: int) -> dict[str, Any]:
    from segany.eval.interactive import eval_objects, evaluate_model, summarize

    objects = eval_objects(records, max_objects)
    if not objects:
        raise InputError("the evaluation split has no objects of at least 64 pixels; add data or use --eval-data")
    was_training = sam.training
    sam.eval()
    try:
        return summarize(evaluate_model(sam, objects, max_clicks=max_clicks), max_clicks)
    finally:
        sam.train(was_training)


RETRAIN_KIND = "retrain"  # the claim kind (see segany.engine.locks) a retrain holds on its project


def retrain(store: Any, project: str | None, settings: RetrainSettings, *, model: str | None = None,
            checkpoint: str | None = None, out_dir: str | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One turn of the loop: freeze data, fine-tune, evaluate old vs new, register, maybe promote.

    Args:
        log: gets each progress line and note for a person (the CLI prints them). Without it, progress is not
            shown, and the freeze's notes (images that could not be read for the near-duplicate check,
            near-duplicate groups with images on both sides) go to this module's logger as warnings.

    Returns a JSON-ready dict: ``dataset_version``, ``model_version`` (id, name, checkpoint),
    ``metrics_old``/``metrics_new`` (per dataset and ``all``: ``miou_1``, ``miou_5``, ``box_miou``, ...),
    ``promoted`` and ``train`` (the trainer's summary).
    """
    from segany.checkpoints import build_sam
    from segany.engine.locks import held_claim, touch_claim

    proj = store.get_project(project)
    spec = model_spec_for(store, project, model=model, checkpoint=checkpoint, device=settings.device)
    if out_dir is not None:
        from segany.engine.report import check_out_dir

        check_out_dir(Path(out_dir))
    # Built (its checkpoint read and checked) before anything is registered, frozen or written.
    old = build_sam(spec.model, spec.checkpoint, device=settings.device)
    # One retrain of a project at a time: two at once wrote one run folder, so model version 2's checkpoint
    # came to hold version 3's weights. Held with a heartbeat, as `engine auto` holds its claim.
    with held_claim(store, proj, RETRAIN_KIND) as owner:
        def still_ours(_entry: Any = None) -> None:
            touch_claim(store, proj["id"], RETRAIN_KIND, owner)

        return _retrain_claimed(store, project, proj, spec, old, settings, out_dir, log or _quiet, still_ours,
                                say=log)


def _quiet(message: str) -> None:
    """Progress nobody asked to see."""


def _retrain_claimed(store: Any, project: str | None, proj: dict[str, Any], spec: ModelSpec, old: Any,
                     settings: RetrainSettings, out_dir: str | None, log: Callable[[str], None],
                     still_ours: Callable[..., None], say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`retrain` from registering the parent on, while the project's retrain claim is held.

    ``say`` gets the freeze's notes (the module's logger when None); ``log`` the progress lines.

    ``still_ours`` raises :class:`segany.engine.locks.ClaimLostError` once another retrain has taken the project
    over (this one's heartbeats stopped for the stale limit). It is asked at each log step of the fine-tuning and
    before the model is written, registered and promoted, so a run that lost its claim stops without writing a
    model beside the run that now holds the project (the heartbeat thread alone only noticed, and the run went on
    to register and promote).
    """
    import torch

    from segany.atomic import atomic_write_json
    from segany.checkpoints import save_checkpoint
    from segany.engine.auto import register_model
    from segany.engine.store import file_sha256
    from segany.train.config import TrainConfig
    from segany.train.trainer import Trainer

    # What can be refused without the store is refused first: a failed retrain must not leave a frozen dataset
    # version (it takes a number and shows in `versions` and reports) or a registered parent behind.
    if out_dir:
        _run_folder(Path(out_dir), Path(out_dir))
    eval_records = None
    if settings.eval_data:
        from segany.eval.run import load_eval_records

        eval_records = load_eval_records(settings.eval_data, "val", list(settings.eval_datasets or []) or None,
                                         limit_images=settings.eval_images, flag="--eval-data")
    dv = freeze_dataset_version(store, project, held_out=settings.held_out_fraction, say=say, need_both_sides=True)
    parent_id = register_model(store, spec)  # after the freeze's refusals: a refused retrain registers nothing
    n_groups, n_split = dv["near_duplicate_groups"], dv["near_duplicate_groups_split"]
    n_left = len(dv["near_duplicate_left_out"])
    groups = (f"; near-duplicate image groups: {n_groups - n_split} kept on one side"
              + (f", {n_split} with images on both sides" if n_split else "")
              + (f", {n_left} new images of those left out" if n_left else "") if n_groups else "")
    log(f"dataset version {dv['name']}: {dv['annotations']} masks on {dv['images']} images "
        f"({len(dv['train_image_ids'])} train, {len(dv['held_out_image_ids'])} held out{groups})")
    train_records = dataset_records(store, dv["id"], dv["train_image_ids"])
    if eval_records is None:
        eval_records = dataset_records(store, dv["id"], dv["held_out_image_ids"])
        if settings.eval_images is not None:
            eval_records = eval_records[: settings.eval_images]
    check_split(len(train_records), len(eval_records), n_groups)  # a version reused from an earlier freeze

    base = _run_folder(Path(out_dir) if out_dir else None,
                       (store.project_dir or Path.cwd()) / ".segany" / "retrain" / f"{dv['name']}-from-{parent_id}")
    cfg = TrainConfig.from_dict({
        "model": {"name": spec.model},
        "data": {"max_masks": 8, "num_workers": 0, "scale_min": 0.8, "scale_max": 1.2, "min_mask_area": 16},
        "optim": {"lr": settings.lr, "warmup_steps": max(1, min(50, settings.steps // 10)), "weight_decay": 0.01,
                  "freeze_image_encoder": settings.freeze_encoder},
        "recipe": {"point_rounds": 2, "mask_only_rounds": 1},
        "run": {"out_dir": str(base / "run"), "max_steps": settings.steps, "batch_size": settings.batch_size,
                "seed": settings.seed, "device": settings.device, "log_every": max(1, settings.steps // 10),
                "ckpt_every": 0, "ckpt_minutes": CHECKPOINT_MINUTES},
    })
    base.mkdir(parents=True, exist_ok=True)

    log(f"evaluating the current model {spec.version_name()} on {len(eval_records)} held-out images")
    t0 = time.time()
    metrics_old = evaluate(old, eval_records, max_objects=settings.max_objects, max_clicks=settings.max_clicks)

    torch.manual_seed(settings.seed)
    trainer = Trainer(cfg, sam=old, train_records=train_records)  # fine-tunes ``old`` in place
    parent = spec.version_name()
    _continue_fine_tune(trainer, base / "run", parent, log)
    log(f"fine-tuning for {settings.steps} steps on {len(train_records)} images"
        + (f", from step {trainer.step}" if trainer.step else ""))
    atomic_write_json(base / "run" / FINE_TUNE_FILE, {"parent": parent}, indent=1)
    try:
        summary = trainer.fit(on_log=still_ours)
    except KeyboardInterrupt:
        kept = trainer.saved_state  # this Ctrl-C's save, else the last periodic one (or the state it continued)
        log(f"interrupted at step {trainer.step} of {settings.steps}; "
            + (f"{kept[0]} holds step {kept[1]}: the same `segany engine retrain` command continues from it"
               if kept else "no training state was saved yet: a rerun starts the fine-tuning over"))
        raise
    new = trainer.sam.eval()
    metrics_new = evaluate(new, eval_records, max_objects=settings.max_objects, max_clicks=settings.max_clicks)
    _prune_run_dir(base / "run")
    still_ours()  # the model is written, registered and maybe promoted only by the claim's holder
    s_old, s_new = score(metrics_old), score(metrics_new)
    better = s_new > s_old
    promote, why = promotion_decision(s_old, s_new, int(metrics_new["all"].get("objects", 0)), settings)
    meta = {"dataset_version": dv["name"], "content_hash": dv["content_hash"], "steps": settings.steps,
            "metrics": metrics_new, "parent_metrics": metrics_old, "score": round(s_new, 4),
            "parent_score": round(s_old, 4), "eval_images": len(eval_records),
            "eval_split": "external:" + settings.eval_data if settings.eval_data else "held-out project images",
            "train_images": len(train_records), "train": summary, "promoted": promote, "promotion_reason": why}
    ckpt = base / "model.pt"
    save_checkpoint(new, ckpt, meta={k: v for k, v in meta.items() if k != "train"})
    new_spec = ModelSpec(spec.model, str(ckpt.resolve()), settings.device)
    mv_id = int(store.register_model_version(new_spec.version_name(), spec.model, str(ckpt.resolve()),
                                             checkpoint_sha256=file_sha256(ckpt), parent_id=parent_id,
                                             trained_on_id=dv["id"], meta=meta))
    if promote:
        still_ours()
        set_current_model(store, project, mv_id)
    result = {"project": proj["name"],
              "dataset_version": {k: dv[k] for k in ("id", "name", "content_hash", "annotations", "images",
                                                     "near_duplicate_groups", "near_duplicate_groups_split",
                                                     "near_duplicate_left_out")},
              "model_version": {"id": mv_id, "name": new_spec.version_name(), "checkpoint": str(ckpt),
                                "parent_id": parent_id},
              "metrics_old": metrics_old, "metrics_new": metrics_new, "score_old": round(s_old, 4),
              "score_new": round(s_new, 4), "better": better, "promoted": promote, "promotion_reason": why,
              "train": summary,
              "seconds": round(time.time() - t0, 1)}
    atomic_write_json(base / "result.json", result, indent=1)
    return result


# What each trainer setting a retrain derives is set by, so a refusal to continue names the retrain's flags.
_RETRAIN_FLAGS = {"run.max_steps": "--steps", "optim.warmup_steps": "--steps", "run.log_every": "--steps",
                  "optim.lr": "--lr", "run.batch_size": "--batch-size", "optim.freeze_image_encoder": "--freeze-encoder",
                  "run.device": "--device"}


def _continue_fine_tune(trainer: Any, run_dir: Path, parent: str, log: Callable[[str], None]) -> None:
    """Load the training state an interrupted run of this same retrain left in ``run_dir``, if any.

    Long jobs resume where they stopped: a rerun after Ctrl-C or a kill finds the state the trainer saved then
    (or at its last periodic save) and trains only the steps left; batches and prompts are functions of the
    step, so the weights come out as an uninterrupted run's. Only the same fine-tune is continued: the same
    parent model (``parent``, its version name, recorded in :data:`FINE_TUNE_FILE`; a reused ``--out`` may
    hold another model's), the same data and the same settings, device included. Anything else (other --steps,
    --lr, a torn file) is not an error: the fine-tuning starts over, and the log says why.
    """
    from segany.train.resume import changed_keys, saved_config

    last = run_dir / "last.pt"
    if not last.is_file():
        return
    why = None
    try:
        recorded = json.loads((run_dir / FINE_TUNE_FILE).read_text(encoding="utf-8")).get("parent")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != parent:
        why = f"it fine-tuned another model ({recorded or 'not recorded'})"
    else:
        try:
            changed = [k for k in changed_keys(saved_config(last), trainer.cfg) if k != "run.out_dir"]
            if changed:
                flags = sorted({_RETRAIN_FLAGS.get(k, k) for k in changed})
                why = f"it ran with other {', '.join(flags)}"
            else:
                trainer.load(last)  # checks weights and data before it changes anything
        except Exception as exc:  # any reason at all: starting over is always correct, only slower
            from segany.errors import one_line

            why = one_line(exc)
    if why is not None:
        log(f"not continuing the earlier fine-tune in {run_dir}: {why}; starting it over")
        _prune_run_dir(run_dir)  # else a rerun killed before its first save would find these again
        return
    log(f"continuing the interrupted fine-tune in {run_dir} (step {trainer.step} was saved)")
    for note in trainer.resume_notes:
        log(note)


def promotion_decision(s_old: float, s_new: float, objects: int, settings: RetrainSettings) -> tuple[bool, str]:
    """Whether the new model becomes current, and why, in one line for the output."""
    gain = s_new - s_old
    if settings.always_promote:
        return True, f"--always-promote (score {s_old:.4f} -> {s_new:.4f})"
    if objects < settings.min_eval_objects:
        return False, (f"only {objects} held-out objects were evaluated (--min-eval-objects "
                       f"{settings.min_eval_objects}); too few to tell, so the current model stays. Raise "
                       "--held-out or --max-objects, or pass --eval-data")
    if gain < settings.min_gain:
        return False, (f"score {s_old:.4f} -> {s_new:.4f} (gain {gain:+.4f}) is below --min-gain "
                       f"{settings.min_gain}; the current model stays")
    return True, f"score {s_old:.4f} -> {s_new:.4f} (gain {gain:+.4f} >= {settings.min_gain}) on {objects} objects"


def _prune_run_dir(run_dir: Path) -> None:
    """Drop the trainer's checkpoints (optimizer state, copies of the weights) once the run is over.

    The registered ``model.pt`` beside the run folder is what later stages load; ``config.json`` and
    ``log.jsonl`` stay as the run's record. A 2-step retrain otherwise leaves over 100 MB behind.
    """
    if not run_dir.is_dir():
        return
    for p in run_dir.rglob("*.pt"):
        p.unlink(missing_ok=True)
