"""``segment_anything``-style names as a view of segany's registry, plus builders users add themselves."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, MutableMapping, ValuesView
from functools import cache
from typing import Any

import torch

from segany.checkpoints import build_sam
from segany.errors import CheckpointError, InputError, UnknownModelError
from segany.modeling.sam import Sam
from segany.registry import get_config, get_model_info, list_models

Builder = Callable[..., Sam]


def create_model(name: str, checkpoint: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> Sam:
    return build_sam(name, checkpoint=checkpoint, device=device)


class _Builder:
    """``build_sam_<name>(checkpoint=None)``: the model ``name``, refusing a checkpoint of another kind.

    A top-level class rather than a closure so that it pickles (and with it ``sam_model_registry``): it is
    stored by model name and loads as this process's builder for that name, the same object again.
    """

    def __init__(self, name: str) -> None:
        self.model_name = name
        self.__name__ = self.__qualname__ = f"build_sam_{name}"  # as the reference's module functions are named

    def __call__(self, checkpoint: str | os.PathLike[str] | None = None) -> Sam:
        model = build_sam(self.model_name, checkpoint=checkpoint)
        _check_kind(model, self.model_name, checkpoint)
        return model

    def __reduce__(self) -> tuple[Any, ...]:
        return _builder, (self.model_name,)

    def __repr__(self) -> str:
        return f"<segany builder {self.__name__}>"


@cache  # one builder per name, so sam_model_registry["vit_b"] is build_sam_vit_b, as in the reference
def _builder(name: str) -> Builder:
    return _Builder(name)


def _check_kind(model: Sam, name: str, checkpoint: str | os.PathLike[str] | None) -> None:
    """``sam_model_registry["vit_b"](checkpoint=f)`` must give a ViT-B model, as the reference's strict load
    ensures. A segany file carries its own config, which ``build_sam`` follows (the CLI relies on that); here
    the name was asked for explicitly, so an encoder of another architecture is refused: another kind
    (TinyViT for ViT), or the same kind built otherwise (segany_tiny's 512 px TinyViT for ``vit_t``, whose
    weights the reference could not load strictly either). Fine-tuned weights of the named model pass."""
    wanted_cfg = get_config(name).encoder
    got_cfg = model.cfg.encoder
    if got_cfg == wanted_cfg:
        return
    wanted, got = type(wanted_cfg), type(got_cfg)
    same = [m for m in list_models() if get_config(m).encoder == got_cfg]
    hint = f"sam_model_registry[{same[0]!r}]" if same else "segany.build_sam(path)"
    if got is not wanted:
        what = f"a {got.__name__.removesuffix('Config')} model, not {name!r} ({wanted.__name__.removesuffix('Config')})"
    else:
        diff = [f"{f} {getattr(got_cfg, f)!r} (not {getattr(wanted_cfg, f)!r})" for f in got.__dataclass_fields__
                if getattr(got_cfg, f) != getattr(wanted_cfg, f)]
        what = f"a {got.__name__.removesuffix('Config')} encoder built unlike {name!r}'s: {', '.join(diff)}"
    raise CheckpointError(f"checkpoint {str(checkpoint)!r} holds {what}: use {hint}, which reads the variant "
                          "from the file")


# The reference's keys, first and in its order; segany's other registered variants follow, sorted.
_REFERENCE_KEYS = ("default", "vit_h", "vit_l", "vit_b")
_MISSING: Any = object()


class _Registry(dict[str, Builder]):
    """Model names to builders: a ``dict``, as ``segment_anything.sam_model_registry`` is.

    Its entries are the reference's (``default``, ``vit_h``, ``vit_l``, ``vit_b``, in that order), then
    segany's other registered variants. They follow the live registry: every read first brings the dict
    up to date, so variants registered later appear too (the entries are filled on first use, which keeps
    importing this module free of loading every variant). As with the reference's dict, users may add
    their own builders (``sam_model_registry["mine"] = fn`` or ``.update(...)``); those take priority over
    a registered name of the same spelling and are the only entries that can be deleted. To make a
    variant known to the whole library (CLI, ``create_model``), register it with ``segany.registry``.

    Why a ``dict`` subclass that overrides every method: code written for the reference checks
    ``isinstance(..., dict)``, and ``dict``'s own C methods read the stored entries directly, so each
    read path must sync them first; writes change only the user's builders and mark the entries stale.
    """

    def __init__(self) -> None:
        super().__init__()
        self._user: dict[str, Builder] = {}
        self._synced: tuple[str, ...] | None = None  # list_models() when the entries were last rebuilt

    # ------------------------------------------------------------- syncing with segany.registry
    def _sync(self) -> None:
        names = tuple(list_models())
        if names == self._synced:
            return
        registered = [n for n in _REFERENCE_KEYS if n == "default" or n in names]
        registered += [n for n in names if n not in registered]
        entries = {n: self._user[n] if n in self._user else _builder("vit_h" if n == "default" else n)
                   for n in registered}
        entries.update((n, b) for n, b in self._user.items() if n not in entries)
        dict.clear(self)
        dict.update(self, entries)
        self._synced = names

    # ------------------------------------------------------------------------------- reads
    def __getitem__(self, name: str) -> Builder:
        self._sync()
        try:
            return dict.__getitem__(self, name)
        except KeyError:
            if not isinstance(name, str):
                raise
        get_model_info(name)  # raises with suggestions for unknown names
        return _builder(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        self._sync()
        return dict.get(self, name, default)

    def __contains__(self, name: object) -> bool:
        self._sync()
        return dict.__contains__(self, name)

    def __iter__(self) -> Iterator[str]:
        self._sync()
        return dict.__iter__(self)

    def __reversed__(self) -> Iterator[str]:
        self._sync()
        return dict.__reversed__(self)

    def __len__(self) -> int:
        self._sync()
        return dict.__len__(self)

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        self._sync()
        return dict.keys(self)

    def values(self) -> ValuesView[Builder]:  # type: ignore[override]
        self._sync()
        return dict.values(self)

    def items(self) -> ItemsView[str, Builder]:  # type: ignore[override]
        self._sync()
        return dict.items(self)

    def copy(self) -> dict[str, Builder]:
        """A plain ``dict`` snapshot of the entries (as ``copy()`` of the reference's dict gives)."""
        self._sync()
        return dict(dict.items(self))

    __copy__ = copy

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Builder]:
        return copy.deepcopy(self.copy(), memo)

    def __reduce__(self) -> tuple[Any, ...]:
        # A new registry with the user's builders (re-added through __setitem__); the registered names are
        # read live again where it loads. dict's default would replay every entry before _user exists.
        return _Registry, (), None, None, iter(self._user.items())

    def __repr__(self) -> str:
        self._sync()
        return dict.__repr__(self)

    def __eq__(self, other: object) -> bool:
        self._sync()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        self._sync()
        return dict.__ne__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> Any:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**self.copy(), **other}

    def __ror__(self, other: Any) -> Any:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**other, **self.copy()}

    # ------------------------------------------------------------------------------ writes
    def __setitem__(self, name: str, builder: Builder) -> None:
        if not isinstance(name, str):
            raise InputError(f"sam_model_registry keys are model names (str), got {type(name).__name__}")
        if not callable(builder):
            raise InputError(f"sam_model_registry[{name!r}] must be a builder function (checkpoint=None) -> Sam, "
                            f"got {type(builder).__name__}")
        self._user[name] = builder
        self._synced = None  # rebuilt on the next read: a registered name keeps its place, a new one goes last

    def __delitem__(self, name: str) -> None:
        if name not in self._user:
            raise UnknownModelError(f"{name!r} is not a builder added to sam_model_registry; registered models cannot "
                           "be removed, only builders assigned with sam_model_registry[name] = fn")
        del self._user[name]
        self._synced = None  # rebuilt on the next read: a registered builder it shadowed comes back, in its place

    # MutableMapping's versions go through __setitem__ (and __getitem__), so they validate as it does.
    update = MutableMapping.update  # type: ignore[assignment]
    setdefault = MutableMapping.setdefault  # type: ignore[assignment]

    def __ior__(self, other: Any) -> _Registry:
        self.update(other)
        return self

    def pop(self, name: str, default: Any = _MISSING) -> Any:  # type: ignore[override]
        if name in self._user:
            builder = self._user[name]
            del self[name]
            return builder
        if default is not _MISSING and name not in self:
            return default
        del self[name]  # raises: a registered model, or an unknown name
        raise AssertionError("unreachable")  # pragma: no cover

    def popitem(self) -> tuple[str, Builder]:
        """Remove and return the builder added last; registered models cannot be removed."""
        if not self._user:
            raise UnknownModelError("sam_model_registry has no added builders to remove; registered models cannot "
                                    "be removed, only builders assigned with sam_model_registry[name] = fn")
        name = next(reversed(self._user))
        return name, self.pop(name)

    def clear(self) -> None:
        """Remove the user-added builders; registered models stay."""
        self._user.clear()
        self._synced = None


sam_model_registry = _Registry()
build_sam_vit_h = _builder("vit_h")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_b = _builder("vit_b")
build_sam_vit_t = _builder("vit_t")
build_sam_default = build_sam_vit_h
