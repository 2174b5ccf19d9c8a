"""End-to-end data engine on the bundled sample images, on CPU (SAM §4, all three stages plus retraining).

    .venv/bin/python scripts/engine_demo.py --out /tmp/engine-demo [--checkpoint W.pt --model NAME]

1. create a project with the bundled samples;
2. stage 1 (assisted-manual): scripted clicks through the predictor, saved as manual annotations with
   the seconds they "took";
3. stage 2 (semi-automatic): confident automatic masks pre-filled as pending, then accepted by the annotator;
4. stage 3 (fully automatic): `segany engine auto` over every image;
5. retrain for a few steps on the accepted data, evaluated on held-out images;
6. the maintenance report (HTML) with review flags.

Without weights for the model (``segany download`` or --checkpoint) it runs on random weights: every step
still runs, the masks are just meaningless.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/segany-engine-demo")
    p.add_argument("--model", default=None, help="registered model (default segany_tiny)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--points-per-side", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)

    from segany.data.images import load_image
    from segany.engine.auto import AutoSettings, make_generator, run_auto
    from segany.engine.report import ReportSettings, build_report
    from segany.engine.retrain import RetrainSettings, model_spec_for, retrain
    from segany.engine.store import open_store
    from segany.predictor import SamPredictor

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[demo {time.time() - t0:6.1f}s] {msg}", flush=True)

    store = open_store(out / "project", create=True)
    proj = store.create_project("demo", labels=["object"], stage="manual")
    samples = Path(__file__).resolve().parents[1] / "src" / "segany" / "assets" / "samples"
    images = store.add_images(proj["id"], [samples])
    store.add_annotator("alice")
    alice = store.list_annotators()[0]["id"]
    spec = model_spec_for(store, None, model=args.model, checkpoint=args.checkpoint, device="cpu")
    random_weights = spec.checkpoint is None
    say(f"project with {len(images)} images; model {spec.version_name()}"
        + (" (RANDOM weights: pass --checkpoint for real masks)" if random_weights else ""))
    sam = spec.build()
    mv = store.register_model_version(spec.version_name(), spec.model, spec.checkpoint)

    # Stage 1: three scripted clicks per image (centre, then a point left and right of it).
    store.update_project(proj["id"], stage="manual")
    pred = SamPredictor(sam)
    n1 = 0
    for im in images:
        image = load_image(im["path"])
        pred.set_image(image)
        h, w = image.shape[:2]
        for fx, fy in ((0.5, 0.5), (0.25, 0.6), (0.75, 0.6)):
            masks, scores, _ = pred.predict(point_coords=np.array([[fx * w, fy * h]]), point_labels=np.array([1]))
            best = masks[int(np.argmax(scores))]
            if not best.any():
                continue
            store.save_annotation(im["id"], mask=best, source="manual", annotator_id=alice, model_version_id=mv,
                                  seconds_spent=float(30 - 4 * n1 % 20), predicted_iou=float(scores.max()),
                                  prompts={"points": [[fx * w, fy * h]], "labels": [1]})
            n1 += 1
    say(f"stage 1: {n1} manual masks from scripted clicks")

    # Stage 2: confident masks pre-filled (pending), then accepted by the annotator.
    store.update_project(proj["id"], stage="semi")
    # SAM's thresholds suit SAM's confident heads. segany_tiny (minutes of training) predicts IoUs below
    # 0.4 and soft logits, so it gets thresholds on its own scale (as in scripts/demo.sh).
    tiny = not random_weights and spec.model == "segany_tiny"
    if random_weights:
        strict_t, auto_t = (0.0, 0.0, 1.0), (0.0, 0.0, 1.0)
    elif tiny:
        strict_t, auto_t = (0.3, 0.4, 0.1), (0.25, 0.3, 0.1)
    else:
        strict_t, auto_t = (0.9, 0.95, 1.0), (0.88, 0.92, 1.0)
    strict = AutoSettings(points_per_side=args.points_per_side, pred_iou_thresh=strict_t[0],
                          stability_score_thresh=strict_t[1], stability_score_offset=strict_t[2], max_masks=5)
    gen = make_generator(sam, strict)
    n2 = 0
    for im in images:
        records = sorted(gen.generate(load_image(im["path"])), key=lambda r: -float(r["predicted_iou"]))[:5]
        for r in records:
            if not r["segmentation"].any():
                continue
            ann, _ = store.save_annotation(im["id"], mask=r["segmentation"], source="semi", review_state="pending",
                                           model_version_id=mv, predicted_iou=float(r["predicted_iou"]),
                                           stability_score=float(r["stability_score"]))
            store.update_annotation(ann["id"], review_state="accepted", annotator_id=alice, seconds_spent=8.0)
            n2 += 1
    say(f"stage 2: {n2} pre-filled masks accepted")

    # Stage 3: fully automatic over every image.
    store.update_project(proj["id"], stage="auto")
    auto = AutoSettings(points_per_side=args.points_per_side, pred_iou_thresh=auto_t[0],
                        stability_score_thresh=auto_t[1], stability_score_offset=auto_t[2], max_masks=50)
    s3 = run_auto(store, None, spec, auto, workers=args.workers)
    say(f"stage 3: {s3.masks_written} automatic masks on {s3.images_written} images "
        f"({s3.images_per_hour:.0f} images/hour)")

    # Retrain on the accepted data; held-out images give old vs new metrics.
    r = retrain(store, None, RetrainSettings(steps=args.steps, batch_size=1, held_out=0.25, max_objects=3,
                                             device="cpu"), model=spec.model, checkpoint=spec.checkpoint,
                out_dir=str(out / "retrain"), log=say)
    o, n = r["metrics_old"]["all"], r["metrics_new"]["all"]
    say(f"retrain: {r['model_version']['name']} 1-click {o['miou_1']:.3f} -> {n['miou_1']:.3f}, box "
        f"{o['box_miou']:.3f} -> {n['box_miou']:.3f}; {'promoted' if r['promoted'] else 'kept the old model'}")

    rep = build_report(store, None, out / "report", ReportSettings(max_disagreement=100), spec=spec, log=say)
    say(f"report: {rep['html']} ({rep['flagged']} masks sent to review)")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
