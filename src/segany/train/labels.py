"""Training with class labels and CLIP prompts (issue 10): SAM's recipe plus a class head and a text token.

Per image, up to K instance masks with class names (COCO128-seg's ``data.yaml``; PennFudan is all
"person"). Each mask is prompted once, by one of:

* a foreground point (the 3 ambiguity masks are scored, the best takes the loss) or a jittered box;
* with a text token (``SamConfig.text``) and a mask at least ``min_text_area`` px: the **CLIP image
  embedding of a crop around the mask** (SAM §7.5), alone or with a point. At inference the CLIP *text*
  embedding of a phrase takes its place, which CLIP aligns with image embeddings.

Losses: 20·focal + dice on masks, MSE on the IoU head (SAM §3), cross-entropy of the class head on every
mask token, and for open-vocabulary heads 1 − cos between each mask's CLIP-space embedding and its
crop's CLIP embedding. Background points (pixels of no labelled object) teach the head's background
class, so "segment every <class>" can drop masks of sky, road and the like.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segany.atomic import append_whole
from segany.data.formats.common import InstanceRecord, decode_rle
from segany.errors import InputError
from segany.modeling.config import ClassHeadConfig, SamConfig, TextConfig
from segany.modeling.sam import Sam
from segany.train.losses import mask_iou, mask_losses
from segany.train.prompts import jitter_boxes, mask_boxes_xyxy, sample_points
from segany.train.trainer import _atomic_torch_save, resolve_device

log = logging.getLogger(__name__)

# coco128 ships no validation split, so label training holds some of its images out. The split is frozen: the
# shipped label head (segany_tiny_labels, docs/benchmarks.md) was trained on the 112 images of COCO128_LABEL_TRAIN
# and evaluated on the 16 of COCO128_LABEL_VAL, the first 16 of the 128 sorted ids shuffled with the seed
# "labels-10" (how the split was made until that shuffle was found to move images across it whenever the folder
# gained or lost one). Any other coco128 id goes by its own seeded hash (_held_out_by_hash), so one image's side
# never depends on the others. COCO ids as numbers; image ids are them zero-padded to 12 digits.
COCO128_LABEL_VAL = (30, 36, 42, 71, 94, 241, 250, 260, 308, 332, 338, 359, 428, 472, 590, 612)
COCO128_LABEL_TRAIN = (
    9, 25, 34, 49, 61, 64, 72, 73, 74, 77, 78, 81, 86, 89, 92, 109, 110, 113, 127, 133, 136, 138, 142, 143, 144, 149,
    151, 154, 164, 165, 192, 194, 196, 201, 208, 247, 257, 263, 283, 294, 307, 309, 312, 315, 321, 322, 326, 328, 349,
    357, 360, 368, 370, 382, 384, 387, 389, 394, 395, 397, 400, 404, 415, 419, 431, 436, 438, 443, 446, 450, 459, 471,
    474, 486, 488, 490, 491, 502, 508, 510, 514, 520, 529, 531, 532, 536, 540, 542, 544, 560, 562, 564, 569, 572, 575,
    581, 584, 589, 595, 597, 599, 605, 620, 623, 625, 626, 629, 634, 636, 641, 643, 650,
)
_COCO128_VAL_IDS = frozenset(f"{i:012d}" for i in COCO128_LABEL_VAL)
_COCO128_TRAIN_IDS = frozenset(f"{i:012d}" for i in COCO128_LABEL_TRAIN)
COCO128_HELD_OUT_FRACTION = 16 / 128  # of coco128 ids outside the frozen lists, about this share is held out
LABEL_SPLIT_SEED = 10


def background_points(gt: torch.Tensor, img_idx: torch.Tensor, size_hw: Sequence[tuple[int, int]], num_images: int,
                      per_image: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``per_image`` points per image on no labelled mask and inside the image (not its padding).

    Returns the points (N, 2) as x, y and the image index of each; images with no free pixel give none.
    """
    S = gt.shape[-1]
    covered = torch.zeros(num_images, S, S, dtype=torch.bool, device=gt.device)
    covered.index_put_((img_idx,), gt, accumulate=True)
    region = ~covered
    for i, (h, w) in enumerate(size_hw):
        region[i, h:], region[i, :, w:] = False, False
    xy, found = sample_points(region.repeat_interleave(per_image, 0), gen)
    b_img = torch.arange(num_images, device=gt.device).repeat_interleave(per_image)[found]
    return xy[found], b_img


def with_labels(cfg: SamConfig, class_names: Sequence[str], clip_model: str | None = None,
                clip_dim: int | None = None, open_vocab: bool = True) -> SamConfig:
    """``cfg`` plus a class head over ``class_names`` and, with ``clip_model``, a CLIP text token."""
    from dataclasses import replace

    text = None
    if clip_model is not None:
        from segany.text.clip import get_clip_spec

        text = TextConfig(clip_model=clip_model, clip_dim=clip_dim or get_clip_spec(clip_model).embed_dim)
    classes = ClassHeadConfig(class_names=tuple(class_names),
                              clip_dim=text.clip_dim if (text is not None and open_vocab) else 0)
    return replace(cfg, text=text, classes=classes)


# ------------------------------------------------------------------------------------------- data
def _held_out_by_hash(dataset: str, image_id: str) -> bool:
    """Whether an image outside the frozen lists is held out: fixed by (dataset, seed, id) alone."""
    digest = hashlib.blake2b(f"labels-{LABEL_SPLIT_SEED}\0{dataset}\0{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < COCO128_HELD_OUT_FRACTION


def coco128_held_out(image_id: str) -> bool:
    """Whether the coco128 image ``image_id`` is held out from label training (the frozen split, else its hash)."""
    if image_id in _COCO128_VAL_IDS:
        return True
    if image_id in _COCO128_TRAIN_IDS:
        return False
    return _held_out_by_hash("coco128", image_id)


def label_split(records: list[InstanceRecord]) -> dict[str, list[InstanceRecord]]:
    """Train/held-out split for label training: PennFudan's held-out images (the project's split) stay
    held out; coco128's are the frozen ``COCO128_LABEL_VAL`` (and about 1 in 8 of any image added since, by
    :func:`coco128_held_out`). PennFudan masks are 'person'."""
    from segany.data.formats import held_out_ids

    out: dict[str, list[InstanceRecord]] = {"train": [], "val": []}
    by_ds: dict[str, list[InstanceRecord]] = {}
    for r in records:
        if r.class_names is None and r.dataset == "pennfudan":
            r.class_names = ["person"] * len(r.masks)
        if r.class_names is None:
            continue  # no labels: nothing to teach the class head
        by_ds.setdefault(r.dataset, []).append(r)
    for ds, recs in by_ds.items():
        if ds == "coco128":
            held = {r.image_id for r in recs if coco128_held_out(r.image_id)}
        else:
            held = set(held_out_ids(ds, sorted(r.image_id for r in recs)))
        for r in recs:
            out["val" if r.image_id in held else "train"].append(r)
    return out


def read_labeled(*, pack: str | None = None, data_root: str | None = None, limit: int | None = None
                 ) -> dict[str, list[InstanceRecord]]:
    """coco128-seg + PennFudan with class names, from a pack (``scripts/pack_data.py``) or the raw data."""
    if pack is not None:
        from segany.data.pack import load_pack

        recs = load_pack(pack, datasets=["coco128", "pennfudan"])
    elif data_root is not None:
        from segany.data.formats import read_shared

        recs = []
        for name in ("coco128", "pennfudan"):
            for split in read_shared(name, data_root, limit=limit).values():
                recs.extend(split)
    else:
        raise InputError("read_labeled needs pack= (a packed dataset folder) or data_root= (../shared/data)")
    return label_split(recs)


class LabeledDataset(torch.utils.data.Dataset):
    """(image, masks, class ids) at model resolution: long side → ``img_size``, zero-padded, optional flip.

    Items: ``image`` (3, S, S) float 0–255 RGB (normalized in the step, CLIP crops need raw pixels),
    ``masks`` (K, S, S) bool, ``labels`` (K,) long (-1 = padding), ``size_hw`` of the valid region.
    """

    def __init__(self, records: Sequence[InstanceRecord], class_names: Sequence[str], *, img_size: int,
                 max_masks: int = 8, hflip: float = 0.5, seed: int = 0, min_area: int = 16) -> None:
        index = {n: i for i, n in enumerate(class_names)}
        self.records = [r for r in records if r.masks and r.class_names]
        if not self.records:
            raise InputError("no labelled images to train on; check the pack/data path")
        self.index, self.S, self.K, self.hflip, self.seed = index, img_size, max_masks, hflip, seed
        self.min_area = min_area

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        import cv2

        from segany.data.images import load_image
        from segany.transforms import preprocess_shape

        i, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        rng = np.random.default_rng([self.seed, epoch, int(i)])
        rec = self.records[int(i)]
        image = load_image(rec.image_path)
        h, w = preprocess_shape(*image.shape[:2], self.S)
        flip = rng.random() < self.hflip
        img = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        order = rng.permutation(len(rec.masks))
        masks, labels = [], []
        for j in order:
            name = rec.class_names[j] if rec.class_names else None
            if name not in self.index:
                continue
            m = cv2.resize(decode_rle(rec.masks[j]).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
            if m.sum() < self.min_area:
                continue
            masks.append(m[:, ::-1] if flip else m)
            labels.append(self.index[name])
            if len(masks) == self.K:
                break
        if flip:
            img = img[:, ::-1]
        out_img = torch.zeros(3, self.S, self.S)
        out_img[:, :h, :w] = torch.from_numpy(np.ascontiguousarray(img).transpose(2, 0, 1).astype(np.float32))
        out_m = torch.zeros(self.K, self.S, self.S, dtype=torch.bool)
        out_l = torch.full((self.K,), -1, dtype=torch.long)
        for k, (m, lab) in enumerate(zip(masks, labels, strict=True)):
            out_m[k, :h, :w] = torch.from_numpy(np.ascontiguousarray(m) > 0)
            out_l[k] = lab
        # key: what the image tensor depends on, so a frozen encoder's features can be cached per key.
        return {"image": out_img, "masks": out_m, "labels": out_l, "size_hw": (h, w), "key": (int(i), bool(flip))}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([it["image"] for it in items]), "masks": torch.stack([it["masks"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items]), "size_hw": [it["size_hw"] for it in items],
            "keys": [it.get("key") for it in items]}


# ------------------------------------------------------------------------------------------- step
@dataclass(frozen=True)
class LabelRecipe:
    box_prob: float = 0.4
    text_prob: float = 0.5  # of masks big enough, the share prompted by their crop's CLIP embedding ...
    text_with_point: float = 0.5  # ... and of those, the share that also get a point
    min_text_area: int = 1024  # px at model resolution (32×32 at 1024 px; SAM §7.5 used 100² at 1024)
    bg_points: int = 4  # background points per image (class-head negatives)
    class_weight: float = 1.0
    clip_weight: float = 1.0
    iou_weight: float = 1.0


def label_loss(sam: Sam, batch: dict[str, Any], recipe: LabelRecipe, gen: torch.Generator,
               clip: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch (see the module docstring). ``clip`` is a :class:`~segany.text.clip.ClipEncoder`."""
    dev = sam.device
    images = batch["image"].to(dev)
    masks, labels = batch["masks"].to(dev), batch["labels"].to(dev)
    valid = labels >= 0
    img_idx, gt, cls = valid.nonzero()[:, 0], masks[valid], labels[valid]
    M, S = gt.shape[0], images.shape[-1]
    pe = sam.prompt_encoder
    feats = sam.image_encoder(sam.preprocess(images))
    head = sam.class_head
    has_text = sam.cfg.text is not None and clip is not None
    stats: dict[str, float] = {"masks": float(M)}
    total = feats.new_zeros(())

    # CLIP embeddings of crops around each mask (the training stand-in for a phrase's text embedding).
    crop_emb = None
    boxes = mask_boxes_xyxy(gt)
    if has_text or (head is not None and head.clip_dim > 0 and clip is not None):
        crop_emb = torch.cat([clip.encode_crops(images[i], boxes[img_idx == i] + torch.tensor([0, 0, 1, 1.], device=dev))
                              for i in range(images.shape[0])]).to(dev) if M else None
    area = gt.flatten(1).sum(1)
    u = torch.rand(M, 3, generator=gen, device=dev)
    use_text = (area >= recipe.min_text_area) & (u[:, 0] < recipe.text_prob) if has_text else torch.zeros(
        M, dtype=torch.bool, device=dev)
    use_box = ~use_text & (u[:, 1] < recipe.box_prob)
    text_point = use_text & (u[:, 2] < recipe.text_with_point)
    use_point = ~use_box & ~use_text
    pts, _ = sample_points(gt, gen)
    jit = jitter_boxes(boxes, S, gen)
    if M:
        # One decoder call per prompt kind, each with exactly the token layout inference uses
        # ([point, pad], [corner, corner], [text], [point, pad, text]): SAM's decoder attends to padding
        # tokens too, so training on another layout would shift what it sees at inference.
        text_tok = pe.embed_text(crop_emb) if has_text and crop_emb is not None else None
        dense_pe = pe.get_dense_pe()
        low = feats.new_zeros(M, 4, 4 * pe.image_embedding_size[0], 4 * pe.image_embedding_size[1])
        iou_pred = feats.new_zeros(M, 4)
        tokens = feats.new_zeros(M, 4, feats.shape[1])
        ones = torch.ones(M, 1, dtype=torch.long, device=dev)
        for kind in ("point", "box", "text", "text_point"):
            rows = {"point": use_point & ~use_text, "box": use_box, "text": use_text & ~text_point,
                    "text_point": text_point}[kind].nonzero().flatten()
            if len(rows) == 0:
                continue
            pts_k = (pts[rows, None], ones[rows]) if kind in ("point", "text_point") else None
            box_k = jit[rows] if kind == "box" else None
            txt_k = text_tok[rows, 0] if kind.startswith("text") and text_tok is not None else None
            parts = [] if pts_k is None else [pe._embed_points(pts_k[0], pts_k[1], pad=box_k is None)]
            if box_k is not None:
                parts.append(pe._embed_boxes(box_k))
            if txt_k is not None:
                parts.append(txt_k[:, None])
            sparse = torch.cat(parts, 1)
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(rows), -1, *pe.image_embedding_size)
            lo, io, tk = sam.mask_decoder.predict_masks(feats[img_idx[rows]], dense_pe, sparse, dense,
                                                        return_tokens=True)
            low = low.index_copy(0, rows, lo.to(low.dtype))
            iou_pred = iou_pred.index_copy(0, rows, io.to(iou_pred.dtype))
            tokens = tokens.index_copy(0, rows, tk.to(tokens.dtype))
        # Ambiguous prompts (a point alone) train the best of the 3 multimask outputs; the rest output 0.
        ambiguous = use_point
        cand = torch.where(ambiguous[:, None, None, None], low[:, 1:], low[:, :1].expand(-1, 3, -1, -1))
        cand_iou = torch.where(ambiguous[:, None], iou_pred[:, 1:], iou_pred[:, :1].expand(-1, 3))
        # Losses on the decoder's low-res grid (S/4 for SAM): 16× cheaper than at full size, and the
        # class head, not mask detail, is what this recipe adds.
        up = cand.float()
        small = F.adaptive_avg_pool2d(gt[:, None].float(), up.shape[-2:]) > 0.5
        tgt = small.float().expand(-1, 3, -1, -1)
        per = mask_losses(up.flatten(0, 1), tgt.flatten(0, 1)).view(M, 3)  # (M, 3)
        true_iou = mask_iou(up.detach().flatten(0, 1), tgt.flatten(0, 1)).view(M, 3)
        best = per.detach().argmin(1)
        rows = torch.arange(M, device=dev)
        total = total + per[rows, best].mean() + recipe.iou_weight * F.mse_loss(cand_iou, true_iou)
        stats["mask_iou"] = float(true_iou[rows, best].mean())
        if head is not None:
            logits, emb = head(tokens)  # (M, 4, K+1), (M, 4, D)
            ce = F.cross_entropy(logits.flatten(0, 1), cls.repeat_interleave(4))
            total = total + recipe.class_weight * ce
            stats["class_ce"] = float(ce.detach())
            stats["class_acc"] = float((logits[rows, 0].argmax(-1) == cls).float().mean())
            if emb is not None and crop_emb is not None:
                cos = (emb * crop_emb[:, None]).sum(-1)
                total = total + recipe.clip_weight * (1 - cos).mean()
                stats["clip_cos"] = float(cos.detach().mean())
    if head is not None and recipe.bg_points > 0:
        # Background: points on no labelled object. Labels are incomplete (coco128 misses some objects),
        # so this teaches "stuff" more than "unlabelled thing"; it is weighted like one more mask.
        bxy, b_img = background_points(gt, img_idx, batch["size_hw"], images.shape[0], recipe.bg_points, gen)
        if len(bxy):
            lab = torch.ones(len(bxy), 1, dtype=torch.long, device=dev)
            sp = pe._embed_points(bxy[:, None], lab, pad=True)
            dn = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(bxy), -1, *pe.image_embedding_size)
            _, _, btok = sam.mask_decoder.predict_masks(feats[b_img], pe.get_dense_pe(), sp, dn, return_tokens=True)
            blog, _ = head(btok)
            bg = torch.full((len(bxy) * 4,), head.num_classes, dtype=torch.long, device=dev)
            total = total + recipe.class_weight * F.cross_entropy(blog.flatten(0, 1), bg) * 0.5
    stats["loss"] = float(total.detach())
    return total, stats


# ------------------------------------------------------------------------------------------- loop
@dataclass(frozen=True)
class LabelTrainConfig:
    out_dir: str = "runs/labels"
    steps: int = 200
    max_minutes: float | None = None
    batch_size: int = 4
    max_masks: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    freeze_image_encoder: bool = False
    # Train the class head alone (see train_head_only): every SAM parameter frozen, so the head fits the
    # base weights exactly and can ship as a small file over them. ``steps`` then counts head updates of
    # ``pool_batch`` prompts over a pool collected in ``pool_rounds`` passes over the images
    # (``max_minutes`` caps the collection).
    head_only: bool = False
    pool_rounds: int = 4
    pool_batch: int = 256
    head_val_fraction: float = 0.0
    log_every: int = 10
    recipe: LabelRecipe = field(default_factory=LabelRecipe)


def train_labels(sam: Sam, train: list[InstanceRecord], cfg: LabelTrainConfig, *, clip: Any = None,
                 on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``sam`` (with a class head and optionally a text token) in place; returns a summary."""
    from segany.data.datasets import StepBatchSampler

    if sam.class_head is None:
        raise InputError("train_labels needs a model with a class head: build it from with_labels(config, names)")
    if cfg.head_only:
        if clip is not None or sam.cfg.text is not None:
            raise InputError("head-only training covers a closed-vocabulary class head; drop the CLIP text token")
        return train_head_only(sam, train, cfg, on_log=on_log)
    dev = resolve_device(cfg.device)
    sam.to(dev).train()
    if clip is not None:
        clip.to(dev)
    torch.manual_seed(cfg.seed)
    if cfg.freeze_image_encoder:
        # eval(): frozen also means BatchNorm running statistics (TinyViT) are not updated by the batches.
        sam.image_encoder.requires_grad_(False).eval()
    params = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ds = LabeledDataset(train, sam.class_head.class_names, img_size=sam.img_size, max_masks=cfg.max_masks,
                        seed=cfg.seed)
    sampler = StepBatchSampler(len(ds), cfg.batch_size, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    history: list[dict[str, Any]] = []
    budget = 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    amp = dev.type == "cuda"
    step = 0
    for step, batch in enumerate(loader, start=1):
        frac = min(1.0, (step / cfg.steps) if not cfg.max_minutes else max(step / cfg.steps,
                                                                          (time.time() - t0) / budget))
        lr = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + step)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss, stats = label_loss(sam, batch, cfg.recipe, gen, clip)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stats.update(step=step, lr=lr, time_s=round(time.time() - t0, 1))
        history.append(stats)
        if step % cfg.log_every == 0 or step == 1:
            append_whole(out / "log.jsonl", (json.dumps(stats) + "\n").encode())
            log.info("step %d loss %.4f", step, stats["loss"])
            if on_log:
                on_log(stats)
        if step >= cfg.steps or time.time() - t0 > budget:
            break
    sam.eval()
    first = float(np.mean([h["loss"] for h in history[:5]]))
    last = float(np.mean([h["loss"] for h in history[-5:]]))
    return {"steps": step, "train_seconds": round(time.time() - t0, 1), "first_loss": first, "last_loss": last,
            "train_images": len(ds), "device": str(dev), "config": asdict(cfg)}


# ------------------------------------------------------------------------------ head only
@torch.no_grad()
def head_tokens(sam: Sam, batch: dict[str, Any], features: torch.Tensor, recipe: LabelRecipe,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask tokens of one batch's prompts and their targets, decoded exactly as at inference.

    Each mask gets one prompt, a foreground point (``[point, pad]``, as "segment every <class>" decodes its
    grid) or with ``recipe.box_prob`` a jittered box (``[corner, corner]``, as ``label_masks`` re-prompts
    automatic masks); each image ``recipe.bg_points`` points on no labelled object, target background.

    Returns:
        tokens (P, 4, C) float32 (all 4 mask tokens of each prompt), targets (P,) long (the class index, or
        ``num_classes`` for background) and the batch index of each prompt's image (P,) long.
    """
    dev = features.device
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    masks, labels = batch["masks"].to(dev), batch["labels"].to(dev)
    valid = labels >= 0
    img_idx, gt, cls = valid.nonzero()[:, 0], masks[valid], labels[valid]
    B, S = masks.shape[0], masks.shape[-1]

    def decode(idx: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(idx), -1, *pe.image_embedding_size)
        _, _, tokens = dec.predict_masks(features[idx], pe.get_dense_pe(), sparse, dense, return_tokens=True)
        return tokens.float()

    toks, tgts, imgs = [], [], []
    M = gt.shape[0]
    if M:
        use_box = torch.rand(M, generator=gen, device=dev) < recipe.box_prob
        pts, _ = sample_points(gt, gen)
        boxes = jitter_boxes(mask_boxes_xyxy(gt), S, gen)
        ones = torch.ones(M, 1, dtype=torch.long, device=dev)
        tokens = features.new_zeros(M, 4, features.shape[1])
        rows = (~use_box).nonzero().flatten()
        if len(rows):
            tokens[rows] = decode(img_idx[rows], pe._embed_points(pts[rows, None], ones[rows], pad=True))
        rows = use_box.nonzero().flatten()
        if len(rows):
            tokens[rows] = decode(img_idx[rows], pe._embed_boxes(boxes[rows]))
        toks.append(tokens)
        tgts.append(cls)
        imgs.append(img_idx)
    head = sam.class_head
    assert head is not None
    if recipe.bg_points > 0:
        bxy, b_img = background_points(gt, img_idx, batch["size_hw"], B, recipe.bg_points, gen)
        if len(bxy):
            lab = torch.ones(len(bxy), 1, dtype=torch.long, device=dev)
            toks.append(decode(b_img, pe._embed_points(bxy[:, None], lab, pad=True)))
            tgts.append(torch.full((len(bxy),), head.num_classes, dtype=torch.long, device=dev))
            imgs.append(b_img)
    if not toks:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return features.new_zeros(0, 4, features.shape[1]), empty, empty
    return torch.cat(toks), torch.cat(tgts), torch.cat(imgs)


def collect_head_pool(sam: Sam, ds: LabeledDataset, cfg: LabelTrainConfig) -> dict[str, Any]:
    """Mask tokens of ``cfg.pool_rounds`` passes over ``ds`` (fresh flips, mask subsets and prompts each).

    Each (image, flip) is embedded once. Returns ``tokens`` (P, 4, C), ``targets`` (P,), ``images`` (P,)
    (dataset index of each prompt's image), ``rounds`` done (``max_minutes`` stops early), ``embeddings`` and
    ``seconds``.
    """
    dev = sam.device
    t0 = time.time()
    budget = 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    cache: dict[tuple[int, bool], torch.Tensor] = {}
    pool_t, pool_y, pool_i = [], [], []
    rounds = 0
    for rnd in range(cfg.pool_rounds):
        order = np.random.default_rng([cfg.seed, 7919, rnd]).permutation(len(ds))
        for j in range(0, len(order), cfg.batch_size):
            chunk = [int(i) for i in order[j:j + cfg.batch_size]]
            batch = collate([ds[(i, rnd)] for i in chunk])
            with torch.no_grad():
                new = [k for k, key in enumerate(batch["keys"]) if key not in cache]
                if new:
                    feats = sam.image_encoder(sam.preprocess(batch["image"][new].to(dev)))
                    for k, f in zip(new, feats, strict=True):
                        cache[batch["keys"][k]] = f
                features = torch.stack([cache[key] for key in batch["keys"]])
            gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + rnd * 100_003 + j)
            tokens, targets, local = head_tokens(sam, batch, features, cfg.recipe, gen)
            pool_t.append(tokens.cpu())
            pool_y.append(targets.cpu())
            pool_i.append(torch.tensor(chunk, dtype=torch.long)[local.cpu()])
            if time.time() - t0 > budget:
                break
        rounds = rnd + 1
        log.info("pool round %d: %d prompts, %d embeddings, %.0f s", rounds, sum(len(y) for y in pool_y),
                 len(cache), time.time() - t0)
        if time.time() - t0 > budget:
            break
    return {"tokens": torch.cat(pool_t), "targets": torch.cat(pool_y), "images": torch.cat(pool_i),
            "rounds": rounds, "embeddings": len(cache), "seconds": round(time.time() - t0, 1)}


def _pool_key(sam: Sam, ds: LabeledDataset, cfg: LabelTrainConfig) -> dict[str, Any]:
    """What a saved pool depends on: reuse it only when all of this matches."""
    digest = hashlib.sha256()
    for name, t in sorted(sam.state_dict().items()):
        if not name.startswith("class_head."):
            digest.update(name.encode())
            digest.update(t.detach().cpu().float().numpy().tobytes()[:4096])  # a cheap fingerprint per tensor
    return {"sam": digest.hexdigest(), "images": [r.image_path for r in ds.records],
            "classes": list(ds.index), "seed": cfg.seed, "rounds": cfg.pool_rounds, "batch": cfg.batch_size,
            "max_masks": cfg.max_masks, "recipe": asdict(cfg.recipe), "minutes": cfg.max_minutes}


def train_head_only(sam: Sam, train: list[InstanceRecord], cfg: LabelTrainConfig, *,
                    on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``sam.class_head`` alone, every other parameter frozen; returns a summary.

    With SAM frozen the head's inputs — mask tokens of prompts — do not depend on the head, so they are
    decoded once into a pool (:func:`collect_head_pool`, saved as ``out_dir/pool.pt`` and reused by a rerun
    with the same model, data and settings) and the head is then fitted to the pool for ``steps`` updates of
    ``pool_batch`` prompts. Loss per update: cross-entropy of all 4 tokens of each object prompt plus 0.5 ×
    that of the background prompts, as in :func:`label_loss`.

    Mask tokens of one SAM share a large common component (per-dimension spread ≈ 1/3 of the mean's), which
    makes plain SGD on them slow; the head is fitted on standardized tokens and the standardization is then
    folded exactly into its first linear layer, so the shipped head takes raw tokens like any other.

    ``head_val_fraction`` > 0 keeps that share of the *training* images out of the fit and reports the
    head's loss and accuracy on their prompts (to choose ``lr``/``steps`` without the evaluation images).
    """
    head = sam.class_head
    if head is None:
        raise InputError("train_head_only needs a model with a class head: build it from with_labels(config, names)")
    dev = resolve_device(cfg.device)
    sam.to(dev)
    # eval() everywhere but the head: frozen means TinyViT's BatchNorm statistics stay the base weights' too.
    sam.requires_grad_(False).eval()
    head.requires_grad_(True)
    ds = LabeledDataset(train, head.class_names, img_size=sam.img_size, max_masks=cfg.max_masks, seed=cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    key = _pool_key(sam, ds, cfg)
    pool_file = out / "pool.pt"
    pool = None
    reused = False
    if pool_file.exists():
        saved = torch.load(pool_file, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            pool, reused = saved, True
            log.info("reusing the prompt-token pool in %s (%d prompts)", pool_file, len(saved["targets"]))
    if pool is None:
        pool = collect_head_pool(sam, ds, cfg)
        _atomic_torch_save({**pool, "key": key}, pool_file)
    tokens, targets, images = pool["tokens"].to(dev), pool["targets"].to(dev), pool["images"].to(dev)
    if len(targets) == 0:
        raise InputError("no prompts collected for the class head; check the labelled data")
    fit = torch.ones(len(targets), dtype=torch.bool, device=dev)
    if cfg.head_val_fraction > 0:
        held = np.random.default_rng([cfg.seed, 31]).permutation(len(ds))[: round(cfg.head_val_fraction * len(ds))]
        fit = ~torch.isin(images, torch.as_tensor(held, device=dev))
    fit_idx, val_idx = fit.nonzero().flatten(), (~fit).nonzero().flatten()
    flat = tokens[fit_idx].flatten(0, 1)
    mu, sigma = flat.mean(0), flat.std(0).clamp(min=1e-4)
    z = (tokens - mu) / sigma
    is_bg = targets == head.num_classes

    def loss_of(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        logits, _ = head(z[idx])  # (b, 4, K+1)
        y = targets[idx]
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(4), reduction="none").view(-1, 4).mean(1)
        bg = is_bg[idx]
        w = cfg.recipe.class_weight
        loss = w * ce[~bg].mean() if (~bg).any() else ce.new_zeros(())
        if bg.any():  # background weighs half a mask, as in label_loss
            loss = loss + 0.5 * w * ce[bg].mean()
        return loss, float((logits[:, 0].argmax(-1) == y).float().mean())

    head.train()
    params = list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    perm, pos = fit_idx[torch.randperm(len(fit_idx), generator=g).to(dev)], 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.pool_batch > len(perm):
            perm, pos = fit_idx[torch.randperm(len(fit_idx), generator=g).to(dev)], 0
        idx = perm[pos:pos + cfg.pool_batch]
        pos += cfg.pool_batch
        lr = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss, acc = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stats: dict[str, Any] = {"step": step, "loss": float(loss.detach()), "acc": acc, "lr": lr,
                                 "time_s": round(time.time() - t0, 1)}
        if len(val_idx) and (step % cfg.log_every == 0 or step == cfg.steps):
            with torch.no_grad():
                vl, va = loss_of(val_idx)
            stats.update(val_loss=float(vl), val_acc=va)
        history.append(stats)
        if step % cfg.log_every == 0 or step == 1:
            append_whole(out / "log.jsonl", (json.dumps(stats) + "\n").encode())
            if on_log:
                on_log(stats)
    head.eval()
    with torch.no_grad():  # fold the standardization into the first layer: W (x - mu) / sigma + b
        first_layer = head.trunk.layers[0]
        w = first_layer.weight / sigma
        first_layer.bias -= w @ mu
        first_layer.weight.copy_(w)
    first = float(np.mean([h["loss"] for h in history[:5]]))
    last = float(np.mean([h["loss"] for h in history[-5:]]))
    summary = {"steps": len(history), "train_seconds": round(time.time() - t0, 1),
               "pool_seconds": pool["seconds"], "pool_reused": reused, "pool_rounds": pool["rounds"], "pool_prompts": len(targets),
               "pool_background": int(is_bg.sum()), "embeddings": pool["embeddings"], "first_loss": first,
               "last_loss": last, "train_images": len(ds), "device": str(dev), "config": asdict(cfg)}
    if len(val_idx):
        summary.update(val_images=round(cfg.head_val_fraction * len(ds)), val_prompts=len(val_idx),
                       val_loss=history[-1]["val_loss"], val_acc=history[-1]["val_acc"])
    return summary
