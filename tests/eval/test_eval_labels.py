"""Label evaluation (issue 10): the AP means and the figures evaluate_labels reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import randomize_, tiny_config

from segany.data.formats.common import InstanceRecord, encode_mask
from segany.eval.labels import _coco_ap, _coco_gt, evaluate_labels
from segany.modeling.sam import Sam
from segany.train.labels import with_labels

NAMES = ("person", "dog", "car")


def _records(tmp_path: Path) -> list[InstanceRecord]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i, ds in enumerate(("coco128", "pennfudan")):
        img = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        masks = np.zeros((2, 64, 80), dtype=bool)
        masks[0, 5:30, 5:40] = True
        masks[1, 35:60, 40:78] = True
        out.append(InstanceRecord(str(tmp_path / f"{i}.png"), (64, 80), [encode_mask(m) for m in masks],
                                  class_names=["person", "dog" if i == 0 else "person"], image_id=str(i), dataset=ds))
    return out


def test_coco_ap_means_do_not_depend_on_max_detections(tmp_path: Path) -> None:
    # pycocotools' own summary reports AP = -1 unless maxDets includes 100: the means come from precision.
    from pycocotools.coco import COCO

    recs = _records(tmp_path)
    coco = COCO()
    coco.dataset = _coco_gt(recs, NAMES)
    coco.createIndex()
    def perfect() -> list[dict]:  # fresh dicts: loadRes adds fields to the ones it gets
        return [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                 "score": 0.9} for a in coco.dataset["annotations"]]

    ap, ap50, per_class = _coco_ap(coco, coco.loadRes(perfect()), NAMES, 50, None)
    assert np.isclose(ap, 1.0) and np.isclose(ap50, 1.0)
    assert set(per_class) == {"person", "dog"} and np.allclose(list(per_class.values()), 1.0)  # no 'car' GT
    ap, _, per_class = _coco_ap(coco, coco.loadRes(perfect()[:1]), NAMES, 50, [1])  # image 1 only
    assert 0.0 < ap <= 1.0 and set(per_class) == {"person", "dog"}


def test_evaluate_labels_reports_every_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_(Sam(with_labels(tiny_config(), NAMES)), seed=5).eval()
    auto = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    m = evaluate_labels(model, _records(tmp_path), points_per_side=4, auto_kwargs=auto)
    assert m["images"] == 2 and m["gt_instances"] == 4
    assert m["majority_class"] == "person" and m["majority_class_accuracy"] == 0.75
    assert 0.0 <= m["gt_box_label_accuracy"] <= 1.0 and m["auto_masks"] > 0
    assert set(m["per_class_gt"]) == {"person", "dog"}
    if m["detections"]:
        assert set(m["per_dataset"]) == {"coco128", "pennfudan"}
        assert m["mask_ap"] != -1.0 and set(m["per_class_ap"]) <= {"person", "dog"}
