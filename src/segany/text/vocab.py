"""Closed vocabularies: matching a user's phrase to a model's class names."""

from __future__ import annotations

import difflib
import re
import unicodedata

from segany.errors import PromptError

_ARTICLES = re.compile(r"^(a|an|the|every|all)\s+", re.IGNORECASE)
# The score floor of "every <text>" results (predicted IoU × label probability), one for every entry point
# (predict --text, SamPredictor.predict(text=...), the server's text proposals): segany_tiny_labels' scores
# stay below about 0.2, so the 0.25 the server and the API had kept 2 of the 25 people on the sample photo.
# TEXT_POINTS_PER_SIDE is the side of the point grid that search covers. Both live here, not in prompting.py,
# so the command line's parser can read them without importing torch.
TEXT_MIN_SCORE = 0.1
TEXT_POINTS_PER_SIDE = 16


def normalize_phrase(text: str) -> str:
    """'  The Dogs ' → 'dogs'; 'a traffic light' → 'traffic light' (articles and case do not matter, nor
    full-width letters or invisible format characters such as a zero-width space)."""
    t = "".join(ch for ch in unicodedata.normalize("NFKC", str(text)) if unicodedata.category(ch) != "Cf")
    t = " ".join(t.strip().lower().replace("_", " ").split())
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


def resolve_label(text: str, class_names: tuple[str, ...] | list[str]) -> int:
    """Index of ``text`` in a closed vocabulary (case, articles and a plural 's' are ignored).

    Raises :class:`PromptError` listing the known names (and close matches) when it is not there.
    """
    check_text(text)
    want = normalize_phrase(text)
    names = [normalize_phrase(n) for n in class_names]
    for cand in (want, want[:-1] if want.endswith("s") else want, want[:-2] if want.endswith("es") else want):
        if cand in names:
            return names.index(cand)
    close = difflib.get_close_matches(want, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(class_names[names.index(c)]) for c in close)}?" if close else ""
    shown = text if len(text) <= 60 else text[:57] + "..."
    raise PromptError(
        f"unknown label {shown!r}: this model has a closed vocabulary of {len(class_names)} classes "
        f"and no CLIP text path.{hint} Known: {', '.join(class_names)}; pass one of them (free-form text needs "
        "a model with a text token and CLIP weights, which segany does not ship)"
    )
