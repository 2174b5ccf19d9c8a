"""CLIP loading and phrase errors (text audit findings 4, 10, 11): each says what was wrong and the fix that works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import segany.checkpoints
from segany.errors import CheckpointError, DownloadError, InputError
from segany.text import clip as clip_mod
from segany.text.clip import CLIP_WEIGHTS_ENV, TINY_CLIP_CFG, ClipSpec, load_clip


def test_offline_error_names_the_clip_loader_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not build_sam(checkpoint=) (SAM's weights) nor a clip_checkpoint= that exists nowhere."""
    def offline(name: str, **_: object) -> Path:
        try:
            raise OSError("Name or service not known")
        except OSError as exc:
            raise DownloadError(f"could not download {name} ... (or pass its path as build_sam(..., "
                                "checkpoint=PATH))") from exc

    monkeypatch.delenv(CLIP_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(segany.checkpoints, "download", offline)
    with pytest.raises(DownloadError) as got:
        load_clip("clip_vit_l14")
    msg = str(got.value)
    assert "load_clip('clip_vit_l14', checkpoint=PATH)" in msg and f"${CLIP_WEIGHTS_ENV}" in msg, msg
    assert "segany download clip_vit_l14_openai" in msg and "Name or service not known" in msg
    assert "build_sam" not in msg and "clip_checkpoint" not in msg


def test_a_phrase_longer_than_clip_reads_is_refused_not_cut() -> None:
    clip = load_clip("clip_tiny_test")  # context 16: 14 tokens besides start and end
    clip.encode_text(["zebra " * 14])
    with pytest.raises(InputError, match=r"15 CLIP tokens long, but clip_tiny_test reads at most 14"):
        clip.encode_text(["zebra " * 15])
    with pytest.raises(InputError, match="at most 14"):  # few characters, many tokens
        clip.encode_text(["🦓" * 8])


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    """The 64-dim tiny CLIP's weights, as a state dict (what an OpenAI archive also builds from)."""
    path = tmp_path / "tiny_clip.pt"
    torch.save(load_clip("clip_tiny_test").model.state_dict(), path)
    return path


@pytest.mark.parametrize("layout", ["openai", "open_clip"])
def test_weights_of_another_clip_are_refused_naming_both(tiny_file: Path, layout: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """$SEGANY_CLIP_WEIGHTS applies to every CLIP model: a ViT-B/32 file (512-dim) given to clip_vit_l14 (768)
    built a ViT-B/32 and failed at the first prompt with a shape error. Here, a 64-dim file given to a 32-dim
    spec: an OpenAI archive builds whatever it holds, a state dict fails to load; both say which is which."""
    narrow = {**TINY_CLIP_CFG, "embed_dim": 32}
    monkeypatch.setitem(clip_mod._SPECS, "clip_narrow_test",
                        ClipSpec(name="clip_narrow_test", embed_dim=32, model_cfg=narrow, layout=layout))
    monkeypatch.setenv(CLIP_WEIGHTS_ENV, str(tiny_file))
    with pytest.raises(CheckpointError) as got:
        load_clip("clip_narrow_test")
    msg = str(got.value)
    assert str(tiny_file) in msg and "clip_narrow_test" in msg and CLIP_WEIGHTS_ENV in msg, msg
    if layout == "openai":
        assert "64-dim embeddings (as clip_tiny_test), but clip_narrow_test has 32-dim ones" in msg, msg
    monkeypatch.delenv(CLIP_WEIGHTS_ENV)
    with pytest.raises(CheckpointError, match="pass clip_narrow_test's file as checkpoint="):
        load_clip("clip_narrow_test", checkpoint=tiny_file)
    assert load_clip("clip_tiny_test", checkpoint=tiny_file).embed_dim == 64  # the right file still loads
