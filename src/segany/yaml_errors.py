"""One wording for YAML syntax errors (configs, data.yaml): what PyYAML found and where, 1-based."""

from __future__ import annotations

from typing import Any


def yaml_problem(exc: Any) -> tuple[str, str]:
    """(the problem, `` at line L, column C`` or ``""``) of a ``yaml.YAMLError``."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0] or exc.__class__.__name__
    return problem, where


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses a mapping holding one key twice, as a ``yaml.YAMLError`` whose mark is the
    second key (so :func:`yaml_problem` says where).

    PyYAML keeps the last of two equal keys without a word: a second ``run:`` block appended to a training config
    silently replaced the first one's settings (its output folder, step count and device).
    """
    import yaml

    class _UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                # The mapping's own keys, before "<<" merges are flattened in: overriding a merged key is what
                # a merge is for, not a repeat.
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: construct_mapping names that itself
                        continue
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping", node.start_mark,
                            f"key {key!r} appears twice (first at line {first.line + 1}); keep one of them",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass
