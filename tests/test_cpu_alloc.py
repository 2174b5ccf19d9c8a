"""The glibc allocator tuning of CPU fast paths: what it changes, and when it stays out of the way."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from segany import cpu_alloc

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning applies to glibc only")

# glibc adapts its mmap threshold to the blocks a process has freed, so whether a given pattern faults
# depends on the interpreter's history. The script first pins glibc's starting threshold (128 KiB, fixed),
# where every block below is mapped afresh and faulted in each round; tuning must then make them reused.
CHURN = """
import ctypes, resource, sys, torch
from segany import cpu_alloc
ctypes.CDLL("libc.so.6").mallopt(cpu_alloc.M_MMAP_THRESHOLD, 128 << 10)
tuned = cpu_alloc.tune_cpu_allocator()
def churn():
    for _ in range(10):
        ts = [torch.ones(1 << 21) for _ in range(3)]  # three 8 MiB blocks
        del ts
churn()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _run(**env: str) -> tuple[str, int]:
    base = {k: v for k, v in os.environ.items() if k not in ("SEGANY_MALLOC_TUNING", *cpu_alloc._USER_SETTINGS)}
    out = subprocess.run([sys.executable, "-c", CHURN], env={**base, **env}, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_tuning_stops_freed_buffers_from_faulting_back_in():
    tuned, faults = _run()
    untuned, faults_default = _run(SEGANY_MALLOC_TUNING="0")
    assert (tuned, untuned) == ("True", "False")
    assert faults_default > 10_000  # 2,048 pages a block with glibc's defaults
    assert faults < 200


@glibc_only
def test_users_own_malloc_settings_are_left_alone():
    tuned, faults = _run(MALLOC_TRIM_THRESHOLD_="131072")
    assert tuned == "False" and faults > 10_000


def test_cpu_fast_path_applies_it(monkeypatch, tiny_sam):
    from segany.fast import FastPath

    calls = []
    monkeypatch.setattr(cpu_alloc, "tune_cpu_allocator", lambda: calls.append(1) or True)
    FastPath(tiny_sam, precision="fp32", fast_decoder=True)
    assert calls == [1]
