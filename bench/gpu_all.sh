#!/usr/bin/env bash
# Every GPU benchmark in one call of the device tool (each step time-boxed; a failing step does not stop
# the others). Results go to $OUT/*.json and $OUT/bench_log.txt.
#   device run: command "STEPS=... bash bench/gpu_all.sh", carry [".whl"] (pycocotools + segment_anything wheels)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_bench}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
LOG="$OUT/bench_log.txt"
# STEPS: which steps to run (space-separated names; default all). All of them take ~15 minutes, more than
# one 10-minute device call, so split them, e.g. STEPS="speed_vit_b speed_vit_h amg_vit_h" then the rest.
STEPS=${STEPS:-all}
# Steps run in the order STEPS names them (so the most valuable go first when a call may be cut short);
# with STEPS=all, in the order they are defined below. Each is kept as a quoted command line until then.
declare -A STEP_CMD=()
ORDER=()
step() {  # step SECONDS NAME CMD...
  local t=$1 name=$2; shift 2
  STEP_CMD[$name]="timeout $t $(printf '%q ' "$@")"
  ORDER+=("$name")
}
run_step() {  # run_step NAME
  local name=$1
  echo "== $name ($(date -u +%T))" | tee -a "$LOG"
  eval "${STEP_CMD[$name]}" 2>&1 | tail -n 40 | tee -a "$LOG"
  echo "== $name rc ${PIPESTATUS[0]}" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"
# The fused rel-pos kernel alone at the global blocks' shapes vs SDPA with the bias mask (~20 s).
step ${T_KERNEL:-60} relpos_kernel python3 bench/relpos_kernel.py --json "$OUT/relpos_kernel.json"
step ${T_SPEED_B:-200} speed_vit_b python3 bench/speed.py --device cuda --models vit_b --no-compile --json "$OUT/speed_vit_b.json"
step ${T_AMG:-150} amg_vit_h python3 bench/amg.py --model vit_h --device cuda --points-per-side 32 --repeats 1 --json "$OUT/amg_vit_h.json"
step ${T_PRED:-50} predictor_vit_b python3 bench/predictor.py --device cuda --repeats 3 --prompts 20 --json "$OUT/predictor_vit_b.json"
step ${T_SPEED_H:-180} speed_vit_h python3 bench/speed.py --device cuda --models vit_h --no-compile --json "$OUT/speed_vit_h.json"
# Compiled encoders (issue 7's remaining lever): 'default' mode compiles in about a minute per variant;
# max-autotune (segment-anything-fast's choice) only if time is left.
step ${T_COMPILE_B:-240} speed_vit_b_compiled python3 bench/speed.py --device cuda --models vit_b --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions mixed,fused \
  --json "$OUT/speed_vit_b_compiled.json"
step ${T_SPEED_L:-80} speed_vit_l python3 bench/speed.py --device cuda --models vit_l --no-compile --json "$OUT/speed_vit_l.json"
# Where the eager and compiled encoders spend their time (kernels grouped by kind), for the next change.
step ${T_PROFILE:-70} profile_vit_b python3 bench/profile_encoder.py --device cuda --model vit_b --attention mask,mixed,fused \
  --json "$OUT/profile_vit_b.json"
# The CUDA-only tests (CUDA-graph decoder path vs the exact fp32 modules).
step ${T_TESTS:-200} cuda_tests python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast.py tests/kernels
# Compiled ViT-L/H (default mode) and ViT-B in segment-anything-fast's max-autotune mode, ours and theirs.
step ${T_COMPILE_LH:-230} speed_lh_compiled python3 bench/speed.py --device cuda --models vit_l,vit_h --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions mixed,fused \
  --json "$OUT/speed_lh_compiled.json"
step ${T_PROFILE_C:-50} profile_vit_b_compiled python3 bench/profile_encoder.py --device cuda --model vit_b --attention mixed,fused \
  --compile-mode default --json "$OUT/profile_vit_b_compiled.json"
step ${T_AUTOTUNE_B:-300} speed_vit_b_autotune python3 bench/speed.py --device cuda --models vit_b --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode max-autotune --compile-attentions fused --no-compile-mask \
  --json "$OUT/speed_vit_b_autotune.json"
# ViT-H's compiled time by kernel kind (not yet profiled: its gap to 80 img/s is the largest).
step ${T_PROFILE_H:-120} profile_vit_h_compiled python3 bench/profile_encoder.py --device cuda --model vit_h \
  --attention mixed,fused --compile-mode default --json "$OUT/profile_vit_h_compiled.json"
# Issue 7's open targets after 2026-11-26 (docs/dev/GPU_RUNBOOK.md, call 3): each model compiled ('default'
# mode) with the fused kernel, the 8-bit block GEMMs, and segment-anything-fast's method in the same process.
step ${T_B_FUSED:-240} speed_b_fused python3 bench/speed.py --device cuda --models vit_b --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions fused --no-compile-mask \
  --encoder-quant int8 --skip-eager --json "$OUT/speed_b_fused.json"
step ${T_H_QUANT:-330} speed_h_quant python3 bench/speed.py --device cuda --models vit_h --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions fused --no-compile-mask \
  --encoder-quant int8,fp8 --skip-eager --json "$OUT/speed_h_quant.json"
step ${T_L_FUSED:-200} speed_l_fused python3 bench/speed.py --device cuda --models vit_l --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions fused --no-compile-mask \
  --encoder-quant int8 --skip-eager --json "$OUT/speed_l_fused.json"
# ViT-H's 8-bit encoders in max-autotune, where Inductor generates the int8 GEMM with its scaling fused
# (default mode writes the int32 sums out first).
step ${T_H_QUANT_AT:-330} speed_h_quant_autotune python3 bench/speed.py --device cuda --models vit_h --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode max-autotune --compile-attentions fused --no-compile-mask \
  --encoder-quant int8,fp8 --skip-eager --json "$OUT/speed_h_quant_autotune.json"
# After the window kernel (2026-11-26 evening): ViT-H compiled with `fused` (now both kernels) and fp8, with
# segment-anything-fast's method; the same in max-autotune (GELU and norms fused into GEMM epilogues);
# and ViT-H's profile with the window kernel.
step ${T_H_FUSED:-240} speed_h_fused python3 bench/speed.py --device cuda --models vit_h --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions fused --no-compile-mask \
  --encoder-quant fp8 --skip-eager --json "$OUT/speed_h_fused.json"
step ${T_H_AUTOTUNE:-400} speed_h_autotune python3 bench/speed.py --device cuda --models vit_h --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode max-autotune --compile-attentions fused --no-compile-mask \
  --skip-eager --skip-sam-fast --json "$OUT/speed_h_autotune.json"
step ${T_PROFILE_HF:-90} profile_vit_h_fused python3 bench/profile_encoder.py --device cuda --model vit_h \
  --attention fused --compile-mode default --json "$OUT/profile_vit_h_fused.json"
# The MLP's GELU in cuBLASLt's GEMM epilogue (segany.kernels.gelu_epilogue; on by default since 2026-11-27
# evening): its accuracy on the GPU (tanh form), then ViT-H compiled without and with it, beside
# segment-anything-fast's method, and its bf16 accuracy row.
step ${T_EPILOGUE_TEST:-90} epilogue_tests python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_gelu_epilogue.py
step ${T_H_EPILOGUE:-260} speed_h_epilogue python3 bench/speed.py --device cuda --models vit_h --parts encoder,accuracy \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions fused --no-compile-mask \
  --skip-eager --gelu-epilogue both --json "$OUT/speed_h_epilogue.json"
# The epilogue on ViT-B and ViT-L, without and with it (2026-11-27 evening: +8% and +5%; now on by default).
step ${T_BL_EPILOGUE:-280} speed_bl_epilogue python3 bench/speed.py --device cuda --models vit_b,vit_l --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions fused --no-compile-mask \
  --skip-eager --skip-sam-fast --gelu-epilogue both --json "$OUT/speed_bl_epilogue.json"
# The window kernel's tiles: its autotuner's timing of each of its own configs, then a search that also
# tries bench/relpos_kernel.py's EXTRA_WINDOW_CONFIGS (ViT-H's and ViT-B's windowed blocks).
step ${T_WINDOW_CONFIGS:-120} window_configs python3 bench/relpos_kernel.py --models vit_h,vit_b --blocks windowed \
  --extra-window-configs --json "$OUT/window_configs.json"
# ViT-H compiled in default mode with the shipped options: the baseline for a step that changes one of them.
step ${T_H_BASE:-150} speed_h_base python3 bench/speed.py --device cuda --models vit_h --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions fused --no-compile-mask \
  --skip-eager --skip-sam-fast --json "$OUT/speed_h_base.json"
# The global kernel's tiles, with the autotuner's timing of each (fused_autotune): KR = 2 key rows a step
# (2026-11-28; offered only with SEGANY_RELPOS_TWO_ROWS=1 until timed) against the one row a step.
step ${T_GLOBAL_CONFIGS:-90} global_configs env SEGANY_RELPOS_TWO_ROWS=1 python3 bench/relpos_kernel.py --models vit_h,vit_b --blocks global \
  --json "$OUT/global_configs.json"
# ViT-H compiled in default mode with both kernel experiments of 2026-11-28 on: the window kernel's rel-pos
# terms read by tl.gather, and the global kernel's two-rows-a-step tiles offered to its autotuner (which
# keeps one row where that is faster). window_configs and global_configs time each alone.
step ${T_H_EXPERIMENTS:-200} speed_h_experiments env SEGANY_WINDOW_TERMS=gather SEGANY_RELPOS_TWO_ROWS=1 \
  python3 bench/speed.py --device cuda --models vit_h --parts encoder,accuracy --skip-reference --attentions "" \
  --compile --compile-mode default --compile-attentions fused --no-compile-mask --skip-eager --skip-sam-fast \
  --json "$OUT/speed_h_experiments.json"
# After a change of the window kernel's tiles: the CUDA tests of the fast path (fused kernels included), then ViT-B and ViT-L compiled with the shipped
# options (ViT-H's is speed_h_base above).
step ${T_WINDOW_TESTS:-120} window_tests python3 -m pytest -q -p no:cacheprovider tests/test_fast.py -k cuda
step ${T_BL_BASE:-240} speed_bl_base python3 bench/speed.py --device cuda --models vit_b,vit_l --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode default --compile-attentions fused --no-compile-mask \
  --skip-eager --skip-sam-fast --json "$OUT/speed_bl_base.json"
# ViT-B and ViT-L replayed as CUDA graphs (compile="reduce-overhead"; ViT-H ran 80.0 and 79.6 img/s so on
# 2026-11-27 late): whether it should be what compile=True does depends on their figures too.
step ${T_RO:-200} speed_ro python3 bench/speed.py --device cuda --models vit_b,vit_l --parts encoder \
  --skip-reference --attentions "" --compile --compile-mode reduce-overhead --compile-attentions fused \
  --no-compile-mask --skip-eager --skip-sam-fast --json "$OUT/speed_ro.json"
step ${T_ENGINE:-50} engine_gpu python3 bench/engine.py --model segany_tiny --device cuda --workers 1 --json "$OUT/engine_gpu.json"
if [ "$STEPS" = all ]; then
  selected=("${ORDER[@]}")
else
  read -r -a selected <<<"$STEPS"
fi
for name in "${selected[@]}"; do
  if [ -z "${STEP_CMD[$name]+x}" ]; then
    echo "gpu_all.sh: unknown step '$name'; known: ${ORDER[*]}" | tee -a "$LOG"
    continue
  fi
  run_step "$name"
done
ls -la "$OUT"
