"""Data maintenance for the engine's output (SAM §5 "Segment Anything Dataset", mask quality checks).

``build_report`` writes an HTML page with PNG plots, a ``report.json`` and a ``flags.json`` for every
dataset version of a project plus the live set of annotations:

* masks per image, mask size (fraction of the image), predicted IoU and stability of automatic masks;
* disagreement: the current model's mask from each accepted annotation's box, compared with the
  annotation. Low IoU marks a mask for review (either the annotation or the model is wrong);
* near-duplicate masks (pairs above an IoU in one image) and near-duplicate images (64-bit dHash,
  :mod:`segany.engine.near_dupes`), listed by group with their first pairs (20,000 frames of a still camera
  are one group, not 200 million pairs); dataset versions keep each group on one side of their split;
* annotator throughput: seconds per mask over time (SA-1B went from 34 s to 14 s per mask).

* empty masks (area 0, stored before the store refused them): nothing to train on.

A report changes nothing by default: flags are listed in ``flags.json`` and the page. With ``demote=True``
(``segany engine report --demote``) flagged accepted masks are also moved to ``review_state = pending`` (the
app's review queue), which takes them out of exports and training until someone accepts them again.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segany.atomic import atomic_write_text
from segany.engine.near_dupes import DEFAULT_MAX_BITS, DHASH_META_KEY
from segany.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportSettings:
    disagreement_iou: float = 0.5
    max_disagreement: int = 500
    dup_iou: float = 0.9
    dup_hash_bits: int = DEFAULT_MAX_BITS  # the dataset versions' split keeps such images on one side
    demote: bool = False  # move flagged accepted masks to pending: opt-in, since it changes the released data

    def __post_init__(self) -> None:
        for name, value in (("disagreement-iou", self.disagreement_iou), ("dup-iou", self.dup_iou)):
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise InputError(f"--{name} is an IoU, so it must be between 0 and 1, got {value}")
        if self.max_disagreement < 0:
            raise InputError(f"--max-disagreement must be >= 0 (0 skips the check), got {self.max_disagreement}")
        if not 0 <= self.dup_hash_bits <= 64:
            raise InputError(f"--dup-hash-bits counts differing bits of a 64-bit hash, so it must be 0-64, "
                             f"got {self.dup_hash_bits}")


# ---------------------------------------------------------------------------------------- measures
def _quality(ann: dict[str, Any]) -> float:
    """The predicted IoU, with a hand-drawn mask (None) as sure as can be. Not ``or 1.0``: that also made a
    predicted 0.0 the best, so the worse of two duplicates was kept and the better one flagged."""
    return 1.0 if ann["predicted_iou"] is None else float(ann["predicted_iou"])


def duplicate_masks(anns: list[dict[str, Any]], thresh: float) -> list[tuple[int, int, float]]:
    """(annotation a, annotation b, IoU) for pairs in one image above ``thresh``; b is the one to review
    (lower predicted IoU, or the later one)."""
    from pycocotools import mask as mask_utils

    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in anns:
        by_image[a["image_id"]].append(a)
    out = []
    for items in by_image.values():
        if len(items) < 2:
            continue
        rles = [{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode("ascii")}
                for a in items]
        ious = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)))
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                if ious[i, j] > thresh:
                    a, b = items[i], items[j]
                    keep_a = (_quality(a), -a["id"]) >= (_quality(b), -b["id"])
                    first, second = (a, b) if keep_a else (b, a)
                    out.append((first["id"], second["id"], float(ious[i, j])))
    return out


def disagreement(sam: Any, images: dict[int, dict[str, Any]], anns: list[dict[str, Any]], limit: int
                 ) -> dict[int, float]:
    """annotation id → IoU between the annotation and the model's single mask from its box."""
    from segany.data.images import load_image
    from segany.engine.masks import decode_rle
    from segany.eval.metrics import iou
    from segany.predictor import SamPredictor

    pred = SamPredictor(sam)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in anns[:limit]:
        by_image[a["image_id"]].append(a)
    out: dict[int, float] = {}
    for image_id, items in by_image.items():
        pred.set_image(load_image(images[image_id]["path"]))
        for a in items:
            x, y, w, h = a["bbox"]
            if w < 1 or h < 1:
                continue
            masks, _, _ = pred.predict(box=np.array([x, y, x + w, y + h], dtype=np.float32), multimask_output=False)
            out[a["id"]] = iou(masks[0], decode_rle(a["segmentation"]))
    return out


def throughput(anns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seconds per mask per day for annotator-made masks (manual and reviewed semi-automatic)."""
    days: dict[str, list[float]] = defaultdict(list)
    for a in anns:
        if a["seconds_spent"] is None or a["source"] == "auto" or not a["created_at"]:
            continue
        day = a["created_at"][:10]
        days[day].append(float(a["seconds_spent"]))
    return [{"day": d, "masks": len(v), "seconds_per_mask": round(float(np.mean(v)), 2)}
            for d, v in sorted(days.items())]


def describe(anns: list[dict[str, Any]], images: Mapping[Any, Any]) -> dict[str, Any]:
    """Counts and distributions of one set of annotations on ``images`` (keyed as the annotations' image_id)."""
    per_image = defaultdict(int)
    for a in anns:
        per_image[a["image_id"]] += 1
    counts = [per_image.get(i, 0) for i in images]
    rel = [a["area"] / max(1, a["segmentation"]["size"][0] * a["segmentation"]["size"][1]) for a in anns]
    by_source: dict[str, int] = defaultdict(int)
    for a in anns:
        by_source[a["source"]] += 1

    def stats(v: list[float]) -> dict[str, float] | None:
        if not v:
            return None
        arr = np.asarray(v, dtype=float)
        return {"mean": round(float(arr.mean()), 4), "median": round(float(np.median(arr)), 4),
                "p10": round(float(np.percentile(arr, 10)), 4), "p90": round(float(np.percentile(arr, 90)), 4)}

    return {"images": len(images), "masks": len(anns), "by_source": dict(by_source),
            "masks_per_image": stats([float(c) for c in counts]), "relative_area": stats(rel),
            "predicted_iou": stats([a["predicted_iou"] for a in anns if a["predicted_iou"] is not None]),
            "stability_score": stats([a["stability_score"] for a in anns if a["stability_score"] is not None]),
            "_counts": counts, "_rel": rel,
            "_piou": [a["predicted_iou"] for a in anns if a["predicted_iou"] is not None],
            "_stab": [a["stability_score"] for a in anns if a["stability_score"] is not None]}


# ------------------------------------------------------------------------------------------- plots
def _plots(name: str, d: dict[str, Any], out: Path, extra: dict[str, list[float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = [("masks per image", d["_counts"], "masks", False), ("mask size", d["_rel"], "area / image area", True),
              ("predicted IoU", d["_piou"], "predicted IoU", False), ("stability", d["_stab"], "stability score", False)]
    panels += [(k, v, k, False) for k, v in extra.items()]
    panels = [p for p in panels if len(p[1])]
    if not panels:
        return files
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, (title, values, xlabel, logx) in zip(axes[0], panels, strict=True):
        v = np.asarray(values, dtype=float)
        if logx:
            v = np.clip(v[v > 0], 1e-4, 1.0)
            bins = np.logspace(-4, 0, 21)  # 0.01 % of the image up to all of it
            ax.set_xscale("log")
        else:
            bins = 20
        ax.hist(v, bins=bins, color="#4477aa")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = out / f"{name}_distributions.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    files.append(path.name)
    return files


def _throughput_plot(rows: list[dict[str, Any]], out: Path) -> str | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.plot([r["day"] for r in rows], [r["seconds_per_mask"] for r in rows], marker="o")
    ax.set_ylabel("seconds per mask")
    ax.set_title("annotator throughput", fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)
    return "throughput.png"


# ------------------------------------------------------------------------------------------ report
def _version_annotations(store: Any, version_id: int, live: dict[str, dict[str, Any]]
                         ) -> tuple[list[dict[str, Any]], dict[str, None]]:
    """A dataset version's masks as :func:`describe` reads them, and its images (keyed by sha256), from the
    snapshot frozen with it: the live rows a version links to are edited, deleted and rejected afterwards, and
    a version's section must describe what the models were trained on. Predicted IoU and stability are not
    frozen; they are taken from the live mask where it is still the frozen one (same uuid and pixels)."""
    from segany.engine.versions import snapshot_items

    out: list[dict[str, Any]] = []
    frozen_images: dict[str, None] = {}
    for it in snapshot_items(store, version_id):
        frozen_images[it["image_sha256"]] = None
        now = live.get(it["annotation_uuid"])
        same = now is not None and now["segmentation"]["counts"] == it["rle_counts"]
        out.append({"image_id": it["image_sha256"], "area": it["area"], "source": it["source"],
                    "segmentation": {"size": [it["height"], it["width"]], "counts": it["rle_counts"]},
                    "predicted_iou": now["predicted_iou"] if same and now else None,
                    "stability_score": now["stability_score"] if same and now else None})
    return out, frozen_images


MAX_PAIRS_PER_GROUP = 20  # pairs a near-duplicate image group lists; the rest are counted


def near_duplicate_image_flags(hashes: Mapping[int, int], max_bits: int, max_pairs: int = MAX_PAIRS_PER_GROUP
                               ) -> list[dict[str, Any]]:
    """One flag per group of 2 or more near-duplicate images (:func:`~segany.engine.near_dupes.near_duplicate_groups`):
    ``{"reason": "near_duplicate_images", "image_ids": the group's ids (sorted),
    "pairs": [{"image_id": a, "duplicate_of": b, "hash_bits": d}, ...] (its first ``max_pairs`` pairs within
    ``max_bits`` bits, a < b), "pairs_left_out": how many more pairs it has}``, groups by their first image id.

    Memory grows with the number of images, not pairs: 20,000 equal frames are one flag of 20,000 ids and 20
    pairs (the 199,989,980 others counted). Counting is quadratic in a group's size, about a second for that one.
    """
    from segany.engine.near_dupes import near_duplicate_groups, pairs_within

    out = []
    for group in near_duplicate_groups(hashes, max_bits):
        if len(group) < 2:
            continue
        pairs, total = pairs_within({i: hashes[i] for i in group}, max_bits, limit=max_pairs)
        out.append({"reason": "near_duplicate_images", "image_ids": group,
                    "pairs": [{"image_id": a, "duplicate_of": b, "hash_bits": d} for a, b, d in pairs],
                    "pairs_left_out": total - len(pairs)})
    return out


def build_report(store: Any, project: str | None, out_dir: str | os.PathLike[str], settings: ReportSettings,
                 *, spec: Any = None, log: Callable[[str], None] = lambda m: None, force: bool = False
                 ) -> dict[str, Any]:
    """Write ``index.html``, plots, ``report.json`` and ``flags.json`` to ``out_dir``; with ``settings.demote``
    also send flagged accepted masks to the review queue.

    The folder is written as exports are (:func:`segany.engine.exports.folder_swap`): built beside ``out_dir``
    and swapped in whole, so a failed report leaves the earlier one, and a folder holding other files (a home
    folder's ``index.html``) is refused before anything runs, unless ``force``.

    Args:
        spec: the model to check accepted masks against (:class:`segany.engine.auto.ModelSpec`), or None.
        force: replace ``out_dir``'s contents even when they are not an earlier report.

    Returns:
        ``{"html": path, "flagged": masks flagged, "demoted": masks moved to pending, "report": the report dict}``.
    """
    from segany.engine.db import DatasetVersion
    from segany.engine.exports import check_folder_target, folder_swap
    from segany.engine.near_dupes import cache_from_metas, dhashes_for

    out = Path(out_dir)
    check_out_dir(out)
    proj = store.get_project(project)
    check_folder_target(store, out.resolve(), out, "report", force)  # before --demote changes anything
    # The model is built (its checkpoint read and checked) before the report folder exists: a bad checkpoint
    # fails here and leaves nothing behind.
    sam = spec.build() if spec is not None else None
    pid = proj["id"]
    images = {im["id"]: im for im in store.list_images(pid)}
    live = store.list_annotations(project_id=pid, states=["accepted", "pending"])
    with store.transaction(write=False) as s:
        from sqlalchemy import select

        versions = [(dv.id, dv.name, dict(dv.meta or {}))
                    for dv in s.scalars(select(DatasetVersion).where(DatasetVersion.project_id == pid)
                                        .order_by(DatasetVersion.id))]
    all_by_id = {a["id"]: a for a in store.list_annotations(project_id=pid)}

    # Checks on the live set (what the next dataset version will freeze).
    log(f"checking {len(live)} masks on {len(images)} images")
    # dHashes that dataset versions cached (by image sha256) are not computed again.
    hashes, _, unreadable = dhashes_for({i: (im["sha256"], im["path"]) for i, im in images.items()},
                                        cache_from_metas(meta for _, _, meta in versions))
    for i in unreadable:
        log(f"image {i} ({images[i]['file_name']}) cannot be read; skipped in the near-duplicate check")
    image_flags = near_duplicate_image_flags(hashes, settings.dup_hash_bits)
    empty = [a for a in live if a["area"] == 0]
    live_nonempty = [a for a in live if a["area"] > 0]  # an empty mask has no box to prompt and no IoU
    dup_masks = duplicate_masks(live_nonempty, settings.dup_iou)
    disagree: dict[int, float] = {}
    model_name = None
    if spec is not None:
        accepted = [a for a in live_nonempty if a["review_state"] == "accepted"]
        log(f"model {spec.version_name()} vs {min(len(accepted), settings.max_disagreement)} accepted masks")
        model_name = spec.version_name()
        disagree = disagreement(sam, images, accepted, settings.max_disagreement)

    flags: list[dict[str, Any]] = []
    for aid, iou_v in sorted(disagree.items()):
        if iou_v < settings.disagreement_iou:
            flags.append({"annotation_id": aid, "image_id": all_by_id[aid]["image_id"], "reason": "disagreement",
                          "iou": round(iou_v, 4)})
    for a_id, b_id, iou_v in dup_masks:
        flags.append({"annotation_id": b_id, "image_id": all_by_id[b_id]["image_id"], "reason": "duplicate_mask",
                      "duplicate_of": a_id, "iou": round(iou_v, 4)})
    flags += [{"annotation_id": a["id"], "image_id": a["image_id"], "reason": "empty_mask"} for a in empty]
    flagged = 0
    if settings.demote:
        seen = set()
        for f in flags:
            aid = f["annotation_id"]
            if aid in seen:
                continue
            seen.add(aid)
            if all_by_id[aid]["review_state"] == "accepted":
                store.update_annotation(aid, project_id=pid, review_state="pending")
                flagged += 1

    # Written into a fresh folder beside --out and swapped in whole (see the docstring).
    with folder_swap(store, out, "report", force) as work:
        sections = []
        report: dict[str, Any] = {"project": proj["name"], "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                                  "model": model_name, "versions": [], "flags": flags, "image_flags": image_flags,
                                  "flagged_masks": len({f["annotation_id"] for f in flags}),
                                  "flagged_to_review": flagged}
        sets: list[tuple[str, str, list[dict[str, Any]], Any, Mapping[Any, Any]]] = [
            ("live", "current annotations (accepted + pending)", live, None, images)]
        live_by_uuid = {a["uuid"]: a for a in all_by_id.values()}  # once, not per version
        for vid, name, meta in versions:
            frozen, frozen_images = _version_annotations(store, vid, live_by_uuid)
            sets.append((f"dv{vid}", f"dataset version {name}", frozen, meta, frozen_images))
        for key, title, anns, meta, of_images in sets:
            d = describe(anns, of_images)
            extra = {}
            if key == "live" and disagree:
                extra["model vs annotation IoU"] = list(disagree.values())
            pngs = _plots(key, d, work, extra)
            public = {k: v for k, v in d.items() if not k.startswith("_")}
            meta = {k: v for k, v in (meta or {}).items() if k != DHASH_META_KEY}  # a cache, not a description
            report["versions"].append({"key": key, "title": title, "meta": meta, **public})
            sections.append((title, public, pngs, meta))
        thr = throughput(store.list_annotations(project_id=pid))
        report["throughput"] = thr
        thr_png = _throughput_plot(thr, work)
        _write_json(work / "report.json", report)
        _write_json(work / "flags.json", {"masks": flags, "images": image_flags})
        _write_text(work / "index.html", _html(report, sections, thr_png, settings))
    return {"html": str(out / "index.html"), "flagged": report["flagged_masks"], "demoted": flagged,
            "report": report}


def check_out_dir(out: Path) -> None:
    """Raise :class:`InputError` when ``out`` (or a folder above it) is a file, so it cannot be the report folder."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"--out {str(out)!r} cannot be a folder: {str(p)!r} is a file; pass a folder path")
            return


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1, default=str))


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _html(report: dict[str, Any], sections: list[Any], thr_png: str | None, settings: ReportSettings) -> str:
    e = html.escape
    parts = [f"<!doctype html><meta charset=utf-8><title>segany report: {e(report['project'])}</title>",
             "<style>body{font:14px sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style>",
             f"<h1>Data report: {e(report['project'])}</h1><p>generated {e(report['generated_at'])}; model "
             f"{e(str(report['model']))}; {report['flagged_masks']} masks flagged, {report['flagged_to_review']} "
             "of them sent to the review queue.</p>"]
    for title, d, pngs, meta in sections:
        parts.append(f"<h2>{e(title)}</h2>")
        if meta and meta.get("content_hash"):
            parts.append(f"<p>content hash <code>{e(meta['content_hash'][:16])}</code></p>")
        rows = "".join(f"<tr><th>{e(k)}</th><td>{e(json.dumps(v))}</td></tr>" for k, v in d.items())
        parts.append(f"<table>{rows}</table>")
        parts += [f'<p><img src="{e(p)}" alt="{e(title)}"></p>' for p in pngs]
    parts.append(f"<h2>Review candidates</h2><p>model-vs-annotation IoU below {settings.disagreement_iou}, "
                 f"duplicate masks above IoU {settings.dup_iou}, empty masks:</p><table><tr><th>annotation</th><th>image</th>"
                 "<th>reason</th><th>IoU</th></tr>")
    parts += [f"<tr><td>{f['annotation_id']}</td><td>{f['image_id']}</td><td>{e(f['reason'])}</td>"
              f"<td>{format(f['iou'], '.3f') if 'iou' in f else '-'}</td></tr>" for f in report["flags"][:500]]
    parts.append(f"</table><h2>Near-duplicate images</h2><p>groups of images whose dHash differ in at most "
                 f"{settings.dup_hash_bits} bits, chains included; dataset versions keep each group on one side of "
                 "their split.</p><table><tr><th>images</th><th>image ids</th><th>pairs (dHash bits)</th></tr>")
    for f in report["image_flags"]:
        ids = ", ".join(map(str, f["image_ids"][:20])) + (f" and {len(f['image_ids']) - 20} more"
                                                           if len(f["image_ids"]) > 20 else "")
        pairs = ", ".join(f"{p['image_id']}-{p['duplicate_of']} ({p['hash_bits']})" for p in f["pairs"])
        if f["pairs_left_out"]:
            pairs += f" and {f['pairs_left_out']} more"
        parts.append(f"<tr><td>{len(f['image_ids'])}</td><td>{ids}</td><td>{pairs}</td></tr>")
    parts.append("</table><h2>Annotator throughput</h2><table><tr><th>day</th><th>masks</th><th>s/mask</th></tr>")
    parts += [f"<tr><td>{e(r['day'])}</td><td>{r['masks']}</td><td>{r['seconds_per_mask']}</td></tr>"
              for r in report["throughput"]]
    parts.append("</table>")
    if thr_png:
        parts.append(f'<p><img src="{thr_png}" alt="throughput"></p>')
    return "\n".join(parts)
