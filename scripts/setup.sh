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
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (from the local wheel store)" >&2
  $VPIP install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
fi
EXTRAS=${SEGANY_EXTRAS:-dev,train,server,onnx}
echo "[setup] installing segany[$EXTRAS]" >&2
$VPIP install -q -e ".[$EXTRAS]" torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import segany, torch; print('[setup] segany', segany.__version__, 'torch', torch.__version__)" >&2
