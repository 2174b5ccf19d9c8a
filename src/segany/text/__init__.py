"""Text prompts and class labels (issue 10): CLIP encoders, vocabularies and "segment every <class>".

Public names: :func:`load_clip`, :func:`list_clip_models`, :class:`ClipEncoder`, :func:`resolve_label`. They
load on first use: :mod:`segany.text.clip` imports torch, and the command line reads only
:mod:`segany.text.vocab` (its shared score floor) to build its ``--help``.
"""

from __future__ import annotations

from segany._lazy import lazy_getattr

_LAZY = {
    "ClipEncoder": "segany.text.clip",
    "ClipSpec": "segany.text.clip",
    "get_clip_spec": "segany.text.clip",
    "list_clip_models": "segany.text.clip",
    "load_clip": "segany.text.clip",
    "register_clip": "segany.text.clip",
    "resolve_label": "segany.text.vocab",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr("segany.text", _LAZY)
