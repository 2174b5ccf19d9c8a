"""Errors raised by segany.

Every error is a :class:`SeganyError` so callers can catch one type; each message says what was
wrong, what was received and how to fix it, because most of them reach a person through the CLI.
"""

from __future__ import annotations


class SeganyError(Exception):
    """Base class of all errors segany raises on purpose.

    Where the fix reads differently in Python than on the command line (``build_sam('vit_t', ...)`` against
    ``--model vit_t``), the message carries the Python one and ``cli`` the whole message as the command
    line words it; the CLI prints :meth:`cli_message`. So each caller is told the fix it can make, and no
    code has to guess its caller from the stack.
    """

    def __init__(self, *args: object, cli: str | None = None) -> None:
        super().__init__(*args)
        self.cli = cli

    def cli_message(self) -> str:
        """The message as the command line prints it (the Python one where both read the same)."""
        return self.cli if self.cli is not None else str(self)


class InputError(SeganyError, ValueError):
    """A user-supplied value (image, prompt, option) is malformed."""


class ImageLoadError(InputError):
    """A file could not be read as an image."""


class PromptError(InputError):
    """Point, box or mask prompts are malformed or inconsistent."""


class StateError(SeganyError, RuntimeError):
    """An API was called in the wrong order (e.g. ``predict`` before ``set_image``)."""


class UnknownModelError(SeganyError, KeyError):
    """A model or weights name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class CheckpointError(SeganyError):
    """A checkpoint file is missing, corrupt, truncated or made for another model."""

    looks_like: str | None = None  # the registered model a file made for another model looks like, if any
    # With ``looks_like``: what is wrong, without the fix, so a caller that names its model some other way
    # (``segany train``'s ``-o model.name=``) words its own fix after it (:meth:`with_cli_fix`).
    diagnosis: str | None = None

    def with_cli_fix(self, fix: str) -> None:
        """Set the command-line message to the diagnosis followed by ``fix``, a flag of the calling command."""
        if self.diagnosis is not None:
            self.cli = f"{self.diagnosis}{fix}"


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist. Also a ``FileNotFoundError``, which is what the reference package
    raises there, so code written for it that catches that still does."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """The checkpoint's keys or shapes do not fit the model. Also a ``RuntimeError``, which is what the reference
    package raises there (from ``load_state_dict``), so code written for it that tries ``vit_h``, ``vit_l`` and
    ``vit_b`` under ``except RuntimeError`` still finds the variant."""


class DownloadError(SeganyError):
    """Weights could not be fetched or failed their checksum."""


class MissingDependencyError(SeganyError, ImportError):
    """An optional dependency is not installed; the message carries the pip command."""


def require(module: str, extra: str) -> object:
    """Import an optional dependency or raise with the install hint for the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module!r} is needed for this feature but is not installed; run: pip install 'segany[{extra}]'"
        ) from exc


def one_line(exc: BaseException) -> str:
    """An error as one line for a person: a segany error's command-line wording (its fix names flags, not Python),
    any other's text, whitespace collapsed; the type's name when it has no text."""
    text = exc.cli_message() if isinstance(exc, SeganyError) else str(exc)
    return " ".join(text.split()) or type(exc).__name__
