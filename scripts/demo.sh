#!/usr/bin/env bash
# The README's main command: set up .venv, then run segany's main jobs on the bundled sample images
# with the built-in segany_tiny model (its weights ship inside the package; nothing is downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
SEGANY_EXTRAS=${SEGANY_EXTRAS:-server} bash scripts/setup.sh
OUT=${OUT:-out/demo}
S=.venv/bin/segany
echo "== 1. a click on the zebra (3 candidate masks, overlay, JSON with scores and COCO RLE)"
$S predict src/segany/assets/sample.jpg --point 250,150 --out "$OUT/predict"
echo "== 2. segment everything in the sample folder (SA-1B JSON per image, overlays, run manifest)"
# segany_tiny was trained for minutes, so its IoU head and logits are far less confident than SAM's:
# SAM's default thresholds (0.88 / 0.95) keep nothing, and `segany auto` gives it its own defaults
# (segany/amg/model_defaults.py): about its top quarter by predicted IoU, stable masks only, holes and
# islands under 800 px cleaned, overlaps above 0.5 merged, 16 points a side.
$S auto src/segany/assets/samples --out "$OUT/auto" --format sa1b --overlay
echo "== done: results in $OUT/"
echo "   the annotation app on the same images:  .venv/bin/segany project create out/demo_project --samples"
echo "                                            .venv/bin/segany project add-annotator out/demo_project you --role admin"
echo "                                            .venv/bin/segany serve out/demo_project   # open the printed URL"
