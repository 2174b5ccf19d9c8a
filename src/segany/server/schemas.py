"""Typed request bodies of the annotation API (responses are the store's plain dicts).

Every body model derives from :class:`Body`, which refuses NaN and Infinity anywhere in the body, free-form
``prompts`` included: Python's JSON reader accepts them although JSON has no such numbers, SQLite then
fails after the row is written and PostgreSQL stores them, to come out again as bare ``NaN`` in exports
that no JSON reader accepts. Refusing them here, before any route runs, keeps them out of the store.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from segany.engine.store import first_non_finite, plain_text_problem

# A SAM-style interactive decode uses a handful of clicks (the paper's interactive evaluation stops at 11;
# people rarely go past 20). The decoder's cost grows with the points, and 100,000 of them held a core for
# minutes and 8 GB, so the server takes at most this many per decode.
MAX_DECODE_POINTS = 64


class Body(BaseModel):
    """Base of every request body: unknown fields and non-finite numbers are refused (422)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        found = first_non_finite(data)
        if found is not None:
            raise ValueError(f"{found[0] or 'the body'} is not a finite number (NaN and Infinity are not JSON); "
                             "send a number, or null where the field allows it")
        return data


def _plain_label(value: Any) -> Any:
    """A label that is text on one line: NUL (which PostgreSQL cannot store), newlines and other control
    characters, and lone surrogates are refused here (422) with the character named."""
    if isinstance(value, str):
        label = value.strip()  # the store strips it, so a trailing newline is harmless
        problem = plain_text_problem(label)
        if problem is not None:
            raise ValueError(f"label {label[:80]!r} {problem}")
    return value


class RLE(BaseModel):
    """COCO RLE: ``counts`` a compressed string or an uncompressed, column-major list of run lengths."""

    size: list[int] = Field(min_length=2, max_length=2)
    counts: str | list[int]


class AnnotationIn(Body):
    uuid: str = Field(description="client-generated UUID: the idempotency key of this save")
    segmentation: RLE
    label: str = "object"
    source: Literal["manual", "semi", "auto"] = "manual"
    prompts: dict[str, Any] = Field(default_factory=dict)
    seconds_spent: float | None = Field(default=None, ge=0, lt=1e6)
    predicted_iou: float | None = None

    _label = field_validator("label")(_plain_label)


class AnnotationPatch(Body):
    segmentation: RLE | None = None
    label: str | None = None
    review_state: Literal["accepted", "pending", "rejected"] | None = None
    seconds_spent: float | None = Field(default=None, ge=0, lt=1e6)
    prompts: dict[str, Any] | None = None
    revision: int | None = Field(default=None, description="fail with 409 unless the stored revision is this")
    uuid: str | None = Field(default=None, description="fail with 409 unless the id still names this annotation")
    edit_uuid: str | None = Field(
        default=None, description="client-generated UUID of this edit: its idempotency key. Sent again (a retry after "
                                  "a lost answer) while the edit is still the annotation's last change, the row is "
                                  "answered as that edit left it instead of 409; send a new one for each new edit "
                                  "(the same one with a different edit is refused, 409)")

    _label = field_validator("label")(_plain_label)


class PreviousDecode(BaseModel):
    """Candidate ``index`` of an earlier decode of the same image: its low-res logits become this decode's
    mask_input (SAM's refinement from the previous mask, what the browser's decoder feeds from the second
    click on). An unknown or expired ``decode_id`` answers 410: decode the clicks again."""

    model_config = ConfigDict(extra="forbid")

    decode_id: str = Field(min_length=1, max_length=64, description="the decode_id a decode response gave")
    index: int = Field(ge=0, description="which of its candidates (0-based): the one the user has chosen")


class DecodeIn(Body):
    points: list[tuple[float, float]] = Field(
        default_factory=list, max_length=MAX_DECODE_POINTS,
        description=f"[[x, y], ...] original-image pixels, at most {MAX_DECODE_POINTS}")
    labels: list[Literal[-1, 0, 1]] = Field(
        default_factory=list, max_length=MAX_DECODE_POINTS,
        description="one per point: 1 foreground, 0 background, -1 ignore")
    box: tuple[float, float, float, float] | None = Field(
        default=None, description="[x0, y0, x1, y1] original-image pixels")
    previous: PreviousDecode | None = Field(default=None, description="refine from this earlier decode's mask")

    @field_validator("points", "labels", mode="before")
    @classmethod
    def _few_clicks(cls, value: Any, info: ValidationInfo) -> Any:
        # Before parsing, so an oversized list is refused with the reason rather than parsed item by item,
        # and a ragged point is named here instead of failing later in the model's numpy code.
        if not isinstance(value, list):
            return value  # the type check says what is wrong
        if len(value) > MAX_DECODE_POINTS:
            raise ValueError(f"a decode takes at most {MAX_DECODE_POINTS} {info.field_name} (the clicks on one "
                             f"object), got {len(value)}; send the clicks of one object, or use prefill for a "
                             "whole image")
        if info.field_name == "points":
            for i, p in enumerate(value):
                if not isinstance(p, list) or len(p) != 2:
                    raise ValueError(f"points[{i}] must be [x, y] (two numbers), got {repr(p)[:80]}; send [[x, y], ...]")
        return value

    @field_validator("box", mode="before")
    @classmethod
    def _four_numbers(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) != 4:
            raise ValueError(f"box must be [x0, y0, x1, y1] (four numbers), got {len(value)} values")
        return value


class ReviewIn(Body):
    seconds_spent: float | None = Field(default=None, ge=0, lt=1e6)
    label: str | None = None
    uuid: str | None = Field(default=None, description="fail with 409 unless the id still names this annotation "
                                                       "(ids are reused after a delete)")
    revision: int | None = Field(default=None, ge=1, lt=2**62,
                                 description="fail with 409 unless the annotation is still at this revision: another "
                                             "reviewer's accept or reject (or an edit) since the page read it")
    edit_uuid: str | None = Field(
        default=None, description="client-generated UUID of this accept or reject: its idempotency key, as an "
                                  "edit's. Sent again (a retry after a lost answer) while that review is still the "
                                  "annotation's last change, the row is answered as it left it instead of a 409 or "
                                  "403; send a new one for each new review (the same one with another action, "
                                  "label or revision is refused, 409)")

    _label = field_validator("label")(_plain_label)


class ProjectPatch(Body):
    labels: list[str] | None = None
    stage: Literal["manual", "semi", "auto"] | None = None

    @field_validator("labels")
    @classmethod
    def _plain_labels(cls, value: list[str] | None) -> list[str] | None:
        for i, label in enumerate(value or []):
            problem = plain_text_problem(label)
            if problem is not None:
                raise ValueError(f"labels[{i}] {label[:80]!r} {problem}")
            if not label.strip():
                raise ValueError(f"labels[{i}] {label!r} is empty: give each label a name, or leave it out")
        return value


class TextIn(Body):
    """A phrase to find in the image (models with a class head or a CLIP text token, issue 10)."""

    text: str = Field(max_length=200, description="what to segment, e.g. 'dog' or 'a red car'")
    max_masks: int = Field(default=20, ge=1, le=100, description="at most this many proposals, best first")
    min_score: float | None = Field(default=None, ge=0, le=1,
                                    description="keep masks scoring at least this (predicted IoU × label "
                                                "probability); default: the server's setting")

    @field_validator("text")
    @classmethod
    def _plain_text(cls, value: str) -> str:
        """Control characters and lone surrogates are refused (422) as in labels: a proposal takes the phrase as
        its label when the project declares none that it names."""
        problem = plain_text_problem(value.strip())
        if problem is not None:
            raise ValueError(f"text {value[:80]!r} {problem}")
        return value
