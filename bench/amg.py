"""Automatic mask generation: segany vs the reference segment_anything, same image and weights, one process.

    .venv/bin/python bench/amg.py --model vit_h --device cuda --json amg_cuda.json
    .venv/bin/python bench/amg.py --model tiny --device cpu --points-per-side 16

Weights are seeded random (no download needed); the mask head is given image- and point-dependent
output (as in tests/parity/test_amg_parity.py) so post-processing sees many distinct masks.
Timings are the median of --repeats runs after one warm-up; CUDA is synchronized before every clock read.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def build(model: str) -> torch.nn.Module:
    from segany.modeling.config import SamConfig, ViTConfig
    from segany.modeling.sam import Sam
    from segany.registry import get_config

    cfg = (SamConfig(encoder=ViTConfig(img_size=256, depth=2, embed_dim=96, num_heads=3, global_attn_indexes=(1,),
                                       window_size=8)) if model == "tiny" else get_config(model))
    m = Sam(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, t in m.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        dec = m.mask_decoder
        for name, p in dec.output_upscaling.named_parameters():
            p.zero_() if name.endswith("bias") else (p.fill_(1.0) if p.ndim == 1 else None)
        for mlp in dec.output_hypernetworks_mlps:
            for p in mlp.parameters():
                p.mul_(100 ** (1 / 3))
        for name, p in dec.transformer.named_parameters():
            if "norm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
        dec.mask_tokens.weight.zero_()
        dec.iou_token.weight.zero_()
    return m.eval()


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    sys.path.insert(0, str(REPO / "tests" / "parity"))
    from sam_oracle import reference_sam

    ref = reference_sam(model.cfg)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def timed(fn, device: str, repeats: int) -> tuple[float, int]:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    n = len(fn())  # warm-up (kernels, allocator, cudnn autotune)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        n = len(fn())
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image", default=str(REPO / "src" / "segany" / "assets" / "sample.jpg"))
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--output-mode", default="binary_mask", choices=["binary_mask", "uncompressed_rle", "coco_rle"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-reference", action="store_true", help="time segany only (the reference is slow)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from segment_anything import SamAutomaticMaskGenerator as RefGenerator

    from segany import SamAutomaticMaskGenerator
    from segany.data.images import load_image

    image = load_image(args.image)
    ours_model = build(args.model).to(args.device)
    ref_model = None if args.skip_reference else reference_model(ours_model.cpu()).to(args.device)
    ours_model.to(args.device)
    settings = {
        "default": {},
        "keep_all": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    }
    results = {"model": args.model, "device": args.device, "image": Path(args.image).name,
               "image_hw": list(image.shape[:2]), "points_per_side": args.points_per_side,
               "crop_n_layers": args.crop_n_layers, "output_mode": args.output_mode, "repeats": args.repeats,
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "threads": torch.get_num_threads(), "cases": {}}
    for name, extra in settings.items():
        kw = dict(points_per_side=args.points_per_side, crop_n_layers=args.crop_n_layers,
                  output_mode=args.output_mode, **extra)
        ours_gen = SamAutomaticMaskGenerator(ours_model, **kw)
        t_ours, n_ours = timed(lambda g=ours_gen: g.generate(image), args.device, args.repeats)
        row = {"segany_s": round(t_ours, 4), "segany_masks": n_ours}
        if ref_model is not None:
            ref_gen = RefGenerator(ref_model, **kw)
            t_ref, n_ref = timed(lambda g=ref_gen: g.generate(image), args.device, max(1, args.repeats))
            row.update(reference_s=round(t_ref, 4), reference_masks=n_ref, speedup=round(t_ref / t_ours, 2))
        # Share of the time in the model itself (embedding), to show what post-processing costs.
        results["cases"][name] = row
        print(f"{name:9s} " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    emb = SamAutomaticMaskGenerator(ours_model).predictor
    t_embed, _ = timed(lambda: (emb.set_image(image), [0])[1], args.device, args.repeats)
    results["embed_s"] = round(t_embed, 4)
    print(f"image embedding alone: {t_embed:.4f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    np.random.seed(0)
    main()
