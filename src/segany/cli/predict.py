"""``segany predict``: masks for point/box prompts on one image, written as PNGs, an overlay and JSON.

Outputs in ``--out`` (each written atomically; the JSON last, so its presence means a complete run):
``<stem>_mask<i>.png`` (0/255), ``<stem>_overlay.png`` (best mask, prompts drawn) and ``<stem>.json``
with scores, mask bounding boxes (XYXY pixels) and COCO RLE (pycocotools ``counts`` as text).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from segany.cli._checks import check_out_dir
from segany.cli._util import (
    Progress,
    add_speed_arguments,
    atomic_write,
    atomic_write_bytes,
    loaded_model_name,
    parse_box,
    parse_point,
    predictor_options,
    resolve_checkpoint,
    resolve_device,
)
from segany.errors import InputError
from segany.text.vocab import TEXT_MAX_INSTANCES, TEXT_MIN_SCORE, TEXT_POINTS_PER_SIDE

# --text alone keeps 3 low-res candidates per grid point until ranking: 64² points are 12,288 candidates, about
# 0.8 GB for segany_tiny's 128² logits and 3.2 GB for SAM's 256².
MAX_TEXT_POINTS_PER_SIDE = 64


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="segment one image from point and box prompts",
        description="Segment one image from clicks and/or a box. A segany checkpoint (from save_checkpoint or "
                    "training) embeds its architecture, so with one --model only picks the fallback; official "
                    ".pth files need the matching --model.",
    )
    p.add_argument("image", help="image file (JPEG, PNG, TIFF, BMP, WebP; grayscale/RGBA/16-bit are converted)")
    p.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                   help="a click in image pixels; LABEL 1 = foreground (default), 0 = background; repeatable")
    p.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="a box in image pixels (top-left, bottom-right); one per run")
    p.add_argument("--text", help="a phrase, e.g. 'a dog' (models with a text token or class head); alone it "
                                  "segments every instance, with clicks/box it picks the named object")
    # --text alone: the search's defaults are segany.text.vocab's, shared with the API and the server (why 0.1:
    # see TEXT_MIN_SCORE); raise --min-score for models with SAM-scale IoU predictions.
    p.add_argument("--min-score", type=float, default=None,
                   help="--text alone: keep instances whose predicted IoU x P(class) is at least this "
                        f"(default {TEXT_MIN_SCORE:g})")
    p.add_argument("--points-per-side", type=int, default=None,
                   help="--text alone: side of the point grid searched for instances "
                        f"(default {TEXT_POINTS_PER_SIDE}, at most "
                        f"{MAX_TEXT_POINTS_PER_SIDE})")
    p.add_argument("--max-instances", type=int, default=None,
                   help=f"--text alone: keep at most this many instances, best first (default {TEXT_MAX_INSTANCES}; "
                        "a note says when the limit was reached)")
    p.add_argument("--model", default="segany_tiny",
                   help="registered model name (see `segany models`; default segany_tiny, whose weights ship with segany)")
    p.add_argument("--checkpoint", help="weights file; default: the model's weights in the download cache")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    mm = p.add_mutually_exclusive_group()
    mm.add_argument("--multimask", dest="multimask", action="store_true", default=None,
                    help="write SAM's 3 candidate masks (default for a single click, which is ambiguous, and with "
                         "--text, which ranks them: the named object first)")
    mm.add_argument("--single", dest="multimask", action="store_false",
                    help="write one mask (default for boxes and several clicks without --text)")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda when there is a GPU, else cpu), cpu, cuda, cuda:1 or mps")
    add_speed_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out at this image's output names (<stem>.json, <stem>_overlay.png, "
                        "<stem>_mask<i>.png) that no earlier segany predict wrote (refused without it)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    points = [parse_point(t) for t in args.point]
    if len(args.box) > 1:
        raise InputError(f"--box was given {len(args.box)} times; predict takes one box (with points, it refines "
                         "that box). For many boxes use SamPredictor.predict_torch, or `segany auto` for everything")
    box = parse_box(args.box[0]) if args.box else None
    if not points and box is None and args.text is None:
        raise InputError("no prompt given: pass at least one --point X,Y[,LABEL], a --box X0,Y0,X1,Y1 or --text")
    text_alone = args.text is not None and not points and box is None
    given = [flag for flag, v in (("--min-score", args.min_score), ("--points-per-side", args.points_per_side),
                                  ("--max-instances", args.max_instances)) if v is not None]
    if given and not text_alone:  # they would be ignored silently
        verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        raise InputError(f"{' and '.join(given)} only {verb} to --text given alone (no --point or --box), which "
                         f"searches the whole image; drop {them}")
    args.min_score = TEXT_MIN_SCORE if args.min_score is None else args.min_score
    args.points_per_side = TEXT_POINTS_PER_SIDE if args.points_per_side is None else args.points_per_side
    args.max_instances = TEXT_MAX_INSTANCES if args.max_instances is None else args.max_instances
    if args.max_instances < 1:
        raise InputError(f"--max-instances must be at least 1, got {args.max_instances}")
    if not 0.0 <= args.min_score <= 1.0:
        raise InputError(f"--min-score must be in [0, 1], got {args.min_score:g}")
    if not 1 <= args.points_per_side <= MAX_TEXT_POINTS_PER_SIDE:
        raise InputError(f"--points-per-side must be between 1 and {MAX_TEXT_POINTS_PER_SIDE}, got "
                         f"{args.points_per_side}: every grid point keeps 3 low-res candidate masks until they are "
                         "ranked, so the memory grows with its square; the default 16 finds objects of 1/16 of the "
                         "image side, and `segany auto --labels` covers denser searches")
    if args.text is not None:  # the same check the model path makes, before seconds of loading
        from segany.text.vocab import check_text

        check_text(args.text)
    # With --text the candidates are what the phrase chooses among: one candidate left it nothing to choose
    # (a box's mask was the same for "person" and "giraffe"; only its score changed).
    multimask = args.multimask if args.multimask is not None else (
        (len(points) == 1 and box is None) or (args.text is not None and not text_alone))
    out = check_out_dir(args.out, "--out")
    _check_foreign(out, Path(args.image).stem, args.overwrite)
    progress = Progress(args.quiet)

    # Cheap checks first, so a typo fails before seconds of model loading.
    from segany.data.images import load_image
    from segany.predictor import check_box, check_points

    image = load_image(args.image)
    coords = np.array([[x, y] for x, y, _ in points], dtype=np.float64) if points else None
    labels = np.array([lab for _, _, lab in points], dtype=np.int64) if points else None
    box_np = np.array(box) if box else None
    check_points(coords, labels, image.shape[:2])  # a click off the image fails before the model loads
    check_box(box_np, image.shape[:2], inside=True)
    checkpoint = resolve_checkpoint(args.model, args.checkpoint)
    device = resolve_device(args.device)
    options = predictor_options(args, device)

    import torch

    from segany.fast import FastMaskDecoder, resolve_precision

    precision = resolve_precision(options["precision"], device)  # what "auto" became on this machine

    from segany.checkpoints import build_sam
    from segany.predictor import SamPredictor

    with progress.step("load_s", f"loading {args.model} from {checkpoint} on {device} ({precision})"):
        model = build_sam(args.model, checkpoint=checkpoint, device=device)
    # A checkpoint embeds its architecture: the outputs name what was loaded, as `segany auto`'s do.
    model_name = loaded_model_name(model.cfg, args.model, checkpoint)
    if model_name != args.model:
        progress.note(f"{checkpoint} holds {model_name}, not {args.model}: that is what runs")
    if args.text is not None:  # a phrase the model cannot take fails now, not after the image is embedded
        from segany.text.prompting import check_text_for_model

        check_text_for_model(model, args.text)
    predictor = SamPredictor(model, **options)
    h, w = image.shape[:2]
    with progress.step("embed_s", f"embedding {w}x{h} image"):
        predictor.set_image(image)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    what = " and ".join(x for x in (f"{len(points)} point(s)" if points else "", "a box" if box else "") if x)
    every = args.text is not None and not points and box is None and model.class_head is not None
    with progress.step("decode_s", f"decoding {what}" if what else f"finding every {args.text!r}"):
        if every:  # text alone + class head: every instance, with the search settings of the command line
            from segany.text.prompting import segment_every

            masks, scores, _ = segment_every(predictor, args.text, points_per_side=args.points_per_side,
                                             min_score=args.min_score, max_instances=args.max_instances)
            if len(masks) >= args.max_instances:
                progress.note(f"kept the best {args.max_instances} instances (--max-instances); there may be more "
                              f"scoring at least {args.min_score:g}: raise --max-instances to see them")
        else:
            masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels,
                                                 box=box_np, multimask_output=multimask,
                                                 text=args.text)
    if len(masks) == 0:
        stem = Path(args.image).stem
        earlier = (f"; {out / (stem + '.json')} is still an earlier run's result, not this prompt's"
                   if _previous_result(out, stem) is not None else "")
        raise InputError(f"nothing matched --text {args.text!r} in {args.image}: no instance scored at least "
                         f"--min-score {args.min_score:g} (predicted IoU x P(class)); lower it to see weaker "
                         f"ones{earlier}")
    if not np.isfinite(scores).all():  # before any file is written: JSON has no NaN, and these masks are noise
        from segany.errors import CheckpointError

        raise CheckpointError(f"{checkpoint} predicted non-finite scores ({', '.join(f'{float(x):g}' for x in scores)}) "
                              "for this image: its weights hold NaN or inf (a training run that diverged, or a "
                              "damaged file); use other weights, e.g. an earlier checkpoint of that run")
    order = np.argsort(-scores, kind="stable")  # best first
    masks, scores = masks[order], scores[order]

    stem = Path(args.image).stem
    _remove_previous(out, stem)
    records = []
    for i, (mask, score) in enumerate(zip(masks, scores, strict=True)):
        name = f"{stem}_mask{i}.png"
        atomic_write_bytes(out / name, _png(mask.astype(np.uint8) * 255))
        records.append({"index": i, "file": name, "score": round(float(score), 6), "area": int(mask.sum()),
                        "box_xyxy": _mask_box(mask), "rle": _rle(mask)})
    overlay = f"{stem}_overlay.png"
    atomic_write_bytes(out / overlay, _png(_overlay(image, masks[0], points, box)))
    result = {
        "image": str(Path(args.image)), "size_hw": [h, w], "model": model_name, "checkpoint": str(checkpoint),
        "device": device, "precision": precision, **({"quantize": args.quantize} if args.quantize else {}),
        # fp32 names two decoders on CPU: the folded one (auto) and the reference modules (--precision fp32).
        # --text always runs the reference modules (segany.text.prompting.decode): it needs the mask tokens.
        "decoder": "folded" if args.text is None and predictor.fast is not None
        and isinstance(predictor.fast.decoder, FastMaskDecoder) else "exact",
        "multimask": multimask,
        "prompts": {"points_xy": [[x, y] for x, y, _ in points], "labels": [lab for *_, lab in points],
                    "box_xyxy": list(box) if box else None, **({"text": args.text} if args.text else {}),
                    **({"min_score": args.min_score, "points_per_side": args.points_per_side,
                        "max_instances": args.max_instances} if every else {})},
        "overlay": overlay, "masks": records,
        "timings_s": {k: round(v, 4) for k, v in progress.timings.items()},
    }
    atomic_write(out / f"{stem}.json", lambda f: f.write(json.dumps(result, indent=2, allow_nan=False).encode()))
    progress.note(f"wrote {len(records)} mask(s), overlay and {stem}.json to {out} "
                  f"(best score {float(scores[0]):.3f})")
    print(out / f"{stem}.json", file=sys.stdout)
    return 0


def _previous_result(out: Path, stem: str) -> dict[str, Any] | None:
    """The earlier ``segany predict`` result for ``stem`` in ``out``, or None (no file, or another program's:
    LabelMe, for one, keeps ``x.json`` beside ``x.jpg``)."""
    try:
        data = json.loads((out / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "image" in data and isinstance(data.get("masks"), list) else None


def _check_foreign(out: Path, stem: str, overwrite: bool) -> None:
    """Refuse, before the model loads, to replace a file at this image's output names that no earlier segany
    predict wrote (the user's ``x.json``, or PNGs of theirs), unless ``overwrite``; with it, name them."""
    import re

    previous = _previous_result(out, stem)
    owned = {f"{stem}.json", str(previous.get("overlay"))} if previous is not None else set()
    if previous is not None:
        owned |= {str(m.get("file")) for m in previous["masks"] if isinstance(m, dict)}
    own = re.compile(re.escape(stem) + r"(\.json|_overlay\.png|_mask\d+\.png)")
    try:
        present = sorted(e.name for e in out.iterdir() if own.fullmatch(e.name))
    except OSError:
        return  # check_out_dir made it: a folder we cannot list fails at the first write, naming the file
    foreign = [name for name in present if name not in owned]
    if not foreign:
        return
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    if not overwrite:
        raise InputError(f"--out {str(out)!r} holds {shown}, at this image's output names, which no earlier segany "
                         f"predict wrote (another tool's annotation beside the image, or files of a segany predict "
                         f"stopped before it wrote {stem}.json); pick another --out, move them away, or pass "
                         "--overwrite to replace them")
    print(f"segany predict: --overwrite: replacing {shown}", file=sys.stderr)


def _remove_previous(out: Path, stem: str) -> None:
    """Remove this image's earlier result in ``out``: its JSON first, then the mask files it lists.

    A rerun with fewer masks (``--single`` after ``--multimask``) would otherwise leave ``<stem>_mask1.png``
    and ``_mask2.png`` beside a JSON that lists one mask. Only files the earlier JSON names (in ``out``,
    as ``<stem>_mask<i>.png``) are touched, so other files in the folder are safe; with the JSON gone
    first, an interrupted rerun never leaves a JSON naming masks of two runs.
    """
    import re

    result = _previous_result(out, stem)
    if result is None:
        return  # no earlier result (or not one of ours: --overwrite replaces it in place)
    listed = [m.get("file") for m in result["masks"] if isinstance(m, dict)]
    own = re.compile(re.escape(stem) + r"_mask\d+\.png")
    (out / f"{stem}.json").unlink(missing_ok=True)
    for name in listed:
        if isinstance(name, str) and own.fullmatch(name):
            (out / name).unlink(missing_ok=True)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _mask_box(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _overlay(image: np.ndarray, mask: np.ndarray, points: list[tuple[float, float, int]],
             box: tuple[float, float, float, float] | None) -> np.ndarray:
    from PIL import Image, ImageDraw

    color = np.array([30, 144, 255], dtype=np.float32)
    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * color
    pil = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = max(3, round(max(image.shape[:2]) / 150))
    if box:
        draw.rectangle(box, outline=(0, 255, 0), width=max(2, r // 2))
    for x, y, label in points:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(0, 200, 0) if label else (230, 30, 30), outline=(255, 255, 255))
    return np.asarray(pil)
