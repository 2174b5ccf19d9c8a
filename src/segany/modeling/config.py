"""Architecture configs as frozen dataclasses.

A checkpoint written by segany embeds ``SamConfig.to_dict()`` so it describes itself; the variants
in :mod:`segany.modeling.variants` are just named instances of these classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from segany.errors import InputError


def _check_positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise InputError(f"{owner}.{name} must be > 0, got {value}")


@dataclass(frozen=True)
class ViTConfig:
    """Plain ViT image encoder with windowed attention (SAM paper §3, appendix A)."""

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    kind: str = field(default="vit", init=False)

    def __post_init__(self) -> None:
        _check_positive("ViTConfig", img_size=self.img_size, patch_size=self.patch_size,
                        embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)
        if self.img_size % self.patch_size:
            raise InputError(f"ViTConfig.img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads:
            raise InputError(f"ViTConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise InputError(f"ViTConfig.global_attn_indexes {bad} are outside 0..{self.depth - 1}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT encoder as used by MobileSAM: conv stem + MBConv stage + three windowed-attention stages."""

    img_size: int = 1024
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    num_classes: int = 1000  # MobileSAM keeps TinyViT's unused classifier head; kept for strict loading.
    kind: str = field(default="tiny_vit", init=False)

    def __post_init__(self) -> None:
        n = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == len(self.window_sizes) == n == 4):
            raise InputError("TinyViTConfig needs 4 stages: embed_dims, depths, num_heads and window_sizes of length 4")
        if self.img_size % 64:
            raise InputError(f"TinyViTConfig.img_size must be a multiple of 64, got {self.img_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // 16


@dataclass(frozen=True)
class PromptEncoderConfig:
    embed_dim: int = 256
    mask_in_chans: int = 16


@dataclass(frozen=True)
class MaskDecoderConfig:
    transformer_dim: int = 256
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class TextConfig:
    """Optional CLIP prompt token (SAM §7.5): a CLIP embedding becomes one more sparse prompt token.

    ``clip_model`` names an entry of :mod:`segany.text.clip` (architecture + weights), so a checkpoint
    says which CLIP its text token was trained against; ``clip_dim`` is that CLIP's embedding width.
    """

    clip_model: str = "clip_vit_b32"
    clip_dim: int = 512

    def __post_init__(self) -> None:
        _check_positive("TextConfig", clip_dim=self.clip_dim)
        if not self.clip_model:
            raise InputError("TextConfig.clip_model must name a CLIP model (see segany.text.list_clip_models())")


@dataclass(frozen=True)
class ClassHeadConfig:
    """Optional class head over the decoder's mask tokens: a label and a score per mask.

    ``class_names`` is the closed vocabulary, in the order of the head's logits. ``clip_dim`` > 0 adds a
    projection of each mask token into a CLIP embedding space, so labels can also be open-vocabulary
    (compared with CLIP text embeddings of any label list).
    """

    class_names: tuple[str, ...] = ()
    hidden_dim: int = 256
    num_layers: int = 3
    clip_dim: int = 0

    def __post_init__(self) -> None:
        if not self.class_names:
            raise InputError("ClassHeadConfig.class_names must list at least one class, e.g. ('person', 'car')")
        bad = [n for n in self.class_names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise InputError(f"ClassHeadConfig.class_names must be non-empty strings, got {bad[:3]}")
        dup = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
        if dup:
            raise InputError(f"ClassHeadConfig.class_names has duplicates {dup[:5]}; names must be unique")
        _check_positive("ClassHeadConfig", hidden_dim=self.hidden_dim, num_layers=self.num_layers)
        if self.clip_dim < 0:
            raise InputError(f"ClassHeadConfig.clip_dim must be >= 0 (0 = no CLIP projection), got {self.clip_dim}")


_ENCODERS: dict[str, type[ViTConfig] | type[TinyViTConfig]] = {"vit": ViTConfig, "tiny_vit": TinyViTConfig}


@dataclass(frozen=True)
class SamConfig:
    """The whole model. ``encoder`` is a :class:`ViTConfig` or :class:`TinyViTConfig`."""

    encoder: ViTConfig | TinyViTConfig = field(default_factory=ViTConfig)
    prompt: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask_threshold: float = 0.0
    # Optional parts (issue 10); None keeps the model, its state dict and its dict form exactly SAM's.
    text: TextConfig | None = None
    classes: ClassHeadConfig | None = None

    def __post_init__(self) -> None:
        if self.encoder.out_chans != self.prompt.embed_dim or self.prompt.embed_dim != self.decoder.transformer_dim:
            raise InputError(
                "SamConfig: encoder.out_chans, prompt.embed_dim and decoder.transformer_dim must be equal, got "
                f"{self.encoder.out_chans}, {self.prompt.embed_dim}, {self.decoder.transformer_dim}"
            )
        if self.classes is not None and self.classes.clip_dim > 0:
            # Open-vocabulary labels compare mask embeddings with the text token's CLIP: it must exist and match.
            if self.text is None or self.text.clip_dim != self.classes.clip_dim:
                raise InputError("SamConfig: classes.clip_dim > 0 needs text=TextConfig(...) with the same clip_dim "
                                 f"(got classes.clip_dim={self.classes.clip_dim}, text={self.text})")

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    @property
    def embed_size(self) -> int:
        """Side of the square image-embedding grid (64 for 1024 px input)."""
        return self.encoder.grid_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("text", "classes"):  # absent rather than None: older readers see the dict they know
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def checked_from_dict(cls, data: Any, where: str) -> SamConfig:
        """:meth:`from_dict` for a config a person wrote (``where`` names it, e.g. ``model.arch``): a key this
        architecture does not have, an unknown encoder ``kind`` or a value of the wrong kind is an
        :class:`InputError` naming it. :meth:`from_dict` takes any ``kind`` but ``tiny_vit`` as a ViT and drops
        unknown sections, so a typo (``decodr``) trained some other model without a word."""
        from dataclasses import fields

        def keys_of(section: str, value: Any, allowed: set[str]) -> None:
            if not isinstance(value, dict):
                raise InputError(f"{where}{section} must be a mapping of settings, got {value!r}")
            extra = sorted(set(map(str, value)) - allowed)
            if extra:
                raise InputError(f"{where}{section} has no setting {extra[0]!r}; its settings are "
                                 f"{', '.join(sorted(allowed))}")

        keys_of("", data, {f.name for f in fields(cls)})
        if "encoder" not in data:
            raise InputError(f"{where} needs an encoder section, e.g. {{encoder: {{kind: vit, ...}}}} "
                             "(SamConfig.to_dict() of a registered model shows every setting)")
        encoder = data["encoder"]
        kind = encoder.get("kind", "vit") if isinstance(encoder, dict) else None
        if kind not in _ENCODERS:
            raise InputError(f"{where}.encoder.kind must be one of {', '.join(_ENCODERS)}, got {kind!r}")
        keys_of(".encoder", encoder, {f.name for f in fields(_ENCODERS[kind])} | {"kind"})
        for section, sub in (("prompt", PromptEncoderConfig), ("decoder", MaskDecoderConfig),
                             ("text", TextConfig), ("classes", ClassHeadConfig)):
            if data.get(section) is not None:
                keys_of(f".{section}", data[section], {f.name for f in fields(sub)})
        try:
            return cls.from_dict(data)
        except InputError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise InputError(f"{where} is not a valid architecture ({type(exc).__name__}: {exc}); start from "
                             "SamConfig.to_dict() of a registered model") from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamConfig:
        """Inverse of :meth:`to_dict`; tuples come back as tuples so configs compare equal."""
        enc = dict(data["encoder"])
        kind = enc.pop("kind", "vit")
        enc = {k: tuple(v) if isinstance(v, list) else v for k, v in enc.items()}
        encoder: ViTConfig | TinyViTConfig = _ENCODERS.get(kind, ViTConfig)(**enc)  # any other kind: a ViT, as always
        return cls(
            encoder=encoder,
            prompt=PromptEncoderConfig(**data.get("prompt", {})),
            decoder=MaskDecoderConfig(**data.get("decoder", {})),
            pixel_mean=tuple(data.get("pixel_mean", cls.pixel_mean)),  # type: ignore[arg-type]
            pixel_std=tuple(data.get("pixel_std", cls.pixel_std)),  # type: ignore[arg-type]
            mask_threshold=float(data.get("mask_threshold", 0.0)),
            text=TextConfig(**data["text"]) if data.get("text") else None,
            classes=(ClassHeadConfig(**{**data["classes"], "class_names": tuple(data["classes"]["class_names"])})
                     if data.get("classes") else None),
        )
