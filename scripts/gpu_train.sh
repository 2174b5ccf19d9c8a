#!/usr/bin/env bash
# Train segany_tiny from scratch on one GPU for a fixed wall-clock budget, evaluate it on the held-out
# split beside GrabCut, and write everything a release needs to $OUT (at most 8 files):
#   segany_tiny.pt.part0, .part1, segany_tiny.pt.sha256   fp16 weights in parts of <= 15 MB
#   metrics.json     training summary (steps, images/s, peak memory, GPU) + evaluation (model and GrabCut)
#   train_log.txt    stdout/stderr of training and evaluation;  log.jsonl: per-step training log
#   miou_vs_clicks.png
# Needs only this repo and a pack made here with scripts/pack_data.py (default out/packed, carried).
# Runs with the machine's python3 (torch, numpy, opencv, scipy, matplotlib, pyyaml, tqdm); segany is
# used from src/ without installing; pycocotools is not needed.
#
#   device run: command "bash scripts/gpu_train.sh", carry ["out/packed"], timeout_s 600
#
# Env knobs: MAX_MINUTES (training budget, default 6 so evaluation fits a 10-minute call),
# PACK (default out/packed), OUT (default out/gpu_run), PYTHON (default python3), EVAL_TIMEOUT (s, 150),
# DEVICE (auto), GRABCUT (1: also run the GrabCut baseline; 0: model only), EXTRA (more `-o section.key=value` overrides for training, shell-quoted where a value has spaces:
# EXTRA='-o "data.repeat={bsds: 3, kvasir: 0.5}"'), EVAL_EXTRA (more eval flags, quoted the same way).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACK=${PACK:-out/packed}
OUT=${OUT:-out/gpu_run}
MAX_MINUTES=${MAX_MINUTES:-6}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-200}  # every held-out object (758); the weights ship before it, and a cut eval reruns on a CPU
DEVICE=${DEVICE:-auto}
RUN=${RUN_DIR:-/tmp/segany_tiny_run}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$OUT" "$RUN"
LOG="$OUT/train_log.txt"
t_start=$(date +%s)
eval "extra=(${EXTRA:-})" && eval "eval_extra=(${EVAL_EXTRA:-})" || { echo "EXTRA or EVAL_EXTRA is not valid shell words"; exit 2; }
{
  echo "== $(date -u +%FT%TZ) segany gpu_train: pack=$PACK max_minutes=$MAX_MINUTES"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, cv2, scipy, yaml, matplotlib; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  [ -f "$PACK/manifest.json.gz" ] || { echo "no pack at $PACK: run scripts/pack_data.py here and carry it"; exit 2; }
} 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || exit 2

# 1) train (the budget ends the run; lr decays at fixed fractions of it)
$PY -m segany.cli.train configs/segany_tiny.yaml --max-minutes "$MAX_MINUTES" \
  -o run.out_dir="$RUN" -o data.pack="$PACK" -o run.device="$DEVICE" "${extra[@]}" \
  --export "$RUN/segany_tiny.pt" 2>&1 | tee -a "$LOG"
train_rc=${PIPESTATUS[0]}
cp "$RUN/log.jsonl" "$OUT/log.jsonl" 2>/dev/null
if [ ! -f "$RUN/segany_tiny.pt" ] && [ -f "$RUN/last.pt" ]; then
  echo "training exited with $train_rc; exporting weights from the last checkpoint" | tee -a "$LOG"
  $PY - "$RUN" <<'PYEOF' 2>&1 | tee -a "$LOG"
import sys, torch
from segany.modeling.config import SamConfig
from segany.modeling.sam import Sam
from segany.checkpoints import save_checkpoint
st = torch.load(sys.argv[1] + "/last.pt", map_location="cpu", weights_only=True)
m = Sam(SamConfig.from_dict(st["model_config"])); m.load_state_dict(st["model"])
save_checkpoint(m, sys.argv[1] + "/segany_tiny.pt", meta={"trained_steps": st["step"]}, half=True)
PYEOF
fi
[ -f "$RUN/segany_tiny.pt" ] || { echo "no weights were produced (train rc $train_rc)" | tee -a "$LOG"; exit 1; }

# 2) ship the weights first, so a later failure or timeout still returns them
$PY -c "from segany.bundled import split_file; import sys; print([p.name for p in split_file(sys.argv[1], sys.argv[2])])" \
  "$RUN/segany_tiny.pt" "$OUT" 2>&1 | tee -a "$LOG"

# 3) evaluate on the held-out split (every object, as docs/segany_tiny_eval_all_objects.json), GrabCut from the same boxes beside it
timeout "$EVAL_TIMEOUT" $PY -m segany.cli.eval --model segany_tiny --checkpoint "$RUN/segany_tiny.pt" \
  --data "$PACK" $([ "${GRABCUT:-1}" = 1 ] && echo --grabcut) --workers "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --max-objects-per-image 0 \
  --device "$DEVICE" --out "$RUN/eval" --quiet "${eval_extra[@]}" 2>&1 | tee -a "$LOG"
echo "eval rc ${PIPESTATUS[0]}" | tee -a "$LOG"
cp "$RUN/eval/miou_vs_clicks.png" "$OUT/" 2>/dev/null

# 4) one metrics file: training summary + evaluation
$PY - "$RUN" "$OUT" "$t_start" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, sys, time
run, out, t0 = sys.argv[1], sys.argv[2], float(sys.argv[3])
def read(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
m = {"train": read(os.path.join(run, "summary.json")), "eval": read(os.path.join(run, "eval", "results.json")),
     "config": read(os.path.join(run, "config.json")), "wall_seconds": round(time.time() - t0, 1)}
json.dump(m, open(os.path.join(out, "metrics.json"), "w"), indent=1)
print("metrics written:", os.path.join(out, "metrics.json"), "wall", m["wall_seconds"], "s")
PYEOF
ls -la "$OUT"
