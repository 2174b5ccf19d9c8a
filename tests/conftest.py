"""Shared fixtures: tiny seeded models (ours and, for parity, the reference) and real sample images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from segany.modeling.config import SamConfig, ViTConfig
from segany.modeling.sam import Sam

REPO = Path(__file__).resolve().parents[1]
# CI lays ../shared/data beside the repo; SEGANY_SHARED_DATA points a clone elsewhere at the same datasets.
SHARED_DATA = Path(os.environ.get("SEGANY_SHARED_DATA") or REPO.parent / "shared" / "data")
SAMPLE_IMAGE = REPO / "src" / "segany" / "assets" / "sample.jpg"
# The command line's --precision auto picks bf16 on CPUs with native bf16 (segany.fast.cpu_has_native_bf16).
# Tests expect the exact fp32 default whatever CPU runs them (and pass it on to the CLI subprocesses they
# start); tests of the bf16 choice set this themselves.
os.environ["SEGANY_CPU_BF16"] = "0"


def tiny_config(img_size: int = 256) -> SamConfig:
    """Depth-2 ViT at 256 px: runs in well under a second on 2 CPU cores."""
    return SamConfig(encoder=ViTConfig(img_size=img_size, depth=2, embed_dim=96, num_heads=3,
                                       global_attn_indexes=(1,), window_size=8))


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Fill every float parameter and buffer with seeded noise, so untrained parts are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * scale
                if name.endswith(("running_var",)):
                    noise = noise.abs() + 1.0
                t.copy_(noise)
    return model


@pytest.fixture
def tiny_sam() -> Sam:
    return randomize_(Sam(tiny_config())).eval()


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    from segany.data.images import load_image

    return load_image(SAMPLE_IMAGE)


def cli_fails(argv: list[str], capsys: pytest.CaptureFixture[str], fragment: str, code: int = 1) -> str:
    """Run ``segany argv`` in-process; assert it fails with ``code`` and one ``segany: error:`` line holding
    ``fragment``, and return that line. Usage errors (exit 2) leave through argparse's SystemExit."""
    from segany.cli.main import main

    try:
        got = main(argv)
    except SystemExit as exc:
        got = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code, err
    assert len(err) == 1, err
    assert err[0].startswith("segany: error: ") and fragment in err[0], err[0]
    return err[0]


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of exported browser decoders for the session. Exports are filed under a hash of the weights
    (``ModelService.version_name``), so tests serving the same seeded model share them instead of each page
    load exporting its decoder again (~3 s each on 2 cores)."""
    return tmp_path_factory.mktemp("onnx-shared")
