"""The click simulator, NoC/mIoU on hand-made cases, AR against a hand-computed COCOeval case, GrabCut."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segany.data.formats.common import InstanceRecord, encode_mask
from segany.errors import InputError
from segany.eval.clicks import Click, first_click, next_click
from segany.eval.metrics import average_recall, iou, noc, summarize_clicks


def rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_first_click_is_farthest_from_boundary() -> None:
    gt = rect(40, 60, 10, 31, 5, 26)  # 21x21 square: centre (15, 20)
    assert first_click(gt) == Click(15, 20, True)
    # an L shape: the thick arm wins, not the bounding-box centre
    L = rect(50, 50, 0, 50, 0, 10) | rect(50, 50, 30, 50, 0, 50)
    c = first_click(L)
    assert L[c.y, c.x] and 30 <= c.y < 50 and c.x >= 9
    # the image border counts as boundary
    edge = rect(20, 20, 0, 20, 0, 7)
    assert first_click(edge).x == 3
    with pytest.raises(InputError):
        first_click(np.zeros((5, 5), bool))


def test_next_click_picks_largest_error_region_and_sign() -> None:
    gt = rect(60, 60, 10, 50, 10, 50)
    pred = gt.copy()
    pred[10:50, 40:50] = False  # 40x10 missed strip (false negative)
    pred |= rect(60, 60, 0, 4, 0, 4)  # 4x4 false positive blob
    c = next_click(gt, pred)
    assert c is not None and c.positive and 40 <= c.x < 50 and 10 <= c.y < 50 and c.x in (44, 45)
    pred2 = gt | rect(60, 60, 52, 60, 0, 60)  # an 8x60 false-positive band is the largest error
    pred2[20:22, 20:22] = False
    c2 = next_click(gt, pred2)
    assert c2 is not None and not c2.positive and c2.y >= 52
    assert next_click(gt, gt) is None


def test_next_click_follows_ritm_distance_rule_and_never_repeats() -> None:
    """RITM's rule: the error pixel deepest inside its region wins, not the region of largest area; an exact
    tie clicks negative; a pixel already clicked is not chosen again."""
    from segany.eval.clicks import mark_clicked

    gt = rect(80, 80, 10, 70, 10, 70)
    pred = gt.copy()
    pred[10:70, 10:12] = False  # a 60x2 missed sliver: area 120, depth 1
    pred |= rect(80, 80, 72, 80, 0, 8)  # an 8x8 false-positive block at the border: area 64, depth 4
    c = next_click(gt, pred)
    assert c is not None and not c.positive and c.y >= 72 and c.x < 8  # by area the sliver would have won
    clicked = np.zeros_like(gt)
    mark_clicked(clicked, c)
    again = next_click(gt, pred, clicked)
    assert again is not None and (again.x, again.y) != (c.x, c.y) and not again.positive
    tie_gt = rect(40, 40, 0, 20, 0, 40)  # top half is the object
    tie_pred = rect(40, 40, 0, 20, 0, 40)
    tie_pred[4:8, 4:8] = False  # a 4x4 hole (false negative, depth 2)
    tie_pred[30:34, 30:34] = True  # a 4x4 extra blob (false positive, depth 2)
    tie = next_click(tie_gt, tie_pred)
    assert tie is not None and not tie.positive
    with pytest.raises(InputError, match="clicked map"):
        next_click(gt, pred, np.zeros((3, 3), bool))


def test_noc_and_miou_on_hand_made_case() -> None:
    a = [0.5, 0.86, 0.91] + [0.95] * 17
    b = [0.2] * 20
    assert noc(a, 0.85) == 2 and noc(a, 0.90) == 3 and noc(b, 0.85) == 20
    s = summarize_clicks([a, b])
    assert s["miou_1"] == pytest.approx(0.35) and s["miou_5"] == pytest.approx(0.575)
    assert s["noc85"] == pytest.approx(11.0) and s["noc90"] == pytest.approx(11.5)
    assert iou(rect(4, 4, 0, 2, 0, 4), rect(4, 4, 0, 4, 0, 4)) == 0.5


def test_average_recall_matches_hand_computation() -> None:
    h, w = 100, 100
    g1, g2 = rect(h, w, 0, 20, 0, 20), rect(h, w, 50, 90, 50, 90)
    p1 = g1  # perfect: matched at all 10 IoU thresholds
    p2 = rect(h, w, 50, 90, 50, 74)  # IoU 24/40 = 0.6: matched at 0.50, 0.55, 0.60
    far = rect(h, w, 0, 5, 90, 100)  # matches nothing
    props = [[{"segmentation": encode_mask(p1), "score": 0.9}, {"segmentation": encode_mask(p2), "score": 0.8},
              {"segmentation": encode_mask(far), "score": 0.95}]]
    ar = average_recall([[encode_mask(g1), encode_mask(g2)]], props, [(h, w)], max_dets=(1, 100, 1000))
    assert ar["AR@100"] == pytest.approx((1.0 + 0.3) / 2)
    assert ar["AR@1000"] == pytest.approx(0.65)
    assert ar["AR@1"] == pytest.approx(0.0)  # the single top-scored proposal is the miss


def test_grabcut_and_model_eval_on_synthetic_object(tmp_path, tiny_sam) -> None:
    from PIL import Image

    from segany.eval.grabcut import evaluate_grabcut, grabcut_box
    from segany.eval.interactive import eval_objects, evaluate_model, summarize

    rng = np.random.default_rng(0)
    img = (rng.random((80, 100, 3)) * 60).astype(np.uint8)
    gt = rect(80, 100, 20, 60, 30, 75)
    img[gt] = [220, 200, 30]
    m = grabcut_box(img, np.array([25, 15, 80, 65]))
    assert iou(m, gt) > 0.9
    Image.fromarray(img).save(tmp_path / "x.png")
    objects = eval_objects([InstanceRecord(str(tmp_path / "x.png"), (80, 100), [encode_mask(gt)], dataset="syn")])
    gc = summarize(evaluate_grabcut(objects))
    assert gc["syn"]["box_miou"] > 0.9
    res = evaluate_model(tiny_sam, objects, max_clicks=3)
    assert len(res) == 1 and len(res[0].click_ious) == 3
    s = summarize(res, max_clicks=3)
    assert set(s["all"]) >= {"miou_1", "miou_5", "noc85", "noc90", "box_miou", "miou_by_clicks"}


def test_paired_bootstrap_resamples_images_not_objects() -> None:
    from segany.eval.metrics import paired_bootstrap

    # A constant difference: the interval collapses onto it.
    c = paired_bootstrap([0.1] * 6, ["a", "a", "b", "b", "c", "c"], resamples=500)
    assert c["mean"] == pytest.approx(0.1) and c["ci_low"] == pytest.approx(0.1) and c["ci_high"] == pytest.approx(0.1)
    assert (c["objects"], c["clusters"], c["a_better"]) == (6, 3, 1.0)
    # 20 images, each with 10 identical objects (+1 or -1): object-level resampling would see 200 independent
    # draws (CI half-width ~0.14); image-level sees 20 (~0.44). The wide interval proves images are resampled.
    diffs = [1.0 if i % 2 else -1.0 for i in range(20) for _ in range(10)]
    groups = [i for i in range(20) for _ in range(10)]
    w = paired_bootstrap(diffs, groups, resamples=4000, seed=1)
    assert w["mean"] == pytest.approx(0.0) and w["ci_low"] < -0.3 and w["ci_high"] > 0.3
    flat = paired_bootstrap(diffs, list(range(200)), resamples=4000, seed=1)
    assert flat["ci_high"] - flat["ci_low"] < 0.5 * (w["ci_high"] - w["ci_low"])
    assert paired_bootstrap([], [])["objects"] == 0


def test_run_evaluation_writes_per_object_rows_and_box_comparison(tmp_path, tiny_sam) -> None:
    from PIL import Image

    from segany.eval.run import format_table, run_evaluation

    rng = np.random.default_rng(0)
    records = []
    for k in range(2):
        img = (rng.random((80, 100, 3)) * 60).astype(np.uint8)
        gt = rect(80, 100, 20 + k, 60, 30, 75)
        img[gt] = [220, 200, 30]
        Image.fromarray(img).save(tmp_path / f"x{k}.png")
        records.append(InstanceRecord(str(tmp_path / f"x{k}.png"), (80, 100), [encode_mask(gt)], dataset="syn",
                                      image_id=f"x{k}"))
    res = run_evaluation(tiny_sam, records, max_clicks=2, grabcut=True, out_dir=tmp_path / "out")
    rows_m, rows_g = res["per_object"]["model"], res["per_object"]["grabcut"]
    assert [r["image_id"] for r in rows_m] == [r["image_id"] for r in rows_g] == ["x0", "x1"]
    assert len(rows_m[0]["click_ious"]) == 2 and "click_ious" not in rows_g[0]
    cmp = res["box_vs_grabcut"]["all"]
    want = np.mean([m["box_iou"] - g["box_iou"] for m, g in zip(rows_m, rows_g, strict=True)])
    assert cmp["mean"] == pytest.approx(want, abs=1e-3) and cmp["clusters"] == 2
    assert "box mIoU − GrabCut, all" in format_table(res)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["box_vs_grabcut"] == res["box_vs_grabcut"]


def test_per_object_rows_name_the_object_and_table_has_no_grabcut_column_without_it(tmp_path, tiny_sam) -> None:
    """Two objects of one image are told apart in results.json (`object`: largest first), and without --grabcut
    the table has no GrabCut column (it used to print nan)."""
    from PIL import Image

    from segany.eval.run import format_table, run_evaluation

    img = (np.random.default_rng(1).random((80, 100, 3)) * 60).astype(np.uint8)
    big, small = rect(80, 100, 10, 50, 10, 60), rect(80, 100, 55, 75, 70, 95)
    Image.fromarray(img).save(tmp_path / "two.png")
    rec = InstanceRecord(str(tmp_path / "two.png"), (80, 100), [encode_mask(small), encode_mask(big)], dataset="syn",
                         image_id="two")
    res = run_evaluation(tiny_sam, [rec], max_clicks=1)
    rows = res["per_object"]["model"]
    assert [(r["image_id"], r["object"]) for r in rows] == [("two", 0), ("two", 1)]
    table = format_table(res)
    assert "GrabCut" not in table and "nan" not in table, table


def test_table_names_the_click_count_it_shows() -> None:
    """With --max-clicks 3 the second column is the 3rd click's mIoU and says so (it was headed 5-click)."""
    from segany.eval.metrics import summarize_clicks
    from segany.eval.run import format_table

    s = {**summarize_clicks([[0.2, 0.5, 0.7]], max_clicks=3), "box_miou": 0.6}
    table = format_table({"model": {"all": s}})
    assert "3-click" in table.splitlines()[0] and "5-click" not in table
    s5 = {**summarize_clicks([[0.1] * 6], max_clicks=6), "box_miou": 0.6}
    assert "5-click" in format_table({"model": {"all": s5}}).splitlines()[0]
    # NoC under a cap of 3 is not the usual NoC (capped at 20): the header names the cap.
    assert "NoC3@85" in table.splitlines()[0] and "NoC@85" not in table


def test_nof_counts_objects_that_never_reach_the_threshold() -> None:
    from segany.eval.metrics import summarize_clicks
    from segany.eval.run import format_table

    s = summarize_clicks([[0.5, 0.86, 0.91] + [0.95] * 17, [0.2] * 20, [0.87] * 20])
    assert (s["nof85"], s["nof90"], s["max_clicks"]) == (1, 2, 20)
    head, _, row = format_table({"model": {"all": {**s, "box_miou": 0.5}}}).splitlines()
    assert "NoC@85" in head and "NoF@85" in head and row.split()[6:8] == ["1", "2"]


def test_every_object_and_thin_objects_are_evaluated() -> None:
    """``max_objects_per_image=None`` keeps every object (the RITM/SAM protocol); a one-pixel-wide object gets
    a box the predictor accepts instead of stopping the evaluation."""
    from segany.data.formats.common import InstanceRecord, encode_mask
    from segany.eval.interactive import box_of, eval_objects

    masks = [rect(50, 50, 0, 40, 0, 2), rect(50, 50, 10, 20, 10, 20), rect(50, 50, 30, 40, 30, 40)]
    rec = InstanceRecord(image_path="x.jpg", size_hw=(50, 50), masks=[encode_mask(m) for m in masks],
                         image_id="x", dataset="d")
    assert [len(ms) for _, ms in eval_objects([rec], 2, min_area=1)] == [2]
    assert [len(ms) for _, ms in eval_objects([rec], None, min_area=1)] == [3]
    line = rect(50, 50, 5, 45, 7, 8)  # one pixel wide
    x0, y0, x1, y1 = box_of(line)
    assert (x0, x1) == (7, 8) and (y0, y1) == (5, 44)


def test_a_dataset_named_all_is_refused_not_hidden_under_the_aggregate_row(tmp_path) -> None:
    """The "all" row replaced a dataset of that name: its objects had no row of their own, without a word."""
    from segany.data.pack import pack_own
    from segany.eval.interactive import by_dataset

    with pytest.raises(InputError, match="a dataset is named 'all'"):
        by_dataset(["a", "b"], lambda it: {"a": "x", "b": "all"}[it])
    assert list(by_dataset(["a", "b"], lambda it: it)) == ["a", "b", "all"]
    with pytest.raises(InputError, match="--name 'all' is the name of segany eval's row"):
        pack_own(tmp_path / "pack", coco=str(tmp_path / "x.json"), name="all")


@pytest.mark.parametrize("amg", [False, True])
def test_data_without_an_object_to_evaluate_is_refused_before_writing(tmp_path, tiny_sam, amg: bool) -> None:
    """Objects all under 64 px: the interactive run wrote results.json and an empty plot, then crashed on a None
    box mIoU; --amg crashed inside pycocotools (KeyError: 'annotations')."""
    from PIL import Image

    from segany.eval.amg import evaluate_amg
    from segany.eval.run import run_evaluation

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "x.png")
    records = [InstanceRecord(str(tmp_path / "x.png"), (40, 50), [encode_mask(rect(40, 50, 3, 9, 4, 11))],
                              dataset="syn", image_id="x")]
    with pytest.raises(InputError, match="have no object of at least 64 px"):
        if amg:
            evaluate_amg(tiny_sam, records)
        else:
            run_evaluation(tiny_sam, records, max_clicks=2, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_clicks_are_the_same_on_every_call() -> None:
    """On exact distance ties OpenCV's values differ in the last bit between calls, which moved the argmax: on
    this 17x21 mask 200 calls gave (9, 8) 103 times and (9, 7) 97 times."""
    bits = bytes.fromhex("f9ffffcffffffffdffffcfffff7ffffffffffffffffffffffffc1fffc03ffc00ffe007ff001ffc00ffe007ff00")
    gt = np.unpackbits(np.frombuffer(bits, np.uint8))[: 17 * 21].reshape(17, 21).astype(bool)
    assert gt.sum() == 280
    rng = np.random.default_rng(0)
    junk, clicks = [], set()
    for _ in range(200):
        junk.append(np.empty(int(rng.integers(1, 100)), np.uint8))  # the copy lands at other alignments
        clicks.add(first_click(gt.copy()))
    assert len(clicks) == 1
