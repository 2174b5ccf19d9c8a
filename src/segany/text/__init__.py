"""Text prompts and class labels (issue 10): CLIP encoders, vocabularies and "segment every <class>".

Public names: :func:`load_clip`, :func:`list_clip_models`, :class:`ClipEncoder`, :func:`resolve_label`.
"""

from segany.text.clip import ClipEncoder, ClipSpec, get_clip_spec, list_clip_models, load_clip, register_clip
from segany.text.vocab import resolve_label

__all__ = ["ClipEncoder", "ClipSpec", "get_clip_spec", "list_clip_models", "load_clip", "register_clip",
           "resolve_label"]
