"""Typed request bodies of the annotation API (responses are the store's plain dicts)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RLE(BaseModel):
    """COCO RLE: ``counts`` a compressed string or an uncompressed, column-major list of run lengths."""

    size: list[int] = Field(min_length=2, max_length=2)
    counts: str | list[int]


class AnnotationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uuid: str = Field(description="client-generated UUID: the idempotency key of this save")
    segmentation: RLE
    label: str = "object"
    source: Literal["manual", "semi", "auto"] = "manual"
    prompts: dict[str, Any] = Field(default_factory=dict)
    seconds_spent: float | None = Field(default=None, ge=0, lt=1e6)
    predicted_iou: float | None = None


class AnnotationPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segmentation: RLE | None = None
    label: str | None = None
    review_state: Literal["accepted", "pending", "rejected"] | None = None
    seconds_spent: float | None = Field(default=None, ge=0, lt=1e6)
    prompts: dict[str, Any] | None = None
    revision: int | None = Field(default=None, description="fail with 409 unless the stored revision is this")
    uuid: str | None = Field(default=None, description="fail with 409 unless the id still names this annotation")


class PreviousDecode(BaseModel):
    """Candidate ``index`` of an earlier decode of the same image: its low-res logits become this decode's
    mask_input (SAM's refinement from the previous mask, what the browser's decoder feeds from the second
    click on). An unknown or expired ``decode_id`` answers 410: decode the clicks again."""

    model_config = ConfigDict(extra="forbid")

    decode_id: str = Field(min_length=1, max_length=64, description="the decode_id a decode response gave")
    index: int = Field(ge=0, description="which of its candidates (0-based): the one the user has chosen")


class DecodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    points: list[list[float]] = Field(default_factory=list, description="[[x, y], ...] original-image pixels")
    labels: list[int] = Field(default_factory=list, description="1 foreground, 0 background")
    box: list[float] | None = Field(default=None, description="[x0, y0, x1, y1] original-image pixels")
    previous: PreviousDecode | None = Field(default=None, description="refine from this earlier decode's mask")


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds_spent: float | None = Field(default=None, ge=0, lt=1e6)
    label: str | None = None
    uuid: str | None = Field(default=None, description="fail with 409 unless the id still names this annotation "
                                                       "(ids are reused after a delete)")


class ProjectPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: list[str] | None = None
    stage: Literal["manual", "semi", "auto"] | None = None


class TextIn(BaseModel):
    """A phrase to find in the image (models with a class head or a CLIP text token, issue 10)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=200, description="what to segment, e.g. 'dog' or 'a red car'")
    max_masks: int = Field(default=20, ge=1, le=100, description="at most this many proposals, best first")
    min_score: float | None = Field(default=None, ge=0, le=1,
                                    description="keep masks scoring at least this (predicted IoU × label "
                                                "probability); default: the server's setting")
