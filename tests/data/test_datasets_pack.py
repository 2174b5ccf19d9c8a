"""Packing a few real images and sampling them through the training Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from segany.data.datasets import AugmentConfig, SegmentationDataset, StepBatchSampler, collate
from segany.data.formats.common import decode_rle
from segany.data.pack import load_pack, pack_shared


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    if not SHARED_DATA.exists():
        pytest.fail(f"shared datasets not found at {SHARED_DATA}; lay ../shared/data beside the repo or set SEGANY_SHARED_DATA")
    out = tmp_path_factory.mktemp("pack")
    pack_shared(SHARED_DATA, out, datasets=("pennfudan", "kvasir"), limit=3, max_side=256)
    return out


def test_pack_roundtrip(pack_dir) -> None:
    train, val = load_pack(pack_dir, split="train"), load_pack(pack_dir, split="val")
    assert train and val
    for r in train + val:
        assert max(r.size_hw) <= 256
        from PIL import Image

        with Image.open(r.image_path) as im:
            assert im.size == (r.size_hw[1], r.size_hw[0])
        assert all(decode_rle(m).shape == r.size_hw for m in r.masks)


def test_dataset_is_deterministic_and_shaped(pack_dir) -> None:
    recs = load_pack(pack_dir)
    ds = SegmentationDataset(recs, img_size=128, max_masks=3, augment=AugmentConfig(min_mask_area=4), seed=1)
    a, b = ds[(1, 2)], ds[(1, 2)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    assert a["image"].shape == (3, 128, 128) and a["masks"].shape == (3, 128, 128)
    c = ds[(1, 3)]  # another epoch: another augmentation draw
    assert not (torch.equal(a["image"], c["image"]) and torch.equal(a["masks"], c["masks"]))
    h, w = a["size_hw"]
    assert not a["masks"][:, h:, :].any() and not a["masks"][:, :, w:].any()
    assert torch.all(a["image"][:, h:, :] == 0)
    batch = collate([ds[k] for k in next(iter(StepBatchSampler(len(ds), 2, seed=0)))])
    assert batch["image"].shape == (2, 3, 128, 128) and batch["num_masks"].min() >= 1


def test_no_augment_matches_resize(pack_dir) -> None:
    recs = load_pack(pack_dir, split="val")[:1]
    ds = SegmentationDataset(recs, img_size=128, max_masks=8, augment=None)
    item = ds[0]
    h, w = item["size_hw"]
    assert max(h, w) == 128
    m0 = decode_rle(recs[0].masks[0])
    assert item["num_masks"] == min(8, len(recs[0].masks))
    # areas survive the resize up to scale
    scale = (h * w) / (m0.shape[0] * m0.shape[1])
    areas = sorted(int(item["masks"][i].sum()) for i in range(item["num_masks"]))
    ref = sorted(int(decode_rle(m).sum() * scale) for m in recs[0].masks[: item["num_masks"]])
    assert np.allclose(areas, ref, rtol=0.25, atol=20)


def test_sampler_resumes_mid_epoch() -> None:
    full = iter(StepBatchSampler(10, 3, seed=4))
    batches = [next(full) for _ in range(6)]
    resumed = iter(StepBatchSampler(10, 3, seed=4, start_step=4))
    assert [next(resumed), next(resumed)] == batches[4:6]
    r0 = iter(StepBatchSampler(10, 3, seed=4, rank=0, world_size=2))
    r1 = iter(StepBatchSampler(10, 3, seed=4, rank=1, world_size=2))
    assert next(r0) + next(r1) == batches[0] + batches[1]


@pytest.mark.parametrize("extra, fragment", [
    (["--max-side", "-5"], "--max-side"), (["--quality", "500"], "--quality"), (["--limit", "0"], "--limit"),
    (["--datasets", "foo"], "unknown dataset 'foo'"), (["--datasets", ","], "no datasets to pack"),
])
def test_pack_rejects_bad_options_before_writing(tmp_path, capsys, extra, fragment) -> None:
    from segany.cli.main import main

    out = tmp_path / "pack"
    assert main(["data", "pack", "--data", str(SHARED_DATA), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("segany: error:") and fragment in err and "unexpected" not in err, err
    assert not out.exists()


def test_pack_missing_data_folder_names_the_right_option(tmp_path, capsys) -> None:
    from segany.cli.main import main

    assert main(["data", "pack", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "--data" in err and "--split" not in err, err


def test_interrupted_pack_resumes_keeping_written_images(tmp_path, monkeypatch) -> None:
    import segany.data.images

    out = tmp_path / "pack"
    first = pack_shared(SHARED_DATA, out, datasets=("pennfudan",), limit=3, max_side=128)
    # As if Ctrl-C struck before the last image and the manifest were written.
    (out / "manifest.json.gz").unlink()
    last = out / first["records"][-1]["image_path"]
    last.unlink()
    loads = []
    real = segany.data.images.load_image
    monkeypatch.setattr(segany.data.images, "load_image", lambda p, *a, **k: loads.append(p) or real(p, *a, **k))
    again = pack_shared(SHARED_DATA, out, datasets=("pennfudan",), limit=3, max_side=128)
    assert len(loads) == 1 and again["reused"] == 2 and last.exists()
    assert again["records"] == first["records"]
    assert len(load_pack(out)) == 3
    loads.clear()
    other = pack_shared(SHARED_DATA, out, datasets=("pennfudan",), limit=3, max_side=64)  # new size: all again
    assert len(loads) == 3 and other["reused"] == 0
    assert all(max(r.size_hw) <= 64 for r in load_pack(out))
    assert not list(out.rglob("*.tmp"))
