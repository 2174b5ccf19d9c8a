"""write_sa1b: SA-1B files are strict JSON, so a NaN or infinite number is refused where it is, and nothing
is written (the generator gives an empty mask a NaN stability, as the reference does)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from segany.data.formats.sa1b import read_sa1b, to_sa1b, write_sa1b
from segany.errors import InputError


def _records(stability: float) -> list[dict]:
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:5] = True
    return [{"segmentation": mask, "bbox": [2, 1, 2, 1], "area": 6, "predicted_iou": 0.9, "stability_score": s,
             "crop_box": [0, 0, 6, 4], "point_coords": [[3.0, 2.0]]} for s in (0.95, stability)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_score_is_refused_naming_the_annotation_and_nothing_is_written(tmp_path: Path,
                                                                                     bad: float) -> None:
    data = to_sa1b(_records(bad), image_id=3, file_name="x.jpg", size_hw=(4, 6))
    data["annotations"][1]["id"] = 17
    with pytest.raises(InputError, match=r"annotation 1 \(id 17\) stability_score = (nan|inf) is not a finite "
                                         r"number.*strict JSON.*math.isfinite"):
        write_sa1b(tmp_path / "x.json", data)
    assert list(tmp_path.iterdir()) == []  # no file, no temp file


def test_finite_data_is_written_as_strict_json_and_reads_back(tmp_path: Path) -> None:
    data = to_sa1b(_records(0.5), image_id=3, file_name="x.jpg", size_hw=(4, 6))
    path = write_sa1b(tmp_path / "x.json", data)

    def refuse(name: str) -> object:
        raise AssertionError(name)

    assert json.loads(path.read_text(), parse_constant=refuse) == data
    back = read_sa1b(path)
    assert back.masks().shape == (2, 4, 6) and all(math.isfinite(a["stability_score"]) for a in back.annotations)
