"""Dataset readers, third audit: damaged or unusual inputs to the SA-1B, YOLO, BSDS and PNG readers and to
load_image. Each case writes real files in a temp folder; a damaged file is refused at once with its name, the
annotation or line, and the fix, and an unusual but valid one (0/1 masks, palette masks, colour instance maps,
float TIFFs) gives the masks or pixels a person sees in a viewer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany.data.formats.bsds import read_bsds
from segany.data.formats.common import ReadReport, decode_rle
from segany.data.formats.png import read_binary_masks, read_instance_pngs
from segany.data.formats.sa1b import read_sa1b
from segany.data.formats.yolo import read_yolo_seg
from segany.data.images import load_image, to_rgb_uint8
from segany.data.rle import counts_to_mask, mask_to_coco
from segany.errors import ImageLoadError, InputError, SeganyError


# ----------------------------------------------------------------------------- SA-1B
def _sa1b(tmp_path: Path, segmentation: object, h: int = 6, w: int = 8) -> Path:
    ann = {"id": 41, "segmentation": segmentation, "bbox": [0, 0, 1, 1], "area": 1, "predicted_iou": 0.9,
           "stability_score": 0.9, "crop_box": [0, 0, w, h], "point_coords": [[0.5, 0.5]]}
    path = tmp_path / "sa_1.json"
    path.write_text(json.dumps({"image": {"image_id": 1, "width": w, "height": h, "file_name": "sa_1.jpg"},
                                "annotations": [ann]}))
    return path


def _good_counts(h: int = 6, w: int = 8) -> str:
    m = np.zeros((h, w), dtype=bool)
    m[1:4, 2:5] = True
    return mask_to_coco(m)["counts"]


@pytest.mark.parametrize(("segmentation", "fragment"), [
    # Counts of a 6x9 mask (too long: pycocotools failed only at .masks()) and of a 6x7 one (too short).
    ({"size": [6, 8], "counts": _good_counts(6, 9)}, "cover 54 pixels but its size 6x8 has 48"),
    ({"size": [6, 8], "counts": _good_counts(6, 7)}, "cover 42 pixels but its size 6x8 has 48"),
    ({"size": [6, 8], "counts": _good_counts()[:-1] + "P"}, "counts are corrupt .*cut off"),
    ({"size": [6, 8], "counts": [5, 5]}, "cover 10 pixels but its size 6x8 has 48"),
    ({"size": [6, 8], "counts": "0~1"}, "counts are corrupt"),
    ({"size": [6, 8], "counts": [10, -2, 40]}, "counts are corrupt"),
    ([[0, 0, 4, 0, 4, 4]], "segmentation is a polygon list"),
    ({"size": [6, 8]}, "segmentation is a dict"),
])
def test_sa1b_damaged_mask_is_refused_when_read(tmp_path, segmentation, fragment) -> None:
    path = _sa1b(tmp_path, segmentation)
    with pytest.raises(InputError, match=fragment) as info:
        read_sa1b(path)
    msg = str(info.value)
    assert str(path) in msg and "annotation 0 (id 41)" in msg
    assert any(fix in msg for fix in ("regenerate", "convert it", "re-export"))


def test_sa1b_good_file_still_reads(tmp_path) -> None:
    back = read_sa1b(_sa1b(tmp_path, {"size": [6, 8], "counts": _good_counts()}))
    assert back.masks().shape == (1, 6, 8) and int(back.masks().sum()) == 9


def test_sa1b_folder_is_refused(tmp_path) -> None:
    _sa1b(tmp_path, {"size": [6, 8], "counts": _good_counts()})
    with pytest.raises(InputError, match=r"is a folder \(it holds sa_1.json\); pass one per-image .json file"):
        read_sa1b(tmp_path)


@pytest.mark.parametrize(("counts", "fragment"), [([5, 5], "sum to 10 pixels but size 4x5 has 20"),
                                                  ([10, -2, 12], "negative run")])
def test_counts_to_mask_raises_a_segany_error(counts, fragment) -> None:
    with pytest.raises(SeganyError, match=fragment):
        counts_to_mask(counts, (4, 5))
    assert counts_to_mask([3, 2, 15], (4, 5)).sum() == 2


# ----------------------------------------------------------------------------- YOLO
def _yolo(tmp_path: Path, yaml_text: str | None = None, label: bytes = b"0 0.1 0.1 0.9 0.1 0.5 0.9\n") -> Path:
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (20, 10), (90, 90, 90)).save(tmp_path / "images" / "train" / "a.png")
    (tmp_path / "labels" / "train" / "a.txt").write_bytes(label)
    if yaml_text is not None:
        (tmp_path / "data.yaml").write_text(yaml_text)
    return tmp_path


@pytest.mark.parametrize(("yaml_text", "fragment"), [
    ("names: [a, b\n", r"not valid YAML \(.*at line 2"),
    ("- a\n- b\n", "holds a list, not a mapping"),
    ("names: {person: 0}\n", r"names has the key 'person', not a class index \(it maps 'person' to 0: swap them"),
    ("names: person\n", "names is a str"),
])
def test_yolo_bad_data_yaml_is_refused(tmp_path, yaml_text, fragment) -> None:
    root = _yolo(tmp_path, yaml_text)
    with pytest.raises(InputError, match=fragment) as info:
        read_yolo_seg(root, "train")
    assert str(root / "data.yaml") in str(info.value) and "names: [person, car]" in str(info.value)


def test_yolo_good_data_yaml_forms(tmp_path) -> None:
    root = _yolo(tmp_path, "names: {0: person, '1': car}\n")
    assert read_yolo_seg(root, "train")[0].class_names == ["person"]


def test_yolo_label_file_not_utf8_names_file_and_line(tmp_path) -> None:
    root = _yolo(tmp_path, "names: [person]\n", label="0 0.1 0.1 0.9 0.1 0.5 0.9\n0 0.1 0.2 0.9 0.2 0.5 0.9 # café\n"
                 .encode("latin-1"))
    with pytest.raises(InputError, match=r"a\.txt:2: not UTF-8 text \(byte 0xe9\).*save the file as UTF-8"):
        read_yolo_seg(root, "train")


def test_yolo_label_file_with_bom_reads(tmp_path) -> None:
    root = _yolo(tmp_path, "names: [person]\n", label=b"\xef\xbb\xbf0 0.1 0.1 0.9 0.1 0.5 0.9\n")
    assert len(read_yolo_seg(root, "train")[0].masks) == 1


# ----------------------------------------------------------------------------- BSDS
def _bsds(tmp_path: Path, *, image: bool = True) -> Path:
    import scipy.io as sio

    (tmp_path / "groundTruth" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train").mkdir(parents=True)
    seg = np.ones((12, 16), dtype=np.uint16)
    seg[:, 8:] = 2
    gt = np.empty((1, 1), dtype=object)
    gt[0, 0] = {"Segmentation": seg, "Boundaries": np.zeros((12, 16), dtype=np.uint8)}
    sio.savemat(tmp_path / "groundTruth" / "train" / "1.mat", {"groundTruth": gt})
    if image:
        Image.new("RGB", (16, 12)).save(tmp_path / "images" / "train" / "1.jpg")
    return tmp_path


def test_bsds_good_file_reads(tmp_path) -> None:
    (rec,) = read_bsds(_bsds(tmp_path))
    assert rec.size_hw == (12, 16) and len(rec.masks) == 2 and rec.groups == [0, 0]


@pytest.mark.parametrize(("content", "fragment"), [
    (b"MATLAB 5.0 MAT-file, cut off", "not a readable MATLAB .mat file"),
    (b"", "not a readable MATLAB .mat file"),
    (None, "has no 'groundTruth' variable \\(it has other\\)"),
])
def test_bsds_damaged_mat_is_refused(tmp_path, content, fragment) -> None:
    import scipy.io as sio

    root = _bsds(tmp_path)
    mat = root / "groundTruth" / "train" / "1.mat"
    if content is None:
        sio.savemat(mat, {"other": np.zeros(3)})
    else:
        mat.write_bytes(content)
    with pytest.raises(InputError, match=fragment) as info:
        read_bsds(root)
    assert str(mat) in str(info.value)


def test_bsds_missing_image_is_reported_not_returned(tmp_path) -> None:
    root = _bsds(tmp_path, image=False)
    with pytest.raises(ImageLoadError, match="1.jpg: file not found"):  # the old reader returned the record
        read_bsds(root)
    report = ReadReport()
    assert read_bsds(root, report=report) == []
    assert len(report.bad) == 1 and str(root / "images" / "train" / "1.jpg") in report.bad[0]


def test_bsds_image_of_another_size_is_reported(tmp_path) -> None:
    root = _bsds(tmp_path)
    Image.new("RGB", (12, 16)).save(root / "images" / "train" / "1.jpg")  # turned a quarter
    report = ReadReport()
    assert read_bsds(root, report=report) == [] and "is 16x12 but its region maps" in report.bad[0]


# ----------------------------------------------------------------------------- PNG folders
def _pair(tmp_path: Path, mask: Image.Image, stem: str = "a", suffix: str = ".png") -> tuple[Path, Path]:
    idir, mdir = tmp_path / "images", tmp_path / "masks"
    idir.mkdir(exist_ok=True)
    mdir.mkdir(exist_ok=True)
    Image.new("RGB", mask.size, (80, 80, 80)).save(idir / f"{stem}.png")
    mask.save(mdir / f"{stem}{suffix}")
    return idir, mdir


def _square(value: int = 1) -> np.ndarray:
    arr = np.zeros((20, 20), dtype=np.uint8)
    arr[5:15, 5:15] = value
    return arr


def test_binary_masks_0_1_grayscale(tmp_path) -> None:
    idir, mdir = _pair(tmp_path, Image.fromarray(_square(1), "L"))
    (rec,) = read_binary_masks(idir, mdir, min_area=1)
    assert len(rec.masks) == 1 and decode_rle(rec.masks[0]).sum() == 100


def test_binary_masks_palette_index_1_white(tmp_path) -> None:
    mask = Image.fromarray(_square(1), "P")
    mask.putpalette([0, 0, 0, 255, 255, 255])
    idir, mdir = _pair(tmp_path, mask)
    (rec,) = read_binary_masks(idir, mdir, min_area=1)
    assert len(rec.masks) == 1 and decode_rle(rec.masks[0]).sum() == 100


def test_binary_masks_jpeg_noise_is_not_a_0_1_mask(tmp_path) -> None:
    # A JPEG mask's background may hold 1s from compression: it is thresholded, never read as 0/1.
    idir, mdir = _pair(tmp_path, Image.fromarray(_square(1), "L"), suffix=".jpg")
    (rec,) = read_binary_masks(idir, mdir, min_area=1)
    assert rec.masks == []


def test_instance_pngs_colour_map_keeps_every_colour(tmp_path) -> None:
    arr = np.zeros((20, 20, 3), dtype=np.uint8)
    arr[2:8, 2:8] = (255, 0, 0)
    arr[10:18, 10:18] = (255, 255, 0)
    idir, mdir = _pair(tmp_path, Image.fromarray(arr, "RGB"), suffix="_mask.png")
    (rec,) = read_instance_pngs(idir, mdir)
    assert sorted(int(decode_rle(m).sum()) for m in rec.masks) == [36, 64]


def test_instance_pngs_palette_map_uses_indices(tmp_path) -> None:
    ids = np.zeros((20, 20), dtype=np.uint8)
    ids[2:8, 2:8], ids[10:18, 10:18] = 1, 2
    mask = Image.fromarray(ids, "P")
    mask.putpalette([0, 0, 0, 200, 200, 200, 200, 200, 200])  # two instances drawn in one colour
    idir, mdir = _pair(tmp_path, mask, suffix="_mask.png")
    (rec,) = read_instance_pngs(idir, mdir)
    assert sorted(int(decode_rle(m).sum()) for m in rec.masks) == [36, 64]


@pytest.mark.parametrize(("reader", "suffix", "fragment"), [
    (read_instance_pngs, "_mask.png", "1 image(s) have no mask"),
    (read_binary_masks, ".png", "1 image(s) have no same-named mask"),
])
def test_png_readers_note_images_without_a_mask(tmp_path, caplog, reader, suffix, fragment) -> None:
    idir, mdir = _pair(tmp_path, Image.fromarray(_square(255), "L"), suffix=suffix)
    Image.new("RGB", (20, 20)).save(idir / "lonely.png")
    with caplog.at_level(logging.WARNING):  # without a report the note is logged (the old readers said nothing)
        assert len(reader(idir, mdir)) == 1
    assert fragment in caplog.text and "lonely" in caplog.text
    report = ReadReport()
    assert len(reader(idir, mdir, report=report)) == 1
    assert len(report.notes) == 1 and fragment in report.notes[0] and "lonely" in report.notes[0]


def test_png_readers_refuse_unreadable_mask(tmp_path) -> None:
    idir, mdir = _pair(tmp_path, Image.fromarray(_square(255)))
    (mdir / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match=r"a\.png: not a readable image"):
        read_binary_masks(idir, mdir)
    (mdir / "a_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match=r"a_mask\.png: not a readable image"):
        read_instance_pngs(idir, mdir)


# ----------------------------------------------------------------------------- load_image
def _float_tiff(tmp_path: Path, arr: np.ndarray) -> Path:
    path = tmp_path / "f.tif"
    Image.fromarray(arr.astype(np.float32), "F").save(path)
    assert Image.open(path).mode == "F"
    return path


def test_float_tiff_in_0_1_is_not_black(tmp_path) -> None:
    img = load_image(_float_tiff(tmp_path, np.full((4, 5), 0.5)))
    assert img.shape == (4, 5, 3) and (img == 127).all()  # 0.5 * 255, truncated as to_rgb_uint8 does


@pytest.mark.parametrize("arr", [np.linspace(0, 1, 20).reshape(4, 5),  # 0-1
                                 np.linspace(-3, 300, 20).reshape(4, 5)])  # 0-255, outside clipped
def test_float_tiff_reads_as_the_same_array_would(tmp_path, arr) -> None:
    expected = to_rgb_uint8(arr.astype(np.float32))
    np.testing.assert_array_equal(load_image(_float_tiff(tmp_path, arr)), expected)


def test_float_tiff_with_nan_is_refused(tmp_path) -> None:
    arr = np.full((4, 5), 0.5)
    arr[1, 1] = np.nan
    with pytest.raises(ImageLoadError, match=r"f\.tif.*NaN or infinite pixels; replace them"):
        load_image(_float_tiff(tmp_path, arr))


def test_int32_image_negative_pixels_are_black(tmp_path) -> None:
    arr = np.array([[-5, 0, 65535, 70000]], dtype=np.int32)
    path = tmp_path / "i.tif"
    Image.fromarray(arr, "I").save(path)
    np.testing.assert_array_equal(load_image(path)[..., 0], [[0, 0, 255, 255]])


@pytest.mark.parametrize(("reader", "suffix"), [(read_instance_pngs, "_mask.png"), (read_binary_masks, ".png")])
def test_png_readers_refuse_a_mask_of_another_size_than_its_image(tmp_path, reader, suffix) -> None:
    """The record's size came from the mask file alone, so a 20x20 mask of a 30x20 image packed a cut picture."""
    idir, mdir = _pair(tmp_path, Image.fromarray(_square(255), "L"), suffix=suffix)
    Image.new("RGB", (20, 30), (80, 80, 80)).save(idir / "a.png")
    with pytest.raises(InputError, match="is 20x20 but its image .* is 30x20"):
        reader(idir, mdir)
    (idir / "a.png").write_bytes(b"not an image")
    report = ReadReport()
    assert reader(idir, mdir, report=report) == [] and len(report.bad) == 1
