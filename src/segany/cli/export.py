"""``segany export onnx``: write the encoder and decoder as ONNX graphs (see :mod:`segany.export.onnx`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segany.errors import InputError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser = subparsers.add_parser("export", help="export a model to other runtimes (ONNX)",
                                   description="Export a model for other runtimes.")
    formats = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    formats.required = True
    onnx = formats.add_parser(
        "onnx", help="encoder.onnx + decoder.onnx for ONNX Runtime (CPU, browser)",
        description="Write encoder.onnx (resized RGB image -> embeddings) and decoder.onnx (SAM-ONNX inputs: "
                    "image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size).")
    onnx.add_argument("--model", required=True, help="registered model name, e.g. vit_b, vit_t (`segany models` lists them)")
    onnx.add_argument("--checkpoint", help="weights file; default: the cached download for --model")
    onnx.add_argument("--out", required=True, help="output folder (created if missing)")
    onnx.add_argument("--quantize", action="store_true", help="also write int8 *.int8.onnx files for CPUs")
    onnx.add_argument("--multimask", action="store_true",
                      help="decoder outputs the 3 multimask masks instead of the single best one")
    onnx.add_argument("--random-weights", action="store_true",
                      help="export untrained random weights (for tests and benchmarks only)")
    onnx.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from segany.checkpoints import build_sam, find_weights
    from segany.cli._util import loaded_model_name
    from segany.export.onnx import export_onnx
    from segany.registry import get_model_info, list_models, weights_for_model

    get_model_info(args.model)  # unknown names raise with suggestions before any slow work
    checkpoint = args.checkpoint
    if checkpoint is not None and args.random_weights:
        raise InputError("--checkpoint and --random-weights exclude each other; pass one")
    if checkpoint is None and not args.random_weights:
        info = weights_for_model(args.model)
        cached = find_weights(info.name) if info else None
        if cached is None:
            raise InputError(f"no --checkpoint given and no cached weights for {args.model!r}; pass --checkpoint "
                             f"PATH or run `segany download {info.name if info else args.model}` first")
        checkpoint = cached
    if checkpoint is not None and not Path(checkpoint).exists():
        raise InputError(f"--checkpoint {str(checkpoint)!r} does not exist; check the path")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; pass a folder for encoder.onnx and decoder.onnx")
    model = build_sam(args.model, checkpoint=checkpoint)
    # A checkpoint embeds its architecture, so --model vit_t with a segany_tiny file builds segany_tiny: the
    # meta file names what the graphs are (as predict's and auto's outputs do), null for an unregistered one.
    model_name = loaded_model_name(model.cfg, args.model, Path(checkpoint) if checkpoint is not None else None)
    if model_name != args.model:
        print(f"[segany] {checkpoint} holds {model_name}, not {args.model}: that is what is exported",
              file=sys.stderr, flush=True)
    from segany.hashing import file_digest

    weights = ({"checkpoint": str(Path(checkpoint).resolve()), "sha256": file_digest(Path(checkpoint), "sha256")}
               if checkpoint is not None else {"checkpoint": None, "random_weights": True})
    paths = export_onnx(model, out, quantize_int8=args.quantize, multimask=args.multimask,
                        model_name=model_name if model_name in list_models() else None, weights=weights)
    for role, path in paths.items():
        print(f"{role}: {path}", file=sys.stdout)
    return 0
