"""The accelerator-resident batcher: deterministic per step, geometry identical to the source without
augmentation, masks moved with their image, valid masks first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segany.data.datasets import AugmentConfig
from segany.data.device_batches import DeviceBatcher
from segany.data.formats.common import InstanceRecord, encode_mask

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@pytest.fixture
def records(tmp_path) -> list[InstanceRecord]:
    from PIL import Image

    rng = np.random.default_rng(0)
    recs = []
    for i, (h, w) in enumerate([(48, 64), (64, 40), (30, 64)]):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"im{i}.png"
        Image.fromarray(img).save(path)
        masks = []
        for k in range(3):
            m = np.zeros((h, w), dtype=bool)
            m[4 + 3 * k : 20 + 3 * k, 5 + 4 * k : 25 + 4 * k] = True
            masks.append(encode_mask(m))
        recs.append(InstanceRecord(image_path=str(path), size_hw=(h, w), masks=masks, image_id=str(i)))
    return recs


def make(records, aug: AugmentConfig, K: int = 2) -> DeviceBatcher:
    return DeviceBatcher(records, img_size=64, max_masks=K, batch_size=2, augment=aug, seed=3, pixel_mean=MEAN,
                         pixel_std=STD, device=torch.device("cpu"), workers=1)


def test_same_step_same_batch_and_steps_differ(records):
    b = make(records, AugmentConfig())
    x, y, z = b.batch(0), b.batch(0), b.batch(1)
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["masks"], y["masks"])
    assert not torch.equal(x["image"], z["image"])


def test_identity_without_augmentation(records):
    b = make(records, AugmentConfig(hflip=0.0, scale_min=1.0, scale_max=1.0, min_mask_area=1), K=3)
    out = b.batch(0)
    for j, i in enumerate(b._indices(0)):
        h, w = b.sizes[i].tolist()
        src = (b.images[i].float() - b.mean[0]) / b.std[0]
        assert torch.allclose(out["image"][j, :, :h, :w], src[:, :h, :w], atol=1e-5)
        assert out["image"][j, :, h:, :].abs().sum() == 0 and out["image"][j, :, :, w:].abs().sum() == 0
        n = int(out["num_masks"][j])
        assert n == 3
        got = {tuple(m.nonzero().min(0).values.tolist()) for m in out["masks"][j, :n]}
        want = {tuple(m.bool().nonzero().min(0).values.tolist()) for m in b.masks[b.first[i]: b.first[i] + 3]}
        assert got == want


def test_flip_moves_masks_with_image(records):
    b = make(records, AugmentConfig(hflip=1.0, scale_min=1.0, scale_max=1.0, min_mask_area=1), K=3)
    out = b.batch(0)
    i = b._indices(0)[0]
    h, w = b.sizes[i].tolist()
    src = (b.images[i].float() - b.mean[0]) / b.std[0]
    assert torch.allclose(out["image"][0, :, :h, :w], src[:, :h, :w].flip(-1), atol=1e-5)
    first = b.masks[b.first[i]][:h, :w].bool().flip(-1)
    assert any(torch.equal(m[:h, :w], first) for m in out["masks"][0])


def test_size_hw_is_the_image_part_of_each_augmented_input(records):
    """The trainer draws corrective clicks inside ``size_hw`` only: it must cover the image and no more than
    the one row and column of padding that bilinear upscaling blends into."""
    b = make(records, AugmentConfig(hflip=0.5, scale_min=0.5, scale_max=1.6, min_mask_area=1))
    for step in range(6):
        out = b.batch(step)
        assert len(out["size_hw"]) == 2
        for img, (h, w) in zip(out["image"], out["size_hw"], strict=True):
            assert 1 <= h <= 64 and 1 <= w <= 64
            assert (img[:, :h, :w] != 0).all()  # normalized random pixels are never exactly 0
            assert img[:, h + 1:].abs().sum() == 0 and img[:, :, w + 1:].abs().sum() == 0


def test_cropped_away_masks_are_dropped_and_valid_first(records):
    b = make(records, AugmentConfig(hflip=0.0, scale_min=1.0, scale_max=1.0, min_mask_area=10_000), K=2)
    out = b.batch(0)
    assert out["num_masks"].tolist() == [0, 0]
    assert not out["masks"].any()


def test_repeated_records_decode_once_and_follow_factors(records):
    from segany.data.datasets import repeat_records

    for r, name in zip(records, ["a", "b", "b"], strict=True):
        r.dataset = name
    rep = repeat_records(records, {"a": 3, "b": 0.5}, seed=1)
    assert sum(r.dataset == "a" for r in rep) == 3 and sum(r.dataset == "b" for r in rep) == 1
    assert rep == repeat_records(records, {"a": 3, "b": 0.5}, seed=1)  # a pure function of the seed
    b = make(rep, AugmentConfig())
    assert len(b) == 4 and len(b.records) == 2 and b.images.shape[0] == 2
    seen = [i for step in range(4) for i in b._indices(step)]
    a_slot = b.records.index(records[0])
    assert seen.count(a_slot) == 6  # two epochs of 4 positions, 3 of them image "a"


def test_image_of_another_size_than_its_masks_is_refused(records) -> None:
    """As in the CPU dataset: a stale pack (an old image under a reused id) is refused, not stretched."""
    from PIL import Image

    from segany.errors import InputError

    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(records[1].image_path)
    with pytest.raises(InputError, match="stale or edited") as exc:
        make(records, AugmentConfig(hflip=0.0))
    assert records[1].image_path in str(exc.value)


@pytest.mark.parametrize("path", ["dataset", "device"])
def test_resized_masks_stay_on_their_object(tmp_path, path: str) -> None:
    """A white box labelled by the same box: after resizing (the pack's 400 px side to 512, and scale jitter) the
    mask covers the bright pixels with no systematic shift. Nearest-neighbour resizing that does not sample pixel
    centres moved every mask half a pixel right and down."""
    import cv2

    from segany.data.datasets import SegmentationDataset

    h, w = 300, 400
    m = np.zeros((h, w), bool)
    m[101:200, 151:260] = True
    img = np.zeros((h, w, 3), np.uint8)
    img[m] = 255
    cv2.imwrite(str(tmp_path / "box.png"), img)
    rec = InstanceRecord(str(tmp_path / "box.png"), (h, w), [encode_mask(m)], image_id="box", dataset="toy")
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    shifts = []
    for aug in (AugmentConfig(hflip=0, scale_min=1, scale_max=1), AugmentConfig(hflip=0.5, scale_min=0.6, scale_max=1.4)):
        if path == "dataset":
            ds = SegmentationDataset([rec], img_size=512, max_masks=1, augment=aug, seed=0)
            samples = [(s["image"], s["masks"][0]) for s in (ds[(0, e)] for e in range(6))]
        else:
            b = DeviceBatcher([rec], img_size=512, max_masks=1, batch_size=1, augment=aug, seed=0, pixel_mean=mean,
                              pixel_std=std, device=torch.device("cpu"), workers=1)
            samples = [(o["image"][0], o["masks"][0, 0]) for o in (b.batch(s) for s in range(6)) if o["num_masks"][0]]
        for image, mask in samples:
            bright = (image[0] * std[0] + mean[0]).numpy() > 127.5
            mk = mask.numpy() > 0
            ys, xs = np.nonzero(mk)
            yb, xb = np.nonzero(bright)
            shifts.append((xs.mean() - xb.mean(), ys.mean() - yb.mean(), (bright & mk).sum() / (bright | mk).sum()))
    arr = np.array(shifts)
    assert len(arr) >= 6
    # A boundary pixel half covered may land on either side in one sample (a 0.5 px centroid step on this box);
    # what must not happen is the same shift in every sample.
    assert np.abs(arr[:, :2].mean(axis=0)).max() < 0.15, arr[:, :2]
    assert arr[:, 2].min() > 0.98


@pytest.mark.parametrize("path", ["dataset", "device"])
def test_a_mask_of_another_size_than_its_image_is_refused(records, path: str) -> None:
    """Every mask's frame is checked, not only the first one's: an edited pack with one mask of another size
    had it stretched onto the image by the device batcher and crashed np.stack in the dataset."""
    from segany.data.datasets import SegmentationDataset
    from segany.errors import InputError

    rec = records[0]
    h, w = rec.size_hw
    rec.masks[2] = encode_mask(np.ones((w, h), dtype=bool))  # transposed: same pixel count, other frame
    with pytest.raises(InputError, match="stale or edited") as exc:
        if path == "device":
            make(records, AugmentConfig(hflip=0.0))
        else:
            ds = SegmentationDataset([rec], img_size=64, max_masks=3, augment=None)
            ds[0]
    assert rec.image_path in str(exc.value) and f"{w}x{h}" in str(exc.value)
