"""CLIP encoders for text prompts (SAM §7.5) through open_clip_torch (``pip install 'segany[text]'``).

A :class:`ClipSpec` names an architecture (an open_clip built-in, or an explicit ``model_cfg`` for tiny
test models) and where its weights come from: a segany weights-registry entry (URL + sha256, fetched by
``segany download NAME``), a local file (``checkpoint=`` or ``$SEGANY_CLIP_WEIGHTS``), or, for test
specs only, a seeded random init. A text-enabled :class:`~segany.modeling.config.SamConfig` stores the
spec's name, so inference embeds text with the same CLIP its training used.

Training encodes *image crops* around masks (:meth:`ClipEncoder.encode_crops`); inference encodes the
user's *phrase* (:meth:`ClipEncoder.encode_text`). Both come back L2-normalized, float32, (N, D).
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from segany.errors import CheckpointError, DownloadError, InputError, SeganyError, UnknownModelError, require

log = logging.getLogger(__name__)

CLIP_WEIGHTS_ENV = "SEGANY_CLIP_WEIGHTS"
# OpenAI CLIP's pixel statistics (0-1 RGB); open_clip uses the same for its OpenAI/LAION weights.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipSpec:
    """One CLIP: architecture + weights source.

    Attributes:
        name: segany's name for it (stored in ``TextConfig.clip_model``).
        embed_dim: width of its joint embedding space.
        arch: open_clip built-in model name (``"ViT-B-32"``), or None with ``model_cfg``.
        model_cfg: an explicit open_clip model config (tiny test models), used when ``arch`` is None.
        weights: segany weights-registry name; None means a seeded random init (tests only).
        layout: ``"openai"`` (TorchScript archive from OpenAI) or ``"open_clip"`` (a state dict).
        seed: seed of the random init when ``weights`` is None.
    """

    name: str
    embed_dim: int
    arch: str | None = None
    model_cfg: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    weights: str | None = None
    layout: str = "open_clip"
    seed: int = 0
    description: str = ""


_SPECS: dict[str, ClipSpec] = {}


def register_clip(spec: ClipSpec) -> ClipSpec:
    if spec.name in _SPECS:
        raise SeganyError(f"CLIP model {spec.name!r} is already registered")
    if spec.arch is None and spec.model_cfg is None:
        raise SeganyError(f"CLIP model {spec.name!r} needs an open_clip arch name or a model_cfg")
    _SPECS[spec.name] = spec
    return spec


def list_clip_models() -> list[str]:
    return sorted(_SPECS)


def get_clip_spec(name: str) -> ClipSpec:
    if name not in _SPECS:
        close = difflib.get_close_matches(name, list(_SPECS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else "."
        raise UnknownModelError(f"unknown CLIP model {name!r}{hint} Known: {', '.join(list_clip_models())}")
    return _SPECS[name]


# The weights entry (URL + sha256) lives in segany.weights next to SAM's; OpenAI's URL path is the file's sha256.
register_clip(ClipSpec(name="clip_vit_b32", embed_dim=512, arch="ViT-B-32", weights="clip_vit_b32_openai",
                       layout="openai", description="OpenAI CLIP ViT-B/32 (the SAM paper used ViT-L/14@336)"))
register_clip(ClipSpec(name="clip_vit_l14", embed_dim=768, arch="ViT-L-14", weights="clip_vit_l14_openai",
                       layout="openai", description="OpenAI CLIP ViT-L/14, the SAM paper's text encoder family"))
# A few-MB random CLIP with the real tokenizer: for tests and wiring checks, never for real prompts.
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
register_clip(ClipSpec(name="clip_tiny_test", embed_dim=64, model_cfg=TINY_CLIP_CFG, seed=0,
                       description="random-weight tiny CLIP (tests only; its embeddings mean nothing)"))


def _weights_path(spec: ClipSpec, checkpoint: str | os.PathLike[str] | None) -> Path | None:
    """A local file (argument, then $SEGANY_CLIP_WEIGHTS), else the verified cached/downloaded file."""
    if checkpoint is None and os.environ.get(CLIP_WEIGHTS_ENV):
        checkpoint = os.environ[CLIP_WEIGHTS_ENV]
    if checkpoint is not None:
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise InputError(f"CLIP weights {str(p)!r} do not exist; pass the path of {spec.name}'s file "
                             f"(or unset ${CLIP_WEIGHTS_ENV})")
        return p
    if spec.weights is None:
        return None
    from segany.checkpoints import cached_path, download
    from segany.registry import get_weights_info

    try:
        return download(spec.weights)
    except DownloadError as exc:
        # The download's own advice names build_sam(checkpoint=), which loads SAM weights, not CLIP's: say what
        # loads these instead.
        info = get_weights_info(spec.weights)
        cause = exc.__cause__
        why = (f"could not download {info.name} from {info.url} ({getattr(cause, 'reason', cause)})" if cause
               else str(exc))
        raise DownloadError(f"{why}. Text prompts need the CLIP weights of {spec.name!r}: run `segany download "
                            f"{spec.weights}` where there is network (or fetch the file elsewhere and put it at "
                            f"{cached_path(info)}), or pass its path as load_clip({spec.name!r}, checkpoint=PATH) "
                            f"or in ${CLIP_WEIGHTS_ENV}") from exc


def _build(spec: ClipSpec, path: Path | None) -> torch.nn.Module:
    open_clip: Any = require("open_clip", "text")
    if path is not None and spec.layout == "openai":
        from open_clip.openai import load_openai_model

        return load_openai_model(str(path), precision="fp32", device="cpu")
    if spec.arch is not None:
        return open_clip.create_model(spec.arch, pretrained=str(path) if path else None)
    from open_clip.model import CLIP

    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (spec.model_cfg or {}).items()}
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
        torch.manual_seed(spec.seed)
        model = CLIP(**cfg)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state), strict=True)
    return model


def _embed_dims(model: torch.nn.Module) -> dict[str, int]:
    """The joint-space widths a built CLIP produces: ``text`` (its text projection) and ``image`` (its visual
    tower's output), each where the model exposes it."""
    dims: dict[str, int] = {}
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        dims["text"] = proj.out_features
    elif isinstance(proj, torch.Tensor) and proj.ndim == 2:
        dims["text"] = int(proj.shape[1])
    out = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(out, int):
        dims["image"] = out
    return dims


def _check_weights(spec: ClipSpec, path: Path, model: torch.nn.Module, from_env: bool) -> None:
    """Refuse a weights file of another CLIP (e.g. ViT-B/32's for clip_vit_l14): an OpenAI archive builds
    whatever architecture it holds, and would fail only later, at the first prompt, with a shape error."""
    wrong = {k: v for k, v in _embed_dims(model).items() if v != spec.embed_dim}
    if not wrong:
        return
    got = next(iter(wrong.values()))
    alike = [s.name for s in _SPECS.values() if s.embed_dim == got and s.name != spec.name]
    raise CheckpointError(
        f"CLIP weights {str(path)!r} are a CLIP with {got}-dim embeddings"
        + (f" (as {', '.join(alike)})" if alike else "")
        + f", but {spec.name} has {spec.embed_dim}-dim ones; " + _weights_fix(spec, from_env))


def _weights_fix(spec: ClipSpec, from_env: bool) -> str:
    if from_env:
        return (f"${CLIP_WEIGHTS_ENV} applies to every CLIP model: point it at {spec.name}'s file, or unset it "
                f"and pass each file as load_clip({spec.name!r}, checkpoint=PATH)")
    return f"pass {spec.name}'s file as checkpoint="


class ClipEncoder:
    """A frozen CLIP in eval mode that turns phrases and image crops into normalized embeddings."""

    def __init__(self, spec: ClipSpec, model: torch.nn.Module, tokenizer: Any) -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> ClipEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_text(self, phrases: list[str]) -> torch.Tensor:
        """Phrases → (N, D) float32 unit vectors. Empty phrases raise :class:`InputError`."""
        if isinstance(phrases, str):
            phrases = [phrases]
        bad = [p for p in phrases if not isinstance(p, str) or not p.strip()]
        if not phrases or bad:
            raise InputError("text prompts must be non-empty phrases such as 'a dog'; got "
                             f"{phrases!r}")
        phrases = [p.strip() for p in phrases]
        self.check_length(phrases)
        tokens = self.tokenizer(phrases).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def check_length(self, phrases: list[str]) -> None:
        """Raise :class:`InputError` for a phrase longer than CLIP reads: its tokenizer would cut it silently.

        The limit is in BPE tokens, not characters: the context length less the start and end tokens (75 for
        OpenAI's CLIP). A CJK character or an emoji can take several, so 200 characters can be too long.
        """
        context = getattr(self.tokenizer, "context_length", None)
        encode = getattr(self.tokenizer, "encode", None)
        if not isinstance(context, int) or not callable(encode):
            return  # a tokenizer that does not say its limit (none of the registered ones)
        limit = context - 2
        for phrase in phrases:
            n = len(encode(phrase))
            if n > limit:
                shown = phrase if len(phrase) <= 40 else phrase[:37] + "..."
                raise InputError(f"text prompt {shown!r} is {n} CLIP tokens long, but {self.spec.name} reads "
                                 f"at most {limit} ({context} less its start and end tokens) and would drop the "
                                 "rest; shorten it to a few words such as 'a red car' (an emoji or a CJK "
                                 "character can take several tokens)")

    @torch.no_grad()
    def encode_crops(self, image: torch.Tensor, boxes_xyxy: torch.Tensor, context: float = 0.1) -> torch.Tensor:
        """Crops around boxes of one image → (N, D) float32 unit vectors.

        Args:
            image: (3, H, W) RGB in 0–255 (any float/uint8 dtype, any device).
            boxes_xyxy: (N, 4) pixel boxes in that image; each is grown by ``context`` of its side on
                every edge and made square (CLIP sees an object with a little surround, undistorted).
        """
        from torchvision.ops import roi_align

        if boxes_xyxy.numel() == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        dev = self.device
        img = image.to(dev, torch.float32)[None] / 255.0
        b = boxes_xyxy.to(dev, torch.float32)
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        side = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).clamp(min=8) * (1 + 2 * context)
        sq = torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)
        s = self.image_size
        crops = roi_align(img, [sq], output_size=(s, s), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        mean = torch.tensor(CLIP_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=dev).view(1, 3, 1, 1)
        return F.normalize(self.model.encode_image((crops - mean) / std).float(), dim=-1)


_LOADED: dict[tuple[str, str, str], ClipEncoder] = {}


def load_clip(name: str, *, checkpoint: str | os.PathLike[str] | None = None,
              device: str | torch.device = "cpu") -> ClipEncoder:
    """Build (once per process, then cached) the CLIP ``name`` with its weights on ``device``.

    Weights: ``checkpoint``, else ``$SEGANY_CLIP_WEIGHTS``, else the registered file (downloaded and
    checked on first use; offline, the error says where to put it). Test specs use a seeded random init.
    """
    spec = get_clip_spec(name)
    path = _weights_path(spec, checkpoint)
    key = (name, str(path), str(torch.device(device)))
    if key not in _LOADED:
        open_clip: Any = require("open_clip", "text")
        from_env = checkpoint is None and bool(os.environ.get(CLIP_WEIGHTS_ENV))
        try:
            model = _build(spec, path)
        except (RuntimeError, KeyError, ValueError) as exc:  # a file of another architecture, or not CLIP's
            if path is None:
                raise
            reason = " ".join(str(exc).split())[:300]  # one line: a state-dict error lists every key on its own
            raise CheckpointError(f"could not load CLIP weights {str(path)!r} as {spec.name} ({reason}); "
                                  + _weights_fix(spec, from_env)) from exc
        if path is not None:
            _check_weights(spec, path, model, from_env)
        if spec.arch is not None:
            tokenizer = open_clip.get_tokenizer(spec.arch)
        else:
            ctx = int((spec.model_cfg or {}).get("text_cfg", {}).get("context_length", 77))
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
        _LOADED[key] = ClipEncoder(spec, model, tokenizer).to(device)
    return _LOADED[key]
