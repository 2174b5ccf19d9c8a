"""Closed vocabularies: matching a user's phrase to a model's class names."""

from __future__ import annotations

import difflib
import re
import unicodedata

from segany.errors import PromptError

_ARTICLES = re.compile(r"^(a|an|the|every|all)\s+", re.IGNORECASE)
# Punctuation that ends or wraps a typed phrase ("car.", "a car!", "'dog'"); hyphens become spaces instead.
_PUNCTUATION = ".,;:!?…'\"“”‘’«»()[]{}¿¡"
# Plurals of COCO class names that dropping 's'/'es' does not undo, by last word ("computer mice").
_IRREGULAR = {"people": "person", "mice": "mouse", "knives": "knife", "busses": "bus", "scissor": "scissors"}
# Several things in one phrase: "person and car", "dog,cat", "cups/bowls".
_SEVERAL = re.compile(r"\s*(?:,|;|/|&|\+|\band\b|\bor\b)\s*")
# The score floor of "every <text>" results (predicted IoU × label probability), one for every entry point
# (predict --text, SamPredictor.predict(text=...), the server's text proposals): segany_tiny_labels' scores
# are mostly under 0.2 (the best few of an image about 0.3-0.35), so the 0.25 the server and the API had kept
# 2 of the 25 people on the sample photo.
# TEXT_POINTS_PER_SIDE is the side of the point grid that search covers. Both live here, not in prompting.py,
# so the command line's parser can read them without importing torch.
TEXT_MIN_SCORE = 0.1
TEXT_POINTS_PER_SIDE = 16
TEXT_MAX_INSTANCES = 50  # the most instances "every <text>" returns, best first (`predict --max-instances`)


def normalize_phrase(text: str) -> str:
    """'  The Dogs ' → 'dogs'; 'a traffic-light.' → 'traffic light' (articles, case, hyphens and underscores,
    punctuation around the phrase do not matter, nor full-width letters or invisible format characters such as
    a zero-width space). Punctuation inside it stays: 'dog,cat' is two things, see :func:`resolve_label`."""
    return _clean(text, "_-")


def phrase_label(text: str) -> str:
    """The label an open-vocabulary phrase gives its masks: :func:`normalize_phrase` but with its inner hyphens,
    'A T-Shirt.' → 't-shirt', since they are part of the word ('t shirt' would be a class of its own)."""
    return _clean(text, "_", strip="-")


def _clean(text: str, spaces: str, strip: str = "") -> str:
    """Lower-cased NFKC ``text`` without format characters, ``spaces`` made spaces, runs of spaces made one, and
    surrounding punctuation (and ``strip``) and leading articles removed."""
    t = "".join(ch for ch in unicodedata.normalize("NFKC", str(text)) if unicodedata.category(ch) != "Cf").lower()
    for ch in spaces:
        t = t.replace(ch, " ")
    t = " ".join(t.strip(_PUNCTUATION + strip + " \t\n\r\f\v").split())
    while True:
        stripped = _ARTICLES.sub("", t)
        if stripped == t:
            return t
        t = stripped


def check_text(text: object) -> str:
    if not isinstance(text, str):
        raise PromptError(f"text must be a string such as 'a dog', got {type(text).__name__}")
    if not text.strip():
        raise PromptError("text is empty; pass a phrase such as 'a dog' or one of the model's class names")
    return text.strip()


def _singulars(phrase: str) -> list[str]:
    """``phrase`` and the singulars its last word may stand for: 'wine glasses' → [..., 'wine glass']."""
    head, _, last = phrase.rpartition(" ")
    words = [last]
    if last in _IRREGULAR:
        words.append(_IRREGULAR[last])
    if last.endswith("ies") and len(last) > 3:
        words.append(last[:-3] + "y")
    if last.endswith("es") and len(last) > 2:
        words.append(last[:-2])
    if last.endswith("s") and len(last) > 1:
        words.append(last[:-1])
    return [f"{head} {w}" if head else w for w in words]


def _find(want: str, names: list[str]) -> int | None:
    for cand in _singulars(want):
        if cand in names:
            return names.index(cand)
    # A class named in the plural (COCO's "skis"), asked for in the singular ("ski"). Only a plain "s", and not
    # for a stub: "glass" must not become "glasses", nor "bu" "bus".
    if len(want) >= 3 and want + "s" in names:
        return names.index(want + "s")
    return None


def resolve_label(text: str, class_names: tuple[str, ...] | list[str]) -> int:
    """Index of ``text`` in a closed vocabulary (case, articles, hyphens, surrounding punctuation and plurals,
    irregular ones of COCO's classes included, are ignored).

    Raises :class:`PromptError` listing the known names (and close matches) when it is not there, and saying
    to prompt one class at a time when it names several ("person and car").
    """
    check_text(text)
    want = normalize_phrase(text)
    names = [normalize_phrase(n) for n in class_names]
    found = _find(want, names)
    if found is not None:
        return found
    shown = text if len(text) <= 60 else text[:57] + "..."
    parts = [normalize_phrase(p) for p in _SEVERAL.split(want)]
    parts = [p for p in parts if p]
    known = [class_names[i] for i in (_find(p, names) for p in parts) if i is not None]
    if len(parts) > 1 and known:
        unknown = [p for p in parts if _find(p, names) is None]
        extra = f" ({', '.join(repr(u) for u in unknown)} not among its classes)" if unknown else ""
        raise PromptError(
            f"{shown!r} names {len(parts)} things ({', '.join(parts)}){extra}: one class per prompt; use "
            f"`segany auto --labels {','.join(known)}` for several (in Python, prompt each class in turn or "
            "label automatic masks with segany.text.prompting.label_masks)")
    close = difflib.get_close_matches(want, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(class_names[names.index(c)]) for c in close)}?" if close else ""
    raise PromptError(
        f"unknown label {shown!r}: this model has a closed vocabulary of {len(class_names)} classes "
        f"and no CLIP text path.{hint} Known: {', '.join(class_names)}; pass one of them (free-form text needs "
        "a model with a text token and CLIP weights, which segany does not ship)"
    )
