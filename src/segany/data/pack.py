"""Pack datasets into one small self-contained folder that travels to a training machine.

Layout::

    <out>/manifest.json.gz     gzipped JSON {"format": "segany-pack-v1", "max_side": 512, "records": [...], "splits": {...}}
    <out>/images/<dataset>/<image_id>.jpg

A dataset whose re-pack was interrupted after it began overwriting JPEGs has no records and is listed
under ``"unfinished"``; every JPEG carries the hash of its source, which readers check against the record's.

Images are resized so their long side is at most ``max_side`` (JPEG, quality ``quality``); masks are
resized to the same grid and stored as COCO RLE in the manifest. Each record carries its split
("train" or "val"), so evaluation uses exactly the held-out images. Reading a pack needs neither
pycocotools nor scipy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segany.atomic import atomic_path, atomic_write, atomic_write_json
from segany.data.formats import held_out_ids
from segany.data.formats.common import (
    IMAGE_FRAMES,
    ImageFrames,
    InstanceRecord,
    ReadReport,
    decode_rle,
    encode_mask,
    image_frames_hw,
    note,
)
from segany.errors import ImageLoadError, InputError
from segany.transforms import preprocess_shape

log = logging.getLogger(__name__)

PACK_FORMAT = "segany-pack-v1"
# Manifest key: datasets whose re-pack started overwriting their JPEGs and did not finish (see _withdraw).
UNFINISHED = "unfinished"


def _resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    import cv2

    if mask.shape == size_hw:
        return mask
    # Area-average then threshold: thin parts survive better than with nearest neighbour.
    small = cv2.resize(mask.astype(np.float32), (size_hw[1], size_hw[0]), interpolation=cv2.INTER_AREA)
    return small >= 0.5


SETTINGS_FILE = ".pack_settings.json"  # what the images were written with; a rerun that matches resumes


def _check_settings(max_side: int, quality: int, max_side_by_dataset: dict[str, int] | None) -> None:
    for name, side in [("max_side (--max-side)", max_side), *((f"max side of {k}", v) for k, v in
                                                              (max_side_by_dataset or {}).items())]:
        if not isinstance(side, int) or side < 32:
            raise InputError(f"{name} must be a whole number of pixels >= 32, got {side!r}; e.g. 512")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InputError(f"quality (--quality) is a JPEG quality from 1 to 100, got {quality!r}; e.g. 80")


def source_digest(path: str | os.PathLike[str]) -> str:
    """A short content hash of a source image: what decides whether a packed JPEG may be kept on a rerun.

    The content, not the image id or path, is the key: a rerun whose ids now name other images (a
    re-exported COCO file, renamed files) must not keep the old JPEGs under those ids.
    """
    from segany.hashing import file_digest

    return file_digest(path, "blake2b", digest_size=16)


def _packed_source(path: Path) -> tuple[str | None, tuple[int, int] | None, str]:
    """(source digest, (H, W), EXIF frame) a packed JPEG was written from and at, read from its header;
    Nones if unknown. The frame is "" for a source without EXIF rotation."""
    try:
        with Image.open(path) as im:
            comment = json.loads(im.info.get("comment", b""))
            size_hw = (im.size[1], im.size[0])
        return str(comment.get("segany_source")), size_hw, str(comment.get("exif_frame", ""))
    except (OSError, ValueError, AttributeError):
        return None, None, ""


def _exif_frame(rec: InstanceRecord) -> str:
    """"stored" when the record's masks are on the file's pixels as stored although it has an EXIF rotation
    (the rotation is then not applied); "shown" when they are on the rotated picture; "" without rotation
    or when unknown (shared datasets: the rotation is applied, as always)."""
    return str(rec.extra.get("exif_frame", ""))


def _write_image(rec: InstanceRecord, target: Path, size_hw: tuple[int, int], quality: int, digest: str) -> None:
    from segany.data.images import load_image

    image = load_image(rec.image_path, apply_exif=_exif_frame(rec) != "stored")
    if image.shape[:2] != tuple(rec.size_hw):
        raise ImageLoadError(f"{rec.image_path}: image is {image.shape[0]}x{image.shape[1]} but its masks are "
                             f"{rec.size_hw[0]}x{rec.size_hw[1]}")
    nh, nw = size_hw
    target.parent.mkdir(parents=True, exist_ok=True)
    small = Image.fromarray(image).resize((nw, nh), Image.BILINEAR)
    # Lets a rerun tell whose pixels these are, and in which frame they were written.
    info: dict[str, str] = {"segany_source": digest}
    if _exif_frame(rec):
        info["exif_frame"] = _exif_frame(rec)
    comment = json.dumps(info).encode()
    atomic_write(target, lambda f: small.save(f, format="JPEG", quality=quality, comment=comment))


_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def packed_file_name(image_id: str) -> str:
    """The packed JPEG's name for an image id: the id itself when it is a plain file name, otherwise a
    sanitized id plus a short hash of the raw id, so an id like ``../../x`` or ``a/b`` never writes outside
    ``images/<dataset>/`` and two ids never share a file."""
    if _SAFE_ID.fullmatch(image_id) and ".." not in image_id:
        return f"{image_id}.jpg"
    plain = re.sub(r"[^A-Za-z0-9_-]+", "_", image_id).strip("_")[:60] or "id"
    return f"{plain}-{hashlib.blake2b(image_id.encode(), digest_size=4).hexdigest()}.jpg"


def _packed_masks(rec: InstanceRecord, size_hw: tuple[int, int], min_area: int) -> dict[str, list[Any]]:
    masks, classes, groups = [], [], []
    for i, rle in enumerate(rec.masks):
        m = _resize_mask(decode_rle(rle), size_hw)
        if m.sum() < min_area:
            continue
        masks.append(encode_mask(m))
        if rec.class_names is not None:
            classes.append(rec.class_names[i])
        if rec.groups is not None:
            groups.append(rec.groups[i])
    return {"masks": masks, "classes": classes, "groups": groups, "dropped": len(rec.masks) - len(masks)}


def pack_records(records: Iterable[tuple[str, InstanceRecord]], out_dir: str | os.PathLike[str], *,
                 max_side: int = 512, quality: int = 80, min_area: int = 16,
                 max_side_by_dataset: dict[str, int] | None = None, progress: Callable[[int], None] | None = None,
                 on_bad: Callable[[str], None] | None = None, manifest_extra: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Write (split, record) pairs into a pack folder; returns the manifest.

    Resumable: images are written atomically, each JPEG remembering the content hash of its source, and a
    rerun into the same folder with the same ``max_side`` and ``quality`` keeps a JPEG only when its source
    is byte-identical and its size is the record's (the manifest is rebuilt; masks come from the sources).
    An image that cannot be read raises, or, with ``on_bad``, is reported there and left out.
    ``manifest_extra`` is merged into the manifest (the split rule of own data). A pack already in
    ``out_dir`` is merged with: the datasets of ``records`` replace their old records (their JPEGs no
    record names any more are deleted), every other dataset stays with its split and split rule. The
    returned dict also says how many images were ``reused`` and which datasets the pack already held
    (``replaced``: packed again now; ``kept``: untouched); those keys are not in the manifest file.
    """
    _check_settings(max_side, quality, max_side_by_dataset)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"pack output {str(out)!r} is an existing file; pass a folder (--out DIR)")
    records = list(records)
    if not records:
        raise InputError(f"nothing to pack into {str(out)!r}: the input has no images")
    (out / "images").mkdir(parents=True, exist_ok=True)
    settings = {"format": PACK_FORMAT, "max_side": max_side, "quality": quality,
                "max_side_by_dataset": dict(sorted((max_side_by_dataset or {}).items()))}
    settings_path = out / SETTINGS_FILE
    try:
        resume = json.loads(settings_path.read_text()) == settings
    except (OSError, ValueError):
        resume = False
    if not resume:
        atomic_write_json(settings_path, settings)
    packed: list[dict[str, Any]] = []
    reused = dropped = 0
    bad: list[str] = []
    names = sorted({rec.dataset for _, rec in records})
    earlier = _existing_manifest(out) or {}  # read before _withdraw below edits it
    held = {r.get("dataset") for r in earlier.get("records", [])} | set(earlier.get(UNFINISHED, []))
    invalidated = False
    for split, rec in records:
        h, w = rec.size_hw
        side = (max_side_by_dataset or {}).get(rec.dataset, max_side)
        nh, nw = preprocess_shape(h, w, side) if max(h, w) > side else (h, w)
        rel = Path("images") / rec.dataset / packed_file_name(rec.image_id)
        try:
            digest = source_digest(rec.image_path)
            if resume and _packed_source(out / rel) == (digest, (nh, nw), _exif_frame(rec)):
                reused += 1
            else:
                if not invalidated:  # before the first JPEG an old record may name is overwritten
                    _withdraw(out, names)
                    invalidated = True
                _write_image(rec, out / rel, (nh, nw), quality, digest)
        except (OSError, ImageLoadError) as exc:
            if on_bad is None:  # the header read passed: damaged pixels (a cut-off JPEG) show only here
                its = "its" if len(names) == 1 else "their"
                withdrawn = (f"; until a pack of {', '.join(names)} finishes, the pack holds none of {its} records"
                             if invalidated else "")
                raise ImageLoadError(f"{rec.image_path}: cannot be packed ({exc}); replace or remove that file, or "
                                     f"pass --skip-bad to pack the rest without it{withdrawn}") from exc
            bad.append(f"{rec.image_path}: {exc}")
            on_bad(bad[-1])
            continue
        kept = _packed_masks(rec, (nh, nw), min_area)
        dropped += kept["dropped"]
        d = InstanceRecord(image_path=rel.as_posix(), size_hw=(nh, nw), masks=kept["masks"],
                           class_names=kept["classes"] if rec.class_names is not None else None,
                           image_id=rec.image_id, dataset=rec.dataset,
                           groups=kept["groups"] if rec.groups is not None else None).to_dict()
        d["split"] = split
        d["source"] = {"file": Path(rec.image_path).name, "blake2b": digest}
        packed.append(d)
        if progress:
            progress(1)
    if not packed:
        raise InputError(f"none of the {len(records)} images could be packed; the first: {bad[0]}")
    manifest = _merged(_existing_manifest(out), packed, {"format": PACK_FORMAT, "max_side": max_side,
                                                         **(manifest_extra or {})})
    _write_manifest(out, manifest)
    _remove_orphans(out, packed)
    return {**manifest, "reused": reused, "dropped_small": dropped, "replaced": sorted(held & set(names)),
            "kept": sorted(held - set(names) - {None})}


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest already in ``out``, or None when there is none (or it is unreadable, so nothing to keep)."""
    path = out / "manifest.json.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        log.warning("%s: unreadable (%s); it is replaced", path, exc)
        return None
    return old if isinstance(old, dict) and old.get("format") == PACK_FORMAT else None


def _merged(old: dict[str, Any] | None, packed: list[dict[str, Any]], head: dict[str, Any]) -> dict[str, Any]:
    """The new manifest: the datasets just packed replace their own records; every other dataset already in
    the pack stays, with its split and split rule, so packing your data beside the shared data (or a second
    dataset beside a first) adds to the pack instead of silently replacing it. Datasets another interrupted
    pack left unfinished stay marked so."""
    names = {r["dataset"] for r in packed}
    kept = [r for r in (old or {}).get("records", []) if r.get("dataset") not in names]
    rules = {k: v for k, v in (old or {}).get("split_rule", {}).items() if k not in names}
    rules.update(head.get("split_rule", {}))
    unfinished = sorted(set((old or {}).get(UNFINISHED, [])) - names)
    records = kept + packed
    manifest = {**head, "records": records, "splits": _split_summary(records)}
    if rules:
        manifest["split_rule"] = rules
    if unfinished:
        manifest[UNFINISHED] = unfinished
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    with atomic_path(out / "manifest.json.gz") as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(manifest, f, separators=(",", ":"))  # RLE strings gzip to about a third


def _withdraw(out: Path, names: list[str]) -> None:
    """Take the records of datasets ``names`` out of the pack's manifest (atomically) and mark them unfinished.

    Runs before the first packed JPEG is overwritten: image ids become file names, so a re-pack whose ids
    now name other images writes new pixels under the names the old records point at. Were the pack killed
    midway, the old manifest would pair old masks with new images. Withdrawn first, an interrupted pack
    leaves those datasets out of the pack (readers name the rerun that finishes them) instead.
    """
    old = _existing_manifest(out)
    if old is None:
        return
    wanted = set(names)
    if not any(r.get("dataset") in wanted for r in old.get("records", [])) and wanted <= set(old.get(UNFINISHED, [])):
        return
    records = [r for r in old.get("records", []) if r.get("dataset") not in wanted]
    rules = {k: v for k, v in old.get("split_rule", {}).items() if k not in wanted}
    manifest = {**old, "records": records, "splits": _split_summary(records),
                UNFINISHED: sorted(set(old.get(UNFINISHED, [])) | wanted)}
    manifest.pop("split_rule", None)
    if rules:
        manifest["split_rule"] = rules
    _write_manifest(out, manifest)


def _remove_orphans(out: Path, packed: list[dict[str, Any]]) -> None:
    """Delete the JPEGs of the datasets just packed that no record names any more (images that were
    dropped from the dataset, or renamed), so a replaced dataset leaves no stale files behind."""
    used = {(out / r["image_path"]).resolve() for r in packed}
    for name in sorted({r["dataset"] for r in packed}):
        folder = out / "images" / name
        if not folder.is_dir():
            continue
        for f in folder.rglob("*.jpg"):
            if f.is_file() and f.resolve() not in used:
                f.unlink()


OWN_FORMATS = ("coco", "yolo", "masks", "sa1b")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_own(*, coco: str | None = None, yolo: str | None = None, masks: str | None = None,
             images: str | None = None, name: str = "own", split: str | None = None,
             categories: list[str] | None = None, report: ReadReport | None = None,
             sa1b: str | None = None) -> list[InstanceRecord]:
    """Records of a user's own dataset: a COCO instances JSON, a YOLO-seg folder, per-object PNG masks or a
    folder of per-image SA-1B JSONs (SA-1B's own, or ``segany auto``'s).

    Exactly one of ``coco``, ``yolo``, ``masks``, ``sa1b`` is given; ``images`` is the image folder (COCO:
    defaults to the JSON's folder; masks: required; SA-1B: default each image beside its JSON). Refuses an
    input that yields no object, saying what it looked for and what it found there (empty masks, empty
    label files, images without annotations).
    """
    from segany.data.formats import read_coco, read_object_masks, read_yolo_seg
    from segany.data.formats.sa1b import read_sa1b_folder

    given = [k for k, v in (("--coco", coco), ("--yolo", yolo), ("--masks", masks), ("--sa1b", sa1b))
             if v is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one input, --coco FILE, --yolo DIR, --masks DIR (with --images DIR) or "
                         f"--sa1b DIR; got {', '.join(given) or 'none'}")
    if not _NAME_RE.fullmatch(name):
        raise InputError(f"--name {name!r} names a folder of the pack; use letters, digits, '_', '-' or '.', "
                         "e.g. --name parts")
    if name == "all":  # segany eval's row for every dataset together
        raise InputError("--name 'all' is the name of segany eval's row for every dataset together, so this data "
                         "would have no row of its own; pick another name, e.g. --name mine")
    if categories is not None and (masks is not None or sa1b is not None):
        raise InputError(f"--categories filters class names, which {given[0]} data has none of; leave it out")
    if split is not None and yolo is None:
        raise InputError("--split picks a YOLO split folder (images/<split>/); it only goes with --yolo")
    if coco is not None:
        try:
            recs = read_coco(coco, images, dataset=name, categories=categories, report=report)
        except InputError as exc:
            _refuse_sa1b_as_coco(coco, images, exc)
            raise
        looked = f"images listed in {coco} (files under {images or Path(coco).parent})"
    elif yolo is not None:
        if images is not None:
            raise InputError("--images does not go with --yolo: a YOLO-seg folder holds its own images/ and labels/")
        recs = read_yolo_seg(yolo, split, dataset=name, categories=categories, report=report)
        looked = f"images under {Path(yolo) / 'images' / (split or '*')} with labels under {Path(yolo) / 'labels'}"
    elif sa1b is not None:
        recs = read_sa1b_folder(sa1b, images, dataset=name, report=report)
        looked = f"the SA-1B files in {sa1b} and their images ({f'under {images}' if images else 'beside them'})"
    else:
        if images is None:
            raise InputError("--masks needs --images DIR, the folder of the images the masks belong to")
        recs = read_object_masks(images, masks, dataset=name, report=report)
        looked = f"images in {images} with a mask folder {masks}/<image stem>/*.png"
    if not any(r.masks for r in recs):
        what = f" of categories {', '.join(categories)}" if categories else ""
        skipped = report.skipped if report is not None else {}
        if skipped:  # the annotations were found: say why none of them is an object, not to check the paths
            from segany.data.formats.coco import SKIP_REASONS

            why = "; ".join(f"{n} {SKIP_REASONS.get(k, k)}" for k, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
            fixes = ([("regenerate the files (every mask empty)" if sa1b is not None
                       else "export the annotations with segmentation polygons or RLE")]
                     if set(skipped) - {"crowd"} else [])
            if "crowd" in skipped:
                fixes.append("crowd regions are never packed: outline each object on its own (iscrowd 0)")
            raise InputError(f"found no objects{what} to pack in {coco or yolo or masks or sa1b}: of its "
                             f"annotations, {why}; {' and '.join(fixes)}")
        if not recs:
            raise InputError(f"found no objects{what}: looked for {looked} and found no image; check the paths "
                             "(see `segany data pack --help` for each layout)")
        raise InputError(f"found no objects{what}: " + _why_no_objects(recs, coco=coco, yolo=yolo, masks=masks,
                                                                       sa1b=sa1b, what=what))
    return recs


def _refuse_sa1b_as_coco(coco: str, images: str | None, exc: InputError) -> None:
    """Say to use --sa1b when a file (or folder) given to --coco holds SA-1B files, which read_coco refused.

    Checked only once read_coco has failed, so a real COCO file is never read twice."""
    from segany.data.formats.sa1b import looks_like_sa1b

    if not looks_like_sa1b(coco):
        return
    folder = coco if Path(coco).is_dir() else str(Path(coco).parent)
    with_images = f" --images {images}" if images is not None else ""
    what = "a folder of SA-1B files" if Path(coco).is_dir() else "an SA-1B file (one image's 'image' and 'annotations')"
    raise InputError(f"{coco} is {what}, as SA-1B and `segany auto` write, not a COCO instances file; pack SA-1B "
                     f"files with --sa1b DIR, the folder of the .json files: --sa1b {folder}{with_images}") from exc


def _why_no_objects(recs: list[InstanceRecord], *, coco: str | None, yolo: str | None, masks: str | None,
                    sa1b: str | None, what: str) -> str:
    """What was found where objects were looked for, when the images were found but none has an object: the
    paths are right, the annotations are empty (black mask PNGs, empty label files, no annotations)."""
    n = len(recs)
    if masks is not None:
        pngs = sum(1 for r in recs for p in (Path(masks) / r.image_id).iterdir() if p.suffix.lower() == ".png")
        if not pngs:
            return (f"the mask folders of the {n} image(s) ({masks}/<image stem>/) hold no .png file; put one PNG "
                    "per object there")
        return (f"the {n} image(s) have mask folders, but all {pngs} mask PNG(s) in them are empty (black or "
                f"transparent everywhere), so the paths are right and the masks are blank; draw each object in a "
                "nonzero colour on black (e.g. white, or 1 for 0/1 masks), one PNG per object")
    if yolo is not None:
        missing = empty = other = 0
        for r in recs:
            lbl = Path(yolo) / "labels" / str(r.extra.get("yolo_split", "")) / f"{Path(r.image_path).stem}.txt"
            if not lbl.is_file():
                missing += 1
            elif not lbl.read_text(encoding="utf-8", errors="replace").strip():
                empty += 1
            else:
                other += 1
        parts = [f"{k} {words}" for k, words in (
            (empty, "have an empty label file"),
            (missing, f"have no label file {Path(yolo) / 'labels'}/<split>/<image stem>.txt"),
            (other, f"have labels but no polygon{what} with an area")) if k]
        fix = ("check the paths: each image's labels are labels/<split>/<image stem>.txt beside images/<split>/"
               if missing == n else "label the objects, one line `class x1 y1 x2 y2 ...` per object")
        return f"of the {n} image(s) under {Path(yolo) / 'images'}, {', '.join(parts)}; {fix}"
    if sa1b is not None:
        return (f"the {n} SA-1B file(s) in {sa1b} have no annotations; segment the images first (`segany auto`) "
                "or check that this is the folder you meant")
    return (f"none of the {n} image(s) listed in {coco} has an annotation{what}; add annotations with "
            "segmentation polygons or RLE, or check that this is the file you meant")


def pack_own(out_dir: str | os.PathLike[str], *, coco: str | None = None, yolo: str | None = None,
             masks: str | None = None, images: str | None = None, name: str = "own", split: str | None = None,
             categories: list[str] | None = None, val_fraction: float = 0.1, seed: int = 0,
             skip_bad: bool = False, max_side: int = 512, quality: int = 80,
             progress: Callable[[int], None] | None = None, sa1b: str | None = None) -> dict[str, Any]:
    """Pack a user's own dataset with a seeded held-out split; returns the manifest plus its ``report``.

    About ``val_fraction`` of the images (at least one when there are two or more) become the "val" split
    ``segany eval`` uses, each picked by a seeded hash of its own id so adding images later never moves an
    old one across; training uses the rest. A YOLO folder's own val/ folder is kept as the split instead.
    The rule is kept in the manifest (``split_rule``) so the split can be told and remade. Unusable images
    (unreadable, or of another size than their annotations) are refused all at once, listed, before
    anything is written; with ``skip_bad`` they are left out and listed in ``report.bad``. Packing into a
    folder that holds a pack replaces dataset ``name`` there and keeps the others.
    """
    _check_settings(max_side, quality, None)
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}; e.g. 0.1 holds out a tenth")
    report = ReadReport()
    recs = _readable(read_own(coco=coco, yolo=yolo, masks=masks, images=images, name=name, split=split,
                              categories=categories, report=report, sa1b=sa1b), report)
    if not recs:
        hint = ""
        if sa1b is not None and all(b.endswith(": file not found") for b in report.bad):
            hint = ("; an SA-1B file's image is DIR/file_name with --images DIR (for `segany auto` output: the "
                    "folder it read), else the file of that name beside the JSON: pass --images")
        raise InputError(_bad_summary(report.bad) + "; nothing usable is left to pack" + hint)
    recs = _with_objects(recs, report, categories)
    if report.bad and not skip_bad:
        raise InputError(_bad_summary(report.bad) + "; fix or remove them, or pass --skip-bad to pack the rest")
    pairs, rule = _split(recs, name, val_fraction, seed, report)
    manifest = pack_records(pairs, out_dir, max_side=max_side, quality=quality, progress=progress,
                            on_bad=report.bad.append if skip_bad else None, manifest_extra={"split_rule": {name: rule}})
    return {**manifest, "report": report}


# A YOLO folder's split folders with these names hold its held-out images (Ultralytics: val, often test).
YOLO_HELD_OUT = ("val", "valid", "validation", "test")


def _split(recs: list[InstanceRecord], name: str, val_fraction: float, seed: int, report: ReadReport
           ) -> tuple[list[tuple[str, InstanceRecord]], dict[str, Any]]:
    """(split, record) pairs and the rule that made them.

    A YOLO folder with a held-out split folder (val/, valid/, test/) beside others keeps it: those images
    are "val" and ``val_fraction`` is not applied, so the user's own validation images never end up in
    training. Otherwise the seeded per-id hash split of ``held_out_ids``.
    """
    folders = {str(r.extra["yolo_split"]) for r in recs if "yolo_split" in r.extra}
    held_folders = sorted(f for f in folders if f.lower() in YOLO_HELD_OUT)
    if held_folders and folders - set(held_folders):
        pairs = [("val" if str(r.extra.get("yolo_split")).lower() in YOLO_HELD_OUT else "train", r) for r in recs]
        note(report, f"{name}: kept the YOLO split folders: {', '.join(f + '/' for f in held_folders)} is the "
                     f"held-out val split, the rest is train (--val-fraction is not applied; pass --split NAME "
                     "to pack one folder and split it by --val-fraction instead)")
        rule: dict[str, Any] = {"val_folders": held_folders}
    else:
        held = set(held_out_ids(name, [r.image_id for r in recs], fraction=val_fraction, seed=seed))
        pairs = [("val" if r.image_id in held else "train", r) for r in recs]
        rule = {"val_fraction": val_fraction, "seed": seed}
    if not any(sp == "val" for sp, _ in pairs):
        why = "--val-fraction is 0" if val_fraction == 0 else f"it has {len(recs)} image(s)"
        note(report, f"{name} has no val image ({why}), so `segany eval` has nothing of it to evaluate; to hold "
                     "some out, pack at least 2 images with --val-fraction 0.1 (or more)")
    return pairs, rule


def _readable(recs: list[InstanceRecord], report: ReadReport) -> list[InstanceRecord]:
    """The records whose image file opens at the size the annotations say; the rest go to ``report.bad``.

    Header reads only, so every bad file (a size mismatch included) is found and listed before any image
    is written. An image with an EXIF rotation is matched in both frames: annotations of its stored pixels
    (what most labelers draw on, and the rule when both fit: a square image) pack it unrotated; annotations
    of the rotated picture pack it rotated. Either way masks and pixels agree. Sets ``extra["exif_frame"]``,
    unless the reader already knew the frame (YOLO labels are always on the shown picture): then only that
    frame's size is accepted.
    """
    good = []
    unrotated: list[str] = []
    for r in recs:
        frames = _image_frames(r, report)
        if frames is None:
            continue
        stored, shown, orientation = frames
        size_hw = tuple(r.size_hw)
        known = r.extra.get("exif_frame")
        if known in ("stored", "shown") and orientation != 1:
            expected = stored if known == "stored" else shown
            if size_hw != expected:
                report.bad.append(f"{r.image_path}: image is {expected[0]}x{expected[1]} as {known} but its "
                                  f"annotations say {r.size_hw[0]}x{r.size_hw[1]}")
                continue
            good.append(r)
            continue
        if size_hw not in (stored, shown):
            turned = f" ({shown[0]}x{shown[1]} as its EXIF rotation shows it)" if shown != stored else ""
            report.bad.append(f"{r.image_path}: image is {stored[0]}x{stored[1]}{turned} but its annotations say "
                              f"{r.size_hw[0]}x{r.size_hw[1]}")
            continue
        if orientation != 1:
            r.extra["exif_frame"] = "stored" if size_hw == stored else "shown"
            if size_hw == stored:
                unrotated.append(Path(r.image_path).name)
        good.append(r)
    if unrotated:
        note(report, f"{len(unrotated)} image(s) carry an EXIF orientation but their annotations fit the pixels as "
                     f"stored (e.g. {unrotated[0]}); packed without that rotation, so masks stay on their pixels")
    return good


def _image_frames(r: InstanceRecord, report: ReadReport) -> ImageFrames | None:
    """The record's image frames as :func:`image_frames_hw` reads them, None (reported) when unreadable.

    Taken from ``extra[IMAGE_FRAMES]`` when the reader already opened the header (SA-1B for its EXIF tag,
    YOLO and per-object masks for the image's size), so each image's header is read once; the entry is used
    up, so a later check reads the file afresh.
    """
    known = r.extra.pop(IMAGE_FRAMES, None)
    if known is None:
        return image_frames_hw(Path(r.image_path), report)
    if isinstance(known, str):  # why the reader could not read it
        report.bad.append(known)
        return None
    return known


def _with_objects(recs: list[InstanceRecord], report: ReadReport, categories: list[str] | None
                  ) -> list[InstanceRecord]:
    """Leave out images without objects: they teach SAM nothing and have nothing to evaluate (counted)."""
    empty = [r.image_id for r in recs if not r.masks]
    if empty:
        what = f" of {', '.join(categories)}" if categories else ""
        note(report, f"{len(empty)} image(s) have no objects{what} (e.g. {empty[0]!r}); left out")
    return [r for r in recs if r.masks]


def _bad_summary(bad: list[str], show: int = 5) -> str:
    more = f" (and {len(bad) - show} more)" if len(bad) > show else ""
    return f"{len(bad)} image(s) cannot be used: " + "; ".join(bad[:show]) + more


def _split_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    summary: dict[str, dict[str, list[str]]] = {}
    for r in records:
        summary.setdefault(r["dataset"], {"train": [], "val": []})[r["split"]].append(r["image_id"])
    return summary


def pack_shared(data_root: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                datasets: Iterable[str] = ("coco128", "pennfudan", "kvasir", "bsds"), max_side: int = 512,
                quality: int = 80, max_side_by_dataset: dict[str, int] | None = None, bsds_annotators: int = 3, limit: int | None = None,
                progress: Callable[[int], None] | None = None, on_bad: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Pack the shared datasets (``../shared/data``) with their train/held-out splits; ``on_bad`` as in
    :func:`pack_records` (`--skip-bad`)."""
    from segany.data.formats import SHARED_DATASETS, SHARED_DIRS, read_shared

    datasets = list(datasets)
    if limit is not None and limit < 1:
        raise InputError(f"limit (--limit) must be at least 1 image per dataset, got {limit}")
    if max_side_by_dataset is None:
        # Kvasir is 60% of the images; its smooth endoscopy frames lose little at 384 px, and that keeps
        # the whole pack under the 45 MB that can travel to a GPU machine.
        max_side_by_dataset = {"kvasir": min(384, max_side)} if isinstance(max_side, int) else {}
    _check_settings(max_side, quality, max_side_by_dataset)
    root = Path(data_root)
    if root.is_file():
        raise InputError(f"--data {str(root)!r} is a file; --data is the shared data folder. To pack your own "
                         "data pass --coco FILE (a COCO json, with --images DIR), --yolo DIR, --masks DIR or --sa1b DIR")
    if not root.is_dir():
        raise InputError(f"data folder {str(root)!r} does not exist; pass the shared data folder (--data DIR) "
                         f"holding {', '.join(f'{d}/' for d in SHARED_DIRS.values())}")
    if not datasets:
        raise InputError(f"no datasets to pack; name some of {', '.join(SHARED_DATASETS)} (--datasets)")
    for name in datasets:
        if name not in SHARED_DIRS:
            raise InputError(f"unknown dataset {name!r} (--datasets); choose from {', '.join(SHARED_DATASETS)}, "
                             "or pack your own data with --coco FILE, --yolo DIR, --masks DIR or --sa1b DIR")
        if not (root / SHARED_DIRS[name]).is_dir():
            raise InputError(f"{name}: {str(root / SHARED_DIRS[name])!r} not found; pass the shared data folder "
                             f"(--data DIR) or leave {name} out of --datasets")
    pairs: list[tuple[str, InstanceRecord]] = []
    for name in datasets:
        splits = read_shared(name, data_root, limit=limit)
        for split, recs in splits.items():
            for r in recs:
                if name == "bsds" and r.groups is not None:  # keep a few annotators: the pack must stay small
                    keep = [i for i, g in enumerate(r.groups) if g < bsds_annotators]
                    r.masks = [r.masks[i] for i in keep]
                    r.groups = [r.groups[i] for i in keep]
                pairs.append((split, r))
    log.info("packing %d images", len(pairs))
    return pack_records(pairs, out_dir, max_side=max_side, quality=quality, progress=progress,
                        max_side_by_dataset=max_side_by_dataset, on_bad=on_bad)


def pack_datasets(pack_dir: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(the datasets a pack holds records of, those an interrupted or stopped re-pack left without records), from
    one read of its manifest alone (no record or image is checked); ([], []) without a readable manifest."""
    manifest = _existing_manifest(Path(pack_dir)) or {}
    return (sorted({str(d.get("dataset", "")) for d in manifest.get("records", [])}),
            sorted(manifest.get(UNFINISHED, [])))


def load_pack(pack_dir: str | os.PathLike[str], split: str | None = None, datasets: Iterable[str] | None = None
              ) -> list[InstanceRecord]:
    """Records of a pack (optionally one split and some datasets), image paths made absolute."""
    root = Path(pack_dir)
    path = root / "manifest.json.gz"
    if not path.exists():
        raise InputError(f"{str(root)!r} is not a segany pack (no manifest.json.gz); create one with "
                         "`segany data pack --out DIR` or scripts/pack_data.py")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != PACK_FORMAT:
        raise InputError(f"{str(path)!r} has format {manifest.get('format')!r}, expected {PACK_FORMAT!r}")
    wanted = set(datasets) if datasets is not None else None
    have = sorted({str(d.get("dataset", "")) for d in manifest["records"]})
    # Asked for by name, or by asking for the whole pack: it would silently be the pack without them (an eval's
    # "all" row of other datasets, a training run on less data). Left out by name, the rest may be read.
    unfinished = set(manifest.get(UNFINISHED, []))
    unfinished = sorted(unfinished & wanted if wanted is not None else unfinished)
    if unfinished:
        rest = [d for d in have if d not in unfinished]
        others = (f", or ask for the others alone (eval: --datasets {','.join(rest)}, or --eval-datasets for "
                  f"engine retrain; training: "
                  f"-o data.datasets=[{','.join(rest)}])" if rest and wanted is None else "")
        raise InputError(f"dataset(s) {', '.join(unfinished)} of the pack {str(root)!r} were being packed again "
                         "when that stopped (interrupted, or an image could not be packed), so the pack holds no "
                         f"records of them; rerun the same `segany data pack` command to finish it{others}")
    if wanted is not None and not wanted & set(have):
        raise InputError(f"unknown dataset(s) {', '.join(map(repr, sorted(wanted)))} for the pack {str(root)!r}, "
                         f"which holds {', '.join(have) or 'nothing'}; ask for those (training: "
                         f"-o data.datasets=[{','.join(have)}]; eval: --datasets {','.join(have)})")
    out = []
    for d in manifest["records"]:
        if split is not None and d["split"] != split:
            continue
        if wanted is not None and d["dataset"] not in wanted:
            continue
        out.append(InstanceRecord.from_dict(d, root))
        _check_packed_image(d, root)
    return out


def _check_packed_image(d: dict[str, Any], root: Path) -> None:
    """Refuse a record whose JPEG was written from another source image than its masks were.

    Each packed JPEG carries the hash of its source in its header and each record the hash it was packed
    from; they differ when the JPEG was overwritten after the record was written (a pack of other data into
    this folder that was interrupted, or files copied over by hand). Masks on such an image would train or
    score the wrong object. A header read only: well under a millisecond per image.
    """
    want = (d.get("source") or {}).get("blake2b")
    if not want:  # records written before packs kept their source hash
        return
    path = root / str(d["image_path"])
    got, size_hw, _ = _packed_source(path)
    if got != want or (size_hw is not None and list(size_hw) != list(d["size_hw"])):
        why = "is missing" if not path.exists() else "was written from another image than its masks"
        raise InputError(f"{path} {why} (dataset {d.get('dataset')!r}, image {d.get('image_id')!r}): the pack is "
                         "stale or was edited; rerun the `segany data pack` command that made it, or pack into a "
                         "new --out folder")
