#!/usr/bin/env python
"""How much class information do a model's features carry? Linear probes on the labelled data (issue 10).

The shipped label head names every held-out object "person". This asks whether that is the head's fault or
the base model's: for every ground-truth mask of the labelled training and held-out images (the split of
``segany.train.labels.label_split``) it takes three kinds of features,

* ``mask_tokens``: the 4 output mask tokens of the decoder, prompted by the mask's box (what the head reads);
* ``pooled_embedding``: the image encoder's embedding averaged under the mask (what any head could read);
* ``color_shape``: mean/std colour in the mask, area, aspect ratio and centroid (no learnt features at all);

fits the same linear softmax probe on each (fixed settings, standardized inputs) on the training masks, and
reports held-out accuracy beside the always-"person" rate. Held-out images only report; nothing is chosen on
them. Without ``--checkpoint`` it loads the model's bundled or cached weights explicitly (``build_sam`` alone
would build a random model) and records the file and its sha256; the figures are then the same on every run.

    .venv/bin/python scripts/label_probe.py --out docs/segany_tiny_label_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def mask_features(pred: Any, image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The three feature kinds of one mask; ``pred`` holds ``image``'s embedding."""
    import cv2
    import torch
    import torch.nn.functional as F

    sam = pred.model
    emb = pred.features[0]  # (C, h, w)
    S = sam.image_encoder.img_size
    rh, rw = pred.input_size
    grid = np.zeros((S, S), np.float32)
    grid[:rh, :rw] = cv2.resize(mask.astype(np.uint8), (rw, rh), interpolation=cv2.INTER_NEAREST)
    weight = F.adaptive_avg_pool2d(torch.from_numpy(grid)[None, None], emb.shape[-2:])[0, 0]
    pooled = (emb * weight).sum((1, 2)) / weight.sum().clamp(min=1e-6)

    ys, xs = np.nonzero(mask)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    box_t = torch.as_tensor(pred.transform.apply_boxes(box, pred.original_size), dtype=torch.float32)
    pe = sam.prompt_encoder
    with torch.no_grad():
        sparse, dense = pe(points=None, boxes=box_t, masks=None)
        _, _, tokens = sam.mask_decoder.predict_masks(pred.features, pe.get_dense_pe(), sparse, dense,
                                                      return_tokens=True)

    h, w = mask.shape
    pixels = image[mask].reshape(-1, 3).astype(np.float32) / 255
    color_shape = np.concatenate([pixels.mean(0), pixels.std(0),
                                  [mask.mean(), (np.ptp(xs) + 1) / (np.ptp(ys) + 1), ys.mean() / h, xs.mean() / w]])
    return {"mask_tokens": tokens[0].flatten().numpy(), "pooled_embedding": pooled.numpy(),
            "color_shape": color_shape.astype(np.float32)}


def collect(pred: Any, records: list[Any], min_area: int) -> tuple[list[str], dict[str, np.ndarray]]:
    import torch

    from segany.data.images import load_image
    from segany.engine.masks import decode_rle

    names: list[str] = []
    feats: dict[str, list[np.ndarray]] = {}
    for n, rec in enumerate(records, 1):
        image = load_image(rec.image_path)
        with torch.no_grad():
            pred.set_image(image)
            for rle, name in zip(rec.masks, rec.class_names, strict=True):
                mask = decode_rle(rle).astype(bool)
                if mask.sum() < min_area:
                    continue
                for kind, v in mask_features(pred, image, mask).items():
                    feats.setdefault(kind, []).append(v)
                names.append(name)
        print(f"\r  {n}/{len(records)} images, {len(names)} masks", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return names, {k: np.stack(v) for k, v in feats.items()}


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int, *,
                 steps: int = 500, lr: float = 1e-2, weight_decay: float = 1e-2, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression on standardized features, full batch; returns (train, test) predictions."""
    import torch

    torch.manual_seed(seed)
    xt, xs = torch.from_numpy(x_train), torch.from_numpy(x_test)
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xt, xs = (xt - mu) / sd, (xs - mu) / sd
    lin = torch.nn.Linear(xt.shape[1], num_classes)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    y = torch.from_numpy(y_train)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(xt), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return lin(xt).argmax(1).numpy(), lin(xs).argmax(1).numpy()


def _default_weights(model: str) -> str | None:
    """The weights build_sam would load for ``model`` (bundled or cached), so the JSON can name them."""
    from segany.checkpoints import find_weights
    from segany.registry import weights_for_model

    info = weights_for_model(model)
    path = find_weights(info.name) if info else None
    return str(path) if path else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="out/packed", help="packed data (scripts/pack_data.py)")
    ap.add_argument("--model", default="segany_tiny")
    ap.add_argument("--checkpoint", default=None, help="weights (default: the model's bundled weights)")
    ap.add_argument("--min-area", type=int, default=16, help="skip masks smaller than this (pixels)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)

    import torch

    from segany.checkpoints import build_sam
    from segany.cli._util import atomic_write_bytes
    from segany.errors import SeganyError
    from segany.hashing import file_digest
    from segany.predictor import SamPredictor
    from segany.train.labels import read_labeled

    torch.set_num_threads(args.threads)
    try:
        split = read_labeled(pack=args.pack)
        checkpoint = args.checkpoint or _default_weights(args.model)
        sam = build_sam(args.model, checkpoint=checkpoint).eval()
    except SeganyError as e:
        print(f"label_probe: {e}", file=sys.stderr)
        return 1
    pred = SamPredictor(sam)
    t0 = time.time()
    print("training images:", file=sys.stderr)
    train_names, train_x = collect(pred, split["train"], args.min_area)
    print("held-out images:", file=sys.stderr)
    test_names, test_x = collect(pred, split["val"], args.min_area)
    classes = sorted(set(train_names))
    index = {c: i for i, c in enumerate(classes)}
    keep = np.array([n in index for n in test_names])  # a class never seen in training cannot be predicted
    y_train = np.array([index[n] for n in train_names])
    y_test = np.array([index[n] for n, k in zip(test_names, keep, strict=True) if k])
    person = y_test == index["person"]
    result: dict[str, Any] = {
        "model": args.model, "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_digest(checkpoint) if checkpoint else None, "train_masks": len(y_train),
        "test_masks": int(keep.sum()), "classes": len(classes),
        "test_top_classes": Counter(n for n in test_names if n in index).most_common(5),
        "always_person_accuracy": round(float(person.mean()), 3), "probes": {},
    }
    for kind in ("mask_tokens", "pooled_embedding", "color_shape"):
        p_train, p_test = linear_probe(train_x[kind], y_train, test_x[kind][keep], len(classes))
        result["probes"][kind] = {
            "dim": int(train_x[kind].shape[1]),
            "train_accuracy": round(float((p_train == y_train).mean()), 3),
            "test_accuracy": round(float((p_test == y_test).mean()), 3),
            "test_accuracy_non_person": round(float((p_test[~person] == y_test[~person]).mean()), 3),
            "test_predicted_person_share": round(float((p_test == index["person"]).mean()), 3),
        }
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        atomic_write_bytes(Path(args.out), (text + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
