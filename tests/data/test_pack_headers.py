"""Packing a YOLO-seg folder or per-object PNG masks opens each image's header once: the reader leaves the
frames it read in ``extra[IMAGE_FRAMES]`` and packing's size check (``_readable``) takes them from there.

Each dataset is real image files in a temp folder (one unreadable, one with an EXIF rotation), read as
``segany data pack`` reads it; header opens are counted at the one function that opens them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany.data.formats import common
from segany.data.formats.common import ReadReport
from segany.data.pack import _readable, read_own

# Distinct sizes; img1 is stored 40x60 with EXIF orientation 6 (a quarter turn), so it shows as 60x40.
SIZES_HW = {"img0": (40, 60), "img1": (40, 60), "img2": (50, 50)}


def _images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for stem, (h, w) in SIZES_HW.items():
        exif = Image.Exif()
        if stem == "img1":
            exif[0x0112] = 6
        Image.fromarray(np.full((h, w, 3), 120, dtype=np.uint8)).save(folder / f"{stem}.png", exif=exif)
    (folder / "broken.png").write_bytes(b"not an image")


def _yolo(tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "yolo"
    _images(root / "images" / "train")
    (root / "labels" / "train").mkdir(parents=True)
    for stem in [*SIZES_HW, "broken"]:
        (root / "labels" / "train" / f"{stem}.txt").write_text("0 0.2 0.2 0.8 0.2 0.8 0.8 0.2 0.8\n")
    return {"yolo": str(root)}


def _masks(tmp_path: Path) -> dict[str, str]:
    _images(tmp_path / "imgs")
    for stem in [*SIZES_HW, "broken"]:
        h, w = SIZES_HW.get(stem, (8, 8))  # img1's mask is on its pixels as stored
        (tmp_path / "masks" / stem).mkdir(parents=True)
        m = np.zeros((h, w), dtype=np.uint8)
        m[: h // 2, : w // 2] = 255
        Image.fromarray(m).save(tmp_path / "masks" / stem / "object_0.png")
    return {"masks": str(tmp_path / "masks"), "images": str(tmp_path / "imgs")}


@pytest.mark.parametrize(("layout", "img1_frame", "img1_size_hw"), [(_yolo, "shown", (60, 40)),
                                                                      (_masks, "stored", (40, 60))])
def test_packing_opens_each_image_header_once(tmp_path: Path, monkeypatch, layout, img1_frame: str,
                                              img1_size_hw: tuple[int, int]) -> None:
    """Where the size check used to open every image the reader had just opened, it now reuses what the
    reader read; the unreadable image is listed once, and the EXIF frame is decided as before."""
    source = layout(tmp_path)
    opened: list[str] = []
    real_header = common._header

    def header(path: Path, *args, **kwargs):  # noqa: ANN202
        opened.append(Path(path).name)
        return real_header(path, *args, **kwargs)

    monkeypatch.setattr(common, "_header", header)
    report = ReadReport()
    recs = _readable(read_own(**source, name="own", report=report), report)
    assert [r.image_id for r in recs] == ["img0", "img1", "img2"]
    assert sorted(opened) == ["broken.png", "img0.png", "img1.png", "img2.png"]
    assert len(report.bad) == 1 and report.bad[0].endswith("broken.png: not a readable image (UnidentifiedImageError)")
    img1 = recs[1]
    assert img1.size_hw == img1_size_hw and img1.extra["exif_frame"] == img1_frame
    assert all(common.IMAGE_FRAMES not in r.extra for r in recs)  # used up by the size check
