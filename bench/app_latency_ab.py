"""A/B click → mask latency of the annotation app: two versions side by side in one Chromium, clicks alternating.

On a shared or busy machine absolute latencies drift with the load by more than the effect of a change, so
this starts two ``segany serve`` processes, each importing segany from its own source tree (``--a`` and
``--b``, e.g. an unpacked ``git archive`` of the previous commit and the working tree), opens both apps in
one headless Chromium and clicks the same points on both pages in turn (A, B, then B, A, ...), one click at
a time. Both versions then see the same load; the paired ratio (B's click over A's click at the same
step) is the robust figure. A latency is the app's ``window.segany.decodeMs`` entry, as in
``bench/app_latency.py``; ``run``/``upscale``/``draw`` are its ``window.segany.timings`` parts when the
version records them.

Usage::

    git archive HEAD~3 src | tar -x -C /tmp/before && cp -r src/segany/server/static/vendor /tmp/before/src/segany/server/static/
    python bench/app_latency_ab.py --a /tmp/before/src --b src --json bench/results/app_latency/ab.json
    python bench/app_latency_ab.py --a src@1 --b src@2      # one vs two onnxruntime-web threads
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import app_latency as base  # noqa: E402  (the single-version benchmark: points, browser flags, helpers)

IMAGE = "coco_000000000025.jpg"


def _variant(spec: str) -> tuple[Path, int | None]:
    src, _, threads = spec.partition("@")
    path = Path(src).resolve()
    if not (path / "segany" / "__init__.py").exists():
        raise SystemExit(f"{src!r} is not a source tree holding segany/ (pass the folder above the package)")
    if not (path / "segany" / "server" / "static" / "vendor" / "ort").exists():
        raise SystemExit(f"{src}: onnxruntime-web is not vendored there (copy src/segany/server/static/vendor)")
    return path, int(threads) if threads else None


def _cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "segany.cli", *args], check=True, capture_output=True, text=True,
                          env=env).stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="source tree of version A (the folder holding segany/), @N for N threads")
    p.add_argument("--b", required=True, help="source tree of version B, @N for N threads")
    p.add_argument("--model", default="segany_tiny")
    p.add_argument("--random-vit-b", action="store_true", help="serve a random-weights vit_b (64x64 embedding)")
    p.add_argument("--clicks", type=int, default=40, help="clicks per version (the first is left out of the stats)")
    p.add_argument("--clicks-per-object", type=int, default=5)
    p.add_argument("--json", default=None, help="write the summary and every click here")
    p.add_argument("--keep", action="store_true", help="keep the temporary projects and server logs")
    args = p.parse_args(argv)
    variants = {"A": _variant(args.a), "B": _variant(args.b)}
    tmp = Path(tempfile.mkdtemp(prefix="segany_app_ab_"))
    model_args = ["--model", args.model]
    if args.random_vit_b:
        model_args = ["--model", "vit_b", "--checkpoint", str(base.save_random_vit_b(tmp / "vit_b.pt", seed=0))]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        servers: dict[str, tuple[str, str]] = {}
        for name, (src, _) in variants.items():
            env = {**os.environ, "PYTHONPATH": str(src)}
            proj = tmp / name
            _cli(env, "project", "create", str(proj), "--samples", "--stage", "manual")
            token = _cli(env, "project", "add-annotator", str(proj), "bench").strip().splitlines()[-1]
            port = base.free_port()
            log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 (open for the server's lifetime)
            procs.append(subprocess.Popen([sys.executable, "-m", "segany.cli", "serve", str(proj), "--host", "127.0.0.1",
                                           "--port", str(port), *model_args, "--device", "cpu"],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
            servers[name] = (f"http://127.0.0.1:{port}", token)
        for url, _ in servers.values():
            deadline = time.monotonic() + 300
            while True:
                try:
                    urllib.request.urlopen(url + "/", timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"server at {url} did not answer; logs in {tmp}") from None
                    time.sleep(0.3)
        clicks, info = _measure(servers, variants, args)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if not args.keep:  # on failure the folder stays: the error names it for its server logs
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, Any] = {"a": args.a, "b": args.b, "model": "vit_b random" if args.random_vit_b else args.model,
                               "image": IMAGE, "load_avg_end": [round(x, 2) for x in os.getloadavg()], **info}
    for name, rows in clicks.items():
        steady = rows[1:]
        ms = [r["ms"] for r in steady]
        part = {k: round(statistics.median(r[k] for r in steady), 2) for k in ("run", "upscale", "draw")
                if all(k in r for r in steady)}
        summary[name] = {"first_ms": round(rows[0]["ms"], 2), "median_ms": round(statistics.median(ms), 2),
                         "p90_ms": round(base.percentile(ms, 90), 2), **{f"{k}_median_ms": v for k, v in part.items()}}
    ratios = sorted(b["ms"] / a["ms"] for a, b in zip(clicks["A"][1:], clicks["B"][1:], strict=True))
    summary["paired_ratio_b_over_a_median"] = round(statistics.median(ratios), 3)
    print(json.dumps(summary, indent=1))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = out.with_suffix(".tmp")
        tmp_json.write_text(json.dumps({"summary": summary, "clicks": clicks}, indent=1) + "\n")
        os.replace(tmp_json, out)
    return 0


def _measure(servers: dict[str, tuple[str, str]], variants: dict[str, tuple[Path, int | None]],
             args: argparse.Namespace) -> tuple[dict[str, list[dict[str, float]]], dict[str, Any]]:
    from playwright.sync_api import sync_playwright

    info: dict[str, Any] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=base.CHROMIUM, args=base.FLAGS, headless=True)
        pages = {}
        for name, (url, token) in servers.items():
            req = urllib.request.Request(f"{url}/api/images", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                ids = {im["file_name"]: im["id"] for im in json.load(r)}
            threads = variants[name][1]
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{url}/?image={ids[IMAGE]}" + (f"&threads={threads}" if threads else "") + f"#token={token}")
            page.wait_for_function("document.getElementById('status').dataset.ready === '1' && "
                                   "document.body.dataset.decoder && window.segany.emb !== null", timeout=600_000)
            if page.evaluate("document.body.dataset.decoder") != "onnx":
                raise SystemExit(f"version {name}: the in-browser decoder did not load")
            info[f"decoder_{name}"] = page.evaluate("document.getElementById('decoder-mode').textContent")
            pages[name] = page
        info["chromium"] = browser.version
        points = base.POINTS_FXY[IMAGE]
        clicks: dict[str, list[dict[str, float]]] = {name: [] for name in pages}
        for n in range(args.clicks):
            for name in (list(pages) if n % 2 == 0 else list(pages)[::-1]):
                page = pages[name]
                if args.clicks_per_object and n and n % args.clicks_per_object == 0:
                    page.keyboard.press("Escape")
                    page.wait_for_function("window.segany.points.length === 0")
                box = page.locator("#view").bounding_box()
                fx, fy = points[n % len(points)]
                page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
                page.wait_for_function(f"window.segany.decodeMs.length === {n + 1}", timeout=60_000)
                rec = page.evaluate("({ms: window.segany.decodeMs.at(-1), t: window.segany.timings})")
                clicks[name].append({"ms": rec["ms"], **{k: v for k, v in rec["t"].items()
                                                         if k in ("run", "upscale", "draw")}})
                time.sleep(0.1)
        browser.close()
    return clicks, info


if __name__ == "__main__":
    sys.exit(main())
