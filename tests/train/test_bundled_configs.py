"""The configs ship inside the package, so the README's fine-tune recipe works from a wheel: ``segany train
--config segany_tiny_cpu_finetune`` (a bare name) finds the bundled copy of ``configs/``; the copies must stay
byte-identical to ``configs/`` (the one place they are edited). Also: ``recipe.loss_size`` is bounded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, cli_fails

from segany.errors import InputError
from segany.train.config import load_config

TOP = REPO / "configs"


def test_packaged_configs_are_the_repos_configs() -> None:
    from segany.train.config import bundled_configs

    shipped = bundled_configs()
    assert sorted(shipped) == sorted(p.stem for p in TOP.glob("*.yaml"))
    for name, res in shipped.items():
        assert res.read_bytes() == (TOP / f"{name}.yaml").read_bytes(), (
            f"src/segany/configs/{name}.yaml differs from configs/{name}.yaml: copy configs/ over it")
    # Without it the wheel ships none of them (tomllib is Python 3.11+: read the one setting as text).
    package_data = re.search(r"\[tool\.setuptools\.package-data\]\s*segany\s*=\s*\[([^\]]*)\]",
                             (REPO / "pyproject.toml").read_text())
    assert package_data and '"configs/*.yaml"' in package_data.group(1)


def test_a_bare_name_is_a_bundled_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here, as after `pip install segany`
    assert load_config("segany_tiny_cpu_finetune") == load_config(TOP / "segany_tiny_cpu_finetune.yaml")
    missing = tmp_path / "no_pack"
    # The config loaded (its model.checkpoint is bundled); the run then stops at the first check of the data.
    for argv in (["--config", "segany_tiny_cpu_finetune"], ["segany_tiny_cpu_finetune"]):
        cli_fails(["train", *argv, "-o", f"data.pack={missing}", "-o", "run.out_dir=r"], capsys,
                  f"data.pack {str(missing)!r} does not exist")
    line = cli_fails(["train", "--config", "segany_tiny_cpu_finetun"], capsys, "did you mean 'segany_tiny_cpu_finetune'")
    assert "segany_tiny, segany_tiny_cpu_finetune, tiny_cpu" in line
    # The README's path outside a checkout names the bare name that works.
    cli_fails(["train", "configs/segany_tiny_cpu_finetune.yaml"], capsys, "pass the bare name 'segany_tiny_cpu_finetune'")
    cli_fails(["train", "tiny_cpu", "--config", "segany_tiny"], capsys, "two configs given")
    assert not (tmp_path / "r").exists()


def test_a_runs_config_json_loads_as_a_config(tmp_path: Path) -> None:
    """config.json also records the run's provenance: a record, not a setting, so the file still loads."""
    cfg = load_config(TOP / "tiny_cpu.yaml")
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "provenance": {"init_sha256": None}}))
    assert load_config(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("value", [1_000_000, 4097, 8, 1])
def test_loss_size_is_bounded(value: int) -> None:
    with pytest.raises(InputError, match=r"recipe.loss_size must be 0 \(the model's img_size\) or in \[16, 4096\]"):
        load_config(None, [f"recipe.loss_size={value}"])


@pytest.mark.parametrize("value", [0, 16, 256, 4096])
def test_loss_size_in_range_is_kept(value: int) -> None:
    assert load_config(None, [f"recipe.loss_size={value}"]).recipe.loss_size == value
