"""Typed phrases → class names of a closed vocabulary (text audit finding 5): irregular plurals, hyphens and
trailing punctuation are understood, and a phrase naming several classes says to prompt one at a time."""

from __future__ import annotations

import pytest

from segany.errors import PromptError
from segany.text.vocab import normalize_phrase, resolve_label

NAMES = ("person", "mouse", "knife", "traffic light", "car", "wine glass", "bus", "scissors", "dog", "cat", "tv", "skis", "glasses")


@pytest.mark.parametrize(("typed", "name"), [
    ("people", "person"), ("all the people", "person"), ("Persons", "person"), ("mice", "mouse"),
    ("computer mice", None), ("knives", "knife"), ("traffic-light", "traffic light"),
    ("traffic-lights", "traffic light"), ("car.", "car"), ("a car!", "car"), ("'dog'", "dog"), ("cars?", "car"),
    ("wine glasses", "wine glass"), ("busses", "bus"), ("buses", "bus"), ("scissors", "scissors"), ("TVs", "tv"),
    ("ski", "skis"), ("a ski", "skis"), ("Skis", "skis"),  # a class named in the plural, asked in the singular
    ("glass", None), ("bu", None),  # but not a plain word that an "es" or a stub would stretch to a class
])
def test_phrases_resolve_to_their_class(typed: str, name: str | None) -> None:
    if name is None:
        with pytest.raises(PromptError, match="unknown label"):
            resolve_label(typed, NAMES)
    else:
        assert NAMES[resolve_label(typed, NAMES)] == name


@pytest.mark.parametrize(("typed", "fragment"), [
    ("person and car", "names 2 things (person, car): one class per prompt; use `segany auto --labels person,car`"),
    ("dog,cat", "names 2 things (dog, cat): one class per prompt"),
    ("dogs, cats or zebras", "('zebras' not among its classes): one class per prompt; use `segany auto --labels "
                             "dog,cat` for several"),
])
def test_several_classes_in_one_phrase_say_one_per_prompt(typed: str, fragment: str) -> None:
    with pytest.raises(PromptError) as got:
        resolve_label(typed, NAMES)
    assert fragment in str(got.value), str(got.value)


def test_unknown_phrases_still_list_the_known_names() -> None:
    with pytest.raises(PromptError, match="unknown label 'zebra and giraffe'.*Known: person, mouse"):
        resolve_label("zebra and giraffe", NAMES)


def test_normalize_phrase_keeps_inner_punctuation() -> None:
    assert normalize_phrase("  A Traffic-Light. ") == "traffic light"
    assert normalize_phrase("dog, cat!") == "dog, cat"
