"""The label-training split of coco128 is frozen (text audit finding 2): the shipped head's held-out images stay
held out, and an image added to or removed from the folder moves no other image across the split."""

from __future__ import annotations

import collections
import json
import random

import pytest
from conftest import REPO, SHARED_DATA

from segany.data.formats.common import InstanceRecord
from segany.train.labels import COCO128_LABEL_TRAIN, COCO128_LABEL_VAL, label_split

COCO = SHARED_DATA / "coco128-seg"


def _records(ids: list[str], dataset: str = "coco128") -> list[InstanceRecord]:
    return [InstanceRecord(image_path=f"{i}.jpg", size_hw=(8, 8), masks=[], class_names=[], image_id=i,
                           dataset=dataset) for i in ids]


def _held(records: list[InstanceRecord]) -> set[str]:
    return {r.image_id for r in label_split(records)["val"]}


def test_frozen_split_is_the_shipped_heads() -> None:
    """The lists are the split docs/benchmarks.md describes: the 128 ids shuffled with seed "labels-10", the
    first 16 held out (how label_split made it when segany_tiny_labels was trained)."""
    ids = sorted(f"{i:012d}" for i in COCO128_LABEL_VAL + COCO128_LABEL_TRAIN)
    assert len(set(ids)) == 128
    pool = list(ids)
    random.Random("labels-10").shuffle(pool)
    assert sorted(pool[:16]) == sorted(f"{i:012d}" for i in COCO128_LABEL_VAL)
    assert _held(_records(ids)) == set(pool[:16])
    report = json.loads((REPO / "docs" / "segany_tiny_labels_eval.json").read_text())
    assert report["eval"]["per_dataset"]["coco128"]["images"] == len(COCO128_LABEL_VAL)


@pytest.mark.skipif(not COCO.is_dir(), reason="needs ../shared/data")
def test_frozen_split_matches_the_shipped_heads_evaluation() -> None:
    """The data the head was evaluated on: the folder's 128 ids are the frozen ones, and the held-out label files
    hold the 91 coco128 instances of docs/segany_tiny_labels_eval.json, class by class (person also counts
    PennFudan's)."""
    import yaml

    folder = sorted(p.stem for p in (COCO / "images" / "train2017").glob("*.jpg"))
    assert folder == sorted(f"{i:012d}" for i in COCO128_LABEL_VAL + COCO128_LABEL_TRAIN)
    names = yaml.safe_load((COCO / "data.yaml").read_text())["names"]
    per_class: collections.Counter[str] = collections.Counter()
    for i in COCO128_LABEL_VAL:
        f = COCO / "labels" / "train2017" / f"{i:012d}.txt"
        lines = f.read_text().split("\n") if f.exists() else []  # 000000000250 has no labelled object
        per_class.update(names[int(line.split()[0])] for line in lines if line.strip())
    report = json.loads((REPO / "docs" / "segany_tiny_labels_eval.json").read_text())["eval"]
    assert sum(per_class.values()) == report["per_dataset"]["coco128"]["gt_instances"] == 91
    assert {k: v for k, v in per_class.items() if k != "person"} == {
        k: v for k, v in report["per_class_gt"].items() if k != "person"}


def test_adding_or_removing_images_moves_no_other_image() -> None:
    frozen = [f"{i:012d}" for i in COCO128_LABEL_VAL + COCO128_LABEL_TRAIN]
    new = [f"{900000 + i:012d}" for i in range(400)]
    base = _held(_records(frozen + new))
    assert base >= {f"{i:012d}" for i in COCO128_LABEL_VAL}
    assert not base & {f"{i:012d}" for i in COCO128_LABEL_TRAIN}
    assert 25 <= len(base & set(new)) <= 75  # about 1 in 8 of the new ids
    rng = random.Random(0)
    for _ in range(3):
        kept = rng.sample(frozen + new, 300)
        assert _held(_records(kept)) == base & set(kept)
    # coco128 without its two unlabelled images, or with one more: the rest stay where they were.
    fewer = [i for i in frozen if i not in ("000000000250", "000000000508")]
    assert _held(_records(fewer)) == base & set(fewer)
    assert _held(_records([*frozen, "000000999999"])) - {"000000999999"} == base & set(frozen)
