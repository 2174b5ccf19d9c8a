#!/usr/bin/env bash
# Vendor onnxruntime-web (from npm, pinned by web/package-lock.json) into the package's static folder,
# so the annotation app decodes masks in the browser without any CDN. The copied files are generated
# (about 15 MB, mostly one .wasm) and git-ignored; run this after cloning and before building a wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=src/segany/server/static/vendor/ort
SRC=web/node_modules/onnxruntime-web/dist
FILES=(ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm)
if ! command -v npm >/dev/null 2>&1; then
  echo "[build_web] npm not found: install Node.js (Debian: apt-get install nodejs npm); the app will fall back to server-side decoding" >&2
  exit 1
fi
stamp="$DEST/.lock-sha256"
want=$(sha256sum web/package-lock.json | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$DEST/${FILES[2]}" ]; then
  echo "[build_web] onnxruntime-web already vendored" >&2
  exit 0
fi
if [ ! -d web/node_modules/onnxruntime-web ]; then
  (cd web && (npm ci --no-audit --no-fund --ignore-scripts || npm install --no-audit --no-fund --ignore-scripts)) >&2
fi
mkdir -p "$DEST"
for f in "${FILES[@]}"; do
  cp "$SRC/$f" "$DEST/$f.tmp" && mv "$DEST/$f.tmp" "$DEST/$f"
done
cp web/node_modules/onnxruntime-web/LICENSE "$DEST/LICENSE" 2>/dev/null || true
echo "$want" > "$stamp"
echo "[build_web] vendored onnxruntime-web $(node -p "require('./web/node_modules/onnxruntime-web/package.json').version") into $DEST ($(du -sh "$DEST" | cut -f1))" >&2
