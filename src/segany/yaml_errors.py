"""One wording for YAML syntax errors (configs, data.yaml): what PyYAML found and where, 1-based."""

from __future__ import annotations

from typing import Any


def yaml_problem(exc: Any) -> tuple[str, str]:
    """(the problem, `` at line L, column C`` or ``""``) of a ``yaml.YAMLError``."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0] or exc.__class__.__name__
    return problem, where
