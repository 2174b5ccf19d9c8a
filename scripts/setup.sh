#!/usr/bin/env bash
# Create .venv and install segany with every extra the tests use.
# torch comes from this machine's disk (pip is capped at torch 2.14.1 / torchvision 0.29.1 here);
# asking for those exact versions keeps pip from pulling any other CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  # torch 2.14.1 is a CUDA build: the venv grows to about 6.5 GB. Say so up front rather than die in pip's ENOSPC.
  free_kb=$(df -Pk .venv | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((6500 * 1024)) ]; then
    echo "[setup] error: only $((free_kb / 1024)) MB free on the disk holding $(pwd)/.venv; installing torch" \
         "needs about 6500 MB. Free some space (old clones, /tmp) or clone onto a bigger disk, then rerun." >&2
    exit 1
  fi
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (from the local wheel store)" >&2
  $VPIP install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
fi
EXTRAS=${SEGANY_EXTRAS:-dev,train,server,onnx}
echo "[setup] installing segany[$EXTRAS]" >&2
$VPIP install -q -e ".[$EXTRAS]" torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import segany, torch; print('[setup] segany', segany.__version__, 'torch', torch.__version__)" >&2
