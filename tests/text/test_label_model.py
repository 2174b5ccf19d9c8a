"""Class-head files and the shipped label model segany_tiny_labels (issue 10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config

from segany.bundled import BUNDLE_DIR, bundled_path
from segany.checkpoints import build_sam, read_checkpoint, save_checkpoint
from segany.data.formats.common import InstanceRecord, encode_mask
from segany.errors import CheckpointError
from segany.modeling.sam import Sam
from segany.registry import get_config, list_models, weights_for_model
from segany.text.label_model import LABEL_HEAD_FILE, RETRAIN_COMMAND, read_head, save_head
from segany.train.labels import LabelTrainConfig, train_labels, with_labels

NAMES = ("person", "dog", "car")


def _labelled_over(base: Sam) -> Sam:
    sam = Sam(with_labels(base.cfg, NAMES))
    sam.load_state_dict(base.state_dict(), strict=False)
    randomize_(sam.class_head, seed=7)
    return sam.eval()


@pytest.fixture
def base_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Sam, Path]:
    """A tiny 'segany_tiny' whose registered weights resolve to a temp file."""
    base = randomize_(Sam(tiny_config()), seed=3).eval()
    path = save_checkpoint(base, tmp_path / "base.pt")
    import segany.checkpoints

    monkeypatch.setattr(segany.checkpoints, "find_weights", lambda name: path if name == "segany_tiny" else None)
    return base, path


def test_head_file_round_trip_is_small_and_rebuilds_the_model(tmp_path: Path, base_file: tuple[Sam, Path]) -> None:
    base, path = base_file
    sam = _labelled_over(base)
    head = save_head(sam, tmp_path / "head.pt", base_model="segany_tiny", base_weights="segany_tiny", base_path=path,
                     meta={"steps": 3, "torch": torch.__version__})
    assert head.stat().st_size < 400_000  # the head only, fp16
    assert (tmp_path / "head.pt.sha256").read_text().strip().isalnum()
    raw = read_head(head)
    assert raw["classes"]["class_names"] == list(NAMES) and raw["meta"]["steps"] == 3
    loaded = build_sam("vit_b", checkpoint=head)  # the head file brings the base's config + its classes
    assert loaded.class_head is not None and loaded.class_head.class_names == NAMES
    want = sam.state_dict()
    for k, v in loaded.state_dict().items():
        if k.startswith("class_head."):
            assert torch.allclose(v, want[k].half().float()), k
        else:
            assert torch.equal(v, want[k]), k
    _, cfg, meta = read_checkpoint(head)
    assert cfg == sam.cfg and meta["base_weights"] == "segany_tiny"


def test_head_refuses_other_base_weights_and_names_the_retrain_command(tmp_path: Path,
                                                                       base_file: tuple[Sam, Path]) -> None:
    base, path = base_file
    head = save_head(_labelled_over(base), tmp_path / "head.pt", base_model="segany_tiny",
                     base_weights="segany_tiny", base_path=path)
    save_checkpoint(randomize_(Sam(tiny_config()), seed=99), path)  # the base weights are replaced
    with pytest.raises(CheckpointError, match=r"trained on 'segany_tiny' weights with sha256 .*"
                                              + RETRAIN_COMMAND.replace(".", r"\.")):
        build_sam("segany_tiny", checkpoint=head)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_only_training_changes_the_head_alone(tmp_path: Path, seed: int) -> None:
    # Seeded: the model's random init came from whatever the tests before this one left in torch's RNG, and
    # one such state (after tests/parity and tests/train) made 20 head-only steps end above their first loss;
    # seeds 0–15 all pass.
    torch.manual_seed(seed)
    rng = np.random.default_rng(0)
    records = []
    for i in range(2):
        img = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
        masks = np.zeros((2, 96, 128), dtype=bool)
        masks[0, 10:50, 10:60] = True
        masks[1, 40:90, 70:120] = True
        img[masks[0]] //= 3
        from PIL import Image

        Image.fromarray(img).save(tmp_path / f"{i}.png")
        records.append(InstanceRecord(str(tmp_path / f"{i}.png"), (96, 128), [encode_mask(m) for m in masks],
                                      class_names=["person", "car"], image_id=str(i), dataset="test"))
    sam = Sam(with_labels(tiny_config(), NAMES))
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    cfg = LabelTrainConfig(out_dir=str(tmp_path / "run"), steps=20, batch_size=2, num_workers=0, device="cpu",
                           head_only=True, lr=1e-2, pool_rounds=2, pool_batch=8, warmup_steps=1)
    summary = train_labels(sam, records, cfg)
    # 2 rounds × (4 object prompts + 2 × 4 background points); each (image, flip) embedded once.
    assert summary["steps"] == 20 and summary["pool_prompts"] == 24 and summary["pool_background"] == 16
    assert 2 <= summary["embeddings"] <= 4
    assert summary["last_loss"] < summary["first_loss"]
    # The head was fitted on standardized tokens and the standardization folded into its first layer:
    # on the raw pool tokens it must do as well as it did in training (not blow up).
    pool = torch.load(tmp_path / "run" / "pool.pt", weights_only=True)
    with torch.no_grad():
        logits, _ = sam.class_head(pool["tokens"])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), pool["targets"].repeat_interleave(4))
    assert float(ce) < summary["first_loss"]
    again = train_labels(sam, records, cfg)  # a rerun with the same model, data and settings reuses the pool
    assert again["pool_prompts"] == 24
    after = sam.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed and all(k.startswith("class_head.") for k in changed), changed
    assert {n for n, p in sam.named_parameters() if p.requires_grad} == {
        n for n, _ in sam.named_parameters() if n.startswith("class_head.")}


# ------------------------------------------------------------------------------ the shipped model
def test_shipped_label_model_is_registered_and_small() -> None:
    assert "segany_tiny_labels" in list_models()
    info = weights_for_model("segany_tiny_labels")
    assert info is not None and info.filename == LABEL_HEAD_FILE and not info.url
    head = BUNDLE_DIR / LABEL_HEAD_FILE
    assert head.is_file() and head.stat().st_size < 500_000
    assert (BUNDLE_DIR / (LABEL_HEAD_FILE + ".sha256")).is_file()
    raw = read_head(head)
    # Trained on exactly the bundled segany_tiny (the sha256 file shipped beside its parts).
    assert raw["base_weights"] == "segany_tiny"
    assert raw["base_sha256"] == (BUNDLE_DIR / "segany_tiny.pt.sha256").read_text().split()[0]
    cfg = get_config("segany_tiny_labels")
    assert cfg.classes is not None and "person" in cfg.classes.class_names
    assert cfg.encoder == get_config("segany_tiny").encoder


def test_build_sam_segany_tiny_labels_loads_the_bundled_weights_and_head() -> None:
    model = build_sam("segany_tiny_labels")  # no checkpoint: the shipped head over the bundled base
    assert model.class_head is not None and "person" in model.class_head.class_names
    path = bundled_path("segany_tiny.pt")
    assert path is not None
    base_sd, _, _ = read_checkpoint(path)
    sd = model.state_dict()
    key = "mask_decoder.iou_token.weight"
    assert torch.equal(sd[key], base_sd[key].float())
    raw = read_head(BUNDLE_DIR / LABEL_HEAD_FILE)
    assert torch.equal(sd["class_head.logits.weight"], raw["head"]["logits.weight"].float())
