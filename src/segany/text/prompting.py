"""Text prompts and class labels at inference (issue 10), behind ``SamPredictor.predict(text=...)``.

Two ways a model can understand text, used together when both exist:

* a **text token** (``SamConfig.text``): CLIP's text embedding of the phrase is one more sparse prompt
  token, as in SAM §7.5. Alone it gives one object; with clicks or a box it says which one ("the cup").
* a **class head** (``SamConfig.classes``): a label distribution per mask, over a closed vocabulary
  (the training data's class names) and, with ``clip_dim`` > 0, open-vocabulary by cosine similarity
  with CLIP text embeddings of any label list.

``predict(text=...)`` with clicks/box rescores the candidate masks by how well they match the phrase;
with text alone and a class head it **segments every instance** of the class: a point grid is decoded,
each mask scored by ``predicted IoU × P(class)``, and overlapping masks suppressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from segany.errors import PromptError
from segany.text.vocab import (
    TEXT_MAX_INSTANCES,
    TEXT_MIN_SCORE,
    TEXT_POINTS_PER_SIDE,
    check_text,
    normalize_phrase,
    resolve_label,
)

if TYPE_CHECKING:
    from segany.modeling.sam import Sam
    from segany.predictor import SamPredictor
    from segany.text.clip import ClipEncoder

# The fix names a model that ships with segany (segany.text.label_model), so it works offline as written.
NO_TEXT_PATH = ("model has neither a text token nor a class head, so it cannot take text prompts; use the "
                "label model segany_tiny_labels (segany_tiny + a class head over the coco128-seg classes, shipped "
                "with segany): `segany predict IMAGE --model segany_tiny_labels --text person` or "
                "build_sam('segany_tiny_labels'). For free-form text beyond its class names, train a model with "
                "a CLIP text token: scripts/train_labels.py --clip clip_vit_b32")


def get_clip(predictor: SamPredictor) -> ClipEncoder:
    """The predictor's CLIP (``predictor.clip`` if set), else the one the model's text config names."""
    clip = getattr(predictor, "clip", None)
    if clip is None:
        from segany.text.clip import load_clip

        cfg = predictor.model.cfg.text
        if cfg is None:
            raise PromptError("this model has no CLIP text path; " + NO_TEXT_PATH)
        clip = load_clip(cfg.clip_model, device=predictor.device)
        predictor.clip = clip  # type: ignore[attr-defined]
    return clip


@dataclass
class Vocabulary:
    """Labels to score masks against: closed (indices into the class head) or open (CLIP text embeddings)."""

    names: list[str]
    closed_idx: list[int] | None = None
    text_emb: torch.Tensor | None = None  # (N, D)


def make_vocabulary(model: Sam, labels: list[str], clip: ClipEncoder | None = None,
                    predictor: SamPredictor | None = None) -> Vocabulary:
    """Closed when every label is a class name; otherwise open-vocabulary (needs CLIP), else an error.

    Labels that read the same (:func:`~segany.text.vocab.normalize_phrase`) are one entry, spelled as first given;
    in a closed vocabulary each is the class's own name, once ("Persons" and "people" are "person").
    """
    head = model.class_head
    labels = [check_text(t) for t in labels]
    if not labels:
        raise PromptError("the label list is empty; pass names such as person,car")
    # One entry per phrase: the same one twice ("zebra", "Zebra.") splits an open vocabulary's probability
    # between identical text embeddings, halving both. The first spelling names it.
    unique: dict[str, str] = {}
    for t in labels:
        unique.setdefault(normalize_phrase(t), t)
    labels = list(unique.values())
    if head is None:
        raise PromptError("this model has no class head, so it cannot label masks; " + NO_TEXT_PATH)
    try:
        classes = list(dict.fromkeys(resolve_label(t, head.class_names) for t in labels))
        return Vocabulary([head.class_names[i] for i in classes], closed_idx=classes)
    except PromptError:
        if head.clip_dim <= 0:
            raise
    if clip is None:
        if predictor is None:
            raise PromptError("open-vocabulary labels need a CLIP encoder (pass clip=load_clip(...))")
        clip = get_clip(predictor)
    return Vocabulary(labels, text_emb=clip.encode_text(labels).to(model.device))


def label_probs(model: Sam, tokens: torch.Tensor, vocab: Vocabulary | None = None) -> torch.Tensor:
    """(..., C) mask tokens → (..., N) label probabilities; N = all classes when ``vocab`` is None.

    The head's background class takes the rest of the mass, so a mask of nothing known scores low on all.
    """
    head = model.class_head
    if head is None:
        raise PromptError("this model has no class head; " + NO_TEXT_PATH)
    logits, emb = head(tokens)
    probs = logits.float().softmax(-1)
    if vocab is None:
        return probs[..., :-1]
    if vocab.closed_idx is not None:
        return probs[..., vocab.closed_idx]
    assert emb is not None and vocab.text_emb is not None
    fg = 1.0 - probs[..., -1:]
    return fg * head.open_vocab_logits(emb, vocab.text_emb).float().softmax(-1)


def decode(model: Sam, features: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None,
           boxes: torch.Tensor | None, mask_input: torch.Tensor | None, text_emb: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts → all 4 low-res mask logits (B, 4, h, w), IoU predictions (B, 4) and mask tokens (B, 4, C)."""
    pe = model.prompt_encoder
    sparse, dense = pe(points, boxes, mask_input, text_emb)
    low, iou, tokens = model.mask_decoder.predict_masks(features, pe.get_dense_pe(), sparse, dense,
                                                        return_tokens=True)
    return low, iou, tokens


def _phrase_vocab(model: Sam, text: str, predictor: SamPredictor) -> tuple[Vocabulary, int] | None:
    """Vocabulary to score one phrase against, and the phrase's index in it (None without a class head).

    Open vocabulary scores the phrase against the model's own class names too, so a 'dog' mask is not
    called 'cat' just because 'cat' was the only option.
    """
    head = model.class_head
    if head is None:
        return None
    try:
        return Vocabulary([text], closed_idx=[resolve_label(text, head.class_names)]), 0
    except PromptError:
        if _closed_vocabulary(model):
            raise
    names = [n for n in head.class_names if normalize_phrase(n) != normalize_phrase(text)] + [text]
    return make_vocabulary(model, names, predictor=predictor), len(names) - 1


def check_text_for_model(model: Sam, text: object) -> str:
    """The phrase, normalised checks done, or the error a prompt with it would raise: before any image work.

    A model without a text path, or a closed vocabulary that lacks the phrase, fails here, so the CLI can
    say so before embedding the image (seconds on a CPU) instead of after.
    """
    text = check_text(text)
    if model.cfg.text is None and model.class_head is None:
        raise PromptError("text prompts: this " + NO_TEXT_PATH)
    if model.class_head is not None and _closed_vocabulary(model):
        # Unknown names fail listing the known ones; known ones come back as the class's own name, so
        # "Persons" is labelled "person" by every entry point (predict, auto, the server).
        return model.class_head.class_names[resolve_label(text, model.class_head.class_names)]
    return text


def _closed_vocabulary(model: Sam) -> bool:
    """A class head that can only name its own classes: phrases beyond them need its CLIP projection
    and the model's CLIP text path together."""
    head = model.class_head
    return head is not None and (head.clip_dim <= 0 or model.cfg.text is None)


@torch.no_grad()
def predict_text(predictor: SamPredictor, text: str, coords: torch.Tensor | None, labels: torch.Tensor | None,
                 box: torch.Tensor | None, mask_input: torch.Tensor | None, multimask_output: bool,
                 return_logits: bool, **every: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The numpy result of ``predict`` for a text prompt; prompts already in the model frame, batch 1."""
    model = predictor.model
    text = check_text_for_model(model, text)
    if coords is None and box is None and mask_input is None and model.class_head is not None:
        return segment_every(predictor, text, return_logits=return_logits, **every)
    text_emb = get_clip(predictor).encode_text([text]) if model.cfg.text is not None else None
    points = (coords, labels) if coords is not None and labels is not None else None
    assert predictor.features is not None and predictor.input_size and predictor.original_size
    low, iou, tokens = decode(model, predictor.features, points, box, mask_input, text_emb)
    sel = slice(1, None) if multimask_output else slice(0, 1)
    low, iou, tokens = low[:, sel], iou[:, sel], tokens[:, sel]
    pv = _phrase_vocab(model, text, predictor)
    if pv is not None:  # how much each candidate is the named thing decides among the ambiguity masks
        vocab, idx = pv
        iou = iou.float().clamp(0, 1) * label_probs(model, tokens, vocab)[..., idx]  # a raw IoU can be < 0
    # Best first, as text alone returns its instances: masks[0] is the named thing (np.argmax still finds it).
    order = torch.argsort(iou.float(), dim=1, descending=True, stable=True)
    iou = torch.gather(iou, 1, order)
    low = torch.gather(low, 1, order[:, :, None, None].expand_as(low))  # each prompt row by its own order
    masks = model.postprocess_masks(low, predictor.input_size, predictor.original_size)
    if not return_logits:
        masks = masks > model.mask_threshold
    return masks[0].cpu().numpy(), iou[0].float().cpu().numpy(), low[0].float().cpu().numpy()


def grid_points(size_hw: tuple[int, int], per_side: int) -> np.ndarray:
    """(per_side², 2) XY cell centres of an even grid over an image of ``size_hw``."""
    h, w = size_hw
    off = 0.5 / per_side
    side = np.linspace(off, 1 - off, per_side)
    xs, ys = np.meshgrid(side * w, side * h)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


@torch.no_grad()
def propose(predictor: SamPredictor, *, text: str | None = None, points_per_side: int = TEXT_POINTS_PER_SIDE,
            batch: int = 64) -> dict[str, torch.Tensor]:
    """Decode a point grid (each point with the phrase's text token when the model has one).

    Returns all candidates, 3 per point: ``low_res`` (P, h, w) logits, ``iou`` (P,) and ``tokens`` (P, C).
    """
    model = predictor.model
    assert predictor.features is not None and predictor.original_size is not None
    pts = predictor.transform.apply_coords(grid_points(predictor.original_size, points_per_side),
                                           predictor.original_size)
    pts_t = torch.as_tensor(pts, dtype=torch.float32, device=predictor.device)
    text_emb = None
    if text is not None and model.cfg.text is not None:
        text_emb = get_clip(predictor).encode_text([text])
    lows, ious, toks = [], [], []
    for i in range(0, len(pts_t), batch):
        p = pts_t[i:i + batch, None]
        lab = torch.ones(p.shape[:2], dtype=torch.long, device=p.device)
        te = text_emb.expand(len(p), -1) if text_emb is not None else None
        low, iou, tok = decode(model, predictor.features, (p, lab), None, None, te)
        lows.append(low[:, 1:].flatten(0, 1))
        ious.append(iou[:, 1:].flatten())
        toks.append(tok[:, 1:].flatten(0, 1))
    return {"low_res": torch.cat(lows), "iou": torch.cat(ious), "tokens": torch.cat(toks)}


def select(low_res: torch.Tensor, scores: torch.Tensor, *, min_score: float, nms_iou: float, max_instances: int,
           threshold: float = 0.0) -> torch.Tensor:
    """Indices of candidates above ``min_score`` surviving box NMS, best first."""
    from torchvision.ops import masks_to_boxes, nms

    keep = torch.nonzero(scores >= min_score).flatten()
    binary = low_res[keep] > threshold
    nonempty = binary.flatten(1).any(1)
    keep, binary = keep[nonempty], binary[nonempty]
    if len(keep) == 0:
        return keep
    boxes = masks_to_boxes(binary).float()
    kept = nms(boxes, scores[keep].float(), nms_iou)
    return keep[kept][:max_instances]


@torch.no_grad()
def segment_every(predictor: SamPredictor, text: str, *, points_per_side: int = TEXT_POINTS_PER_SIDE,
                  min_score: float = TEXT_MIN_SCORE,
                  nms_iou: float = 0.7, max_instances: int = TEXT_MAX_INSTANCES, return_logits: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every instance of ``text``: masks (N, H, W), scores (N,), low-res logits (N, h, w), best first."""
    model = predictor.model
    pv = _phrase_vocab(model, check_text(text), predictor)
    if pv is None:
        raise PromptError("'segment every <class>' needs a class head; " + NO_TEXT_PATH)
    vocab, idx = pv
    cand = propose(predictor, text=text, points_per_side=points_per_side)
    scores = cand["iou"].float().clamp(0, 1) * label_probs(model, cand["tokens"], vocab)[:, idx]
    keep = select(cand["low_res"], scores, min_score=min_score, nms_iou=nms_iou, max_instances=max_instances,
                  threshold=model.mask_threshold)
    low = cand["low_res"][keep][:, None]
    assert predictor.input_size is not None and predictor.original_size is not None
    h, w = predictor.original_size
    if len(keep) == 0:
        side = low.shape[-1]
        empty = np.zeros((0, h, w), dtype=np.float32 if return_logits else bool)
        return empty, np.zeros(0, dtype=np.float32), np.zeros((0, side, side), dtype=np.float32)
    masks = model.postprocess_masks(low, predictor.input_size, predictor.original_size)[:, 0]
    if not return_logits:
        masks = masks > model.mask_threshold
    return masks.cpu().numpy(), scores[keep].float().cpu().numpy(), low[:, 0].float().cpu().numpy()


@torch.no_grad()
def label_masks(predictor: SamPredictor, masks: np.ndarray | torch.Tensor, labels: list[str] | None = None, *,
                vocab: Vocabulary | None = None) -> tuple[list[str], np.ndarray]:
    """Label masks from any source (e.g. the automatic generator): each is re-prompted by its box, and the
    class head reads the resulting mask token.

    Args:
        masks: (N, H, W) bool in original-image pixels.
        labels: optional label list (closed or, with CLIP, open); default the model's class names. A label
            given twice counts once.
        vocab: the labels' :func:`make_vocabulary`, when the caller built it (instead of ``labels``).

    Returns:
        (label per mask, its probability (N,)). With ``labels`` given, each mask gets the best of them.
    """
    m = torch.as_tensor(np.asarray(masks), device=predictor.device).bool()
    if m.ndim != 3:
        raise PromptError(f"masks must be (N, H, W) bool, got shape {tuple(m.shape)}")
    from torchvision.ops import masks_to_boxes

    nonempty = m.flatten(1).any(1)
    boxes = torch.zeros(len(m), 4, device=m.device)
    if nonempty.any():
        boxes[nonempty] = masks_to_boxes(m[nonempty]).float()
    boxes[:, 2:] += 1  # end exclusive (an empty mask prompts with the 1-pixel box at the origin)
    return label_boxes(predictor, boxes.cpu().numpy(), labels, vocab=vocab)


# Boxes decoded at once by label_boxes: 200 masks of a photo decoded in one batch held 200 x 4 x 256 x 256
# float32 logits (200 MB) at once for nothing.
LABEL_BATCH = 64


def label_boxes(predictor: SamPredictor, boxes_xyxy: np.ndarray, labels: list[str] | None = None, *,
                vocab: Vocabulary | None = None) -> tuple[list[str], np.ndarray]:
    """:func:`label_masks` from the masks' boxes (N, 4) XYXY in original-image pixels, end exclusive (a COCO
    bbox's x + w): what it prompts with. Callers that hold the boxes (annotations carry ``bbox``) skip decoding
    every mask to full size."""
    model = predictor.model
    if vocab is None and labels:
        vocab = make_vocabulary(model, labels, predictor=predictor)
    names = vocab.names if vocab else list(model.class_head.class_names if model.class_head else [])
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return [], np.zeros(0, dtype=np.float32)
    assert predictor.features is not None and predictor.original_size is not None
    t = predictor.transform
    scores, picks = [], []
    for i in range(0, len(boxes), LABEL_BATCH):
        boxes_t = torch.as_tensor(t.apply_boxes(boxes[i: i + LABEL_BATCH], predictor.original_size),
                                  dtype=torch.float32, device=predictor.device)
        with torch.no_grad():
            _, _, tokens = decode(model, predictor.features, None, boxes_t, None, None)
            score, idx = label_probs(model, tokens[:, 0], vocab).max(-1)
        scores.append(score.float().cpu().numpy())
        picks += idx.tolist()
    return [names[i] for i in picks], np.concatenate(scores)


def _ann_box(ann: dict[str, Any]) -> list[float]:
    """A generator record's box as :func:`label_masks` prompts with it (XYXY, end exclusive): from its ``bbox``,
    whose width is SAM's (last column minus first, so x + w is the last column), else from its mask."""
    box = ann.get("bbox")
    if isinstance(box, (list, tuple)) and len(box) == 4:
        x, y, w, h = (float(v) for v in box)
        return [x, y, x + w + 1, y + h + 1]
    ys, xs = np.nonzero(_ann_mask(ann["segmentation"]))
    if len(xs) == 0:
        return [0.0, 0.0, 1.0, 1.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _ann_mask(seg: Any) -> np.ndarray:
    if isinstance(seg, np.ndarray):
        return seg.astype(bool)
    from pycocotools import mask as mask_utils

    if isinstance(seg.get("counts"), list):
        seg = mask_utils.frPyObjects(seg, *seg["size"])
    counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
    return mask_utils.decode({"size": seg["size"], "counts": counts}).astype(bool)


def add_labels(generator: Any, image: np.ndarray, anns: list[dict[str, Any]], labels: list[str] | None = None
               ) -> list[dict[str, Any]]:
    """Give the automatic generator's annotations ``label``, ``label_score`` and ``category_id``.

    ``category_id`` is 1-based in ``labels`` (or the model's class names). Reuses the generator's image
    embedding when it ran on the whole image (no crop layers); otherwise embeds the image once more.
    """
    if not anns:
        return anns
    predictor = generator.predictor
    if predictor.original_size != tuple(image.shape[:2]) or getattr(generator.config, "crop_n_layers", 0) > 0:
        predictor.set_image(image)
    # Boxes, not full-size masks (a 12 MP photo's 200 masks decoded at once were 2.4 GB): each from its bbox,
    # else from its mask.
    boxes = np.array([_ann_box(a) for a in anns], dtype=np.float32)
    # The ids come from the vocabulary the masks are scored against: a label given twice ("person", "Person")
    # is one entry there, so the labels as given numbered the next class 3 of 2.
    vocab = make_vocabulary(predictor.model, labels, predictor=predictor) if labels else None
    names, scores = label_boxes(predictor, boxes, vocab=vocab)
    ordered = vocab.names if vocab else list(predictor.model.class_head.class_names)
    for a, n, s in zip(anns, names, scores.tolist(), strict=True):
        a["label"], a["label_score"], a["category_id"] = n, float(s), ordered.index(n) + 1
    return anns
