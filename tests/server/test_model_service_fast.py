"""The server's model on a fast path: built once and shared by every request, serialised, same masks.

Before, each embedding, click and pre-fill made a new ``SamPredictor``; on CUDA (or with any fast-path
option) that copied and cast the whole encoder per request and threw away the click's CUDA graphs.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import SAMPLE_IMAGE, randomize_, tiny_config

from segany.data.images import load_image
from segany.errors import PromptError
from segany.fast import FastPath
from segany.modeling.sam import Sam
from segany.predictor import SamPredictor
from segany.server.model_service import ModelService, PrefillSettings


@pytest.fixture
def sam() -> Sam:
    return randomize_(Sam(tiny_config()), seed=4, scale=0.5).eval()


def test_fast_path_is_built_once_and_gives_the_predictors_masks(sam, monkeypatch):
    built = []
    real_init = FastPath.__init__

    def counting_init(self, *args, **kwargs):
        built.append(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(FastPath, "__init__", counting_init)
    svc = ModelService("vit_b", sam=sam, device="cpu", predictor_options={"precision": "bf16", "quantize": "int8"})
    emb = svc.embedding(1, str(SAMPLE_IMAGE))
    clicks = [dict(points_xy=[[320, 212]], labels=[1]), dict(box_xyxy=[100, 60, 560, 400]),
              dict(points_xy=[[40, 40], [300, 200]], labels=[0, 1])]
    got = [svc.decode(emb, **c) for c in clicks]
    assert len(built) == 1 and built[0]["quantize"] == "int8", built  # one fast path for the embedding and 3 clicks

    ref = SamPredictor(sam, precision="bf16", quantize="int8")
    ref.set_image(load_image(SAMPLE_IMAGE))
    np.testing.assert_allclose(emb.features.numpy(), ref.features.float().numpy(), atol=1e-6)
    for c, (masks, scores, _) in zip(clicks, got, strict=True):
        pc = np.array(c["points_xy"]) if "points_xy" in c else None
        pl = np.array(c["labels"]) if "labels" in c else None
        box = np.array(c["box_xyxy"]) if "box_xyxy" in c else None
        m, s, _ = ref.predict(pc, pl, box, multimask_output=True)
        np.testing.assert_array_equal(masks, m)
        np.testing.assert_allclose(scores, s, atol=1e-6)


def test_concurrent_clicks_on_the_shared_fast_path_are_not_mixed_up(sam):
    svc = ModelService("vit_b", sam=sam, device="cpu", predictor_options={"precision": "bf16"})
    emb = svc.embedding(1, str(SAMPLE_IMAGE))
    points = [[[40 + 60 * i, 30 + 40 * i]] for i in range(6)]
    expected = [svc.decode(emb, points_xy=p, labels=[1])[0] for p in points]
    results: dict[int, np.ndarray] = {}

    def click(i: int) -> None:
        for _ in range(3):
            results[i] = svc.decode(emb, points_xy=points[i], labels=[1])[0]

    threads = [threading.Thread(target=click, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each click gets its own point's masks. Not bit for bit: alone (8 rounds of 6 concurrent clicks) they are
    # equal, but after the rest of the suite the main thread's and the worker threads' bf16 decodes differ in a
    # few boundary pixels (0.02% and 0.12% of 816,000 in two full runs), far fewer than another point's masks
    # differ (about 1%), which is what a mix-up gives.
    for i in range(6):
        own = float((results[i] != expected[i]).mean())
        others = min(float((results[i] != expected[j]).mean()) for j in range(6) if j != i)
        assert own < 0.005 and own < others / 3, (i, own, others)


def test_default_cpu_service_needs_no_fast_path(sam):
    svc = ModelService("vit_b", sam=sam, device="cpu")
    emb = svc.embedding(1, str(SAMPLE_IMAGE))
    masks, _, _ = svc.decode(emb, points_xy=[[320, 212]], labels=[1])
    assert svc._fast is None and masks.shape == (3, 425, 640)


def _thread_spy(monkeypatch) -> dict[str, set[str]]:
    """Names of the threads FastPath.encode and FastPath.decode ran on."""
    seen: dict[str, set[str]] = {"encode": set(), "decode": set()}
    for name in seen:
        real = getattr(FastPath, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            seen[_name].add(threading.current_thread().name.split("_")[0])
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(FastPath, name, spy)
    return seen


def test_on_cuda_fast_path_work_runs_on_the_services_own_two_threads(sam, monkeypatch):
    # torch keeps compiled CUDA graphs per thread: clicks decoded in whichever request thread served them would
    # record the decoder's graphs (and a memory pool) once per thread. CUDA is simulated: the routing is the same.
    monkeypatch.setattr(ModelService, "_device_threads", lambda self: True, raising=False)
    seen = _thread_spy(monkeypatch)
    svc = ModelService("vit_b", sam=sam, device="cpu", predictor_options={"precision": "bf16"},
                       prefill_settings=PrefillSettings(points_per_side=4, pred_iou_thresh=0.0,
                                                        stability_score_thresh=0.0, min_mask_region_area=0))
    emb = svc.embedding(1, str(SAMPLE_IMAGE))
    got: list[np.ndarray] = []

    def click(i: int) -> None:
        got.append(svc.decode(emb, points_xy=[[40 + 60 * i, 30 + 40 * i]], labels=[1])[0])

    threads = [threading.Thread(target=click, args=(i,), name=f"request-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    click(4)
    assert len(got) == 5 and seen == {"encode": {"segany-embed"}, "decode": {"segany-decode"}}, seen

    seen["encode"].clear()
    seen["decode"].clear()
    records = svc.prefill(load_image(SAMPLE_IMAGE))  # encodes the image: on the embedding worker
    assert records and seen == {"encode": {"segany-embed"}, "decode": {"segany-embed"}}, seen

    with pytest.raises(PromptError, match="lies outside the 640x425"):  # raised by predict on the decode thread
        svc.decode(emb, points_xy=[[5000, 5000]], labels=[1])
    with pytest.raises(PromptError):
        svc.text_proposals(emb, "dog")  # a model without a text path: raised on the decode thread, here


def test_on_cpu_clicks_run_in_the_callers_thread(sam, monkeypatch):
    # No graphs to keep on CPU: a click must not queue behind another service thread.
    seen = _thread_spy(monkeypatch)
    svc = ModelService("vit_b", sam=sam, device="cpu", predictor_options={"precision": "bf16"})
    emb = svc.embedding(1, str(SAMPLE_IMAGE))
    svc.decode(emb, points_xy=[[320, 212]], labels=[1])
    assert seen == {"encode": {"segany-embed"}, "decode": {"MainThread"}}, seen


def test_a_text_prompt_does_not_hold_up_clicks_on_cpu(sam, monkeypatch):
    # The text search ran under the fast path's lock, which it does not use: on a CPU server every person's
    # clicks waited 10-16 s for one person's text prompt.
    import contextlib

    from segany.text import prompting

    svc = ModelService("vit_b", sam=sam, device="cpu", predictor_options={"precision": "bf16"})
    emb = svc.embedding(1, str(SAMPLE_IMAGE))
    inside, release = threading.Event(), threading.Event()

    def slow_text(*args, **kwargs):  # stands in for seconds of text search
        inside.set()
        release.wait(30)
        raise PromptError("nothing matched")

    monkeypatch.setattr(prompting, "predict_text", slow_text)

    def ask() -> None:
        with contextlib.suppress(PromptError):
            svc.text_proposals(emb, "person")

    text = threading.Thread(target=ask)
    text.start()
    clicked = threading.Event()
    try:
        assert inside.wait(10)
        threading.Thread(target=lambda: (svc.decode(emb, points_xy=[[320, 212]], labels=[1]), clicked.set()),
                         daemon=True).start()
        assert clicked.wait(10), "the click waited for the text prompt"
    finally:
        release.set()
        text.join()
    assert svc._fast is not None  # the case of the finding: a fast path, whose lock the click takes


def test_on_cuda_a_text_prompt_still_excludes_the_encoders_graph_capture(sam, monkeypatch):
    # On CUDA no kernel may run while the encoder records its CUDA graphs, which hold the fast path's lock; text
    # prompts keep taking it there (on CPU they leave it to clicks, above). CUDA is simulated.
    from segany.text import prompting

    monkeypatch.setattr(ModelService, "_device_threads", lambda self: True, raising=False)
    svc = ModelService("vit_b", sam=sam, device="cpu", predictor_options={"precision": "bf16"})
    emb = svc.embedding(1, str(SAMPLE_IMAGE))
    held: list[bool] = []

    def spy(*args, **kwargs):
        held.append(svc._fast_lock._is_owned())
        raise PromptError("nothing matched")

    monkeypatch.setattr(prompting, "predict_text", spy)
    with pytest.raises(PromptError):
        svc.text_proposals(emb, "person")
    assert held == [True]
