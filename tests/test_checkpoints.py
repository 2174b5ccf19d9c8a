"""Checkpoint reading, strict loading, self-describing saves and the download cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config

from segany import registry
from segany.checkpoints import (
    SEGANY_FORMAT,
    build_sam,
    cached_path,
    download,
    find_weights,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    weights_home,
)
from segany.errors import CheckpointError, DownloadError
from segany.modeling.sam import Sam
from segany.registry import ModelInfo, WeightsInfo, get_config


@pytest.fixture
def tiny_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """The tiny test config under a registered name, for this test only."""
    registry._ensure_loaded()
    monkeypatch.setitem(registry._MODELS, "test_tiny", ModelInfo("test_tiny", tiny_config, None, "test"))
    return "test_tiny"


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def vit_t_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout MobileSAM file (plain state dict, like mobile_sam.pt)."""
    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam.pt"
    torch.save(randomize_(Sam(get_config("vit_t")), seed=2).state_dict(), path)
    return path


# ------------------------------------------------------------------ reading and loading
def test_official_pth_layout(tmp_path: Path, tiny_sam: Sam, tiny_name: str) -> None:
    path = tmp_path / "sam_official.pth"
    torch.save(tiny_sam.state_dict(), path)  # official SAM files are a bare state dict
    _assert_same_weights(build_sam(tiny_name, checkpoint=path), tiny_sam)


def test_official_vit_t_file_loads_strictly(vit_t_file: Path) -> None:
    model = build_sam("vit_t", checkpoint=vit_t_file)
    assert not model.training
    ref = torch.load(vit_t_file, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("wrap", ["module_prefix", "state_dict_key", "model_key", "lightning", "lightning_ddp",
                                  "compiled", "ddp_hf"])
def test_wrapped_state_dicts(tmp_path: Path, tiny_sam: Sam, tiny_name: str, wrap: str,
                             caplog: pytest.LogCaptureFixture) -> None:
    from segany.hf_layout import to_hf

    sd = tiny_sam.state_dict()
    blob: dict = {
        "module_prefix": _prefixed(sd, "module."),  # saved from a DDP-wrapped model
        "state_dict_key": {"state_dict": sd, "epoch": 3},
        "model_key": {"model": sd},
        # A Lightning module holding SAM as self.model, with a loss buffer beside it (which is not the model's)
        "lightning": {"state_dict": {**_prefixed(sd, "model."), "loss_fn.pos_weight": torch.ones(1)}, "epoch": 3,
                      "global_step": 70, "pytorch-lightning_version": "2.4.0"},
        "lightning_ddp": {"state_dict": _prefixed(sd, "model.module.")},
        "compiled": _prefixed(sd, "_orig_mod."),  # torch.compile(model).state_dict()
        "ddp_hf": _prefixed(to_hf(sd), "module."),  # was not recognised as Hugging Face's layout under the prefix
    }[wrap]
    path = tmp_path / "wrapped.pth"
    torch.save(blob, path)
    with caplog.at_level("INFO", logger="segany.checkpoints"):
        _assert_same_weights(build_sam(tiny_name, checkpoint=path), tiny_sam)
    if wrap == "lightning":  # what was stripped and left out is said, not silent
        assert "keys under 'model.'" in caplog.text and "leaving out 1 other entries (first: loss_fn.pos_weight)" \
            in caplog.text


@pytest.mark.parametrize(("layout", "fragments"), [
    ("unknown_prefix", ["the model's keys sit under 'sam.'", "strips by itself only when it is made of module., "
                        "model., _orig_mod.", "sd = {k.removeprefix('sam.'): v for k, v in sd.items() if "
                        "k.startswith('sam.')}"]),
    ("model_and_ema", ["under several prefixes ('model.' and 'ema_model.'", "which one to load is unclear",
                       "k.removeprefix('model.')"]),
    ("model_and_copy", ["besides the model's own keys the file holds model weights under 'ema.'",
                        "sd = {k: v for k, v in sd.items() if not k.startswith('ema.')}"]),
])
def test_ambiguous_or_unknown_prefixes_are_named_with_the_fix(tmp_path: Path, tiny_sam: Sam, tiny_name: str,
                                                              layout: str, fragments: list[str]) -> None:
    """Only a chain of known wrappers holding one model is stripped; otherwise the error names the prefixes
    found and how to strip them (it gave no hint, and "may be truncated" for one of them)."""
    sd = tiny_sam.state_dict()
    blob = {"unknown_prefix": _prefixed(sd, "sam."),
            "model_and_ema": {"state_dict": {**_prefixed(sd, "model."), **_prefixed(sd, "ema_model.")}},
            "model_and_copy": {**sd, **_prefixed(sd, "ema.")}}[layout]
    path = tmp_path / "wrapped.pth"
    torch.save(blob, path)
    with pytest.raises(CheckpointError) as info:
        build_sam(tiny_name, checkpoint=path)
    for fragment in fragments:
        assert fragment in str(info.value) and fragment in info.value.cli_message(), str(info.value)


def test_segany_checkpoint_describes_itself(tmp_path: Path, tiny_sam: Sam) -> None:
    path = save_checkpoint(tiny_sam, tmp_path / "sub" / "tiny.pt", meta={"step": 7})
    sd, cfg, meta = read_checkpoint(path)
    assert cfg == tiny_config() and meta == {"step": 7}
    assert torch.load(path, weights_only=True)["format"] == SEGANY_FORMAT
    # The embedded config wins over the name, so any registered name (here the default) builds it.
    for name in ("vit_b", "vit_h"):
        _assert_same_weights(build_sam(name, checkpoint=path), tiny_sam)
    assert [p.name for p in path.parent.iterdir()] == ["tiny.pt"], "temp files left behind"


def test_half_checkpoint_loads_into_fp32(tmp_path: Path, tiny_sam: Sam) -> None:
    path = save_checkpoint(tiny_sam, tmp_path / "half.pt", half=True)
    model = build_sam("vit_b", checkpoint=path)
    w = model.mask_decoder.iou_token.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, tiny_sam.mask_decoder.iou_token.weight, atol=1e-3, rtol=1e-3)


def test_wrong_checkpoint_names_probable_variant(vit_t_file: Path) -> None:
    """The fix fits the caller: a Python call for the API (it has no --model), the flag on the command line."""
    from segany import sam_model_registry
    from segany.errors import one_line

    with pytest.raises(CheckpointError) as info:
        build_sam("vit_b", checkpoint=vit_t_file)
    msg = str(info.value)
    assert "does not fit model 'vit_b'" in msg
    assert "missing keys (first: image_encoder.pos_embed" in msg
    assert "unexpected keys" in msg
    assert f"looks like a 'vit_t' checkpoint: build that model, e.g. build_sam('vit_t', checkpoint={str(vit_t_file)!r})" \
        in msg and "sam_model_registry['vit_t']" in msg
    assert "--model" not in msg and "\n" not in msg  # was "use --model vit_t" for Python callers too
    assert info.value.looks_like == "vit_t"  # structured, for callers that word the fix their own way
    assert info.value.cli_message().endswith("looks like a 'vit_t' checkpoint: use --model vit_t")
    with pytest.raises(CheckpointError, match=r"build_sam\('vit_t'"):
        sam_model_registry["vit_b"](checkpoint=vit_t_file)
    line = one_line(info.value)  # what `segany: error:` prints (tests/bad_inputs runs the whole command)
    assert "use --model vit_t" in line and "build_sam" not in line, line


def test_missing_keys_say_truncated(tmp_path: Path, tiny_sam: Sam, tiny_name: str) -> None:
    sd = tiny_sam.state_dict()
    partial = {k: v for i, (k, v) in enumerate(sd.items()) if i < len(sd) - 10}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(CheckpointError, match="10 missing keys .*may be truncated or partial"):
        build_sam(tiny_name, checkpoint=path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_never_loads_partially(tmp_path: Path, tiny_sam: Sam, tiny_name: str, suffix: str) -> None:
    full = tmp_path / f"full{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tiny_sam.state_dict().items()}, str(full))
    else:
        torch.save(tiny_sam.state_dict(), full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    target = Sam(tiny_config())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(target, cut, tiny_name)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items()), "partial load happened"
    with pytest.raises(CheckpointError, match="truncated"):
        build_sam(tiny_name, checkpoint=cut)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\xff\xd8\xff\xe0 this is a jpeg, not weights", "not a readable PyTorch checkpoint"),
        (b"", "not a readable PyTorch checkpoint"),
    ],
)
def test_non_checkpoint_bytes(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        build_sam("vit_b", checkpoint=path)


def test_non_state_dict_objects(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save({"weights": "nope"}, tmp_path / "dict.pth")
    with pytest.raises(CheckpointError, match="entry 'weights' is not a tensor"):
        read_checkpoint(tmp_path / "dict.pth")


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        build_sam("vit_b", checkpoint=tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="folder without .safetensors"):
        read_checkpoint(tmp_path)


# ------------------------------------------------------------------ download cache
@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _register(monkeypatch: pytest.MonkeyPatch, **fields: object) -> WeightsInfo:
    registry._ensure_loaded()
    info = WeightsInfo(**{"name": "test_weights", "model": "vit_t", "filename": "test_weights.pt", **fields})
    monkeypatch.setitem(registry._WEIGHTS, info.name, info)
    return info


def test_download_from_file_url(home: Path, vit_t_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = vit_t_file.read_bytes()
    info = _register(monkeypatch, url=vit_t_file.as_uri(), size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert weights_home() == home and find_weights(info.name) is None
    seen: list[tuple[int, int | None]] = []
    path = download(info.name, progress=lambda done, total: seen.append((done, total)))
    assert path == cached_path(info) == home / "weights" / "test_weights.pt"
    assert path.read_bytes() == data
    assert seen and seen[-1] == (len(data), len(data))
    assert find_weights(info.name) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_weights.pt"]
    # Present and valid: no second fetch (a now-dead URL proves it), --force fetches again.
    monkeypatch.setitem(registry._WEIGHTS, info.name, WeightsInfo(**{**info.__dict__, "url": "file:///gone"}))
    assert download(info.name) == path
    with pytest.raises(DownloadError):
        download(info.name, force=True)
    assert path.read_bytes() == data, "a failed forced download must keep the good file"
    build_sam("vit_t", checkpoint=path)


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_download_rejects_bad_checksum(home: Path, vit_t_file: Path, monkeypatch: pytest.MonkeyPatch,
                                       bad: str) -> None:
    data = vit_t_file.read_bytes()
    fields = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    fields[bad] = "0" * 64 if bad == "sha256" else len(data) + 1
    info = _register(monkeypatch, url=vit_t_file.as_uri(), **fields)
    with pytest.raises(DownloadError, match="sha256 check" if bad == "sha256" else "transfer was cut off or the file"):
        download(info.name)
    cache = home / "weights"
    assert not cache.exists() or list(cache.iterdir()) == [], "nothing may be left in the cache"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/sam.pth", "file:///nonexistent/segany/sam.pth"])
def test_download_offline_says_where_to_put_the_file(home: Path, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    info = _register(monkeypatch, url=url)
    with pytest.raises(DownloadError) as exc:
        download(info.name, timeout=5)
    msg = str(exc.value)
    assert "If this machine is offline" in msg
    assert str(home / "weights" / "test_weights.pt") in msg
    assert "checkpoint=PATH" in msg and "--checkpoint" not in msg  # the Python caller's fix, not the flag
    assert exc.value.cli_message().endswith("(or pass its path with --checkpoint)")
    assert not (home / "weights").exists() or list((home / "weights").iterdir()) == []


def test_default_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGANY_HOME", raising=False)
    assert weights_home() == Path.home() / ".cache" / "segany"


def test_registered_weights_are_consistent() -> None:
    for name in registry.list_weights():
        info = registry.get_weights_info(name)
        if info.layout == "openai_clip":  # CLIP text encoders name a CLIP spec, not a SAM variant
            from segany.text.clip import list_clip_models

            assert info.model in list_clip_models(), f"weights {name} name unknown CLIP model {info.model}"
        else:
            assert info.model in registry.list_models(), f"weights {name} name unknown model {info.model}"
        assert info.filename
        if info.url:  # no URL: shipped inside the package (segany_tiny)
            assert info.url.startswith("https://"), name
            assert info.sha256 or info.md5 or info.size or info.layout == "mobile_sam", name


def test_weights_without_url(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = _register(monkeypatch, url="")
    with pytest.raises(DownloadError, match="no download URL; put the file at .*test_weights.pt"):
        download(info.name)


def test_training_state_loads_as_a_checkpoint(tmp_path: Path) -> None:
    """`segany train`'s last.pt (model + optimizer + config) is accepted wherever weights are, e.g. `segany
    predict --checkpoint run/last.pt`; it used to be refused as "not a model state dict"."""
    from segany.checkpoints import TRAIN_STATE_FORMAT, build_sam
    from segany.train.trainer import STATE_FORMAT

    assert TRAIN_STATE_FORMAT == STATE_FORMAT
    model = randomize_(Sam(tiny_config()), seed=5).eval()
    opt = torch.optim.AdamW(model.parameters())
    state = {"format": STATE_FORMAT, "step": 7, "elapsed": 1.0, "progress": 0.1, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "rng": {}, "config": {"run": {}}, "model_config": model.cfg.to_dict()}
    torch.save(state, tmp_path / "last.pt")
    loaded = build_sam(str(tmp_path / "last.pt"))
    assert loaded.cfg == model.cfg
    _assert_same_weights(loaded, model)


def test_bundled_checkpoint_and_registry_kind_check(tmp_path: Path) -> None:
    """checkpoint="bundled" gives segany_tiny's shipped weights (without it: random, as in segment_anything);
    a model without shipped weights says which have them; sam_model_registry["vit_b"] refuses a TinyViT file
    (it used to return the TinyViT model silently)."""
    from segany import sam_model_registry
    from segany.checkpoints import build_sam, find_weights

    shipped = build_sam("segany_tiny", checkpoint="bundled")
    _assert_same_weights(shipped, build_sam("segany_tiny", checkpoint=find_weights("segany_tiny")))
    with pytest.raises(CheckpointError, match="no weights shipped.*models that have: .*segany_tiny"):
        build_sam("vit_b", checkpoint="bundled")
    tiny = tmp_path / "tiny.pt"
    save_checkpoint(shipped, tiny)
    with pytest.raises(CheckpointError, match=r"holds a TinyViT model, not 'vit_b'.*sam_model_registry\['segany_tiny'\]"):
        sam_model_registry["vit_b"](checkpoint=tiny)
    # Same kind, other build: segany_tiny's 512 px TinyViT is not MobileSAM's vit_t (the reference's strict
    # load refuses those weights too), and the message names what differs.
    with pytest.raises(CheckpointError, match=r"TinyViT encoder built unlike 'vit_t''s: img_size 512 \(not 1024\).*"
                                              r"sam_model_registry\['segany_tiny'\]"):
        sam_model_registry["vit_t"](checkpoint=tiny)
    assert sam_model_registry["segany_tiny"](checkpoint=tiny).cfg == shipped.cfg
    # Weights of the named model itself, trained further, still load under its name.
    from segany.modeling.sam import Sam
    from segany.registry import get_config

    vit_t = tmp_path / "vit_t.pt"
    save_checkpoint(Sam(get_config("vit_t")), vit_t)
    assert sam_model_registry["vit_t"](checkpoint=vit_t).cfg.encoder == get_config("vit_t").encoder


def test_run_folder_as_checkpoint_names_the_file_to_pass(tmp_path: Path) -> None:
    """`--checkpoint RUN_DIR` names the run's weights file instead of a bare "pass the file itself"."""
    from segany.checkpoints import read_checkpoint

    (tmp_path / "model_fp16.pt").write_bytes(b"x")
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"a `segany train` run: pass '.*model_fp16\.pt'"):
        read_checkpoint(tmp_path)


def test_loading_weights_leaves_dynamo_unloaded() -> None:
    """The meta-device shell that checks a checkpoint, and every registered model's shell, build without
    torch's Python decompositions: on meta tensors ``normal_`` and out-of-place scalar ops import
    torch._dynamo, which cost every ``segany predict`` 1.4 s. The mask generator's NMS runs without importing
    torchvision, whose package imports torch._dynamo too (2.5 s for every ``segany auto``)."""
    import subprocess
    import sys

    probe = ("import sys, torch\n"
             "from segany.checkpoints import build_sam\n"
             "from segany.modeling.sam import Sam\n"
             "from segany.registry import get_config, list_models\n"
             "build_sam('segany_tiny', checkpoint='bundled')\n"
             "for name in list_models():\n"
             "    with torch.device('meta'):\n"
             "        Sam(get_config(name))\n"
             "import segany.amg.generator\n"
             "from segany.amg.nms import single_class_nms\n"
             "keep = single_class_nms(torch.tensor([[0., 0, 4, 4], [0, 0, 4, 5], [9, 9, 12, 12]]),\n"
             "                        torch.tensor([0.9, 0.8, 0.7]), 0.5)\n"
             "assert keep.tolist() == [0, 2], keep\n"
             "print('torch._dynamo' in sys.modules, 'torchvision' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"], r.stdout


def test_seeded_init_is_unchanged_by_the_meta_safe_constructors() -> None:
    """``layers.embedding`` and the in-place prompt-encoder scale draw the same numbers as ``nn.Embedding`` and
    ``scale * randn``, so a seeded model from scratch is the one it always was."""
    from segany.modeling.layers import embedding

    torch.manual_seed(5)
    a = torch.nn.Embedding(4, 16).weight.detach().clone()
    after_a = torch.rand(3)
    torch.manual_seed(5)
    b = embedding(4, 16).weight.detach()
    after_b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(after_a, after_b)
    with torch.device("meta"):
        assert embedding(2, 8).weight.device.type == "meta"


# ----------------------------------------------------------------------------- audit 4: weights
@pytest.mark.parametrize("body", [b"<html>rate limited</html>", "half"])
def test_an_unhashed_download_must_be_a_torch_file_and_a_damaged_cache_is_fetched_again(
        home: Path, vit_t_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: object) -> None:
    """MobileSAM's entry has no size or hash: an error page or a cut-off file was cached as its weights, and
    `segany download` then kept it (no hash to check it against)."""
    data = vit_t_file.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2] if body == "half" else body)  # type: ignore[arg-type]
    info = _register(monkeypatch, url=bad.as_uri())
    with pytest.raises(DownloadError, match=f"the download of {info.name} from .* is not a PyTorch checkpoint"):
        download(info.name)
    assert not (home / "weights").exists() or list((home / "weights").iterdir()) == []
    cached = cached_path(info)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(bad.read_bytes())  # as an older segany left it
    monkeypatch.setitem(registry._WEIGHTS, info.name, WeightsInfo(**{**info.__dict__, "url": vit_t_file.as_uri()}))
    assert download(info.name) == cached and cached.read_bytes() == data  # fetched again, not kept


class _Scripted:
    """A local HTTP server answering each GET by the next step of a script: ("cut", n) sends a 200 promising the
    whole file and stops after n bytes; ("range", start, n) a 206 of n bytes from ``start`` (whatever was asked);
    ("fail",) a 503; ("whole",) a plain 200. The Range and If-Range headers asked are kept in ``asked``."""

    def __init__(self, data: bytes, script: list[tuple], etag: str | None = None) -> None:
        import http.server
        import threading

        self.asked: list[tuple[str | None, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.asked.append((self.headers.get("Range"), self.headers.get("If-Range")))
                step = script[min(len(outer.asked), len(script)) - 1]
                if step[0] == "fail":
                    self.send_error(503)
                    return
                if step[0] == "range":
                    start, n = step[1], step[2]
                    body = data[start: start + n]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(body)))
                else:
                    body = data if step[0] == "whole" else data[: step[1]]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                if etag:
                    self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/w.pt"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_cut_transfer_is_continued_where_it_stopped(home: Path, vit_t_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A transfer cut short was thrown away: a 2.5 GB ViT-H cut at 95 % started again from byte 0. The bytes
    # received are kept: the same call asks for the rest (an HTTP Range request), and a later call does too.
    data = vit_t_file.read_bytes()
    k = len(data) // 3
    server = _Scripted(data, [("cut", k), ("fail",), ("range", k, len(data))], etag='"v1"')
    info = _register(monkeypatch, url=server.url, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        with pytest.raises(DownloadError, match=rf"the {k} bytes received are kept, and `segany download "
                                                r"test_weights` continues from them"):
            download(info.name, timeout=10)
        part = home / "weights" / ".test_weights.pt.part"
        assert part.stat().st_size == k and find_weights(info.name) is None
        path = download(info.name, timeout=10)
    finally:
        server.close()
    assert server.asked == [(None, None), (f"bytes={k}-", '"v1"'), (f"bytes={k}-", '"v1"')]
    assert path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_weights.pt"]  # part and its validator gone


@pytest.mark.parametrize("answer", ["wrong start", "short ranges"])
def test_a_ranged_answer_is_used_only_where_it_continues_the_part(home: Path, vit_t_file: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   answer: str) -> None:
    # A 206 was appended whatever its Content-Range said: a range from byte 0 doubled the file, and a short one
    # passed for the whole rest. Both ended in a failed check that threw every byte away.
    data = vit_t_file.read_bytes()
    k = len(data) // 3
    script = ([("cut", k), ("range", 0, len(data)), ("whole",)] if answer == "wrong start"
              else [("cut", k), ("range", k, 1000), ("range", k + 1000, len(data))])
    server = _Scripted(data, script)
    info = _register(monkeypatch, url=server.url, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        path = download(info.name, timeout=10)
    finally:
        server.close()
    assert path.read_bytes() == data
    if answer == "short ranges":
        assert [a[0] for a in server.asked] == [None, f"bytes={k}-", f"bytes={k + 1000}-"]


def test_a_server_that_cuts_whole_answers_is_asked_twice_not_64_times(home: Path, vit_t_file: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that ignores Range and cuts every answer short was asked for the whole file again and again.
    data = vit_t_file.read_bytes()
    k = len(data) // 3
    server = _Scripted(data, [("cut", k)])
    info = _register(monkeypatch, url=server.url, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        with pytest.raises(DownloadError, match=rf"stopped after {k} of {len(data)} bytes"):
            download(info.name, timeout=10)
    finally:
        server.close()
    assert len(server.asked) == 2


def test_a_file_without_size_or_hash_is_continued_only_with_a_validator(home: Path, vit_t_file: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # MobileSAM's entry has no size or hash, and its URL follows a branch: a part joined to another version's
    # end would pass the only check it has (a PyTorch zip). Without an ETag it is fetched whole again.
    data = vit_t_file.read_bytes()
    server = _Scripted(data, [("cut", len(data) // 3), ("fail",), ("whole",)])
    info = _register(monkeypatch, url=server.url)
    try:
        with pytest.raises(DownloadError):
            download(info.name, timeout=10)
        path = download(info.name, timeout=10)
    finally:
        server.close()
    assert [a[0] for a in server.asked] == [None, f"bytes={len(data) // 3}-", None]
    assert path.read_bytes() == data


def test_a_server_without_ranges_sends_the_whole_file_again(home: Path, vit_t_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = vit_t_file.read_bytes()
    info = _register(monkeypatch, url=vit_t_file.as_uri(), size=len(data), sha256=hashlib.sha256(data).hexdigest())
    part = home / "weights" / ".test_weights.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk from another attempt")  # file:// ignores Range: the answer is the whole file
    assert download(info.name).read_bytes() == data and not part.exists()


def test_a_download_in_progress_is_not_joined_by_a_second_one(home: Path, vit_t_file: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl
    import os

    info = _register(monkeypatch, url=vit_t_file.as_uri())
    part = home / "weights" / ".test_weights.pt.part"
    part.parent.mkdir(parents=True)
    fd = os.open(part, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the other process's download holds it
        with pytest.raises(DownloadError, match=r"another `segany download test_weights` is writing .*\.part"):
            download(info.name)
    finally:
        os.close(fd)


def test_a_killed_downloads_temporary_file_is_swept_up(home: Path, vit_t_file: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import time

    info = _register(monkeypatch, url=vit_t_file.as_uri())
    folder = home / "weights"
    folder.mkdir(parents=True)
    stale, live = folder / ".test_weights.pt.k1ll3d.tmp", folder / ".test_weights.pt.4ct1v3.tmp"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    download(info.name)
    assert not stale.exists() and live.exists()  # a download idle for an hour was killed; one just written lives


def test_an_empty_segany_home_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGANY_HOME", "")
    assert weights_home() == Path.home() / ".cache" / "segany"


def test_build_sam_of_a_missing_path_is_a_file_not_found_error(tmp_path: Path) -> None:
    """It said "unknown model '/…/sam_vit_b_01ec64.pth'" (a KeyError); the reference raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_sam(str(tmp_path / "sam_vit_b_01ec64.pth"))
    with pytest.raises(FileNotFoundError):
        build_sam("weights/sam.pth")


def test_a_sharded_folder_loads_every_shard(tmp_path: Path, tiny_sam: Sam) -> None:
    """Only the first shard was read: a fraction of the keys, and an error about missing keys."""
    import json

    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny_sam.state_dict().items()}
    keys = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in parts.items() for k in ks}}))
    got, _, _ = read_checkpoint(tmp_path)
    assert sorted(got) == keys and all(torch.equal(got[k], sd[k]) for k in keys)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="sharded checkpoint but lacks model-00002-of-00002.safetensors"):
        read_checkpoint(tmp_path)


def test_checks_of_one_config_share_one_meta_shell_and_still_catch_a_bad_file(
        tmp_path: Path, tiny_sam: Sam, tiny_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from segany import checkpoints

    checkpoints._shapes.cache_clear()  # another test may have checked this config already
    built: list[str] = []
    real_init = Sam.__init__

    def counting_init(self: Sam, *args: object, **kwargs: object) -> None:
        built.append(str(torch.get_default_device()))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Sam, "__init__", counting_init)
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save(tiny_sam.state_dict(), good)
    torch.save({k: v for k, v in list(tiny_sam.state_dict().items())[:-3]}, bad)
    for _ in range(3):
        checkpoints.read_checked(tiny_name, good)
    assert built == ["meta"], built  # one shell for three checks of the same config
    with pytest.raises(CheckpointError, match="3 missing keys"):  # the kept shell still finds a bad file
        checkpoints.read_checked(tiny_name, bad)


def test_a_file_of_another_variant_is_a_runtime_error_as_in_the_reference(vit_t_file: Path) -> None:
    # Code written for segment_anything guesses the variant by trying vit_h, vit_l, vit_b under
    # `except RuntimeError` (load_state_dict's error); a bare SeganyError stopped it at the first try.
    from segany import sam_model_registry

    found = None
    for name in ("vit_h", "vit_l", "vit_b", "vit_t"):
        try:
            found = sam_model_registry[name](checkpoint=str(vit_t_file))
            break
        except RuntimeError as exc:
            assert isinstance(exc, CheckpointError) and "vit_t" in str(exc)
    assert found is not None and name == "vit_t"


def test_a_reference_model_given_to_the_predictor_says_how_to_build_segany_s(tiny_sam: Sam) -> None:
    from segment_anything.modeling import Sam as RefSam

    from segany import SamPredictor
    from segany.errors import InputError

    ref = RefSam.__new__(RefSam)  # the attributes a half-ported script's model lacks are what matters
    torch.nn.Module.__init__(ref)
    with pytest.raises(InputError, match=r"needs a segany model, got segment_anything.*sam_model_registry"):
        SamPredictor(ref)
    assert SamPredictor(tiny_sam).model is tiny_sam


# ------------------------------------------------------------------ weights review (stop 34)
def test_build_sam_takes_none_and_a_path_as_the_reference_does(vit_t_file: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    # build_sam(None) and build_sam(Path(...)) crashed with AttributeError ('NoneType'/'PosixPath' has no .lower).
    import segany.checkpoints as ck

    built = build_sam(vit_t_file.parent / vit_t_file.name)  # a Path: the checkpoint, as the reference's first arg
    assert built.cfg == get_config("vit_t")
    real = ck.get_config
    monkeypatch.setattr(ck, "get_config", lambda name: tiny_config() if name == "vit_h" else real(name))
    assert build_sam(None).cfg == tiny_config()  # the reference's build_sam(checkpoint=None): a random ViT-H


def test_a_config_this_segany_cannot_read_is_a_checkpoint_error(tmp_path: Path) -> None:
    # A newer segany's extra config field was "unexpected error: TypeError: ViTConfig.__init__() got ...".
    path = save_checkpoint(randomize_(Sam(tiny_config()), seed=1), tmp_path / "tiny.pt")
    raw = torch.load(path, weights_only=True)
    raw["config"]["encoder"]["new_field"] = 1
    torch.save(raw, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="embeds a model config this segany cannot read .*newer segany"):
        read_checkpoint(tmp_path / "newer.pt")
    del raw["model"]
    raw["config"]["encoder"].pop("new_field")
    torch.save(raw, tmp_path / "no_model.pt")
    with pytest.raises(CheckpointError, match="without its 'model' weights"):
        read_checkpoint(tmp_path / "no_model.pt")


def test_a_folder_loads_its_model_file_not_the_optimizers(tmp_path: Path, vit_t_file: Path) -> None:
    # An Accelerate state folder: optimizer.bin came first by name and was read as the model.
    folder = tmp_path / "state"
    folder.mkdir()
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.bin")
    (folder / "pytorch_model.bin").write_bytes(vit_t_file.read_bytes())
    assert read_checkpoint(folder)[0].keys() == read_checkpoint(vit_t_file)[0].keys()
    (folder / "pytorch_model.bin").rename(folder / "weights.bin")
    with pytest.raises(CheckpointError, match=r"holds several weight files \(optimizer.bin, weights.bin\)"):
        read_checkpoint(folder)


def test_a_pickle_that_would_run_code_is_named_so(tmp_path: Path) -> None:
    import os

    class Runs:
        def __reduce__(self) -> tuple:
            return (os.system, ("true",))

    torch.save({"w": torch.zeros(1), "x": Runs()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors"):
        read_checkpoint(tmp_path / "evil.pt")


def test_a_connection_cut_mid_chunk_is_a_download_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # http.client.IncompleteRead is no OSError: it escaped as "unexpected error: IncompleteRead".
    import http.client
    import io
    import urllib.request

    class Cut(io.BytesIO):
        headers: dict = {"Content-Length": "4096"}

        def read(self, n: int = -1) -> bytes:
            raise http.client.IncompleteRead(b"PK", 4094)

    info = _register(monkeypatch, url="https://example.invalid/w.pt")
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout=None: Cut())
    with pytest.raises(DownloadError, match="could not download test_weights .*If this machine is offline"):
        download(info.name)
    assert not (home / "weights").exists() or list((home / "weights").iterdir()) == []
