#!/usr/bin/env python3
"""Train a SAM with a class head (and optionally a CLIP text token) on coco128-seg + PennFudan, then
evaluate on held-out images: per-class mask AP of "segment every <class>" and label accuracy of the
automatic generator's masks. Writes ``model.pt`` (self-describing checkpoint) and ``metrics.json``.

    .venv/bin/python scripts/train_labels.py --data ../shared/data --arch tiny --minutes 6 --out runs/labels
    .venv/bin/python scripts/train_labels.py --pack out/packed --arch segany_tiny --minutes 5 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", help="../shared/data (raw datasets)")
    src.add_argument("--pack", help="a packed dataset folder (scripts/pack_data.py)")
    ap.add_argument("--arch", default="tiny", help="'tiny' (tests' 256 px ViT) or a registered model name")
    ap.add_argument("--init", help="initial SAM weights (class-agnostic), e.g. a segany_tiny checkpoint")
    ap.add_argument("--clip", help="CLIP model for a text token + open vocabulary (e.g. clip_vit_b32)")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-masks", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--freeze-encoder", action="store_true")
    ap.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N held-out images")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/labels"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from segany.checkpoints import load_weights, save_checkpoint
    from segany.eval.labels import evaluate_labels
    from segany.modeling.config import SamConfig, ViTConfig
    from segany.modeling.sam import Sam
    from segany.registry import get_config
    from segany.train.labels import LabelTrainConfig, read_labeled, train_labels, with_labels

    t0 = time.time()
    data_root = args.data or (None if args.pack else str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    splits = read_labeled(pack=args.pack, data_root=data_root)
    names = sorted({n for r in splits["train"] for n in (r.class_names or [])})
    print(f"train {len(splits['train'])} images, val {len(splits['val'])} images, {len(names)} classes "
          f"({time.time() - t0:.0f} s to read)", flush=True)
    if args.arch == "tiny":
        base = SamConfig(encoder=ViTConfig(img_size=256, depth=2, embed_dim=96, num_heads=3, global_attn_indexes=(1,),
                                           window_size=8))
    else:
        base = get_config(args.arch)
    cfg = with_labels(base, names, clip_model=args.clip)
    torch.manual_seed(0)
    sam = Sam(cfg)
    if args.init:  # class-agnostic SAM weights: load everything but the new parts
        plain = Sam(base)
        load_weights(plain, args.init, args.arch)
        missing = sam.load_state_dict(plain.state_dict(), strict=False)
        print(f"initialized from {args.init}; new parameters: {len(missing.missing_keys)} tensors")
    clip = None
    if args.clip:
        from segany.text.clip import load_clip

        clip = load_clip(args.clip)
    tcfg = LabelTrainConfig(out_dir=args.out, steps=args.steps, max_minutes=args.minutes, batch_size=args.batch_size,
                            max_masks=args.max_masks, lr=args.lr, num_workers=args.workers, device=args.device,
                            freeze_image_encoder=args.freeze_encoder)
    summary = train_labels(sam, splits["train"], tcfg, clip=clip,
                           on_log=lambda s: print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                              for k, v in s.items()}), flush=True))
    out = Path(args.out)
    save_checkpoint(sam, out / "model.pt", meta={"trained": "scripts/train_labels.py", **{k: v for k, v in
                                                 summary.items() if k != "config"}})
    val = splits["val"][: args.eval_images] if args.eval_images else splits["val"]
    t1 = time.time()
    with torch.no_grad():
        metrics = evaluate_labels(sam, val, points_per_side=args.points_per_side)
    metrics["eval_seconds"] = round(time.time() - t1, 1)
    result = {"train": summary, "eval": metrics, "arch": args.arch, "clip": args.clip,
              "device": summary["device"], "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out / "metrics.json")
    print(json.dumps({k: metrics[k] for k in ("mask_ap", "mask_ap50", "auto_label_accuracy", "auto_recall_at_0.5",
                                             "auto_matched_gt", "images")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
