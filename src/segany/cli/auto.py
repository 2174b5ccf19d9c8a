"""``segany auto``: automatic masks for an image, a folder or a list of images, resumable.

Each image's result is written atomically and is the marker that the image is done, so a run
killed at any moment (even with SIGKILL) and restarted with ``--resume`` loses, duplicates and
half-writes nothing. Unreadable images, images the model cannot take (too thin to resize), and images
whose processing raised an unexpected error (a bug: its traceback goes to the manifest) are reported,
skipped, listed in the manifest with their reason, and the run goes on; the exit status is 1 if any failed.
A run in which every image failed still writes its manifest (the record of what failed), says so in its last
line, and exits 1. A mask whose score is not a finite number (NaN stability of an empty mask that hole
filling made non-empty) is dropped and counted: NaN is not JSON. ``manifest.json`` records the model,
options and versions, the counts of the whole output and those of this run; ``run.json`` the settings that
``--resume`` checks and ``image_ids.json`` each image's stable id and the file behind it
(:mod:`segany.cli.auto_resume`), so a resume redoes an image whose file changed. Output names follow the
image's path, never its place in a list. A run without ``--resume`` first removes what the recorded run
wrote (and nothing else), so the folder never mixes two runs; it refuses to replace any other file at a name
it would write (the user's own ``x.json`` beside ``x.jpg``) unless ``--overwrite`` is given. No image name
can produce a bookkeeping file's name, and an ``--out`` inside a folder input is not read back as input.
The manifest is written however the run ends: Ctrl-C, or a write the file system refused (disk full), which
stops the run naming the file and saying to rerun with ``--resume``; finished outputs are kept whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segany.atomic import NO_SPACE, current_umask
from segany.cli._checks import check_out_dir
from segany.cli._util import (
    add_speed_arguments,
    as_flags,
    atomic_write_bytes,
    comma_list,
    loaded_model_name,
    predictor_options,
    resolve_checkpoint,
    resolve_device,
)
from segany.cli.auto_resume import (
    ANN_ID_STRIDE,
    COCO_IMAGES_FILE,
    COCO_RESULTS_FILE,
    IDS_FILE,
    MANIFEST_FILE,
    RUN_FILE,
    check_resume,
    is_current,
    is_reserved_key,
    plan_images,
    previous_outputs,
    record_run,
    recorded_keys,
    run_settings,
    write_images,
)
from segany.data.formats.auto_files import is_run_record
from segany.data.walk import walk_files
from segany.errors import InputError, SeganyError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
FORMATS = ("sa1b", "coco", "png")
# 256 x 256 points: 64 times SAM's 32 x 32, and with 3 masks per prompt at most, every mask index of an image
# stays below ANN_ID_STRIDE. Larger grids ran out of memory in the point grid (100000 per side) or ran
# for days (3000 per side: 9 million prompts per image).
MAX_PROMPTS_PER_IMAGE = 65_536
_TRACEBACKS_KEPT = 10  # in the manifest, for the first images failed by an unexpected error
_GEN_OPTIONS = {  # CLI flag → (generator keyword, type)
    "points_per_side": int, "points_per_batch": int, "pred_iou_thresh": float, "stability_score_thresh": float,
    "stability_score_offset": float, "box_nms_thresh": float, "crop_n_layers": int, "crop_nms_thresh": float,
    "crop_overlap_ratio": float, "crop_n_points_downscale_factor": int, "min_mask_region_area": int,
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "auto", help="segment everything in images (automatic masks, SA-1B output)",
        description="Automatic mask generation for one image, a folder (recursive) or a .txt file with one image "
                    "path per line. One output per image, written atomically; --resume skips finished images.",
    )
    p.add_argument("input", help="image file, folder of images, or .txt list of image paths (one per line; relative paths "
                   "are relative to the list's folder)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--model", default="segany_tiny",
                   help="registered model name (default segany_tiny, whose weights ship with segany)")
    p.add_argument("--checkpoint", help="weights file; default: the model's weights in the download cache")
    p.add_argument("--format", choices=FORMATS, default="sa1b",
                   help="sa1b: one SA-1B JSON per image (default); coco: per-image COCO results plus "
                        "coco_results.json; png: a folder of mask PNGs per image. bbox is [x0, y0, x1-x0, y1-y0] "
                        "with inclusive x1, y1, as in SAM and SA-1B")
    p.add_argument("--overlay", action="store_true", help="also write NAME.overlay.png showing all masks (with --resume, also "
                   "for images done without it, drawn from their saved masks)")
    p.add_argument("--resume", action="store_true",
                   help="skip images already done with the same model, weights and options (others are refused)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out at the names this run writes that no recorded segany auto run "
                        "wrote there (refused without it); the recorded run's outputs are replaced anyway")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    add_speed_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--labels", help="label masks with these comma-separated names, e.g. person,car (needs a model "
                                    "with a class head; names outside its classes need CLIP)")
    g = p.add_argument_group("generator options (defaults: SAM's; segany_tiny's where they differ)")
    from segany.amg.model_defaults import default_note

    for name, typ in _GEN_OPTIONS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, dest=name, help=default_note(name))
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Listing:
    """The images to segment, as (path, output key) pairs, and what was left out.

    ``root`` is the folder image names are given relative to (``file_name`` in the outputs): the input folder,
    or for a list the deepest folder holding every listed image.
    """

    images: list[tuple[Path, str]]
    other_files: Counter[str] = field(default_factory=Counter)  # suffix -> count
    root: Path | None = None
    duplicates: int = 0  # list entries naming an image listed before
    earlier_outputs: list[Path] = field(default_factory=list)  # folders of earlier runs inside a folder input
    hidden_images: list[Path] = field(default_factory=list)  # images under a name starting with "." (left out)

    def file_name(self, path: Path) -> str:
        """``path`` relative to :attr:`root` with POSIX separators, as COCO tools join it to an image root."""
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).as_posix()  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return path.name


def collect_images(source: str, out: Path | None = None) -> list[tuple[Path, str]]:
    """(image path, output key) pairs in a stable order; see :func:`scan_input`."""
    return scan_input(source, out).images


def scan_input(source: str, out: Path | None = None) -> Listing:
    """The images of ``source`` (an image, a folder, or a .txt list) and their output keys.

    A key is the image's path relative to the listing's root without the extension (``sub/x.jpg`` -> ``sub/x``),
    so it is tied to the image, never to its position in a list. The root is the input folder, or for a list
    (and a single image) the deepest folder holding every listed image; on ``--resume`` an image keeps the key
    the recorded run gave it even when that root moved (:func:`_keep_recorded_keys`). The extension is kept
    where two files differ only by it (``x.jpg`` and ``x.png`` write ``x.jpg.json`` and ``x.png.json``), where
    a folder has the same name (``x.png`` beside ``x/y.png``), and where the name would land on a bookkeeping
    file (``run.jpg`` -> ``run.jpg.json``). A list naming one image twice segments it once. ``out``, when inside a folder input, is
    left out: its PNGs are this command's outputs, not images; so is any other subfolder that holds an earlier
    run's run.json.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise InputError(f"input {str(src)!r} does not exist; pass an image, a folder or a .txt list of paths")
    if src.is_dir():
        return _scan_folder(src, out)
    if src.suffix.lower() == ".txt":
        return _scan_list(_read_list(src))
    return _scan_list([src])


def _scan_folder(src: Path, out: Path | None) -> Listing:
    inner = _parts_inside(out, src) if out is not None else None
    same = inner == ()  # --out is the input folder itself: its JSON outputs are no news to the user
    found, hidden = [], []
    for p in walk_files(src):
        if not any(part.startswith(".") for part in p.relative_to(src).parts):
            found.append(p)
        elif p.suffix.lower() in IMAGE_SUFFIXES and not _not_a_hidden_image(p.relative_to(src).parts):
            hidden.append(p)
    # This run's --out, and any earlier run's output folder (it holds that run's run.json): masks, not input.
    earlier = [p.parent for p in found if p.name == RUN_FILE and p.parent != src and is_run_record(p.parent)
               and p.parent.relative_to(src).parts != inner]
    skip = ([inner] if inner else []) + [p.relative_to(src).parts for p in earlier]
    files: list[Path] = []
    other: Counter[str] = Counter()
    for p in found:
        rel = p.relative_to(src).parts
        if any(rel[:len(s)] == s for s in skip) or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            files.append(p)
        elif not (same and suffix == ".json"):
            other[suffix or "(no extension)"] += 1
    if not files:
        also = (f"; {len(hidden)} hidden ones (a name starting with '.', e.g. {hidden[0]}) are left out: rename "
                "them, or pass them in a .txt list" if hidden else "")
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {str(src)!r}{also}")
    return Listing(_keys(files, src), other, root=src, earlier_outputs=earlier, hidden_images=hidden)


def _scan_list(paths: list[Path]) -> Listing:
    """A list's images, each once, keyed by its path relative to the deepest folder holding them all."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    seen: set[Path] = set()
    unique = []
    for p in absolute:
        real = p.resolve()  # ./x.jpg, x.jpg and a link to it are one image
        if real not in seen:
            seen.add(real)
            unique.append(p)
    try:
        root = Path(os.path.commonpath([str(p.parent) for p in unique]))
    except ValueError:  # images on two Windows drives: no common folder, so keys keep the whole path
        root = Path(unique[0].anchor)
    return Listing(_keys(unique, root), root=root, duplicates=len(absolute) - len(unique))


def _not_a_hidden_image(parts: tuple[str, ...]) -> bool:
    """Dot-names that are no one's hidden picture: macOS's ``._x.jpg`` resource forks, and the temporary folders
    of an interrupted run (``.x.k3j2.tmp``), so the hidden-image count names only what a person hid."""
    return parts[-1].startswith("._") or any(part.startswith(".") and part.endswith(".tmp") for part in parts[:-1])


def _keys(files: list[Path], root: Path) -> list[tuple[Path, str]]:
    """Each file's key: its path below ``root`` without the extension, unless that is ambiguous or reserved."""
    rel = [Path(os.path.relpath(f, root)) if f.anchor == root.anchor else Path(*f.parts[1:]) for f in files]
    stems = [r.with_suffix("").as_posix() for r in rel]
    count = Counter(s.casefold() for s in stems)  # x.jpg and X.png are one output on macOS and Windows
    # x.png beside a folder x/ holding y.png: key x would be the folder of x/y's outputs in the png format
    # (and rewriting x would delete them), so x keeps its extension, as two x.* files do.
    folders = {"/".join(parts[:i]).casefold() for s in stems for parts in [s.split("/")] for i in range(1, len(parts))}
    wanted = [stem if count[stem.casefold()] == 1 and stem.casefold() not in folders and not is_reserved_key(stem)
              else r.as_posix() for r, stem in zip(rel, stems, strict=True)]
    return _unique(files, wanted)


def _keep_recorded_keys(out: Path, images: list[tuple[Path, str]], fmt: str) -> list[tuple[Path, str]]:
    """On --resume, each image the recorded run already named keeps that name. A list's keys are relative to
    the deepest folder holding all its images, so adding an image from elsewhere to the list would otherwise
    rename every output (and a resume would redo them all, leaving the old files beside the new)."""
    recorded = recorded_keys(out)
    if not recorded:
        return images
    kept = {i: recorded[os.path.abspath(p)] for i, (p, _) in enumerate(images) if os.path.abspath(p) in recorded}
    if all(kept.get(i, key) == key for i, (_, key) in enumerate(images)):
        return images
    taken = {k.casefold() for k in kept.values()}
    wanted = [kept.get(i, key if key.casefold() not in taken else f"{key}_new") for i, (_, key) in enumerate(images)]
    if fmt == "png":  # there a key is a folder: one output nested in another goes when that one is redone
        wanted = _unnested(wanted, set(kept))
    return _unique([p for p, _ in images], wanted)


def _unnested(keys: list[str], kept: set[int]) -> list[str]:
    """Rename the new keys (not in ``kept``) whose png output folder would hold, or sit in, a kept key's: a new
    x/y under a kept x (x.png's masks), or a new x over a kept x/y. The new one takes a ``_new`` suffix on the
    clashing part; the kept ones, whose outputs exist, never move."""
    kept_keys = [keys[i].casefold() for i in kept]
    folders = {"/".join(k.split("/")[:j]) for k in kept_keys for j in range(1, k.count("/") + 1)}
    out = list(keys)
    for i, key in enumerate(keys):
        if i in kept:
            continue
        parts = key.split("/")
        for j in range(1, len(parts)):  # a kept key is a folder above this one
            if "/".join(parts[:j]).casefold() in kept_keys:
                parts[j - 1] += "_new"
        if "/".join(parts).casefold() in folders:  # this one would be a folder above a kept key
            parts[-1] += "_new"
        out[i] = "/".join(parts)
    return out


def _parts_inside(out: Path, src: Path) -> tuple[str, ...] | None:
    """``out``'s path parts below ``src`` (``()`` when they are the same folder), or None when outside it."""
    try:
        return out.resolve().relative_to(src.resolve()).parts
    except ValueError:
        return None


def _read_list(src: Path) -> list[Path]:
    try:
        # utf-8-sig: Windows editors (and PowerShell's utf8) start the file with a BOM, which glued an invisible
        # character to the first path, so that image was "missing".
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as exc:
        raise InputError(f"{str(src)!r} ends in .txt but is not a UTF-8 text list of image paths ({exc.reason} "
                         f"at byte {exc.start}); rename an image to its real extension, or write one path "
                         "per line") from exc
    paths = [Path(ln).expanduser() for ln in lines if ln and not ln.startswith("#")]
    if not paths:
        raise InputError(f"list {str(src)!r} names no images; write one image path per line")
    return [p if p.is_absolute() else src.parent / p for p in paths]  # relative to the list's folder


def _unique(paths: list[Path], wanted: list[str]) -> list[tuple[Path, str]]:
    """Pair each path with its wanted key, or ``KEY_1``, ``KEY_2``, ... where that is taken or reserved."""
    used: set[str] = set()
    seen: Counter[str] = Counter()
    out = []
    for p, want in zip(paths, wanted, strict=True):
        key = want
        while key in used or is_reserved_key(key):  # one name in two folders (or x and a real x_1)
            seen[want] += 1
            key = f"{want}_{seen[want]}"
        used.add(key)
        out.append((p, key))
    return out


def _say_skipped(listing: Listing) -> None:
    """One line per kind of input left out, so no image goes missing silently."""
    other = listing.other_files
    if other:
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(other.items()))
        print(f"segany auto: skipped {sum(other.values())} files that are not images ({kinds}); images are "
              f"{', '.join(sorted(IMAGE_SUFFIXES))}", file=sys.stderr)
    if listing.earlier_outputs:
        n = len(listing.earlier_outputs)
        print(f"segany auto: skipped {n} folder{'s' if n > 1 else ''} holding an earlier segany auto output: "
              + ", ".join(str(f) for f in listing.earlier_outputs), file=sys.stderr)
    if listing.hidden_images:
        n = len(listing.hidden_images)
        print(f"segany auto: skipped {n} hidden image{'s' if n > 1 else ''} (a name starting with '.', e.g. "
              f"{listing.hidden_images[0]}); rename, or pass them in a .txt list, to include them", file=sys.stderr)
    if listing.duplicates:
        n = listing.duplicates
        print(f"segany auto: the list names {n} image{'s' if n > 1 else ''} more than once; each is segmented "
              "once", file=sys.stderr)


def check_out_not_input(source: str, out: Path, fmt: str, overlay: bool) -> None:
    """Refuse ``--out`` equal to the input folder where this run writes PNGs there (they would be input)."""
    src = Path(source).expanduser()
    if src.is_dir() and (fmt == "png" or overlay) and _parts_inside(out, src) == ():
        what = "the mask PNGs of --format png" if fmt == "png" else "the --overlay PNGs"
        raise InputError(f"--out {str(out)!r} is the input folder, so {what} would be read as images by the "
                         f"next run; pass another --out, e.g. {str(src / 'masks')!r} (a subfolder is skipped)")


def check_prompt_budget(options: dict[str, Any]) -> None:
    """Refuse grids beyond :data:`MAX_PROMPTS_PER_IMAGE` before anything is written or loaded.

    The point grid, its batches and the kept masks grow with the number of prompts, so an oversized grid
    would otherwise run out of memory, or run for days, after the output folder exists.
    """
    pps, layers = options["points_per_side"], options["crop_n_layers"]
    down = options["crop_n_points_downscale_factor"]
    total, partial = 0, False
    for i in range(layers + 1):
        side = int(pps / down**i)
        if side == 0:  # a sparser layer never adds points again
            break
        total += 4**i * side**2
        if total > MAX_PROMPTS_PER_IMAGE:
            partial = i < layers
            break
    if total > MAX_PROMPTS_PER_IMAGE:
        raise InputError(f"--points-per-side {pps} with --crop-n-layers {layers} asks for "
                         f"{'at least ' if partial else ''}{total:,} point prompts per image, over the limit of "
                         f"{MAX_PROMPTS_PER_IMAGE:,} (256 per side without crops; SAM uses 32 per side, 1,024 "
                         "prompts); lower --points-per-side or --crop-n-layers")


# ----------------------------------------------------------------- outputs
def _json_bytes(data: Any) -> bytes:
    # allow_nan=False: NaN and Infinity are not JSON, and no reader of these files would take them.
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")


def output_path(out: Path, key: str, fmt: str) -> Path:
    return out / (key if fmt == "png" else f"{key}.json")


def overlay_path(out: Path, key: str) -> Path:
    return out / f"{key}.overlay.png"


def _write_png_dir(target: Path, records: list[dict[str, Any]], image: dict[str, Any]) -> None:
    """The png format: one PNG per mask and ``masks.json`` with the image (id, file name, size) and, per mask,
    its file, id (the SA-1B one) and scores."""
    from PIL import Image

    from segany.data.rle import coco_to_mask

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 kept other users and a web server out
        meta = []
        for i, r in enumerate(records):
            m = r["segmentation"]
            m = m if not isinstance(m, dict) else coco_to_mask(m)
            name = f"mask_{i:04d}.png"
            Image.fromarray(m.astype("uint8") * 255).save(tmp / name, format="PNG")
            meta.append({"id": image["image_id"] * ANN_ID_STRIDE + i, "file": name,
                         **{k: v for k, v in r.items() if k != "segmentation"}})
        with open(tmp / "masks.json", "wb") as f:  # on disk before the folder lands (it marks the image done)
            f.write(_json_bytes({"image": image, "annotations": meta}))
            f.flush()
            os.fsync(f.fileno())
        if target.exists():  # a rerun without --resume replaces the old result
            shutil.rmtree(target)
        os.replace(tmp, target)  # renaming a folder is atomic: the image is done exactly when this lands
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _coco_results(records: list[dict[str, Any]], image_id: int) -> list[dict[str, Any]]:
    """COCO detection results. Their ``bbox`` follows COCO (``pycocotools.mask.toBbox``: width = columns
    covered), not the reference's 1 px shorter box that SA-1B files keep: these are read by COCO's evaluation,
    whose box AP would otherwise compare every box 1 px short."""
    return [{"image_id": image_id, "category_id": r.get("category_id", 1), "segmentation": r["segmentation"],
             "bbox": [*r["bbox"][:2], r["bbox"][2] + 1, r["bbox"][3] + 1], "score": r["predicted_iou"],
             "area": r["area"],
             **({"category_name": r["label"], "label_score": r["label_score"]} if "label" in r else {})}
            for r in records]


def _clean_stale_temps(out: Path) -> None:
    # A run killed mid-write leaves ".NAME.*.tmp" behind; the finished outputs never depend on them.
    for p in out.rglob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _versions() -> dict[str, str]:
    """The versions of what made the masks, from each distribution's metadata: pycocotools has no
    ``__version__``, and importing torchvision costs seconds (segany.amg.nms says why) for one string."""
    from importlib.metadata import PackageNotFoundError, version

    import cv2
    import torch

    import segany

    def dist(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"segany": segany.__version__, "torch": torch.__version__, "torchvision": dist("torchvision"),
            "numpy": dist("numpy"), "opencv": cv2.__version__, "pycocotools": dist("pycocotools"),
            "python": sys.version.split()[0]}


# --------------------------------------------------------------------- run
def _generator_options(args: argparse.Namespace, model_name: str | None) -> dict[str, Any]:
    """The generator options: the user's, else ``model_name``'s tuned defaults (SAM's for None)."""
    from segany.amg.model_defaults import generator_defaults

    defaults = generator_defaults(model_name)  # what the user left unset, on the model's own scale
    options = {name: getattr(args, name) if getattr(args, name) is not None else defaults[name]
               for name in _GEN_OPTIONS}
    options["output_mode"] = "binary_mask" if args.format == "png" else "coco_rle"
    return options


def _check_options(options: dict[str, Any]) -> Any:
    """Validate generator options before anything is written; returns their AmgConfig."""
    from segany.amg.config import AmgConfig

    with as_flags({name: "--" + name.replace("_", "-") for name in _GEN_OPTIONS}):
        config = AmgConfig(**options)
    for name in ("pred_iou_thresh", "stability_score_thresh"):  # the Python generator, like SAM's, takes any
        if not 0.0 <= options[name] <= 1.0:  # float; a typed value outside [0, 1] keeps all or no masks
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be in [0, 1], got {options[name]:g}")
    check_prompt_budget(options)
    return config


def _precision_record(args: argparse.Namespace, fast_options: dict[str, Any], device: str) -> dict[str, Any]:
    """What ``--precision``/``--quantize`` asked for and what runs on this machine (``auto`` is bf16 or fp32
    depending on it); the manifest adds the mask decoder that ran (:func:`_decoder_name`)."""
    from segany.fast import resolve_precision

    return {"requested": args.precision, "resolved": resolve_precision(fast_options["precision"], device),
            "quantize": args.quantize}


def _decoder_name(predictor: Any) -> str:
    """``folded`` or ``exact``, as ``segany predict`` records it: fp32 names two decoders on CPU, equal to
    rounding (the folded one with ``--precision auto``, the reference modules with ``--precision fp32``)."""
    from segany.fast import FastMaskDecoder

    fast = getattr(predictor, "fast", None)
    return "folded" if fast is not None and isinstance(fast.decoder, FastMaskDecoder) else "exact"


def run(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out, "--out")
    check_out_not_input(args.input, out, args.format, args.overlay)
    listing = scan_input(args.input, out)
    images = listing.images
    _check_options(_generator_options(args, args.model))  # bad option values fail before the model loads
    labels = comma_list(args.labels) if args.labels is not None else None
    if labels == []:
        raise InputError(f"--labels {args.labels!r} names no labels; pass comma-separated names such as person,car")
    checkpoint = resolve_checkpoint(args.model, args.checkpoint)
    device = resolve_device(args.device)
    fast_options = predictor_options(args, device)
    if not args.resume:  # refused before the model loads; a --resume into an unrecorded folder is checked below
        _check_foreign(out, images, args)

    from segany.amg.generator import SamAutomaticMaskGenerator
    from segany.checkpoints import build_sam
    from segany.predictor import SamPredictor

    start = time.perf_counter()
    model = build_sam(args.model, checkpoint=checkpoint, device=device)
    model_name = loaded_model_name(model.cfg, args.model, checkpoint)
    options = _generator_options(args, None if model_name.startswith("custom") else model_name)
    config = _check_options(options)
    precision = _precision_record(args, fast_options, device)
    if labels is not None:
        if model.class_head is None:  # fail now, not silently on the first image that has masks
            raise InputError(f"--labels needs a model with a class head and {model_name!r} has none; use "
                             "--model segany_tiny_labels (segany_tiny + a class head, shipped with segany)")
        from segany.text.prompting import check_text_for_model

        # Unknown closed-vocabulary names fail here; known ones become the class names, each once, and those
        # are what the run records: `Persons,person` and `person` label alike and resume each other.
        labels = list(dict.fromkeys(check_text_for_model(model, t) for t in labels))
    settings = run_settings(model_name, checkpoint, args.format, config.to_dict(), labels,
                            precision=precision["resolved"], quantize=args.quantize)
    keep = check_resume(out, settings, args.resume,  # other settings: refused before anything is written
                        lambda: any(output_path(out, k, args.format).exists() for _, k in images),
                        requested_precision=args.precision)
    if keep:
        listing = dataclasses.replace(listing, images=_keep_recorded_keys(out, images, args.format))
        images = listing.images
    elif args.resume:  # --resume into a folder without a record: a fresh run
        _check_foreign(out, images, args)
    generator = SamAutomaticMaskGenerator.from_config(model, config)
    within = _WithinImage()
    generator.predictor = _reporting_predictor(SamPredictor, model, fast_options, within)
    precision["decoder"] = _decoder_name(generator.predictor)
    if labels is not None:
        generator.labels = labels
    # The output folder appears only once every check has passed: a refused run leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out)
    if not keep:
        _remove_previous_run(out, images, args)
    record = plan_images(out, images, keep)
    redone = _remove_changed(out, record.changed, args.format)
    with _writing(out / IDS_FILE, done=0):
        write_images(out, record)
    with _writing(out / RUN_FILE, done=0):
        since = record_run(out, settings, keep, requested={"precision": args.precision, "quantize": args.quantize})
    _say_skipped(listing)
    state = _Progress()
    todo, overlay_only = _plan(out, images, args, since, state.earlier_masks)
    finished = False
    try:
        with _stops_as_interrupts():
            _process(out, listing, todo, overlay_only, generator, record.ids, args, state, within)
        finished = True
    finally:  # however the run ends, the manifest records what it did
        stopped = None if finished else sys.exc_info()[1]
        try:
            code = _finish(out, listing, args, model_name, checkpoint, device, config, precision, state, todo,
                           redone, start, since, stopped)
        except Exception as exc:
            if stopped is None:
                raise
            # the error that stopped the run is the one the command ends with; this one gets a line
            print(f"segany auto: the manifest could not be written: {type(exc).__name__}: {exc}", file=sys.stderr)
        if isinstance(stopped, KeyboardInterrupt):
            how = f"stopped by {stopped}" if isinstance(stopped, Terminated) else "interrupted"
            print(f"segany auto: {how} after {state.done} images; finished ones are kept, rerun the same "
                  f"command with --resume to do the rest (outputs in {out})", file=sys.stderr)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``timeout``, a batch system's time limit, ``docker stop``, a closed terminal): ended as
    Ctrl-C is, so the manifest is written and says how to resume. Before, the process died at once and the
    folder's manifest still described the run before it. ``signum``: the command exits 128 + it, as a process
    the signal killed would (143 for SIGTERM), which batch systems and systemd read."""

    def __init__(self, name: str, signum: int) -> None:
        super().__init__(name)
        self.signum = signum


@contextmanager
def _stops_as_interrupts() -> Iterator[None]:
    """While images are processed (main thread only), SIGTERM and SIGHUP raise :class:`Terminated`."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated(signal.Signals(signum).name, signum)

    # Only where the signal would kill the process: `nohup` (SIGHUP ignored) and a parent's own handling stay.
    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP")
              if hasattr(signal, n) and signal.getsignal(getattr(signal, n)) == signal.SIG_DFL]
    before = {sig: signal.signal(sig, stop) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@dataclass
class _Progress:
    """What this run has done so far; an interrupted run still reports it."""

    done: int = 0
    overlays: int = 0
    n_masks: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    nonfinite: int = 0  # masks dropped because a score was NaN or infinite
    unexpected: int = 0  # images failed by an unexpected error (a bug)
    # Masks per output key that --resume found done (and read while checking it), so the summary need not
    # parse those outputs a second time.
    earlier_masks: dict[str, int] = field(default_factory=dict)


class OutputWriteError(SeganyError):
    """The file system refused an output (disk full, read-only, permissions): the run stops, since every
    later image would fail the same way, and says which file and how to go on."""

    def __init__(self, message: str, *, path: Path, reason: str) -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


@contextmanager
def _writing(path: Path, *, done: int) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into an :class:`OutputWriteError` naming it and the fix.
    ``done``: the images finished so far, which a ``--resume`` keeps. The atomic writers leave no temp file
    and the previous version of ``path`` (if any) whole."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OutputWriteError(_write_failure(exc, reason, path, done), path=path, reason=reason) from exc


def _write_failure(exc: OSError, reason: str, path: Path, done: int) -> str:
    if exc.errno in NO_SPACE:
        fix = "free space on that disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make that folder writable"
    else:
        fix = "fix that"
    kept = ("the image this run finished is" if done == 1 else f"the {done} images this run finished are" if done
            else "finished images are")
    return (f"{reason} while writing {path}; {fix} and rerun the same command with --resume to do the rest "
            f"({kept} kept, whole)")


def _finite_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The masks an output can hold, and how many were dropped for a score that is not a finite number.

    An empty mask (possible with --stability-score-thresh 0; its stability is 0/0, NaN) is no SA-1B record,
    and ``--min-mask-region-area`` can fill one into a full mask that keeps the NaN; NaN is not JSON. The
    Python API keeps both, as the reference does."""
    kept, dropped = [], 0
    for r in records:
        if r["area"] <= 0:
            continue
        if all(math.isfinite(float(r[k])) for k in ("predicted_iou", "stability_score", "label_score") if k in r):
            kept.append(r)
        else:
            dropped += 1
    return kept, dropped


class _WithinImage:
    """Progress inside one image on the bar's postfix: the prompts decoded of the image's total (and the crop,
    with crop layers), so a large image (minutes on a CPU) does not look stuck. Shown only once an image has
    run :data:`SLOW_IMAGE_S`, and redrawn at most every :data:`REFRESH_S`: a small image costs one clock read
    per decoder batch."""

    SLOW_IMAGE_S = 2.0
    REFRESH_S = 0.5

    def __init__(self) -> None:
        self.bar: Any = None
        self.name = ""
        self.prompts = self.total_prompts = self.crop = self.total_crops = 0
        self.started = self.shown = 0.0

    def start(self, bar: Any, name: str, prompts_per_crop: list[int]) -> None:
        self.bar, self.name = bar, name
        self.total_prompts, self.total_crops = sum(prompts_per_crop), len(prompts_per_crop)
        self.prompts = self.crop = 0
        self.started = self.shown = time.monotonic()

    def stop(self) -> None:
        self.bar = None

    def on_crop(self) -> None:
        self.crop = min(self.crop + 1, self.total_crops)

    def on_batch(self, prompts: int) -> None:
        """Called as a decoder batch of ``prompts`` starts: the batches before it are done."""
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self.started >= self.SLOW_IMAGE_S and now - self.shown >= self.REFRESH_S:
            self.shown = now
            crop = f", crop {self.crop}/{self.total_crops}" if self.total_crops > 1 else ""
            self.bar.set_postfix_str(f"{self.name}: {min(self.prompts, self.total_prompts)}/{self.total_prompts} "
                                     f"prompts{crop}")
        self.prompts += prompts


def _reporting_predictor(base: type, model: Any, options: dict[str, Any], within: _WithinImage) -> Any:
    """A ``SamPredictor`` (``base``) that tells ``within`` of each crop embedded and each decoder batch; the
    generator drives it as any predictor. Built here so that importing the CLI does not import torch."""

    class ReportingPredictor(base):  # type: ignore[misc, valid-type]
        def set_image(self, *args: Any, **kwargs: Any) -> None:
            within.on_crop()
            super().set_image(*args, **kwargs)

        def predict_torch(self, point_coords: Any, *args: Any, **kwargs: Any) -> Any:
            within.on_batch(0 if point_coords is None else int(point_coords.shape[0]))
            return super().predict_torch(point_coords, *args, **kwargs)

    return ReportingPredictor(model, **options)


def _process(out: Path, listing: Listing, todo: list[tuple[Path, str]], overlay_only: list[tuple[Path, str]],
             generator: Any, ids: dict[str, int], args: argparse.Namespace, state: _Progress,
             within: _WithinImage | None = None) -> None:
    """Segment ``todo`` and draw the overlays of ``overlay_only``, one atomic output per image.

    An image that cannot be read or segmented, or whose processing raised anything else (a bug), is listed
    in ``state.failures`` and the run goes on; an :class:`OutputWriteError` stops it (the caller writes the
    manifest)."""
    from tqdm import tqdm

    overlay_keys = {key for _, key in overlay_only}
    # A context manager: an interrupted run's bar is closed here, before the closing lines, not after them
    with tqdm(total=len(todo) + len(overlay_only), unit="img", file=sys.stderr, disable=args.quiet,
              dynamic_ncols=True, desc="segany auto") as bar:
        for path, key in [*todo, *overlay_only]:
            try:
                _one_image(out, listing, path, key, key in overlay_keys, generator, ids[key], args, state, bar,
                           within if not args.quiet else None)
            except InputError as exc:  # unreadable, or an image this model cannot take (too thin to resize)
                state.failures.append({"image": str(path), "error": str(exc)})
                bar.write(f"segany: skipping {path}: {exc}", file=sys.stderr)
            except OutputWriteError:
                raise
            except Exception as exc:  # a bug: fail this image, keep the traceback for a report, go on
                error = f"unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())}"
                failure = {"image": str(path), "error": error}
                state.unexpected += 1
                if state.unexpected <= _TRACEBACKS_KEPT:  # a bug that fails every image needs a few, not all
                    failure["traceback"] = traceback.format_exc()
                state.failures.append(failure)
                where = f" (traceback in {out / MANIFEST_FILE})" if "traceback" in failure else ""
                bar.write(f"segany: skipping {path}: {error}{where}", file=sys.stderr)
            bar.update(1)  # after the image, so the bar never shows as done one still running


def _one_image(out: Path, listing: Listing, path: Path, key: str, overlay_only: bool, generator: Any,
               image_id: int, args: argparse.Namespace, state: _Progress, bar: Any,
               within: _WithinImage | None) -> None:
    from segany.amg.grid import crop_boxes
    from segany.data.images import load_image

    image = load_image(path)
    target = output_path(out, key, args.format)
    if overlay_only:  # done by the recorded run without --overlay: draw its saved masks
        try:  # read before the write guard: a file of the output that went missing is not a failed write
            saved = _saved_records(target, args.format)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"its earlier output {target} cannot be read to draw the overlay ({exc}); rerun this "
                             "image without --resume") from exc
        with _writing(overlay_path(out, key), done=state.done):
            _write_overlay(out, key, image, saved)
        state.overlays += 1
        return
    if within is not None:
        c = generator.config
        _, layers = crop_boxes(image.shape[:2], c.crop_n_layers, c.crop_overlap_ratio)
        within.start(bar, key, [len(generator.point_grids[layer]) for layer in layers])
    try:
        records = generator.generate(image)
    finally:
        if within is not None:
            within.stop()
    records, dropped = _finite_records(records)
    if args.overlay:  # before the output, which marks the image done
        with _writing(overlay_path(out, key), done=state.done):
            _write_overlay(out, key, image, records)
    with _writing(target, done=state.done):
        _write_output(target, args.format, records, image_id=image_id, file_name=listing.file_name(path),
                      size_hw=image.shape[:2])
    state.done += 1  # counted once written: a run stopped by a full disk reports what its output holds
    state.n_masks += len(records)
    state.nonfinite += dropped
    bar.set_postfix(masks=len(records))


def _finish(out: Path, listing: Listing, args: argparse.Namespace, model_name: str, checkpoint: Path | None,
            device: str, config: Any, precision: dict[str, Any], state: _Progress, todo: list[tuple[Path, str]],
            redone: int, start: float, since: int, stopped: BaseException | None = None) -> int:
    """Write the manifest (and coco's merged files), print the summary; the exit status.

    ``stopped``: what ended the run early (Ctrl-C, an :class:`OutputWriteError`, a bug), recorded in the
    manifest. The summary is printed even when the file system refuses the manifest; that refusal is then
    raised, or, when something else stopped the run, reported in a line so that the command ends with the
    error that stopped it."""
    import torch

    images, failures, done = listing.images, state.failures, state.done
    elapsed = time.perf_counter() - start
    refused: list[OutputWriteError] = []  # a disk that is full stays full: the manifest may fail too
    whole: dict[str, int | None]
    try:
        whole = dict(_summarize(out, [k for _, k in images], args.format, since, state.earlier_masks))
    except OutputWriteError as exc:
        refused.append(exc)
        whole = {"done": None, "masks": None}  # unknown: the merged files could not be written
    counts = {"images": len(images), "done": whole["done"], "failed": len(failures), "masks": whole["masks"],
              "not_images": sum(listing.other_files.values())}
    this_run = {"processed": done, "skipped_existing": len(images) - len(todo), "redone_changed": redone,
                "overlays_added": state.overlays, "failed": len(failures), "masks": state.n_masks,
                "dropped_nonfinite_masks": state.nonfinite, "seconds": round(elapsed, 3)}
    manifest = {
        "command": "auto", "input": str(args.input), "format": args.format, "overlay": args.overlay,
        "model": model_name, "checkpoint": str(checkpoint) if checkpoint else None, "device": device,
        "threads": torch.get_num_threads(), "precision": precision, "options": config.to_dict(),
        "versions": _versions(), "counts": counts, "this_run": this_run, "failures": failures,
        "stopped": None if stopped is None else _stop_reason(stopped), "seconds": round(elapsed, 3),
    }
    try:
        with _writing(out / MANIFEST_FILE, done=done):
            atomic_write_bytes(out / MANIFEST_FILE, json.dumps(manifest, indent=2).encode("utf-8"))
    except OutputWriteError as exc:
        refused.append(exc)
    rate = done / elapsed if elapsed > 0 else 0.0
    held = (f"the output holds {whole['done']} of {len(images)} images, {whole['masks']} masks"
            if whole["done"] is not None else "the output's counts are unknown")
    print(f"segany auto: {done} processed, {this_run['skipped_existing']} already done"
          + (f", {redone} redone because their image changed" if redone else "")
          + (f" ({state.overlays} overlays added)" if state.overlays else "")
          + f", {len(failures)} failed, {state.n_masks} masks"
          + (f" ({state.nonfinite} more dropped: a score was not a number)" if state.nonfinite else "")
          + f", {rate:.2f} images/s; {held}; outputs in {out}", file=sys.stderr)
    if failures:
        print("failed images:", file=sys.stderr)
        for f in failures:
            print(f"  {f['image']}: {f['error']}", file=sys.stderr)
        if not whole["done"] and stopped is None and not refused:
            print(f"segany auto: no image could be segmented ({len(failures)} failed, listed above and in "
                  f"{out / MANIFEST_FILE}); fix or remove them and rerun", file=sys.stderr)
    if refused:
        if stopped is None:
            raise refused[0]
        for exc in refused:
            print(f"segany auto: {exc.path} not written either ({exc.reason})", file=sys.stderr)
    return 1 if failures else 0


def _stop_reason(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return f"stopped by {exc}; rerun the same command with --resume to do the rest"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C); rerun the same command with --resume to do the rest"
    if isinstance(exc, SeganyError):
        return exc.cli_message()
    return f"unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())}"


def _check_foreign(out: Path, images: list[tuple[Path, str]], args: argparse.Namespace) -> None:
    """Refuse a run that would replace files in ``out`` the recorded run did not write (the user's own
    ``x.json`` beside ``x.jpg``, or an unrecorded folder's outputs), unless ``--overwrite``; with it, name them.

    What the recorded run wrote is known from its run.json (format) and image_ids.json (output names), the
    same record :func:`_remove_previous_run` removes by, so no file outside that record is replaced silently.
    """
    foreign = _foreign_files(out, images, args)
    if not foreign:
        return
    shown = ", ".join(str(p) for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    if not args.overwrite:
        raise InputError(f"--out {str(out)!r} holds {len(foreign)} file(s) this run would replace that no recorded "
                         f"segany auto run wrote there: {shown}; move them away, pick another --out, or pass "
                         "--overwrite to replace them")
    print(f"segany auto: --overwrite: replacing {len(foreign)} file(s) no recorded run wrote: {shown}",
          file=sys.stderr)


def _foreign_files(out: Path, images: list[tuple[Path, str]], args: argparse.Namespace) -> list[Path]:
    """The files at names this run writes that exist and are outside the recorded run's outputs."""
    if not out.is_dir():
        return []
    fmt, keys = previous_outputs(out)
    ours: set[Path] = set()
    if fmt in FORMATS:
        ours = {output_path(out, k, fmt) for k in keys} | {overlay_path(out, k) for k in keys}
        if fmt == "coco":
            ours |= {out / COCO_RESULTS_FILE, out / COCO_IMAGES_FILE}
    targets = [output_path(out, k, args.format) for _, k in images]
    if args.overlay:
        targets += [overlay_path(out, k) for _, k in images]
    if args.format == "coco":
        targets += [out / COCO_RESULTS_FILE, out / COCO_IMAGES_FILE]
    return [t for t in targets if t not in ours and (t.exists() or t.is_symlink())]


def _remove(path: Path) -> bool:
    """Remove an output file or png folder; whether there was one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        return True
    if path.exists() or path.is_symlink():
        path.unlink()
        return True
    return False


def _inside(out: Path, path: Path) -> bool:
    return _parts_inside(path, out) not in (None, ())


def _remove_previous_run(out: Path, images: list[tuple[Path, str]], args: argparse.Namespace) -> None:
    """A run without --resume owns its folder: remove every output the recorded run wrote (found through its
    run.json and image_ids.json, so no other file is touched) and say how many this run will not rewrite."""
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # it describes the earlier run; this one writes its own
    fmt, keys = previous_outputs(out)
    if fmt not in FORMATS:
        return
    rewritten = {output_path(out, k, args.format) for _, k in images}
    if args.overlay:
        rewritten |= {overlay_path(out, k) for _, k in images}
    stale = [output_path(out, k, fmt) for k in keys] + [overlay_path(out, k) for k in keys]
    if fmt == "coco":
        stale += [out / COCO_RESULTS_FILE, out / COCO_IMAGES_FILE]
    if args.format == "coco":
        rewritten |= {out / COCO_RESULTS_FILE, out / COCO_IMAGES_FILE}
    left = 0
    for path in stale:
        if _inside(out, path) and _remove(path):
            _remove_empty_parents(out, path)
            if path not in rewritten:
                left += 1
    if left:
        print(f"segany auto: removed {left} outputs of the earlier run in {out} that this run does not rewrite "
              "(images no longer listed, another --format, or no --overlay); --resume keeps finished images",
              file=sys.stderr)


def _remove_empty_parents(out: Path, path: Path) -> None:
    """Remove the folders between ``out`` and ``path`` that removing ``path`` left empty (``sub/`` of
    ``sub/x.json``), so a rerun's folder shows only what it wrote; ``out`` itself and any folder still
    holding a file stay."""
    parent = path.parent
    while parent != out and _inside(out, parent):
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            return
        parent = parent.parent


def _remove_changed(out: Path, keys: list[str], fmt: str) -> int:
    """Remove the outputs of images whose file changed since they were made; how many there were."""
    n = 0
    for key in keys:
        if _remove(output_path(out, key, fmt)):
            n += 1
        _remove(overlay_path(out, key))
    return n


def _plan(out: Path, images: list[tuple[Path, str]], args: argparse.Namespace, since: int,
          earlier_masks: dict[str, int]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(images to segment, images done whose overlay is missing). Without --resume every image is redone.
    The mask count of each output found done goes into ``earlier_masks``."""
    if not args.resume:
        return list(images), []
    todo, overlay_only, unreadable = [], [], []
    for path, key in images:
        target = output_path(out, key, args.format)
        current = is_current(target, since)
        n = _output_masks(target, args.format) if current else None
        if n is None:
            if current:  # cut short or emptied after it was written: redo it
                unreadable.append(target)
            todo.append((path, key))
            continue
        earlier_masks[key] = n
        if args.overlay and not is_current(overlay_path(out, key), since):
            overlay_only.append((path, key))
    if unreadable:
        print(f"segany auto: {len(unreadable)} earlier output(s) cannot be read (empty or cut short, e.g. "
              f"{unreadable[0]}); those images are done again", file=sys.stderr)
    return todo, overlay_only


def _output_masks(target: Path, fmt: str) -> int | None:
    """How many masks a finished output holds, or None when it cannot be read (then --resume redoes it).

    For ``png`` the mask files masks.json lists must be there and whole too: one deleted or cut short counted
    as done, and drawing ``--overlay`` from it later stopped the run as a failed write.
    """
    try:
        data = _read_output(target, fmt)
        if fmt == "png" and not all(_whole_png(target / str(m["file"])) for m in _png_masks(data)):
            return None
        return _mask_count(data, fmt)
    except (OSError, ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG's last chunk: a file cut short lacks it


def _whole_png(path: Path) -> bool:
    """Whether ``path`` is a PNG file that ends as a PNG does (read: its size and last 12 bytes, not its pixels,
    so a resume over thousands of masks stays quick)."""
    try:
        with path.open("rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except OSError:
        return False


def _mask_count(data: Any, fmt: str) -> int:
    return len(data["annotations"] if fmt == "sa1b" else data["results"] if fmt == "coco" else _png_masks(data))


def _write_overlay(out: Path, key: str, image: Any, records: list[dict[str, Any]]) -> None:
    import io

    from PIL import Image

    from segany.amg.render import render_overlay

    buf = io.BytesIO()
    Image.fromarray(render_overlay(image, records)).save(buf, format="PNG")
    atomic_write_bytes(overlay_path(out, key), buf.getvalue())


def _write_output(target: Path, fmt: str, records: list[dict[str, Any]], *, image_id: int, file_name: str,
                  size_hw: tuple[int, int]) -> None:
    """One image's output, written atomically: it marks the image done for --resume."""
    from segany.data.formats.sa1b import to_sa1b

    h, w = size_hw
    if fmt == "sa1b":
        data = to_sa1b(records, image_id=image_id, file_name=file_name, size_hw=(h, w))
        for i, ann in enumerate(data["annotations"]):  # unique over the output, as SA-1B's are
            ann["id"] = image_id * ANN_ID_STRIDE + i
        atomic_write_bytes(target, _json_bytes(data), fsync=True)  # a crash must not leave a "done" empty file
    elif fmt == "coco":
        atomic_write_bytes(target, _json_bytes({"image": {"id": image_id, "file_name": file_name, "width": w,
                                                          "height": h},
                                                "results": _coco_results(records, image_id)}), fsync=True)
    else:
        _write_png_dir(target, records, {"image_id": image_id, "file_name": file_name, "width": w, "height": h})


def _read_output(target: Path, fmt: str) -> Any:
    name = target / "masks.json" if fmt == "png" else target
    return json.loads(name.read_text(encoding="utf-8"))


def _saved_records(target: Path, fmt: str) -> list[dict[str, Any]]:
    """The masks of a finished output, as records :func:`render_overlay` draws."""
    data = _read_output(target, fmt)
    if fmt == "sa1b":
        return data["annotations"]
    if fmt == "coco":
        return data["results"]
    import numpy as np
    from PIL import Image

    return [{**m, "segmentation": np.asarray(Image.open(target / m["file"])) > 0} for m in _png_masks(data)]


def _png_masks(data: Any) -> list[dict[str, Any]]:
    """The mask entries of a png output's masks.json (a bare list before image ids were added)."""
    return data if isinstance(data, list) else data["annotations"]


def _summarize(out: Path, keys: list[str], fmt: str, since: int, earlier_masks: dict[str, int]
               ) -> dict[str, int]:
    """Images done and masks in the whole output (this run's and earlier ones'); writes coco's merged files.
    ``earlier_masks`` holds the counts of outputs --resume already read and left alone; coco needs their data."""
    done = masks = 0
    merged_images, merged = [], []
    for key in keys:
        p = output_path(out, key, fmt)
        if not is_current(p, since):  # not done, or a replaced run's output for an image that failed this time
            continue
        done += 1
        if key in earlier_masks and fmt != "coco":
            masks += earlier_masks[key]
            continue
        data = _read_output(p, fmt)
        if fmt == "coco":
            merged_images.append(data["image"])
            merged.extend(data["results"])
        masks += _mask_count(data, fmt)
    if fmt == "coco":
        with _writing(out / COCO_RESULTS_FILE, done=done):
            atomic_write_bytes(out / COCO_RESULTS_FILE, _json_bytes(merged))
        with _writing(out / COCO_IMAGES_FILE, done=done):
            atomic_write_bytes(out / COCO_IMAGES_FILE, _json_bytes(_coco_dataset(merged_images, merged)))
    return {"done": done, "masks": masks}


def _coco_dataset(images: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    """coco_images.json: a COCO dataset without annotations, so ``COCO('coco_images.json')`` loads it and
    ``.loadRes('coco_results.json')`` attaches the results. Categories are those the results use: 1 "object"
    for class-agnostic masks, and the label names with --labels."""
    names: dict[int, str] = {1: "object"}
    for r in results:
        if "category_name" in r:
            names[r["category_id"]] = r["category_name"]
    used = {r["category_id"] for r in results} or {1}
    categories = [{"id": i, "name": names.get(i, str(i)), "supercategory": "object"} for i in sorted(used)]
    return {"info": {"description": "segany auto outputs"}, "images": images, "annotations": [],
            "categories": categories}
