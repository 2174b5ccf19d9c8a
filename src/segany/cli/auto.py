"""``segany auto``: automatic masks for an image, a folder or a list of images, resumable.

Each image's result is written atomically and is the marker that the image is done, so a run
killed at any moment (even with SIGKILL) and restarted with ``--resume`` loses, duplicates and
half-writes nothing. Unreadable images are reported, skipped and listed; the exit status is 1
if any failed. ``manifest.json`` records the model, options, versions and counts of the run;
``run.json`` the settings that ``--resume`` checks (:mod:`segany.cli.auto_resume`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from segany.cli._checks import check_out_dir
from segany.cli._util import (
    add_speed_arguments,
    atomic_write_bytes,
    changes_results,
    comma_list,
    predictor_options,
    resolve_checkpoint,
    resolve_device,
)
from segany.cli.auto_resume import check_resume, is_current, record_run, run_settings
from segany.errors import ImageLoadError, InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
FORMATS = ("sa1b", "coco", "png")
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
                        "coco_results.json; png: a folder of mask PNGs per image")
    p.add_argument("--overlay", action="store_true", help="also write NAME.overlay.png showing all masks")
    p.add_argument("--resume", action="store_true",
                   help="skip images already done with the same model, weights and options (others are refused)")
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
def collect_images(source: str) -> list[tuple[Path, str]]:
    """(image path, output key) pairs in a stable order; the key names the image's outputs.

    Keys are unique, so no image's outputs overwrite another's: in a folder the key is the path relative to
    it without the extension, or with it where two files differ only by extension (``x.jpg`` and ``x.png``
    write ``x.jpg.json`` and ``x.png.json``); in a list, repeated names get ``_1``, ``_2``, ...
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise InputError(f"input {str(src)!r} does not exist; pass an image, a folder or a .txt list of paths")
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(src).parts))
        if not files:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {str(src)!r}")
        stems = [f.relative_to(src).with_suffix("").as_posix() for f in files]
        count = Counter(stems)
        return [(f, stem if count[stem] == 1 else f.relative_to(src).as_posix())
                for f, stem in zip(files, stems, strict=True)]
    if src.suffix.lower() == ".txt":
        try:
            lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as exc:
            raise InputError(f"{str(src)!r} ends in .txt but is not a UTF-8 text list of image paths ({exc.reason} "
                             f"at byte {exc.start}); rename an image to its real extension, or write one path "
                             "per line") from exc
        paths = [Path(ln).expanduser() for ln in lines if ln and not ln.startswith("#")]
        paths = [p if p.is_absolute() else src.parent / p for p in paths]  # relative to the list's folder
        if not paths:
            raise InputError(f"list {str(src)!r} names no images; write one image path per line")
        used: set[str] = set()
        seen: Counter[str] = Counter()
        out = []
        for p in paths:
            key = p.stem
            while key in used:  # one name in two folders (or x and a real x_1): keep them apart
                seen[p.stem] += 1
                key = f"{p.stem}_{seen[p.stem]}"
            used.add(key)
            out.append((p, key))
        return out
    return [(src, src.stem)]


# ----------------------------------------------------------------- outputs
def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def output_path(out: Path, key: str, fmt: str) -> Path:
    return out / (key if fmt == "png" else f"{key}.json")


def _write_png_dir(target: Path, records: list[dict[str, Any]]) -> None:
    from PIL import Image

    from segany.data.rle import coco_to_mask

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        meta = []
        for i, r in enumerate(records):
            m = r["segmentation"]
            m = m if not isinstance(m, dict) else coco_to_mask(m)
            name = f"mask_{i:04d}.png"
            Image.fromarray(m.astype("uint8") * 255).save(tmp / name, format="PNG")
            meta.append({"file": name, **{k: v for k, v in r.items() if k != "segmentation"}})
        (tmp / "masks.json").write_bytes(_json_bytes(meta))
        if target.exists():  # a rerun without --resume replaces the old result
            shutil.rmtree(target)
        os.replace(tmp, target)  # renaming a folder is atomic: the image is done exactly when this lands
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _coco_results(records: list[dict[str, Any]], image_id: int) -> list[dict[str, Any]]:
    return [{"image_id": image_id, "category_id": r.get("category_id", 1), "segmentation": r["segmentation"],
             "bbox": r["bbox"], "score": r["predicted_iou"], "area": r["area"],
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
    import cv2
    import numpy
    import pycocotools
    import torch
    import torchvision

    import segany

    return {"segany": segany.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "opencv": cv2.__version__,
            "pycocotools": getattr(pycocotools, "__version__", "unknown"), "python": sys.version.split()[0]}


# --------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from segany.amg.config import AmgConfig

    out = check_out_dir(args.out, "--out")
    images = collect_images(args.input)
    from segany.amg.model_defaults import generator_defaults

    defaults = generator_defaults(args.model)  # what the user left unset, on the model's own scale
    options = {name: getattr(args, name) if getattr(args, name) is not None else defaults[name]
               for name in _GEN_OPTIONS}
    options["output_mode"] = "binary_mask" if args.format == "png" else "coco_rle"
    config = AmgConfig(**options)  # bad option values fail here, before the model loads
    for name in ("pred_iou_thresh", "stability_score_thresh"):  # the Python generator, like SAM's, takes any
        if not 0.0 <= options[name] <= 1.0:  # float; a typed value outside [0, 1] keeps all or no masks
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be in [0, 1], got {options[name]:g}")
    labels = comma_list(args.labels) if args.labels is not None else None
    if labels == []:
        raise InputError(f"--labels {args.labels!r} names no labels; pass comma-separated names such as person,car")
    checkpoint = resolve_checkpoint(args.model, args.checkpoint)
    device = resolve_device(args.device)
    fast_options = predictor_options(args, device)
    settings = run_settings(args.model, checkpoint, args.format, config.to_dict(), labels)
    predictor_settings = changes_results(args)
    if predictor_settings:  # runs with the defaults keep the settings record they always had
        settings["predictor"] = predictor_settings
    keep = check_resume(out, settings, args.resume,  # other settings: refused before the model loads
                        lambda: any(output_path(out, k, args.format).exists() for _, k in images))

    from tqdm import tqdm

    from segany.amg.generator import SamAutomaticMaskGenerator
    from segany.checkpoints import build_sam
    from segany.data.formats.sa1b import to_sa1b
    from segany.data.images import load_image
    from segany.predictor import SamPredictor

    start = time.perf_counter()
    model = build_sam(args.model, checkpoint=checkpoint, device=device)
    generator = SamAutomaticMaskGenerator.from_config(model, config)
    generator.predictor = SamPredictor(model, **fast_options)
    if labels is not None:
        if model.class_head is None:  # fail now, not silently on the first image that has masks
            raise InputError(f"--labels needs a model with a class head and {args.model!r} has none; use "
                             "--model segany_tiny_labels (segany_tiny + a class head, shipped with segany)")
        from segany.text.prompting import check_text_for_model

        generator.labels = [check_text_for_model(model, t) for t in labels]  # unknown closed-vocabulary names
    # The output folder appears only once every check has passed: a refused run leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out)
    since = record_run(out, settings, keep)
    todo = [(i, p, k) for i, (p, k) in enumerate(images)
            if not (args.resume and is_current(output_path(out, k, args.format), since))]
    skipped = len(images) - len(todo)
    failures: list[dict[str, str]] = []
    n_masks = 0
    done = 0
    bar = tqdm(todo, total=len(todo), unit="img", file=sys.stderr, disable=args.quiet, dynamic_ncols=True,
               desc="segany auto")
    for index, path, key in bar:
        try:
            image = load_image(path)
        except ImageLoadError as exc:
            failures.append({"image": str(path), "error": str(exc)})
            bar.write(f"segany: skipping {path}: {exc}", file=sys.stderr)
            continue
        records = generator.generate(image)
        n_masks += len(records)
        target = output_path(out, key, args.format)
        if args.overlay:
            from segany.amg.render import render_overlay

            overlay_path = out / f"{key}.overlay.png"
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(render_overlay(image, records)).save(buf, format="PNG")
            atomic_write_bytes(overlay_path, buf.getvalue())
        h, w = image.shape[:2]
        file_name = path.name
        if args.format == "sa1b":
            atomic_write_bytes(target, _json_bytes(to_sa1b(records, image_id=index + 1, file_name=file_name,
                                                           size_hw=(h, w))))
        elif args.format == "coco":
            atomic_write_bytes(target, _json_bytes({"image": {"id": index + 1, "file_name": file_name, "width": w,
                                                              "height": h},
                                                    "results": _coco_results(records, index + 1)}))
        else:
            _write_png_dir(target, records)
        done += 1
        bar.set_postfix(masks=len(records))
    bar.close()
    elapsed = time.perf_counter() - start

    if args.format == "coco":
        merged_images, merged = [], []
        for _, key in images:
            p = output_path(out, key, "coco")
            if is_current(p, since):  # not a replaced run's output for an image that failed this time
                d = json.loads(p.read_text(encoding="utf-8"))
                merged_images.append(d["image"])
                merged.extend(d["results"])
        atomic_write_bytes(out / "coco_results.json", _json_bytes(merged))
        atomic_write_bytes(out / "coco_images.json", _json_bytes(merged_images))

    manifest = {
        "command": "auto", "input": str(args.input), "format": args.format, "model": args.model,
        "checkpoint": str(checkpoint) if checkpoint else None, "device": device, "options": config.to_dict(),
        "versions": _versions(),
        "counts": {"images": len(images), "processed": done, "skipped_existing": skipped, "failed": len(failures),
                   "masks": n_masks},
        "failures": failures, "seconds": round(elapsed, 3),
    }
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode("utf-8"))
    rate = done / elapsed if elapsed > 0 else 0.0
    print(f"segany auto: {done} processed, {skipped} already done, {len(failures)} failed, {n_masks} masks, "
          f"{rate:.2f} images/s; outputs in {out}", file=sys.stderr)
    if failures:
        print("failed images:", file=sys.stderr)
        for f in failures:
            print(f"  {f['image']}: {f['error']}", file=sys.stderr)
        return 1
    return 0
