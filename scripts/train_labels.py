#!/usr/bin/env python3
"""Train a SAM with a class head (and optionally a CLIP text token) on coco128-seg + PennFudan, then
evaluate on held-out images: per-class mask AP of "segment every <class>" and label accuracy of the
automatic generator's masks. Writes ``model.pt`` (self-describing checkpoint) and ``metrics.json``.

    .venv/bin/python scripts/train_labels.py --data ../shared/data --arch tiny --minutes 6 --out runs/labels
    .venv/bin/python scripts/train_labels.py --pack out/packed --arch segany_tiny --minutes 5 --out $OUT

``--head-only`` freezes all of SAM (the registered weights of ``--arch``, e.g. the bundled segany_tiny)
and trains the class head alone (``--steps`` head updates on a pool of prompt tokens collected in
``--pool-rounds`` passes over the images, see ``train_head_only``); it writes a small head file
(``--head-out``) over those weights instead of a whole checkpoint, and evaluates the model loaded back
from that file (what ships). The shipped ``segany_tiny_labels`` is made this way by
``scripts/train_label_head.sh``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
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
    ap.add_argument("--head-only", action="store_true",
                    help="freeze every SAM parameter (registered weights of --arch) and train the class head only")
    ap.add_argument("--pool-rounds", type=int, default=4,
                    help="with --head-only: passes over the images collecting prompt tokens (--minutes caps them)")
    ap.add_argument("--pool-batch", type=int, default=256, help="with --head-only: prompts per head update")
    ap.add_argument("--head-val-fraction", type=float, default=0.0,
                    help="with --head-only: share of the TRAINING images kept out of the head fit to report a "
                         "validation loss (for choosing --lr/--steps; the evaluation images are never used)")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    ap.add_argument("--head-out", help="with --head-only: where to write the head file (default OUT/head.pt)")
    ap.add_argument("--metrics-out", help="also write the metrics JSON here (e.g. docs/segany_tiny_labels_eval.json)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--auto-pred-iou-thresh", type=float, default=0.5,
                    help="automatic generator thresholds for the label-accuracy figure")
    ap.add_argument("--auto-stability-thresh", type=float, default=0.7)
    ap.add_argument("--auto-stability-offset", type=float, default=1.0)
    ap.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N held-out images")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/labels"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

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
    torch.manual_seed(args.seed)
    sam = Sam(cfg)
    base_path = None
    if args.head_only:
        from segany.checkpoints import find_weights
        from segany.registry import weights_for_model

        if args.arch == "tiny" or args.init or args.clip:
            raise SystemExit("--head-only trains a head over a registered model's own weights: pass --arch NAME "
                             "(e.g. segany_tiny) without --init and --clip")
        winfo = weights_for_model(args.arch)
        base_path = find_weights(winfo.name) if winfo is not None else None
        if winfo is None or base_path is None:
            raise SystemExit(f"--head-only: no installed weights for {args.arch!r}; run `segany download NAME`")
        args.init = str(base_path)
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
                            freeze_image_encoder=args.freeze_encoder, head_only=args.head_only, seed=args.seed,
                            pool_rounds=args.pool_rounds, pool_batch=args.pool_batch,
                            head_val_fraction=args.head_val_fraction)
    summary = train_labels(sam, splits["train"], tcfg, clip=clip,
                           on_log=lambda s: print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                              for k, v in s.items()}), flush=True))
    out = Path(args.out)
    hardware = {"device": summary["device"], "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    data = {"source": args.pack or data_root, "train_images": len(splits["train"]), "val_images": len(splits["val"]),
            "classes": len(names), "split": "coco128-seg: the 16 frozen held-out images (train/labels.py COCO128_LABEL_VAL; 15 hold labels); "
                                            "PennFudan: the project's 20 held-out images"}
    train_meta = {"trained": "scripts/train_labels.py", "argv": sys.argv[1:], "data": data, "hardware": hardware,
                  "date_utc": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                  **{k: v for k, v in summary.items() if k != "config"}}
    if args.head_only:
        from segany.checkpoints import build_sam
        from segany.text.label_model import save_head

        head_path = save_head(sam, args.head_out or out / "head.pt", base_model=args.arch, base_weights=winfo.name,
                              base_path=base_path, meta=train_meta)
        print(f"wrote {head_path} ({head_path.stat().st_size / 1e3:.0f} kB)", flush=True)
        sam = build_sam(args.arch, checkpoint=head_path)  # evaluate exactly what ships: base + fp16 head
    else:
        save_checkpoint(sam, out / "model.pt", meta=train_meta)
    if args.no_eval:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1, default=str))
        return 0
    val = splits["val"][: args.eval_images] if args.eval_images else splits["val"]
    auto = {"points_per_side": args.points_per_side, "pred_iou_thresh": args.auto_pred_iou_thresh,
            "stability_score_thresh": args.auto_stability_thresh,
            "stability_score_offset": args.auto_stability_offset}
    t1 = time.time()
    with torch.no_grad():
        metrics = evaluate_labels(sam, val, points_per_side=args.points_per_side, auto_kwargs=auto,
                                  progress=lambda n: print(".", end="", flush=True))
    print(flush=True)
    metrics["eval_seconds"] = round(time.time() - t1, 1)
    metrics["auto_generator"] = auto
    result = {"train": summary, "eval": metrics, "arch": args.arch, "clip": args.clip, "head_only": args.head_only,
              "data": data, "hardware": hardware, "date_utc": train_meta["date_utc"], "argv": sys.argv[1:],
              "total_seconds": round(time.time() - t0, 1), "device": summary["device"], "gpu": hardware["gpu"]}
    text = json.dumps(result, indent=1, default=str) + "\n"
    for target in [out / "metrics.json"] + ([Path(args.metrics_out)] if args.metrics_out else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    print(json.dumps({k: metrics[k] for k in ("mask_ap", "mask_ap50", "auto_label_accuracy", "auto_recall_at_0.5",
                                             "auto_matched_gt", "images")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
