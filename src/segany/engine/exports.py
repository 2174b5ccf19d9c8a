"""Exports of the store (SA-1B JSON, COCO with RLE or polygons, YOLO-seg, PNG masks) and COCO import.

Only accepted annotations are exported unless ``states`` says otherwise: pending stage-2 proposals
and rejected masks stay in the store for review and retraining, not in a released dataset.

Polygons keep holes. COCO and YOLO polygons have no hole syntax, and pycocotools unions the
polygons of one object, so a hole written as its own polygon would be filled in. Instead each
outer contour is joined to each of its holes by a zero-width cut ("keyhole"): the single polygon
that results fills with the even-odd rule, which is how pycocotools (and OpenCV's fillPoly)
rasterise, so the hole comes back.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid as uuid_lib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from segany.atomic import atomic_write, atomic_write_json, atomic_write_text, current_umask
from segany.engine.db import Annotation as AnnotationModel
from segany.engine.db import Image as ImageModel
from segany.engine.masks import decode_rle, normalize_rle, rle_area_bbox
from segany.engine.store import (
    ImageRow,
    Store,
    bad_images_message,
    check_finite,
    check_seconds,
    label_name,
    read_image_files,
)
from segany.errors import InputError


def _write_json(path: Path, data: Any) -> Path:
    return atomic_write_json(path, data)


def _stems(images: Sequence[dict[str, Any]]) -> dict[int, str]:
    """Per image, the name its per-image files get: the file's stem, or ``<stem>-<image id>`` where two
    images share a stem (``x.jpg`` and ``x.png``, or ``a/x.jpg`` and ``b/x.jpg``), so neither overwrites
    the other's file.

    Names are compared case-folded (``X.jpg`` and ``x.png`` clash on macOS and Windows), and a renamed stem
    must be free too: ``a-3.png`` beside ``a.jpg`` and ``a.png`` (id 3) would otherwise both become ``a-3``,
    and the second image was written through the first one's hard link, into the user's own file.
    """
    stems = {im["id"]: Path(im["file_name"]).stem for im in sorted(images, key=lambda im: im["id"])}
    count = Counter(stem.casefold() for stem in stems.values())
    names = {i: stem for i, stem in stems.items() if count[stem.casefold()] == 1}
    taken = {stem.casefold() for stem in names.values()}
    for i, stem in stems.items():
        if i in names:
            continue
        name, k = f"{stem}-{i}", 1
        while name.casefold() in taken:
            k += 1
            name = f"{stem}-{i}-{k}"
        names[i] = name
        taken.add(name.casefold())
    return names


def coco_file_names(images: Sequence[dict[str, Any]]) -> dict[int, str]:
    """Per image, the ``file_name`` a COCO file gives it: its own name where no other image of the file has it,
    else the shortest end of its path that no other image of that name ends with (``a/img.jpg`` and
    ``b/img.jpg``).

    Why: an import finds each image by that name, and two images named ``img.jpg`` from two folders put the
    second picture's masks on the first (or refused to import, when their sizes differed). Paths that end alike
    all the way get ``<stem>-<image id><suffix>``, as :func:`_stems` names per-image files. Linear in the
    images (folders of video frames share every name).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for im in images:
        groups.setdefault(im["file_name"], []).append(im)
    names: dict[int, str] = {}
    for name, group in groups.items():
        if len(group) == 1:
            names[group[0]["id"]] = name
            continue
        parts = {im["id"]: Path(im["path"] or name).as_posix().split("/") for im in group}
        left = [im["id"] for im in group]
        for k in range(2, max(len(v) for v in parts.values()) + 1):
            ends = Counter("/".join(parts[i][-k:]) for i in left)
            for i in left:
                end = "/".join(parts[i][-k:])
                if ends[end] == 1 and len(parts[i]) >= k:
                    names[i] = end
            left = [i for i in left if i not in names]
            if not left:
                break
        for i in left:
            names[i] = f"{Path(name).stem}-{i}{Path(name).suffix}"
    return names


# ------------------------------------------------------------------------------------- targets
# Marks a folder as a segany export, so the next export may replace it. JSON inside, but no .json suffix:
# SA-1B readers take every *.json of the folder as an image's annotations. It lists the files the export wrote,
# so a re-export can tell them from files the user added since (notes, training runs, caches).
EXPORT_MARKER = ".segany-export"

# What exports written before the marker listed its files hold, per format (relative paths, one glob per part).
_LEGACY_LAYOUT = {"sa1b": ("*.json",), "yolo": ("data.yaml", "images/*", "labels/*.txt"),
                  "png": ("index.json", "*/*.png"), "report": ("index.html", "report.json", "flags.json", "*.png")}
# Outputs written before they carried a marker at all (`engine report`): a folder holding this file and nothing
# outside the format's layout is taken for an earlier one, so a weekly report into one folder goes on working.
_UNMARKED_SIGNATURE = {"report": "report.json"}
COCO_EXPORT_DESCRIPTION = "exported by segany"


def _store_files(store: Store) -> list[Path]:
    """The SQLite database file and its journal files (none for a server database)."""
    url = store.engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return []
    db = Path(url.database).resolve()
    return [db] + [db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal")]


def _image_paths(store: Store) -> list[str]:
    """Every registered image's path, in all projects of the store (an export must not delete any of them)."""
    with store.transaction(write=False) as s:
        return list(s.scalars(select(ImageModel.path)))


def _image_dirs(store: Store) -> dict[Path, str]:
    """The folders holding the store's registered images (resolved), each with one image's path for messages."""
    dirs: dict[str, str] = {}
    for path in _image_paths(store):
        dirs.setdefault(os.path.dirname(path), path)
    return {Path(d).resolve(): example for d, example in dirs.items()}


def _media_dirs(store: Store) -> list[Path]:
    return [Path(p["media_dir"]).resolve() for p in store.list_projects() if p.get("media_dir")]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_project_data_folder(store: Store, target: Path, shown: Path, noun: str = "export") -> None:
    """Refuse (even with --force) a folder target whose replacement would delete the store, its media folder or
    registered images, or the folder this process runs in (which cannot be renamed). ``noun`` names what is
    written: ``export`` or ``report``, also the example folder's name."""
    fix = "pass a folder outside the project's data, such as"
    for f in _store_files(store):
        if _within(f, target):
            raise InputError(f"{shown} holds the project's database {f}; replacing it would delete the project "
                             f"(--force does not override this); {fix} {target.parent / noun}")
    for media in _media_dirs(store):
        if _within(target, media) or _within(media, target):
            raise InputError(f"{shown} is, holds or is inside the project's media folder {media}; replacing it "
                             f"would delete the project's images (--force does not override this); {fix} "
                             f"{media.parent.parent / noun}")
    for folder, example in _image_dirs(store).items():
        if _within(folder, target):
            raise InputError(f"{shown} holds images registered in the project (e.g. {example}); replacing it "
                             f"would delete them (--force does not override this); {fix} {target / noun}")
    if _within(Path.cwd().resolve(), target):
        raise InputError(f"{shown} is the current folder or holds it, which the {noun} cannot replace; pass a new "
                         f"subfolder such as {shown / noun}")


def _refuse_project_data_file(store: Store, target: Path, shown: Path) -> None:
    """Refuse (even with --force) a file target that is the store's database or a registered image."""
    if target in _store_files(store):
        raise InputError(f"{shown} is the project's database; writing the export there would destroy the project "
                         "(--force does not override this); pass another file name such as annotations.json")
    if any(Path(p).name == target.name and Path(p).parent.resolve() == target.parent for p in _image_paths(store)):
        raise InputError(f"{shown} is an image registered in the project; writing the export there would destroy "
                         "it (--force does not override this); pass another file name such as annotations.json")


def _same_file(a: Path, b: str) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def is_segany_coco(path: Path, description: str = COCO_EXPORT_DESCRIPTION) -> bool:
    """Whether ``path`` is a COCO file segany wrote: it starts with an ``info`` block whose description begins
    with ``description`` (read from the head only, so a large file is not parsed just to be replaced)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return re.match(r'\A\s*\{\s*"info"\s*:\s*\{\s*"description"\s*:\s*"' + re.escape(description), head) is not None


def _check_file_target(store: Store, project_id: int, path: Path, what: str, force: bool = False) -> None:
    """Refuse a folder; the database, a registered image, or a file the project imported annotations from,
    always (that file is the source data: what the project did not import from it would be lost, so the export
    goes beside it); any other existing file that is not an earlier segany export unless ``force``."""
    if path.is_dir():
        raise InputError(f"{path} is a folder; the {what} export writes one file: pass a file name such as "
                         f"{path / 'annotations.json'}")
    if not path.exists():
        return
    target = path.resolve()
    _refuse_project_data_file(store, target, path)
    if _earlier_imports(store, project_id, target):  # annotations were imported from this very file
        raise InputError(f"{path} is the file this project imported annotations from; the export would replace "
                         "the source data (--force does not override this); pass another file name")
    if not force and not is_segany_coco(target):
        raise InputError(f"{path} exists and is not a segany COCO export; pass a new file name, or --force to "
                         "replace it")


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The export marker's content, ``{}`` for an unreadable marker, None where there is none."""
    marker = folder / EXPORT_MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _files_under(folder: Path) -> list[str]:
    """Every file (and link) under ``folder``, as sorted relative POSIX paths; folders themselves are not listed."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / n).as_posix() for n in files]
        out += [(rel / n).as_posix() for n in dirs if os.path.islink(os.path.join(root, n))]
    return sorted(out)


def _matches_layout(rel: str, patterns: Sequence[str]) -> bool:
    parts = rel.split("/")
    return any(len(parts) == len(p.split("/")) and all(fnmatch.fnmatchcase(a, b) for a, b in
                                                       zip(parts, p.split("/"), strict=True)) for p in patterns)


def _foreign_files(folder: Path, marker: dict[str, Any]) -> list[str]:
    """Files in an earlier export folder that the export did not write (per its marker's file list, or for an
    export older than that list, the files outside its format's layout)."""
    on_disk = [f for f in _files_under(folder) if f != EXPORT_MARKER]
    listed = marker.get("files")
    if isinstance(listed, list):
        own = {str(f) for f in listed}
        return [f for f in on_disk if f not in own]
    layout = _LEGACY_LAYOUT.get(str(marker.get("format")), ())
    return [f for f in on_disk if not _matches_layout(f, layout)]


def _unmarked_earlier_output(folder: Path, what: str) -> bool:
    """Whether ``folder`` is a ``what`` output written before such outputs carried a marker."""
    signature = _UNMARKED_SIGNATURE.get(what)
    return signature is not None and (folder / signature).is_file() and not _foreign_files(folder, {"format": what})


def check_folder_target(store: Store, target: Path, shown: Path, what: str, force: bool = False) -> None:
    """Refuse a file; the project's data (always); a non-empty folder that is not an earlier segany export, or an
    earlier export the user added files to (the swap would delete them), unless ``force``."""
    noun = "report" if what == "report" else "export"  # `engine report` writes its folder through here too
    if target.exists() and not target.is_dir():
        label = noun if noun == "report" else f"{what} export"
        raise InputError(f"{shown} is a file; the {label} writes a folder: pass a folder name")
    _refuse_project_data_folder(store, target, shown, noun)
    if not target.is_dir() or force:
        return
    marker = _read_marker(target)
    if marker is None and _unmarked_earlier_output(target, what):
        marker = {"format": what}
    if marker is not None and (marker.get("format") == "report") != (what == "report"):
        other = "report" if marker.get("format") == "report" else "export"  # exports replace each other; not these
        raise InputError(f"{shown} is a segany {other}, not {'an' if noun == 'export' else 'a'} {noun}; pass another "
                         "folder, or --force to replace it")
    if marker is None:
        if any(target.iterdir()):
            raise InputError(f"{shown} is a folder with files that are not a segany {noun}; pass a new or empty "
                             "folder, or --force to replace its contents")
        return
    foreign = _foreign_files(target, marker)
    if foreign:
        names = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(f"{shown} is an earlier segany {noun} but also holds {len(foreign)} "
                         f"{'file' if len(foreign) == 1 else 'files'} it did not write "
                         f"({names}); move them out, or pass --force to delete them with the old {noun}")


@dataclass
class ExportResult:
    """What an export wrote: where, how many images and annotations, and how many empty masks it left out."""

    path: Path
    images: int = 0
    annotations: int = 0
    skipped_empty: int = 0

    def describe(self) -> str:
        skipped = f" (skipped {self.skipped_empty} empty masks)" if self.skipped_empty else ""
        return f"wrote {self.annotations} annotations on {self.images} images to {self.path}{skipped}"


def _rename(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError as exc:
        raise InputError(f"could not move {src} to {dest} ({exc.strerror}); pass an export folder that may be "
                         "replaced (not a mount point, nor one another program holds open)") from exc


def _swap_in(work: Path, target: Path) -> None:
    """Replace ``target`` with ``work``; if that fails, the earlier ``target`` is put back and no temp folder
    stays."""
    if not target.exists():
        _rename(work, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        _rename(target, old / "x")
    except InputError:
        old.rmdir()
        raise
    try:
        _rename(work, target)
    except InputError:
        os.replace(old / "x", target)  # roll back; should even this fail, ``old`` keeps the earlier export
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def folder_swap(store: Store, out: Path, what: str, force: bool) -> Iterator[Path]:
    """A fresh temporary folder beside ``out`` to write the export into; on success it replaces ``out`` (files
    of an earlier export included, so nothing stale stays), on failure it is removed and ``out`` is untouched.
    The path is resolved first, so ``.`` or a path through a link names the real folder."""
    target = out.resolve()
    check_folder_target(store, target, out, what, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes it 0700; an export is as readable as any other output
        yield work
        atomic_write_json(work / EXPORT_MARKER, {"format": what, "written_by": "segany",
                                                 "files": _files_under(work)})
        _swap_in(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stored_mask(ann: dict[str, Any]) -> np.ndarray:
    """An annotation's mask, or an error naming it: a damaged stored RLE failed the export with only the
    decoder's "counts sum to N pixels" line."""
    try:
        return decode_rle(ann["segmentation"])
    except ValueError as exc:
        raise InputError(f"annotation {ann['id']} (image {ann['image_id']}) has a damaged stored mask ({exc}); "
                         "delete it or draw it again in the app, then export again") from exc


def _nonempty(anns: Sequence[dict[str, Any]], result: ExportResult) -> list[dict[str, Any]]:
    """The annotations with at least one pixel; the empty ones (stored before the store refused them) are
    counted in ``result`` instead: an area-0 mask with a [0, 0, 0, 0] box breaks training and evaluation."""
    kept = [a for a in anns if a["area"] > 0]
    result.skipped_empty += len(anns) - len(kept)
    return kept


# ------------------------------------------------------------------------------------- polygons
def _splice(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Join ``hole`` into ``outer`` through their closest vertices; both (N, 2)."""
    d = ((outer[:, None, :].astype(np.float64) - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    hole_loop = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([outer[: i + 1], hole_loop, outer[i:]])


def _outline(contour: np.ndarray) -> np.ndarray:
    """A contour traced on the 2x-upsampled mask → the pixel-corner outline it stands for, (N, 2) int.

    On the 2x grid a pixel (x, y) is the block 2x..2x+1, and its boundary subpixel u maps to the pixel corner
    ceil(u / 2): an even u is the pixel's left (top) edge, an odd u its right (bottom) edge. Repeated corners
    and the middle points of straight runs are dropped.
    """
    corners = (contour.reshape(-1, 2) + 1) // 2
    step = np.diff(corners, axis=0, append=corners[:1])
    corners = corners[(step != 0).any(1)]  # a repeat of the next corner
    prev = np.roll(corners, 1, axis=0)
    nxt = np.roll(corners, -1, axis=0)
    d_in, d_out = corners - prev, nxt - corners
    straight = (d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0] == 0) & ((d_in * d_out).sum(1) > 0)
    return (corners[~straight] if len(corners) > 3 else corners).astype(np.float64)


def mask_to_polygons(mask: np.ndarray, *, min_area: float = 0.0, convention: str = "coco") -> list[list[float]]:
    """(H, W) mask → polygons ``[[x0, y0, x1, y1, ...], ...]``, one per connected piece, holes kept.

    Each format's polygons are written for the rasteriser its readers use, so they fill back to the mask:

    - ``"coco"``: vertices on pixel corners along the mask's outer edges, as pycocotools rasterises (pixel x
      spans [x, x+1]). Through pixel centres a 20x35 box came back 19x34.
    - ``"yolo"``: vertices on the boundary pixels' centres plus 0.5, for Ultralytics, which truncates the
      scaled coordinates to int and fills with cv2.fillPoly (edges included); the 0.5 keeps the truncation
      on the centre through the rounding of normalised coordinates. Corner vertices grew a 72-pixel box to 90.

    ``min_area`` (pixels) drops smaller pieces.
    """
    m = np.ascontiguousarray(np.asarray(mask, dtype=np.uint8))
    if m.ndim != 2:
        raise InputError(f"mask must be 2-D (H, W), got shape {m.shape}")
    if convention not in ("coco", "yolo"):
        raise ValueError(f"convention must be 'coco' or 'yolo', got {convention!r}")
    corners = convention == "coco"
    if corners:  # traced on a 2x grid, where every pixel is a 2x2 block with its edges to map back to
        m = np.kron(m.astype(bool), np.ones((2, 2), dtype=np.uint8)).astype(np.uint8)
    # RETR_CCOMP: a two-level hierarchy, outer boundaries and the holes directly inside them.
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_NONE if corners else cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hier = hierarchy[0]
    polys = []
    for idx, cnt in enumerate(contours):
        if hier[idx][3] != -1:  # a hole: handled with its parent
            continue
        poly = _outline(cnt) if corners else _centres(cnt)
        if min_area and _shoelace(poly) < min_area:
            continue
        child = hier[idx][2]
        while child != -1:
            hole = _outline(contours[child]) if corners else _centres(contours[child])
            if len(hole) >= 3:
                poly = _splice(poly, hole)
            child = hier[child][0]
        polys.append(poly.reshape(-1).tolist())
    return polys


def _centres(contour: np.ndarray) -> np.ndarray:
    """A contour's boundary-pixel centres (+0.5) as float (N, 2); a piece too thin to enclose any area (one
    pixel, a line) is given as its box instead, which cv2.fillPoly fills to the same pixels."""
    pts = contour.reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:
        (x, y), (x1, y1) = pts.min(0), pts.max(0) + 1
        return np.array([[x, y], [x1, y], [x1, y1], [x, y1]], dtype=np.float64)
    return pts + 0.5


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0].astype(np.float64), poly[:, 1].astype(np.float64)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def join_polygons(polys: Sequence[Sequence[float]]) -> list[float]:
    """COCO polygons of one object → ONE polygon ``[x0, y0, x1, y1, ...]``, for formats with one polygon per
    instance (YOLO-seg): each part is joined to the polygon built so far through their closest vertices, going
    there and back along the same segment, as holes are. Filled with the even-odd rule (cv2.fillPoly,
    pycocotools) the result is the union of the parts up to zero-width seams."""
    if not polys:
        return []
    joined = np.asarray(polys[0], dtype=np.float64).reshape(-1, 2)
    for part in polys[1:]:
        joined = _splice(joined, np.asarray(part, dtype=np.float64).reshape(-1, 2))
    return joined.reshape(-1).tolist()


# ------------------------------------------------------------------------------------- gathering
def _collect(store: Store, project_id: int, states: Sequence[str]) -> tuple[list[dict[str, Any]], dict[int, list]]:
    images = store.list_images(project_id)
    anns: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in images}
    for a in store.list_annotations(project_id=project_id, states=list(states)):
        anns.setdefault(a["image_id"], []).append(a)
    return images, anns


def export_coco(store: Store, project_id: int, out_path: str | os.PathLike[str], *, polygons: bool = False,
                states: Sequence[str] = ("accepted",), force: bool = False) -> Path:
    """One COCO instances JSON; ``polygons`` writes polygon segmentations instead of compressed RLE. An existing
    file is replaced only when it is an earlier segany COCO export, or with ``force`` (never the database, an
    image or the file the project imported from)."""
    return export_coco_summary(store, project_id, out_path, polygons=polygons, states=states, force=force).path


def export_coco_summary(store: Store, project_id: int, out_path: str | os.PathLike[str], *, polygons: bool = False,
                        states: Sequence[str] = ("accepted",), force: bool = False) -> ExportResult:
    """:func:`export_coco`, returning the counts."""
    _check_file_target(store, project_id, Path(out_path), "coco", force)
    images, anns = _collect(store, project_id, states)
    result = ExportResult(Path(out_path), images=len(images))
    anns = {i: _nonempty(group, result) for i, group in anns.items()}
    labels = _project_labels(store, project_id, anns)
    cat_id = {name: i + 1 for i, name in enumerate(labels)}
    out_images, out_anns = [], []
    file_names = coco_file_names(images)
    for im in images:
        out_images.append({"id": im["id"], "file_name": file_names[im["id"]], "width": im["width"],
                           "height": im["height"]})
        for a in anns.get(im["id"], []):
            seg: Any = a["segmentation"]
            if polygons:
                seg = mask_to_polygons(_stored_mask(a))
                if not seg:
                    continue
            out_anns.append({
                "id": a["id"], "image_id": im["id"], "category_id": cat_id[a["label"]], "segmentation": seg,
                "area": a["area"], "bbox": a["bbox"], "iscrowd": 0,
                # Provenance by store id, not name: who drew the mask and who last reviewed it (and when).
                "segany": {"uuid": a["uuid"], "source": a["source"], "review_state": a["review_state"],
                           "seconds_spent": a["seconds_spent"], "predicted_iou": a["predicted_iou"],
                           "annotator_id": a["annotator_id"], "reviewer_id": a["reviewer_id"],
                           "reviewed_at": a["reviewed_at"]},
            })
    # "info" first and its description fixed: a later export recognises the file by its head (is_segany_coco).
    info = {"description": COCO_EXPORT_DESCRIPTION, "segany": {"format": "coco-polygons" if polygons else "coco"}}
    data = {"info": info, "images": out_images, "annotations": out_anns,
            "categories": [{"id": i, "name": n, "supercategory": "object"} for n, i in cat_id.items()]}
    result.annotations = len(out_anns)
    _write_json(Path(out_path), data)
    return result


def _project_labels(store: Store, project_id: int, anns: dict[int, list]) -> list[str]:
    labels: list[str] = []
    for p in store.list_projects():
        if p["id"] == project_id:
            labels = list(p["labels"])
    for group in anns.values():
        for a in group:
            if a["label"] not in labels:
                labels.append(a["label"])
    return labels


def _crop_box_xywh(a: dict[str, Any], im: dict[str, Any]) -> list[float]:
    """The crop the mask was generated in (XYWH, as stage 3 stores it), or the whole image for masks made
    without one (clicks, imports)."""
    box = a["prompts"].get("crop_box")
    W, H = float(im["width"]), float(im["height"])
    if (isinstance(box, list) and len(box) == 4 and all(_finite_number(v) for v in box)):
        x, y, w, h = (float(v) for v in box)
        # Anything else is not a crop of this image: ``prompts`` is what a client sent, checked only as JSON.
        if 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= W and y + h <= H:
            return [x, y, w, h]
    return [0.0, 0.0, W, H]


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _point_coords(prompts: dict[str, Any]) -> list[list[float]]:
    """SA-1B's ``point_coords``: the [x, y] points a mask was made from (stage 3's grid point, or a click's
    points), or [] when ``prompts`` holds none, or holds something else: it is whatever the client sent, and
    an export must not pass ``"hello"`` on as a point."""
    pts = prompts.get("point_coords") or prompts.get("points") or []
    if isinstance(pts, list) and all(isinstance(p, list) and len(p) == 2 and all(_finite_number(v) for v in p)
                                     for p in pts):
        return [[float(p[0]), float(p[1])] for p in pts]
    return []


def export_sa1b(store: Store, project_id: int, out_dir: str | os.PathLike[str], *,
                states: Sequence[str] = ("accepted",), force: bool = False) -> Path:
    """SA-1B layout: one ``<image stem>.json`` per image with ``image`` and ``annotations`` (RLE)."""
    return export_sa1b_summary(store, project_id, out_dir, states=states, force=force).path


def export_sa1b_summary(store: Store, project_id: int, out_dir: str | os.PathLike[str], *,
                        states: Sequence[str] = ("accepted",), force: bool = False) -> ExportResult:
    """:func:`export_sa1b`, returning the counts."""
    out = Path(out_dir)
    images, anns = _collect(store, project_id, states)
    result = ExportResult(out, images=len(images))
    stems = _stems(images)
    with folder_swap(store, out, "sa1b", force) as work:
        for im in images:
            records = []
            for a in _nonempty(anns.get(im["id"], []), result):
                pc = _point_coords(a["prompts"])
                records.append({"id": a["id"], "segmentation": a["segmentation"], "area": a["area"],
                                "bbox": a["bbox"], "predicted_iou": a["predicted_iou"],
                                "stability_score": a["stability_score"], "point_coords": pc,
                                "crop_box": _crop_box_xywh(a, im), "label": a["label"], "source": a["source"]})
            result.annotations += len(records)
            _write_json(work / f"{stems[im['id']]}.json", {
                "image": {"image_id": im["id"], "width": im["width"], "height": im["height"],
                          "file_name": im["file_name"], "sha256": im["sha256"]},
                "annotations": records})
    return result


def export_yolo(store: Store, project_id: int, out_dir: str | os.PathLike[str], *,
                states: Sequence[str] = ("accepted",), force: bool = False) -> Path:
    """YOLO segmentation: ``images/<stem><ext>``, ``labels/<stem>.txt`` lines ``class x1 y1 x2 y2 ...`` (0–1),
    and ``data.yaml`` naming both."""
    return export_yolo_summary(store, project_id, out_dir, states=states, force=force).path


def _place_image(src: str, dest: Path) -> None:
    """Put the image at ``dest``: a hard link when the file system allows (no copy of a large dataset), else a
    copy."""
    if os.path.lexists(dest):  # never: names are unique. A copy onto an earlier link would write into its source.
        raise RuntimeError(f"export file {dest} already exists; two images were given one name")
    try:
        os.link(src, dest)
    except OSError:
        try:
            shutil.copy2(src, dest)
        except OSError as exc:
            raise InputError(f"could not copy image {src!r} into the export ({exc.strerror}); restore the file or "
                             "remove it from the project (segany project remove-images)") from exc


def export_yolo_summary(store: Store, project_id: int, out_dir: str | os.PathLike[str], *,
                        states: Sequence[str] = ("accepted",), force: bool = False) -> ExportResult:
    """:func:`export_yolo`, returning the counts. The images are exported beside the labels because YOLO
    trainers find a label file by replacing ``images`` with ``labels`` in the image's path."""
    out = Path(out_dir)
    images, anns = _collect(store, project_id, states)
    result = ExportResult(out, images=len(images))
    anns = {i: _nonempty(group, result) for i, group in anns.items()}
    labels = _project_labels(store, project_id, anns)
    cls = {n: i for i, n in enumerate(labels)}
    stems = _stems(images)
    with folder_swap(store, out, "yolo", force) as work:
        (work / "labels").mkdir()
        (work / "images").mkdir()
        for im in images:
            stem = stems[im["id"]]
            _place_image(im["path"], work / "images" / f"{stem}{Path(im['file_name']).suffix.lower()}")
            lines = []
            for a in anns.get(im["id"], []):
                # One line per instance: a line per part would turn one object into several for the trainer.
                poly = join_polygons(mask_to_polygons(_stored_mask(a), convention="yolo"))
                if not poly:
                    continue
                result.annotations += 1
                xy = np.clip(np.asarray(poly).reshape(-1, 2) / [im["width"], im["height"]], 0, 1)
                lines.append(f"{cls[a['label']]} " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)))
            atomic_write_text(work / "labels" / f"{stem}.txt", "\n".join(lines) + ("\n" if lines else ""))
        # No ``path:`` key: YOLO trainers then resolve ``images`` against this file's folder, wherever it moves.
        yaml_lines = ["# exported by segany; paths are relative to this file's folder", "train: images",
                      "val: images", "names:"]
        yaml_lines += [f"  {i}: {json.dumps(n)}" for n, i in cls.items()]
        atomic_write_text(work / "data.yaml", "\n".join(yaml_lines) + "\n")
    return result


def export_png(store: Store, project_id: int, out_dir: str | os.PathLike[str], *,
               states: Sequence[str] = ("accepted",), force: bool = False) -> Path:
    """Binary PNG per annotation (``<stem>/<annotation id>.png``, 0/255) and an ``index.json``."""
    return export_png_summary(store, project_id, out_dir, states=states, force=force).path


def export_png_summary(store: Store, project_id: int, out_dir: str | os.PathLike[str], *,
                       states: Sequence[str] = ("accepted",), force: bool = False) -> ExportResult:
    """:func:`export_png`, returning the counts."""
    out = Path(out_dir)
    images, anns = _collect(store, project_id, states)
    result = ExportResult(out, images=len(images))
    stems = _stems(images)
    index = []
    with folder_swap(store, out, "png", force) as work:
        for im in images:
            stem = stems[im["id"]]
            for a in _nonempty(anns.get(im["id"], []), result):
                rel = f"{stem}/{a['id']}.png"
                png = PILImage.fromarray(_stored_mask(a).astype(np.uint8) * 255)
                atomic_write(work / rel, lambda f, png=png: png.save(f, format="PNG"))
                index.append({"file": rel, "image": im["file_name"], "label": a["label"], "uuid": a["uuid"],
                              "source": a["source"]})
        result.annotations = len(index)
        _write_json(work / "index.json", index)
    return result


def export_summary(store: Store, project_id: int, fmt: str, out: str | os.PathLike[str], *,
                   force: bool = False) -> ExportResult:
    """Export accepted annotations in ``fmt`` (one of ``coco``, ``coco-polygons``, ``sa1b``, ``yolo``, ``png``)."""
    if fmt in ("coco", "coco-polygons"):
        return export_coco_summary(store, project_id, out, polygons=fmt == "coco-polygons", force=force)
    fns = {"sa1b": export_sa1b_summary, "yolo": export_yolo_summary, "png": export_png_summary}
    if fmt not in fns:
        raise InputError(f"unknown export format {fmt!r}; choose one of coco, coco-polygons, {', '.join(fns)}")
    return fns[fmt](store, project_id, out, force=force)


# --------------------------------------------------------------------------------------- import
def check_polygons(seg: list[Any], height: int, width: int) -> None:
    """Refuse COCO polygons pycocotools would misread or crash on, with the reason.

    pycocotools checks nothing: a polygon of 4 numbers is taken for a box, an odd count drops the last
    number, a string raises a bare ValueError, and a coordinate of about 4e8 or more overflows its fixed-point
    rasteriser (from 3e9 the process dies with a segmentation fault). A polygon must be a list of at least 3
    x, y pairs of finite numbers within one image size beyond each edge (pixel coordinates of this image;
    polygons are often a little outside, never by more than the image).
    """
    if not seg:
        raise InputError("the polygon list is empty")
    for i, poly in enumerate(seg):
        if not isinstance(poly, list):
            raise InputError(f"polygon {i} is a {type(poly).__name__}, not a list of numbers; COCO polygons are a "
                             "list of lists [[x0, y0, x1, y1, ...], ...]")
        for j, v in enumerate(poly):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"polygon {i} holds {v!r} at position {j}, not a number")
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"polygon {i} holds {v!r} at position {j}, not a finite number")
        if len(poly) % 2 or len(poly) < 6:
            raise InputError(f"polygon {i} has {len(poly)} numbers; a polygon is x, y pairs, at least 3 points "
                             "(6 numbers)")
        xs, ys = poly[0::2], poly[1::2]
        for axis, vals, extent in (("x", xs, width), ("y", ys, height)):
            lo, hi = min(vals), max(vals)
            if lo < -extent or hi > 2 * extent:
                bad = lo if lo < -extent else hi
                raise InputError(f"polygon {i} has {axis} = {bad!r}, outside [{-extent}, {2 * extent}] for an image "
                                 f"{width} wide and {height} high; coordinates are pixels of this image")


def coco_segmentation_to_rle(seg: Any, height: int, width: int) -> dict[str, Any]:
    """COCO polygons / uncompressed RLE / compressed RLE → compressed RLE (str counts) of a ``height`` x
    ``width`` image; :class:`InputError` naming what is wrong with a malformed one."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        check_polygons(seg, height, width)
        rles = mask_utils.frPyObjects([[float(v) for v in poly] for poly in seg], height, width)
        merged = mask_utils.merge(rles)
        c = merged["counts"]
        return {"size": [height, width], "counts": c.decode("ascii") if isinstance(c, bytes) else c}
    if isinstance(seg, dict):
        rle = normalize_rle(seg)
        if tuple(rle["size"]) != (height, width):
            raise InputError(f"the RLE's size {rle['size']} does not match image [height, width] = "
                             f"[{height}, {width}]")
        return rle
    raise InputError(f"unsupported COCO segmentation of type {type(seg).__name__}")


@dataclass
class ImportSummary:
    """What :func:`import_coco_summary` did with each annotation of the file.

    A re-import is idempotent wherever the file lives: annotations are keyed by the project, the image's
    content (sha256) and the annotation's id in the file, so the same annotation is ``unchanged``, an edited
    one ``updated``, and a copy of the file under another name adds nothing. One deleted in the project since
    an earlier import stays deleted (``kept_deleted``) unless the import is asked to restore it.
    """

    created: int = 0
    unchanged: int = 0
    updated: int = 0
    # Not added: the same mask and label are already on the image under another key (a project's own export
    # imported back, or a mask the file holds twice).
    duplicate: int = 0
    empty: int = 0  # masks of zero area, skipped
    crowd: int = 0  # iscrowd=1 regions, skipped unless include_crowd
    unknown_category: int = 0  # category_id not in the file's categories: imported as "object"
    skipped: int = 0  # annotations whose image is neither in the project nor in images_dir
    missing_images: list[str] = field(default_factory=list)  # their file names
    images_added: int = 0
    looked_in: list[str] = field(default_factory=list)  # where images were searched (project, images_dir)
    labels_added: list[str] = field(default_factory=list)  # labels the project did not declare before
    # Annotations an earlier import of this file created that the file no longer has: kept, only counted.
    no_longer_in_file: int = 0
    # Annotations of the file deleted in the project since an earlier import: left deleted (the store records
    # the deletion of an imported annotation), or created again and counted in ``created`` with restore_deleted.
    kept_deleted: int = 0
    # The project holds annotations an earlier import of this file created. ``created`` counts only annotations
    # new in the file (or restored with restore_deleted): deleted ones are counted in ``kept_deleted``.
    reimport: bool = False

    @property
    def already_present(self) -> int:
        """Older name of :attr:`unchanged` and :attr:`duplicate` together (one count until 2026-11-27)."""
        return self.unchanged + self.duplicate


IMPORT_NAMESPACE = uuid_lib.UUID("5e6a0000-0000-4000-8000-000000000003")


def import_key(project_id: int, image_sha256: str, coco_id: Any, rle: dict[str, Any], label: str) -> str:
    """The imported annotation's uuid: project-scoped (the same image may be in two projects) and by content
    (the image's sha256, not the file's path), so the same annotation keys the same wherever its file lives.
    Without a COCO id the mask and label stand in for it."""
    ident = f"id={coco_id}" if coco_id is not None else f"mask={label}:{rle['counts']}"
    return str(uuid_lib.uuid5(IMPORT_NAMESPACE, f"{project_id}:{image_sha256}:{ident}"))


def import_coco(store: Store, project_id: int, coco_json: str | os.PathLike[str], *,
                images_dir: str | os.PathLike[str] | None = None, source: str = "manual",
                restore_deleted: bool = False) -> int:
    """Import COCO instance annotations; images are matched by file name (added from ``images_dir`` if missing).

    Returns the number of annotations created (:func:`import_coco_summary` says what else happened, and what
    ``restore_deleted`` does).
    """
    return import_coco_summary(store, project_id, coco_json, images_dir=images_dir, source=source,
                               restore_deleted=restore_deleted).created


def _read_coco(coco_json: str | os.PathLike[str]) -> dict[str, Any]:
    """The COCO file as a dict with ``images`` and ``annotations`` lists, or an InputError that says what is wrong."""
    path = Path(coco_json)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"COCO file {str(path)!r} {what}; pass the annotations .json file (e.g. instances_val.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{str(path)!r} is not a text file, so not a COCO .json file; pass the annotations "
                         ".json file") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                         "pass a COCO annotations .json file") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise InputError(f"{str(path)!r} is JSON but not COCO instance annotations (expected an object with "
                         "'images' and 'annotations' lists)")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise InputError(f"{str(path)!r}: images[{i}] needs an 'id' and a 'file_name'; fix the file")
    for i, a in enumerate(data.get("annotations", [])):
        if not isinstance(a, dict) or "image_id" not in a or "segmentation" not in a:
            raise InputError(f"{str(path)!r}: annotations[{i}] needs an 'image_id' and a 'segmentation' "
                             "(polygons or RLE); fix the file")
    return data


def import_coco_summary(store: Store, project_id: int, coco_json: str | os.PathLike[str], *,
                        images_dir: str | os.PathLike[str] | None = None, source: str = "manual",
                        include_crowd: bool = False, restore_deleted: bool = False) -> ImportSummary:
    """:func:`import_coco`, returning what was created, updated, unchanged and skipped and why.

    Everything is checked and converted before anything is written, and the images, labels and annotations
    are then written in one transaction: a malformed file, an unreadable image, or a file not one of whose
    annotations has its image in the project or ``images_dir`` raises :class:`InputError` and changes nothing.
    ``iscrowd`` regions are skipped (counted) unless ``include_crowd``. An annotation of the file that was
    deleted in the project since an earlier import stays deleted (``kept_deleted``) unless ``restore_deleted``,
    which creates it again and forgets the deletion.
    """
    data = _read_coco(coco_json)
    out = ImportSummary(looked_in=["the project's images"])
    if images_dir is not None:
        if not Path(images_dir).is_dir():
            raise InputError(f"--images-dir {str(images_dir)!r} is not a folder; pass the folder holding the images "
                             "the COCO file names")
        out.looked_in.append(str(Path(images_dir).resolve()))
    cats = {c["id"]: c["name"] for c in data.get("categories", []) if isinstance(c, dict) and "id" in c
            and "name" in c}
    known, ambiguous = _images_by_name(store.list_images(project_id), [im["file_name"] for im in data["images"]],
                                       images_dir)
    missing = [im["file_name"] for im in data["images"] if im["file_name"] not in known]
    found = [name for name in missing if images_dir is not None and (Path(images_dir) / name).is_file()]
    names = {im["id"]: im["file_name"] for im in data["images"]}
    anns = data.get("annotations", [])
    findable = set(known) | set(found)
    unclear = sorted({names[a["image_id"]] for a in anns if names.get(a["image_id"]) in ambiguous})
    if unclear:
        shown = "; ".join(f"{n!r} matches {', '.join(ambiguous[n])}" for n in unclear[:3])
        raise InputError(f"{coco_json}: {len(unclear)} image name(s) of the file match more than one image of the "
                         f"project, so their masks could land on the wrong picture: {shown}. Name each image in the "
                         "COCO file by enough of its path to tell it apart (e.g. 'a/img.jpg' and 'b/img.jpg'), as "
                         "segany's own COCO export does; nothing was imported")
    usable = [a for a in anns if names.get(a["image_id"]) in findable]
    out.skipped = len(anns) - len(usable)
    out.missing_images = sorted({names.get(a["image_id"], f"<image id {a['image_id']}>") for a in anns
                                 if names.get(a["image_id"]) not in findable})
    if anns and not usable:
        raise InputError(_nothing_found(coco_json, out, images_dir))
    new_rows = _read_new_images(images_dir, found)
    sha_of = {name: im["sha256"] for name, im in known.items()}
    sha_of.update({name: row[3] for name, row in zip(found, new_rows, strict=True)})
    sizes = {name: (im["height"], im["width"]) for name, im in known.items()}
    sizes.update({name: (row[1], row[2]) for name, row in zip(found, new_rows, strict=True)})
    # Imports before 0.x keyed on the file's path: find those rows too, so editing such a file updates them.
    legacy_ns = uuid_lib.uuid5(uuid_lib.NAMESPACE_URL, str(Path(coco_json).resolve()))
    records = []
    bad: list[tuple[Any, str]] = []  # (annotation id, why): every malformed annotation, named at once
    for a in usable:
        name = names[a["image_id"]]
        try:
            rec = _import_record(a, cats, sizes[name], source, include_crowd, out, coco_json)
        except InputError as exc:
            bad.append((a.get("id"), str(exc)))
            continue
        if rec is None:
            continue
        rec["image_sha256"] = sha_of[name]
        rec["key"] = import_key(project_id, sha_of[name], a.get("id"), rec["rle"], rec["label"])
        rec["legacy_key"] = str(uuid_lib.uuid5(legacy_ns, str(a.get("id"))))
        records.append(rec)
    if bad:
        raise InputError(_bad_annotations_message(coco_json, bad))
    # Only the labels imported annotations use: the file's categories list may name classes it never uses.
    used_labels = list(dict.fromkeys(r["label"] for r in records))
    declared = _project_labels(store, project_id, {})
    keys_in_file = {r["key"] for r in records} | {r["legacy_key"] for r in records} | {
        import_key(project_id, sha_of[names[a["image_id"]]], a["id"], {}, "") for a in usable if a.get("id") is not None}
    earlier = _earlier_imports(store, project_id, Path(coco_json).resolve())
    out.reimport = bool(earlier)
    out.no_longer_in_file = sum(1 for u in earlier if u not in keys_in_file)
    counts = store.import_annotations(project_id, new_images=new_rows, labels=used_labels, records=records,
                                      restore_deleted=restore_deleted)
    # What the store declared: only labels of annotations it wrote (a re-import that adds nothing adds none).
    out.labels_added = [n for n in _project_labels(store, project_id, {}) if n not in declared]
    out.images_added = counts["images_added"]
    out.created, out.updated, out.unchanged = counts["created"], counts["updated"], counts["unchanged"]
    out.kept_deleted, out.duplicate = counts["kept_deleted"], counts["duplicate"]
    return out


def _images_by_name(images: Sequence[dict[str, Any]], wanted: Sequence[str],
                    images_dir: str | os.PathLike[str] | None = None
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """The project's image for each name in ``wanted`` (a COCO file's ``file_name`` values), and the names that
    match several images, with their paths.

    A name matches, in this order: the images of that file name; the file it names in ``images_dir``, when that
    file is one of the project's images (when it is not, the name stays unmatched, so the import adds that file
    rather than pick another picture whose path ends alike); the images whose path ends with it (``a/img.jpg``,
    as :func:`coco_file_names` writes where two images share a name); an upload sent under it. The app stores an
    upload as ``<first 12 hex of its sha256>-<name>`` (two uploads may share a name), while a COCO file made
    elsewhere names ``<name>``; an upload answers to ``<name>`` when no other upload was sent under it.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    uploaded: dict[str, list[dict[str, Any]]] = {}
    by_real: dict[str, dict[str, Any]] = {}
    for im in images:
        by_name.setdefault(im["file_name"], []).append(im)
        prefix, sep, rest = im["file_name"].partition("-")
        if sep and rest and prefix == str(im.get("sha256", ""))[:12]:
            uploaded.setdefault(rest, []).append(im)
        if im["path"]:
            by_real[os.path.realpath(im["path"])] = im
    parts = {im["id"]: Path(im["path"] or im["file_name"]).as_posix().split("/") for im in images}
    by_end: dict[int, dict[str, list[dict[str, Any]]]] = {}  # k -> the last k parts of each path -> images

    def ending(name: str) -> list[dict[str, Any]]:
        k = len(name.split("/"))
        if k not in by_end:
            by_end[k] = {}
            for im in images:
                if len(parts[im["id"]]) >= k:
                    by_end[k].setdefault("/".join(parts[im["id"]][-k:]), []).append(im)
        return by_end[k].get(name, [])

    known: dict[str, dict[str, Any]] = {}
    ambiguous: dict[str, list[str]] = {}
    for name in dict.fromkeys(wanted):
        if not isinstance(name, str) or not name:
            continue
        hits = by_name.get(name, [])
        if not hits and images_dir is not None and (Path(images_dir) / name).is_file():
            own = by_real.get(os.path.realpath(Path(images_dir) / name))
            if own is None:
                continue  # a file to add (or one the project holds under another path: matched by content)
            hits = [own]
        hits = hits or ending(name.strip("/"))
        if not hits and len(uploaded.get(name, [])) == 1:
            hits = uploaded[name]
        if len(hits) == 1:
            known[name] = hits[0]
        elif hits:
            ambiguous[name] = sorted(str(im["path"] or im["file_name"]) for im in hits)
    return known, ambiguous


def _earlier_imports(store: Store, project_id: int, coco_path: Path) -> list[str]:
    """The uuids of the project's annotations imported from the file at ``coco_path`` (recorded in their
    ``prompts.imported_from``; older imports recorded the path as given, resolved here from the current folder)."""
    with store.transaction(write=False) as s:
        rows = list(s.execute(select(AnnotationModel.uuid, AnnotationModel.prompts)
                              .join(ImageModel, ImageModel.id == AnnotationModel.image_id)
                              .where(ImageModel.project_id == project_id)))
    same: dict[str, bool] = {}
    out = []
    for uuid, prompts in rows:
        src = prompts.get("imported_from") if isinstance(prompts, dict) else None
        if not src:
            continue
        if src not in same:
            same[src] = str(Path(src).resolve()) == str(coco_path) or _same_file(coco_path, src)
        if same[src]:
            out.append(uuid)
    return out


def _read_new_images(images_dir: str | os.PathLike[str] | None, found: Sequence[str]) -> list[ImageRow]:
    """Size and sha256 of the images to add, read before the transaction; any unreadable one fails the import."""
    if images_dir is None or not found:
        return []
    rows, bad = read_image_files([(Path(images_dir) / name).resolve() for name in found])
    if bad:
        raise InputError(bad_images_message(bad, "fix them, or pass --images-dir a folder with readable copies"))
    return rows


def _bad_annotations_message(coco_json: str | os.PathLike[str], bad: Sequence[tuple[Any, str]]) -> str:
    """One line naming every malformed annotation (the first 10) by its id in the file, with the reason."""
    shown = "; ".join(f"annotation {ann_id!r}: {why}" for ann_id, why in bad[:10])
    more = f"; ... {len(bad) - 10} more" if len(bad) > 10 else ""
    return (f"{str(coco_json)!r}: {len(bad)} annotation{'s are' if len(bad) != 1 else ' is'} malformed, so nothing "
            f"was imported: {shown}{more}; fix the file")


def _import_record(a: dict[str, Any], cats: dict[Any, str], size_hw: tuple[int, int], source: str,
                   include_crowd: bool, out: ImportSummary, coco_json: str | os.PathLike[str]
                   ) -> dict[str, Any] | None:
    """One COCO annotation as an import record for :meth:`Store.import_annotations`, or None (counted in
    ``out``) for a crowd region or an empty mask; :class:`InputError` with the reason for a malformed one."""
    seg = a["segmentation"]
    if not (isinstance(seg, dict) or (isinstance(seg, list) and seg)):
        what = "an empty list" if isinstance(seg, list) else f"of type {type(seg).__name__}"
        raise InputError(f"the segmentation is {what}; COCO uses polygons (a list of lists) or RLE (a dict)")
    if a.get("iscrowd") and not include_crowd:
        out.crowd += 1
        return None
    rle = coco_segmentation_to_rle(seg, *size_hw)
    if rle_area_bbox(rle)[0] == 0:
        out.empty += 1
        return None
    label = cats.get(a.get("category_id"))
    if label is None:
        out.unknown_category += 1
        label = "object"
    extra = a.get("segany") if isinstance(a.get("segany"), dict) else {}
    # The store refuses these too, but by record key: checked here, the error names the annotation's id.
    check_seconds(extra.get("seconds_spent"), "segany.seconds_spent")
    check_finite("segany.predicted_iou", extra.get("predicted_iou"))
    digest = hashlib.sha256(f"{label}\n{rle['counts']}".encode()).hexdigest()[:16]
    src = extra.get("source", source)
    return {"rle": rle, "label": label_name(label),
            "source": src if src in ("manual", "semi", "auto") else source,
            # The resolved path: an export refuses to overwrite it, and a re-import finds its earlier rows.
            "prompts": {"imported_from": str(Path(coco_json).resolve()), "import_digest": digest},
            "seconds_spent": extra.get("seconds_spent"), "predicted_iou": extra.get("predicted_iou")}


def _nothing_found(coco_json: str | os.PathLike[str], out: ImportSummary,
                   images_dir: str | os.PathLike[str] | None) -> str:
    shown = ", ".join(repr(n) for n in out.missing_images[:3]) + (", ..." if len(out.missing_images) > 3 else "")
    fix = ("pass --images-dir FOLDER holding them (file names as in the COCO file)" if images_dir is None
           else "check that --images-dir is the folder the COCO file names are relative to")
    return (f"nothing imported from {str(coco_json)!r}: all {out.skipped} annotations are on "
            f"{len(out.missing_images)} images ({shown}) not found in {' or in '.join(out.looked_in)}; {fix}")
