"""``--precision auto`` on CPUs: bf16 where the CPU multiplies bf16 natively, exact fp32 elsewhere and in eval."""

from __future__ import annotations

import argparse

import pytest

from segany.cli._util import add_speed_arguments, predictor_options
from segany.errors import InputError
from segany.fast import cpu_has_native_bf16

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"


def test_detection_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGANY_CPU_BF16", raising=False)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS) and cpu_has_native_bf16(ZEN4)
    assert not cpu_has_native_bf16(SKYLAKE)  # AVX-512 alone converts bf16 in software: slower than fp32
    assert not cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd\n")  # no x86 flags line
    assert not cpu_has_native_bf16("")
    assert isinstance(cpu_has_native_bf16(), bool)  # this machine's own /proc/cpuinfo parses


def test_environment_overrides_the_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGANY_CPU_BF16", "0")
    assert not cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    monkeypatch.setenv("SEGANY_CPU_BF16", "1")
    assert cpu_has_native_bf16(SKYLAKE)
    monkeypatch.setenv("SEGANY_CPU_BF16", "maybe")
    with pytest.raises(InputError, match="SEGANY_CPU_BF16='maybe'.*set it to 1"):
        cpu_has_native_bf16(SKYLAKE)


def _args(*argv: str, cpu_bf16_auto: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_speed_arguments(parser, cpu_bf16_auto=cpu_bf16_auto)
    return parser.parse_args(list(argv))


def test_auto_becomes_bf16_on_a_native_bf16_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGANY_CPU_BF16", "1")
    assert predictor_options(_args(), "cpu")["precision"] == "bf16"
    assert predictor_options(_args("--precision", "fp32"), "cpu")["precision"] == "fp32"  # asked for: kept
    assert predictor_options(_args(), "cuda")["precision"] == "auto"  # the predictor's own choice (bf16)
    # eval measures the exact model on any CPU, so its figures do not depend on the machine
    eval_args = _args(cpu_bf16_auto=False)
    assert predictor_options(eval_args, "cpu", cpu_bf16_auto=False)["precision"] == "auto"
    # the 8-bit GEMMs need bf16, which auto now is on this CPU
    assert predictor_options(_args("--quantize", "int8"), "cpu")["quantize"] == "int8"
    monkeypatch.setenv("SEGANY_CPU_BF16", "0")
    assert predictor_options(_args(), "cpu")["precision"] == "auto"
    with pytest.raises(InputError, match="--precision bf16"):
        predictor_options(_args("--quantize", "int8"), "cpu")


def test_auto_on_a_cpu_without_native_bf16_takes_the_folded_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 there, with FastMaskDecoder (equal to rounding; 1.6-1.9x per click on an AVX2 EPYC); an explicit
    --precision fp32, eval, bf16 CPUs and CUDA keep their own decoders."""
    monkeypatch.setenv("SEGANY_CPU_BF16", "0")
    assert predictor_options(_args(), "cpu") == {"precision": "auto", "quantize": None, "compile": False,
                                                  "fast_decoder": True}
    assert "fast_decoder" not in predictor_options(_args("--precision", "fp32"), "cpu")
    assert "fast_decoder" not in predictor_options(_args(cpu_bf16_auto=False), "cpu", cpu_bf16_auto=False)
    assert "fast_decoder" not in predictor_options(_args(), "cuda")
    monkeypatch.setenv("SEGANY_CPU_BF16", "1")
    assert "fast_decoder" not in predictor_options(_args(), "cpu")
