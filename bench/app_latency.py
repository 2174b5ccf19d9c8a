"""Click → mask latency of the annotation app, end to end in a real browser.

Starts a real ``segany serve`` (uvicorn on 127.0.0.1, a free port) on a temporary project holding the
bundled sample images, opens the app in Chromium (Debian's /usr/bin/chromium driven by Playwright; the
Playwright browser download is never used), waits until the image embedding has arrived and the
in-browser ONNX decoder (onnxruntime-web) is ready, then clicks N times, one click at a time, at
different points of the image. Each latency is the app's own ``window.segany.decodeMs`` entry: from the
click handler's decode start to the mask drawn on the canvas (the same figure the browser test records).
``window.segany.timings.run`` after each click is the ONNX ``session.run`` part (the decoder's share).

The first click includes onnxruntime-web's first-run warm-up; median and p90 are over the others.
Clicks are grouped per object: after ``--clicks-per-object`` clicks the prompts are cleared (Escape),
as an annotator moves on to the next object, so a click decodes 1..k points with the previous
low-res mask fed back.

Usage::

    python bench/app_latency.py                       # segany_tiny, its bundled weights (32x32 embedding)
    python bench/app_latency.py --random-vit-b        # random-weights vit_b checkpoint (64x64 embedding)
    python bench/app_latency.py --json out.json --screenshot docs/screenshots/app.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SEGANY_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

# Click positions as fractions of the displayed image: on and around the main object of each sample,
# then over the rest of the image. Cycled when more clicks are asked for.
POINTS_FXY: dict[str, list[tuple[float, float]]] = {
    "coco_000000000034.jpg": [  # zebra grazing
        (0.45, 0.35), (0.30, 0.40), (0.55, 0.45), (0.20, 0.25), (0.62, 0.70),
        (0.40, 0.60), (0.10, 0.35), (0.50, 0.25), (0.35, 0.80), (0.58, 0.55),
        (0.85, 0.30), (0.80, 0.80), (0.70, 0.15), (0.95, 0.55), (0.25, 0.90),
        (0.15, 0.60), (0.48, 0.70), (0.66, 0.40), (0.05, 0.10), (0.90, 0.90)],
    "coco_000000000025.jpg": [  # giraffe by a tree
        (0.73, 0.61), (0.68, 0.45), (0.64, 0.25), (0.78, 0.72), (0.70, 0.80),
        (0.60, 0.45), (0.20, 0.90), (0.15, 0.30), (0.40, 0.35), (0.90, 0.10),
        (0.50, 0.95), (0.85, 0.50), (0.30, 0.60), (0.05, 0.50), (0.95, 0.85),
        (0.55, 0.70), (0.35, 0.10), (0.75, 0.35), (0.25, 0.45), (0.45, 0.55)],
}
# Positive clicks for the screenshot: the object's body, then its other parts.
SCREENSHOT_POINTS = {"coco_000000000034.jpg": [(0.30, 0.40), (0.55, 0.50), (0.62, 0.80)],
                     "coco_000000000025.jpg": [(0.73, 0.61), (0.66, 0.35), (0.70, 0.85)]}
DEFAULT_POINTS = [((i * 0.37) % 0.8 + 0.1, (i * 0.61) % 0.8 + 0.1) for i in range(20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def segany_cmd() -> list[str]:
    """The `segany` console script of this interpreter's environment."""
    exe = Path(sys.executable).parent / "segany"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("segany")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from segany.cli.main import main; sys.exit(main())"]


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait until the 1-minute load average drops below ``max_load``; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    while load >= max_load:
        if time.monotonic() > deadline:
            print(f"WARNING: load average still {load:.2f} >= {max_load} after {max_wait_s:.0f} s; "
                  "measuring anyway (figures may be inflated)", file=sys.stderr)
            return load
        print(f"  load average {load:.2f} >= {max_load}: waiting…", file=sys.stderr)
        time.sleep(15)
        load = os.getloadavg()[0]
    return load


def save_random_vit_b(path: Path, seed: int) -> Path:
    """A vit_b segany checkpoint with random (default-initialised) weights: 1024 px input, 64x64 embedding."""
    import torch

    from segany.checkpoints import build_sam, save_checkpoint

    torch.manual_seed(seed)
    sam = build_sam("vit_b", checkpoint=None).eval()
    return save_checkpoint(sam, path, meta={"note": "random weights for app latency benchmarking"})


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def start_server(cmd: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"segany serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"segany serve did not answer in 180 s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.3)


def measure(base: str, token: str, args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: print(f"[browser {m.type}] {m.text}", file=sys.stderr)
                    if m.type in ("error", "warning") else None)
            req = urllib.request.Request(f"{base}/api/images", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                ids = {im["file_name"]: im["id"] for im in json.load(r)}
            if args.image not in ids:
                raise SystemExit(f"--image {args.image!r} is not in the project; choose one of {sorted(ids)}")
            t_open = time.perf_counter()
            query = f"?image={ids[args.image]}" + (f"&threads={args.threads}" if args.threads else "")
            page.goto(f"{base}/{query}#token={token}")
            page.wait_for_function(
                "document.getElementById('status').dataset.ready === '1' && document.body.dataset.decoder"
                " && window.segany.emb !== null", timeout=600_000)
            ready_s = time.perf_counter() - t_open
            decoder = page.evaluate("document.body.dataset.decoder")
            if decoder != "onnx":
                raise SystemExit("the in-browser ONNX decoder did not load (run scripts/build_web.sh); "
                                 "the server fallback is not what this benchmark measures")
            info = page.evaluate("({emb: window.segany.embShape, W: window.segany.W, H: window.segany.H,"
                                 " mode: document.getElementById('decoder-mode').textContent,"
                                 " ua: navigator.userAgent, isolated: self.crossOriginIsolated})")
            print(f"  app ready in {ready_s:.1f} s (page load + embedding + decoder); embedding {info['emb']}, "
                  f"image {info['W']}x{info['H']}, decoder: {info['mode']}", file=sys.stderr)
            load = wait_for_quiet(args.max_load, args.max_wait)

            box = page.locator("#view").bounding_box()
            points = POINTS_FXY.get(args.image, DEFAULT_POINTS)
            clicks: list[dict[str, Any]] = []
            for n in range(args.clicks):
                if args.clicks_per_object and n and n % args.clicks_per_object == 0:
                    page.keyboard.press("Escape")  # next object: no points, no decode
                    page.wait_for_function("window.segany.points.length === 0")
                fx, fy = points[n % len(points)]
                page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
                # one at a time: a click during a decode would wait for it
                page.wait_for_function(f"window.segany.decodeMs.length === {n + 1}", timeout=60_000)
                rec = page.evaluate("({ms: window.segany.decodeMs.at(-1), run: window.segany.timings.run,"
                                    " draw: window.segany.timings.draw, points: window.segany.points.length})")
                clicks.append({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()})
                time.sleep(args.pause)
            if page.evaluate("window.segany.mask.reduce((a, b) => a + b, 0)") <= 0:
                print("  note: the last mask is empty", file=sys.stderr)

            if args.screenshot:
                page.keyboard.press("Escape")
                page.wait_for_function("window.segany.points.length === 0")
                shot = SCREENSHOT_POINTS.get(args.image, [(0.5, 0.5)])[:args.screenshot_clicks]
                for k, (fx, fy) in enumerate(shot, start=1):
                    page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
                    page.wait_for_function(f"window.segany.decodeMs.length === {args.clicks + k}")
                page.wait_for_timeout(300)
                Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(args.screenshot).with_suffix(".tmp.png")
                page.screenshot(path=str(tmp))
                os.replace(tmp, args.screenshot)
                print(f"  screenshot: {args.screenshot}", file=sys.stderr)
            page.close()
            version = browser.version
        finally:
            browser.close()
    return {"clicks": clicks, "ready_s": round(ready_s, 2), "load_avg_at_start": round(load, 2),
            "embedding_shape": info["emb"], "image_size_wh": [info["W"], info["H"]],
            "decoder": info["mode"], "cross_origin_isolated": info["isolated"], "chromium": version}


def summarize(clicks: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [c["ms"] for c in clicks]
    steady = ms[1:] or ms
    share = [c["run"] / c["ms"] for c in clicks[1:] or clicks if c["ms"] > 0]
    return {"first_ms": round(ms[0], 2), "median_ms": round(statistics.median(steady), 2),
            "p90_ms": round(percentile(steady, 90), 2), "max_ms": round(max(steady), 2),
            "decoder_run_median_ms": round(statistics.median(c["run"] for c in clicks[1:] or clicks), 2),
            "decoder_share_median": round(statistics.median(share), 3),
            "draw_median_ms": round(statistics.median(c["draw"] for c in clicks[1:] or clicks), 2)}


def ort_web_version() -> str | None:
    lock = REPO / "web" / "package-lock.json"
    try:
        return str(json.loads(lock.read_text())["packages"]["node_modules/onnxruntime-web"]["version"])
    except (OSError, KeyError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="segany_tiny", help="registered model served (default segany_tiny, "
                   "with its bundled weights)")
    p.add_argument("--checkpoint", default=None, help="weights file passed to `segany serve --checkpoint`")
    p.add_argument("--random-vit-b", action="store_true",
                   help="save a random-weights vit_b checkpoint (64x64 embedding, as real SAM models) and serve it")
    p.add_argument("--image", default="coco_000000000025.jpg", help="bundled sample to click on (default: the giraffe)")
    p.add_argument("--clicks", type=int, default=20)
    p.add_argument("--clicks-per-object", type=int, default=5, help="clear the prompts after this many clicks "
                   "(0: never)")
    p.add_argument("--pause", type=float, default=0.2, help="seconds between clicks")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-minute load average to drop below this")
    p.add_argument("--max-wait", type=float, default=600, help="longest wait for a quiet machine, seconds")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--screenshot", default=None, help="save a screenshot after one click on the image's object")
    p.add_argument("--screenshot-clicks", type=int, default=1, help="positive clicks on the object before the "
                   "screenshot")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime-web threads (the app's ?threads=N; "
                   "default: the app's choice, half the cores)")
    p.add_argument("--keep", action="store_true", help="keep the temporary project folder")
    args = p.parse_args(argv)
    if args.clicks < 2:
        p.error("--clicks must be at least 2 (the first one includes the decoder's warm-up)")
    if not Path(CHROMIUM).exists():
        p.error(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set SEGANY_CHROMIUM)")
    if not (REPO / "src/segany/server/static/vendor/ort").exists():
        p.error("onnxruntime-web is not vendored: run scripts/build_web.sh (needs npm)")

    tmp = Path(tempfile.mkdtemp(prefix="segany_app_latency_"))
    seg = segany_cmd()
    proc = None
    try:
        proj = tmp / "proj"
        subprocess.run([*seg, "project", "create", str(proj), "--samples", "--stage", "manual"], check=True,
                       stdout=subprocess.DEVNULL)
        token = subprocess.run([*seg, "project", "add-annotator", str(proj), "bench"], check=True,
                               capture_output=True, text=True).stdout.strip().splitlines()[-1]
        model, ckpt = args.model, args.checkpoint
        if args.random_vit_b:
            model = "vit_b"
            ckpt = str(save_random_vit_b(tmp / "vit_b_random.pt", seed=0))
            label = "vit_b, random weights"
        else:
            label = f"{model}, {'checkpoint ' + ckpt if ckpt else 'bundled weights'}"
        port = free_port()
        cmd = [*seg, "serve", str(proj), "--host", "127.0.0.1", "--port", str(port), "--model", model,
               "--device", "cpu"]
        if ckpt:
            cmd += ["--checkpoint", ckpt]
        print(f"model: {label}; starting: {' '.join(cmd[len(seg):])}", file=sys.stderr)
        proc = start_server(cmd, port, tmp / "serve.log")
        result = measure(f"http://127.0.0.1:{port}", token, args)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(result["clicks"])
    out = {"model": label, "image": args.image, **summary, **{k: v for k, v in result.items() if k != "clicks"},
           "onnxruntime_web": ort_web_version(), "cpu_count": os.cpu_count(), "machine": platform.platform(),
           "clicks_per_object": args.clicks_per_object, "clicks": result["clicks"]}
    e = result["embedding_shape"]
    print(f"{label}: embedding {e[2]}x{e[3]}, {len(result['clicks'])} clicks on {args.image}")
    print(f"  click->mask first {summary['first_ms']:.1f} ms, median {summary['median_ms']:.1f} ms, "
          f"p90 {summary['p90_ms']:.1f} ms (max {summary['max_ms']:.1f})")
    print(f"  decoder session.run median {summary['decoder_run_median_ms']:.1f} ms = "
          f"{100 * summary['decoder_share_median']:.0f}% of a click; draw median {summary['draw_median_ms']:.1f} ms")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = path.with_suffix(".tmp")
        tmp_json.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp_json, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
