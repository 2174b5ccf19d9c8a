#!/usr/bin/env bash
# Issue 10 at GPU scale: train segany_tiny (TinyViT, 512 px) with a class head on coco128-seg + PennFudan
# from a pack, then evaluate on the held-out images (per-class mask AP of "segment every <class>" and label
# accuracy of automatic masks). Fits a 10-minute device call: MINUTES of training (default 5) + ~1 min eval.
# Writes to $OUT: model.pt (self-describing checkpoint, embeds class names), metrics.json, log.jsonl,
# train_labels_log.txt.
#
#   device run: command "bash scripts/gpu_train_labels.sh", carry ["out/packed"], timeout_s 600
#
# Env: PACK (out/packed), OUT (out/gpu_labels), MINUTES (5), INIT (class-agnostic segany_tiny weights to
# start from, e.g. the file scripts/gpu_train.sh makes; default: from scratch), CLIP (a CLIP name such as
# clip_vit_b32 to add the text token; needs open_clip and the weights in $SEGANY_CLIP_WEIGHTS or the cache),
# BATCH (16), PYTHON (python3). pycocotools is needed for the AP figures (skipped with a note without it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACK=${PACK:-out/packed}
OUT=${OUT:-out/gpu_labels}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -f "$PACK/manifest.json.gz" ] || { echo "no pack at $PACK: run scripts/pack_data.py here and carry it"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
args=(--pack "$PACK" --arch segany_tiny --minutes "${MINUTES:-5}" --batch-size "${BATCH:-16}" --max-masks 16
      --lr 4e-4 --workers 6 --points-per-side 16 --out "$OUT")
[ -n "${INIT:-}" ] && args+=(--init "$INIT")
[ -n "${CLIP:-}" ] && args+=(--clip "$CLIP")
$PY scripts/train_labels.py "${args[@]}" 2>&1 | tee "$OUT/train_labels_log.txt"
exit "${PIPESTATUS[0]}"
