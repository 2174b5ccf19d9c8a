"""Module-level ``__getattr__`` that imports a package's public names on first use.

Why: ``import segany`` and ``import segany.amg`` must stay cheap, since the command line imports them to
build its ``--help``, and the modules behind their names import torch and torchvision (seconds on a
2-core CPU).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A ``__getattr__`` for ``package`` that loads ``name`` from the module ``where[name]``."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
