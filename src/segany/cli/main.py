"""``segany`` entry point: builds the argument parser from subcommand modules and runs one.

Subcommand modules are found, not listed: every public module of :mod:`segany.cli` that defines
``add_parser(subparsers)`` is plugged in (see the package docstring). A module whose import fails
(e.g. an extra is not installed) still shows up, and running it prints the import error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import re
import sys
import traceback
from types import ModuleType
from typing import Any, NoReturn

from segany import __version__
from segany.atomic import NO_SPACE
from segany.errors import SeganyError, one_line

# Shown first in `segany --help`; the rest follow alphabetically.
_FIRST = ("predict", "models", "download")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other segany error."""

    def error(self, message: str) -> NoReturn:
        m = re.match(r"argument (--[\w-]+)(?:/[^:]*)?: expected one argument", message)
        if m and _negative_value_follows(m.group(1)):
            # argparse reads "--point -5,3" as two options; a value starting with "-" needs the = form
            message += f" (a value starting with '-' needs '=': {m.group(1)}=-5,3)"
        self.exit(2, f"segany: error: {message} (see `{self.prog} --help`)\n")


def _negative_value_follows(option: str) -> bool:
    argv = sys.argv[1:] if _ARGV is None else _ARGV
    return any(a == option and b[:1] == "-" and (b[1:2].isdigit() or b[1:2] == ".")
               for a, b in zip(argv, argv[1:], strict=False))


_ARGV: list[str] | None = None  # the arguments main() parses, for the hint above


def _subcommand_modules() -> list[str]:
    import segany.cli as package

    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_") and m.name != "main"]
    return sorted(names, key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n))


def _broken(subparsers: Any, name: str, exc: BaseException) -> None:
    def run(args: argparse.Namespace) -> int:
        raise SeganyError(f"`segany {name}` is unavailable: {exc}")

    p = subparsers.add_parser(name, help=f"(unavailable: {exc})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segany", description="Promptable image segmentation (Segment Anything, reimplemented).")
    parser.add_argument("--version", action="version", version=f"segany {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in _subcommand_modules():
        try:
            module: ModuleType = importlib.import_module(f"segany.cli.{name}")
        except ImportError as exc:
            _broken(subparsers, name, exc)
            continue
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Accepted anywhere (`segany predict ... --debug` too), so it is taken out before parsing.
    debug = "--debug" in args_list
    args_list = [a for a in args_list if a != "--debug"]
    global _ARGV
    _ARGV = args_list
    try:
        parser = build_parser()
        args = parser.parse_args(args_list)
        _refuse_empty_paths(args)
        return int(args.func(args) or 0)
    except SeganyError as exc:
        if debug:
            traceback.print_exc()
        print(f"segany: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)  # segany auto's SIGTERM/SIGHUP (cli.auto.Terminated)
        print(f"segany: stopped by {exc}" if signum else "segany: interrupted", file=sys.stderr)
        return 128 + signum if signum else 130
    except BrokenPipeError:  # the reader went away (`segany ... --json | head`): stop quietly, as Unix tools do
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, what a tool killed by the signal reports
    except OSError as exc:  # the file system refused (a file where a folder goes, permissions, disk full)
        if debug:
            traceback.print_exc()
        if exc.errno in NO_SPACE:
            target = f"could not write {exc.filename}" if exc.filename else "a write failed"
            # Only segany.atomic's writes (the target's name, the temp file removed) may promise that.
            clean = "; nothing partial was left" if getattr(exc, "partial_removed", False) else ""
            print(f"segany: error: {NO_SPACE[exc.errno]}: {target}{clean}. Free space on that disk (or write to "
                  "another one) and run the command again", file=sys.stderr)
            return 1
        where = f": {exc.filename!r}" if exc.filename else ""
        print(f"segany: error: {exc.strerror or one_line(exc)}{where}; check the path and its permissions",
              file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not a user error: say so and how to see more
        if debug:
            traceback.print_exc()
            return 1
        print(f"segany: unexpected error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


# Output options of every subcommand. An empty value is Path("") == ".", which silently writes into the
# current folder: refused here once, for commands present and future, before any of them runs.
_OUTPUT_OPTIONS = ("out", "out_dir", "output", "export")


def _refuse_empty_paths(args: argparse.Namespace) -> None:
    from segany.errors import InputError

    for dest in _OUTPUT_OPTIONS:
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            flag = "--" + dest.replace("_", "-")
            raise InputError(f"{flag} is empty; pass a path (e.g. {flag} out), or . for the current folder")


if __name__ == "__main__":
    sys.exit(main())
