"""`segany export onnx` names the model its graphs are of: a checkpoint embeds its own architecture, so
``--model vit_t`` with a segany_tiny checkpoint exports segany_tiny, and the meta file and a note say so
(as `segany predict` does), where the meta recorded ``"model": null`` without a word."""

from __future__ import annotations

import json
from pathlib import Path

from segany.cli.main import main


def test_export_names_the_model_the_checkpoint_builds(tmp_path: Path, capsys, monkeypatch) -> None:
    import segany.export.onnx as onnx
    from segany.checkpoints import bundled_weights

    # What is checked is the meta file and the note, not tracing (tested in test_export_onnx.py, seconds per
    # graph for a real-size model): the graph writers only leave a file each.
    def fake_graph(model, path, multimask=False):
        Path(path).write_bytes(b"graph")
        return Path(path)

    monkeypatch.setattr(onnx, "export_encoder", fake_graph)
    monkeypatch.setattr(onnx, "export_decoder", fake_graph)
    checkpoint = bundled_weights("segany_tiny")
    assert main(["export", "onnx", "--model", "vit_t", "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "onnx")]) == 0
    err = capsys.readouterr().err
    assert f"{checkpoint} holds segany_tiny, not vit_t: that is what is exported" in err, err
    meta = json.loads((tmp_path / "onnx" / "segany_onnx.json").read_text())
    assert meta["model"] == "segany_tiny"
    assert meta["config"]["encoder"]["img_size"] == 512

    # The name asked for and built: no note.
    assert main(["export", "onnx", "--model", "segany_tiny", "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "onnx2")]) == 0
    assert "holds" not in capsys.readouterr().err
    assert json.loads((tmp_path / "onnx2" / "segany_onnx.json").read_text())["model"] == "segany_tiny"
