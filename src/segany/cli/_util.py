"""Helpers shared by CLI subcommands: stderr progress, atomic file writes, prompt parsing, weights lookup."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segany.atomic import atomic_write, atomic_write_bytes  # noqa: F401  (the CLI modules import them from here)
from segany.errors import CheckpointError, InputError


class Progress:
    """Step messages with timings on stderr, so stdout stays clean for results."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"[segany] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, key: str, message: str) -> Iterator[None]:
        if not self.quiet:
            print(f"[segany] {message} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        seconds = time.perf_counter() - start
        self.timings[key] = seconds
        if not self.quiet:
            print(f" {seconds:.2f} s", file=sys.stderr, flush=True)




@contextmanager
def as_flags(flags: dict[str, str]) -> Iterator[None]:
    """Re-raise an :class:`InputError` of a settings class with its field names as the command's flags.

    Settings dataclasses check their own values and name their fields (``points_per_side must be >= 1``); the
    person at the command line typed ``--points-per-side``, which is what they must change. ``flags`` maps a
    field to its flag; a field the message does not name is left alone.
    """
    import re

    try:
        yield
    except InputError as exc:
        text = str(exc)
        for field, flag in flags.items():
            text = re.sub(rf"(?<![\w-]){re.escape(field)}\b", flag, text)
        if text == str(exc):
            raise
        raise InputError(text) from exc


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: the names of a comma-separated option, blanks dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_numbers(text: str, option: str, counts: tuple[int, ...], example: str) -> list[float]:
    """Split ``"1,2,3"`` into floats, checking how many there are."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(v == v and abs(v) != float("inf") for v in values):
        raise InputError(f"{option} {text!r} is not valid; write it as {example}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """``X,Y`` (foreground) or ``X,Y,LABEL`` with LABEL 1 (foreground) or 0 (background)."""
    values = parse_numbers(text, "--point", (2, 3), "X,Y or X,Y,LABEL (LABEL 1 = foreground, 0 = background)")
    label = 1 if len(values) == 2 else values[2]
    if label not in (0, 1):
        raise InputError(f"--point {text!r} has label {label:g}; use 1 (foreground) or 0 (background)")
    return values[0], values[1], int(label)


def parse_box(text: str) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = parse_numbers(text, "--box", (4,), "X0,Y0,X1,Y1 (top-left and bottom-right corners)")
    return x0, y0, x1, y1


def resolve_checkpoint(model: str, checkpoint: str | None) -> Path | None:
    """The weights file to load: ``checkpoint`` if given, else the model's cached download.

    Raises a :class:`CheckpointError` that says how to get the weights when none are available.
    """
    from segany.checkpoints import cached_path, find_weights
    from segany.registry import get_model_info, get_weights_info

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise CheckpointError(f"--checkpoint {str(path)!r} does not exist; check the path")
        return path
    info = get_model_info(model)  # unknown names raise with suggestions
    if not info.weights:
        raise CheckpointError(f"model {model!r} has no published weights; pass --checkpoint PATH")
    try:
        weights = get_weights_info(info.weights)
    except KeyError:
        raise CheckpointError(f"model {model!r} names weights {info.weights!r}, which are not registered yet; "
                              "pass --checkpoint PATH") from None
    found = find_weights(weights.name)
    if found is None and not weights.url:  # shipped in the package: `segany download` has nothing to fetch
        raise CheckpointError(
            f"the weights of {model!r} ({weights.name}) are missing from this installation; they are not "
            f"downloaded but {weights.description}: reinstall segany (pip install --force-reinstall segany), "
            "or pass --checkpoint PATH")
    if found is None:
        raise CheckpointError(
            f"no weights for {model!r} in the cache ({cached_path(weights)}); run `segany download {weights.name}` "
            "or pass --checkpoint PATH"
        )
    return found


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N, mps or auto") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but CUDA is not available here; use --device cpu")
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise InputError(f"--device {device} was asked for but MPS is not available here; use --device cpu")
    return device


# torch.compile's modes (docs/speed.md says what each gained on an H200).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_speed_arguments(p: argparse.ArgumentParser, *, cpu_bf16_auto: bool = True) -> None:
    """``--precision``, ``--quantize``, ``--compile`` and ``--compile-mode``: the predictor's fast-path options
    (docs/speed.md).

    ``cpu_bf16_auto=False`` (eval) keeps ``--precision auto`` exact on every CPU: a measurement should
    not change with the CPU it runs on. Pass the same value to :func:`predictor_options`.
    """
    g = p.add_argument_group("speed (docs/speed.md)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 on CUDA and on CPUs that run bf16 natively (AMX or AVX512-BF16), "
                        "fp32 on other CPUs with the folded mask decoder (equal to the exact one to rounding, "
                        "twice as fast)" + ("" if cpu_bf16_auto else "; here (eval) exact fp32 on every CPU"))
    g.add_argument("--quantize", default=None, choices=["int8", "fp8"],
                   help="8-bit encoder GEMMs, with --precision bf16: faster on recent GPUs, costs some accuracy")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile encoder and decoder: slow first image, faster after (cached on disk)")
    g.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="--compile with this torch.compile mode for the encoder: reduce-overhead replays it as "
                        "CUDA graphs, max-autotune also times GEMM templates (minutes to compile on a big model)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model (default: torch's own, about one per core, or "
                        "OMP_NUM_THREADS); e.g. --threads 1 keeps a core free on a 2-core laptop")


def predictor_options(args: argparse.Namespace, device: str, *, cpu_bf16_auto: bool = True) -> dict[str, Any]:
    """``SamPredictor`` keyword arguments from :func:`add_speed_arguments`'s options, checked before any
    model loads (a combination that cannot run raises :class:`InputError` naming what to pass). Sets torch's
    CPU threads where ``--threads`` was given (:func:`segany.fast.configure_cpu_threads`)."""
    from segany.fast import check_quantize, configure_cpu_threads, machine_auto, resolve_precision

    if getattr(args, "threads", None) is not None:
        configure_cpu_threads(args.threads)

    precision, fast_decoder = machine_auto(args.precision, device) if cpu_bf16_auto else (args.precision, False)
    check_quantize(args.quantize, resolve_precision(precision, device), device)
    compile_mode = getattr(args, "compile_mode", None)
    options = {"precision": precision, "quantize": args.quantize, "compile": compile_mode or bool(args.compile)}
    return {**options, "fast_decoder": True} if fast_decoder else options


def loaded_model_name(config: Any, asked: str, checkpoint: Path | None) -> str:
    """The registered model whose architecture ``config`` is (``asked`` first), else ``custom (FILE)``.

    A checkpoint embeds its own config, so ``--model segany_tiny --checkpoint last.pt`` may load another
    architecture; the outputs must name what ran, and only that model's tuned thresholds fit it.
    """
    from segany.registry import get_config, list_models

    for name in [asked, *list_models()]:
        try:
            if get_config(name) == config:
                return name
        except Exception:  # noqa: BLE001 - an unknown --model only means "not this one"
            continue
    return f"custom ({checkpoint.name if checkpoint else 'random init'})"
