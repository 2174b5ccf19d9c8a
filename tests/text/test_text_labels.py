"""Text prompts and class labels (issue 10) with a random-weight tiny CLIP and the tiny SAM config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, randomize_, tiny_config

from segany.checkpoints import build_sam, read_checkpoint, save_checkpoint
from segany.errors import CheckpointError, InputError, PromptError
from segany.modeling.config import ClassHeadConfig, SamConfig, TextConfig
from segany.modeling.sam import Sam
from segany.predictor import SamPredictor
from segany.text import load_clip
from segany.train.labels import LabelRecipe, LabelTrainConfig, label_loss, train_labels, with_labels

NAMES = ("person", "dog", "car")


def text_config(open_vocab: bool = True) -> SamConfig:
    return with_labels(tiny_config(), NAMES, clip_model="clip_tiny_test", open_vocab=open_vocab)


@pytest.fixture
def clip():  # type: ignore[no-untyped-def]
    return load_clip("clip_tiny_test")


@pytest.fixture
def text_sam() -> Sam:
    torch.manual_seed(0)
    return Sam(text_config()).eval()


def _predictor(model: Sam, image: np.ndarray) -> SamPredictor:
    p = SamPredictor(model)
    p.set_image(image)
    return p


def test_config_off_by_default_keeps_sam_state_dict() -> None:
    plain = Sam(tiny_config()).state_dict()
    texty = Sam(text_config()).state_dict()
    extra = sorted(set(texty) - set(plain))
    assert set(plain) <= set(texty)
    assert extra and all(k.startswith(("prompt_encoder.text_", "class_head.")) for k in extra)
    assert "text" not in tiny_config().to_dict() and "classes" not in tiny_config().to_dict()
    assert SamConfig.from_dict(text_config().to_dict()) == text_config()


def test_config_validation() -> None:
    with pytest.raises(InputError, match="class_names must list"):
        ClassHeadConfig(class_names=())
    with pytest.raises(InputError, match="duplicates"):
        ClassHeadConfig(class_names=("a", "a"))
    with pytest.raises(InputError, match="clip_dim"):
        replace(tiny_config(), classes=ClassHeadConfig(class_names=("a",), clip_dim=64))
    with pytest.raises(InputError, match="clip_dim must be > 0"):
        TextConfig(clip_dim=0)


def test_clip_shapes_and_batching(clip) -> None:  # type: ignore[no-untyped-def]
    t = clip.encode_text(["a dog", "person", "a red car"])
    assert t.shape == (3, 64) and torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(clip.encode_text(["person"])[0], t[1], atol=1e-5)  # batching does not change rows
    img = torch.rand(3, 90, 120) * 255
    boxes = torch.tensor([[5.0, 5, 40, 60], [50, 10, 110, 80]])
    c = clip.encode_crops(img, boxes)
    assert c.shape == (2, 64)
    assert torch.allclose(clip.encode_crops(img, boxes[1:])[0], c[1], atol=1e-5)
    with pytest.raises(InputError, match="non-empty"):
        clip.encode_text([" "])


def test_prompt_encoder_text_token_shapes(text_sam: Sam, clip) -> None:  # type: ignore[no-untyped-def]
    pe = text_sam.prompt_encoder
    t = clip.encode_text(["a dog", "a cat"])
    sparse, dense = pe(None, None, None, t)
    assert sparse.shape == (2, 1, 256) and dense.shape[0] == 2
    pts = (torch.rand(2, 1, 2) * 200, torch.ones(2, 1, dtype=torch.long))
    sparse2, _ = pe(pts, None, None, t)
    assert sparse2.shape == (2, 3, 256)  # point, padding, text
    assert torch.allclose(sparse2[:, 2], sparse[:, 0])


def test_predict_text_and_points_combine(text_sam: Sam, sample_image: np.ndarray) -> None:
    p = _predictor(randomize_(text_sam, seed=1), sample_image)
    h, w = sample_image.shape[:2]
    pt = np.array([[w / 2, h / 2]])
    m_txt, s_txt, _ = p.predict(point_coords=pt, point_labels=np.array([1]), text="a dog")
    m_pt, s_pt, _ = p.predict(point_coords=pt, point_labels=np.array([1]))
    assert m_txt.shape == m_pt.shape == (3, h, w) and s_txt.shape == (3,)
    assert not np.allclose(s_txt, s_pt)  # the text token changed the decode
    every, scores, low = p.predict(text="dog")  # text alone + class head: every instance
    assert every.ndim == 3 and every.shape[1:] == (h, w) and len(every) == len(scores) == len(low)
    from segany.text.prompting import segment_every

    every, scores, low = segment_every(p, "dog", min_score=0.0)  # random weights: the default floor may keep none
    assert len(scores) > 0 and every.shape[1:] == (h, w) and len(every) == len(low)
    assert np.all(np.diff(scores) <= 1e-6)


def test_closed_vocabulary_and_bad_input(sample_image: np.ndarray) -> None:
    model = randomize_(Sam(with_labels(tiny_config(), NAMES)), seed=2).eval()  # class head, no CLIP
    p = _predictor(model, sample_image)
    masks, scores, _ = p.predict(text="The Dogs", )  # articles, case and plural are forgiven
    assert masks.shape[1:] == sample_image.shape[:2]
    from segany.text.prompting import segment_every

    masks, scores, _ = segment_every(p, "The Dogs", min_score=0.0)  # and something is found (floor 0)
    assert len(scores) > 0 and masks.shape[1:] == sample_image.shape[:2]
    with pytest.raises(PromptError, match=r"unknown label 'zebra'.*Known: person, dog, car"):
        p.predict(text="zebra")
    with pytest.raises(PromptError, match="text is empty"):
        p.predict(text="  ")
    with pytest.raises(PromptError, match=r"unknown label 'zzzz+\.\.\.': "):  # a long phrase is not echoed whole
        p.predict(text="z" * 10_000)
    from segany.text.prompting import check_text_for_model
    from segany.text.vocab import resolve_label

    # Full-width letters and a zero-width space are the same word; every entry point gets the class's own name.
    assert resolve_label("ｐｅｒｓｏｎ", NAMES) == resolve_label("do\u200bg", NAMES) - 1 == 0
    assert check_text_for_model(model, " The Dogs ") == "dog"
    for box in (np.array([5, 5, 9, 9]), np.array([300, 200, 306, 203]), np.array([0, 0, 640, 425])):
        _, scores, _ = p.predict(box=box, text="dog")  # IoU x probability: never below 0
        assert (scores >= 0).all() and (scores <= 1).all(), scores
    plain = _predictor(randomize_(Sam(tiny_config())).eval(), sample_image)
    # The fix names a model that exists and ships with segany.
    with pytest.raises(PromptError, match=r"use the label model segany_tiny_labels .*--model segany_tiny_labels"):
        plain.predict(text="a dog")
    from segany.registry import list_models

    assert "segany_tiny_labels" in list_models()


def test_label_masks_closed_and_open(text_sam: Sam, sample_image: np.ndarray) -> None:
    from segany.text.prompting import label_masks

    p = _predictor(randomize_(text_sam, seed=3), sample_image)
    masks = np.zeros((2, *sample_image.shape[:2]), dtype=bool)
    masks[0, 10:60, 20:90] = True
    masks[1, 100:200, 50:300] = True
    names, score = label_masks(p, masks)
    assert len(names) == 2 and set(names) <= set(NAMES) and score.shape == (2,)
    open_names, _ = label_masks(p, masks, labels=["zebra", "person"])  # open vocabulary through CLIP
    assert set(open_names) <= {"zebra", "person"}


def _batch(S: int = 256) -> dict:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, S, S, generator=g) * 255
    masks = torch.zeros(2, 3, S, S, dtype=torch.bool)
    masks[0, 0, 20:120, 30:150] = True
    masks[0, 1, 150:230, 10:90] = True
    masks[1, 0, 60:200, 60:200] = True
    image[masks.any(1)[:, None].expand(-1, 3, -1, -1)] *= 0.3  # objects are darker, so they can be learned
    labels = torch.tensor([[0, 1, -1], [2, -1, -1]])
    return {"image": image, "masks": masks, "labels": labels, "size_hw": [(S, S), (S, S)]}


def test_training_step_lowers_loss(clip) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    sam = Sam(text_config()).train()
    recipe = LabelRecipe(text_prob=0.7, min_text_area=100)
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch()
    losses = []
    for _step in range(6):
        gen = torch.Generator().manual_seed(1)  # same prompts each step: the loss must go down
        loss, stats = label_loss(sam, batch, recipe, gen, clip)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert {"class_ce", "clip_cos", "mask_iou"} <= set(stats)
    assert losses[-1] < losses[0]
    # every text/class parameter got a gradient at some point
    assert sam.prompt_encoder.text_proj.weight.grad is not None and sam.class_head.logits.weight.grad is not None


def test_checkpoint_round_trip_with_text_parts(tmp_path: Path, text_sam: Sam) -> None:
    randomize_(text_sam, seed=4)
    path = save_checkpoint(text_sam, tmp_path / "labels.pt")
    sd, cfg, _ = read_checkpoint(path)
    assert cfg == text_sam.cfg and cfg is not None and cfg.classes is not None
    assert cfg.classes.class_names == NAMES
    loaded = build_sam("vit_b", checkpoint=path)  # the embedded config wins over the name
    for k, v in text_sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # A SAM without the text parts refuses the file with a readable message (strict loading stays).
    from segany.checkpoints import load_weights

    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_weights(Sam(tiny_config()), path)


@pytest.mark.skipif(not (SHARED_DATA / "coco128-seg").is_dir(), reason="needs ../shared/data")
def test_train_labels_on_real_records(tmp_path: Path) -> None:
    from segany.data.formats import read_yolo_seg

    recs = read_yolo_seg(SHARED_DATA / "coco128-seg", "train2017", limit=4)
    names = sorted({n for r in recs for n in (r.class_names or [])})
    sam = Sam(with_labels(tiny_config(), names))
    cfg = LabelTrainConfig(out_dir=str(tmp_path), steps=3, batch_size=2, num_workers=0, device="cpu")
    summary = train_labels(sam, recs, cfg)
    assert summary["steps"] == 3 and np.isfinite(summary["last_loss"])
    assert (tmp_path / "log.jsonl").exists()


def test_automatic_masks_carry_labels(sample_image: np.ndarray) -> None:
    from segany.amg.generator import SamAutomaticMaskGenerator
    from segany.data.formats.sa1b import to_sa1b

    model = randomize_(Sam(with_labels(tiny_config(), NAMES)), seed=6).eval()
    gen = SamAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    anns = gen.generate(sample_image)
    assert anns, "the random model should still give some masks with no thresholds"
    assert all(a["label"] in NAMES and 0 <= a["label_score"] <= 1 for a in anns)
    sa1b = to_sa1b(anns, image_id=1, file_name="x.jpg", size_hw=sample_image.shape[:2])
    assert sa1b["annotations"][0]["label"] in NAMES
    gen.labels = ["car"]
    assert {a["label"] for a in gen.generate(sample_image)} == {"car"}


def test_one_text_score_floor_for_predict_the_api_and_the_server() -> None:
    """The server and SamPredictor.predict(text=...) kept 0.25 while `segany predict --text` used 0.1: the same
    query gave 2 masks in the app and 25 on the command line with segany_tiny_labels."""
    import inspect

    import segany.cli.predict as predict_cli
    from segany.server.model_service import ModelService
    from segany.text.prompting import segment_every
    from segany.text.vocab import TEXT_MIN_SCORE

    assert inspect.signature(segment_every).parameters["min_score"].default == TEXT_MIN_SCORE
    assert ModelService("vit_b", device="cpu").text_min_score == TEXT_MIN_SCORE
    assert predict_cli.TEXT_MIN_SCORE is TEXT_MIN_SCORE


def test_add_labels_numbers_categories_by_the_vocabulary_it_scores_against(sample_image: np.ndarray) -> None:
    # ["person", "Person", "car"] is two labels to the scorer, but the ids were counted in the list as given:
    # car became category 3 of 2. And a closed vocabulary's labels are the class's own names.
    from types import SimpleNamespace

    from segany.text.prompting import add_labels

    model = randomize_(Sam(with_labels(tiny_config(), NAMES)), seed=2).eval()
    p = _predictor(model, sample_image)
    h, w = sample_image.shape[:2]
    masks = np.zeros((4, h, w), bool)
    for i in range(4):
        masks[i, 40 * i: 40 * i + 60, 100 * i: 100 * i + 120] = True
    anns = [{"segmentation": m} for m in masks]
    generator = SimpleNamespace(predictor=p, config=SimpleNamespace(crop_n_layers=0))
    out = add_labels(generator, sample_image, anns, ["person", "Persons", "cars"])
    ids = {a["label"]: a["category_id"] for a in out}
    assert set(ids) <= {"person", "car"} and all(ids[n] == {"person": 1, "car": 2}[n] for n in ids), ids


def test_add_labels_prompts_with_the_records_boxes_in_batches(sample_image: np.ndarray,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Every record's mask was decoded to full size at once only to find its box, and every box decoded in one
    # batch (a 12 MP photo's 200 masks: 2.4 GB). Now the record's bbox gives the box, in batches, to the same
    # labels and scores as the masks' own boxes.
    from types import SimpleNamespace

    from segany.amg import SamAutomaticMaskGenerator
    from segany.text import prompting

    model = randomize_(Sam(with_labels(tiny_config(), NAMES)), seed=2).eval()
    gen = SamAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                    output_mode="coco_rle")
    recs = gen.generate(sample_image)
    assert len(recs) >= 3
    masks = np.stack([prompting._ann_mask(r["segmentation"]) for r in recs])
    want_names, want_scores = prompting.label_masks(gen.predictor, masks)
    monkeypatch.setattr(prompting, "_ann_mask", lambda seg: pytest.fail("a mask was decoded for its box"))
    monkeypatch.setattr(prompting, "LABEL_BATCH", 2)
    out = prompting.add_labels(SimpleNamespace(predictor=gen.predictor, config=gen.config), sample_image,
                               [dict(r) for r in recs])
    assert [a["label"] for a in out] == want_names
    np.testing.assert_allclose([a["label_score"] for a in out], want_scores, atol=1e-6)
