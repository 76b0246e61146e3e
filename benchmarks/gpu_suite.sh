#!/usr/bin/env bash
# The one script to run on a GPU machine: build mmkernels offline, tune the Triton kernels for this card if the package
# ships no config file for it, run the GPU tests, time every op.
#
#   benchmarks/gpu_suite.sh OUTDIR [OP ...]     (ops as `mmkernels-bench list` names them; default: all)
#
# Writes to OUTDIR (8 files at most: the device tool brings back no more): build.log (build and tuning logs),
# tests.log, bench.log, results.json, results.csv, summary.txt (with the device info), hf.json (HF models patched vs
# unpatched), and <device>.json when it tuned (the card's config file: commit it to mmkernels/kernels/triton/configs/).
# Budget: 8 minutes on an H100 including the build (SUITE_BUDGET seconds, default 480: tuning, the tests and the
# benchmarks each get at most what is left). Env: PYTHON (default python3), SHAPES (bench preset,
# default "gpu": each op's budgeted subset), MMKERNELS_CUDA_ARCHS (default: this GPU's arch, e.g. 90a on Hopper),
# BENCH_ARGS (mmkernels-bench flags, default "--warmup-ms 10 --rep-ms 40"), TEST_TIMEOUT / BENCH_TIMEOUT
# (seconds, default 150 / 240), TUNE_BUDGET (seconds for `mmkernels-bench tune all`: default 90 when the package has no
# config file for this card, else 0 = skip; set it to extend a shipped file with buckets it lacks).
# Results are written after every case, so a run cut short keeps what it timed.
# DRY_RUN=1: on any machine (no GPU needed), print every step with the command and the time budget it would get,
# collect the GPU tests it would run (pytest --collect-only) and list the benchmark cases, and run nothing else: the
# rehearsal before a device run.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [OP ...]}
shift
OPS=("$@")
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "[gpu_suite +$(( $(date +%s) - t0 ))s] $*"; }
left() { echo $(( ${SUITE_BUDGET:-480} - ($(date +%s) - t0) )); }  # seconds left of the suite's budget
atmost() { local a=$1 b=$2; [ "$b" -lt "$a" ] && a=$b; [ "$a" -lt 1 ] && a=1; echo "$a"; }
status=0
DRY=${DRY_RUN:-0}
# run CMD...: the command, or in a dry run the line it would run (exit status 0)
exec 3>&1  # the script's own stdout: a dry run's lines show even where the command's output goes to a log
run() { if [ "$DRY" = 1 ]; then echo "  would run: $*" >&3; else "$@"; fi; }

if [ "$DRY" = 1 ]; then
  stamp "DRY RUN: no build, no tests, no timing; each step's command and its cap (on the card the steps share" \
    "SUITE_BUDGET=${SUITE_BUDGET:-480}s: each gets at most what is left)"
  cap=${MMKERNELS_CUDA_ARCHS:-90a}
  export MMKERNELS_CUDA_ARCHS=$cap
elif ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_suite: no NVIDIA GPU visible (nvidia-smi -L failed); DRY_RUN=1 rehearses the steps without one" >&2
  exit 2
else
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '. ')
  [ "$cap" = "90" ] && cap="90a"
  export MMKERNELS_CUDA_ARCHS=${MMKERNELS_CUDA_ARCHS:-$cap}
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/info.txt"

stamp "building (archs $MMKERNELS_CUDA_ARCHS, log: $OUT/build.log)"
if ! run "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  stamp "BUILD FAILED"
  exit 1
fi
grep -F "[mmkernels build]" "$OUT/build.log" | sed 's/^ *//'
"$PY" -m mmkernels.info | tee -a "$OUT/info.txt"

# Tune first (tests and benchmarks then run the tuned configs): only when the package ships no file for this card,
# unless TUNE_BUDGET says otherwise; at least 300 s stay for the tests and the benchmarks.
slug=$("$PY" -c "from mmkernels.kernels.triton import tuning as t; print(t.device_slug(t.device_name()))" 2>/dev/null)
shipped="mmkernels/kernels/triton/configs/$slug.json"
if [ -n "$slug" ]; then
  default_budget=0
  [ -f "$shipped" ] || default_budget=90
  tune_budget=$(atmost "${TUNE_BUDGET:-$default_budget}" $(( $(left) - 300 )))
  [ "${TUNE_BUDGET:-$default_budget}" -gt 0 ] || tune_budget=0
  if [ "$tune_budget" -ge 20 ]; then
    [ -f "$shipped" ] && cp "$shipped" "$OUT/$slug.json"  # extend the shipped file, keep its buckets
    stamp "tuning for $slug: mmkernels-bench tune all --budget $tune_budget (log: $OUT/build.log)"
    run timeout $(( tune_budget + 60 )) "$PY" -m mmkernels.bench tune all --budget "$tune_budget" \
      --out "$OUT/$slug.json" >>"$OUT/build.log" 2>&1
    rc=$?
    grep -E "^(tuning|tuned|budget|attention|qformer|patch|moe)" "$OUT/build.log" | tail -n 40
    if [ -s "$OUT/$slug.json" ]; then
      cp "$OUT/$slug.json" "$shipped"  # the editable install reads it from here: the tests and benchmarks use it
    fi
    [ $rc -eq 0 ] || { stamp "TUNING FAILED (rc=$rc): the defaults stay where nothing was tuned"; status=1; }
  else
    stamp "tuning skipped: ${shipped} $( [ -f "$shipped" ] && echo exists || echo 'missing, too little time left')"
  fi
fi

if [ -z "$slug" ] && [ "$DRY" = 1 ]; then
  stamp "tuning: on the card, mmkernels-bench tune all --budget ${TUNE_BUDGET:-90} (at most the budget left - 300 s) when \
mmkernels/kernels/triton/configs/ has no file for it; shipped: $(ls mmkernels/kernels/triton/configs/*.json 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ' | grep . || echo none)"
fi

filter=()
if [ ${#OPS[@]} -gt 0 ]; then
  expr=$(printf ' or %s' "${OPS[@]}")
  filter=(-k "${expr:4}")
fi
# Most of the GPU tests' time is Triton compiling each kernel specialisation once: spread it over processes.
parallel=()
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}")
test_budget=$(atmost "${TEST_TIMEOUT:-150}" $(( $(left) - 120 )))
stamp "GPU tests: pytest -m gpu ${parallel[*]} ${filter[*]} (budget ${test_budget}s)"
if [ "$DRY" = 1 ]; then  # what the device would run: the gpu-marked tests, collected (not run) here
  "$PY" -m pytest tests -m gpu --collect-only -q -p no:cacheprovider "${filter[@]}" >"$OUT/tests.log" 2>&1
  rc=$?
  grep -E "^tests/" "$OUT/tests.log" | cut -d: -f1 | sort | uniq -c | sort -rn | head -n 40
else
  timeout "$test_budget" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider "${parallel[@]}" "${filter[@]}" \
    >"$OUT/tests.log" 2>&1
  rc=$?
fi
tail -n 15 "$OUT/tests.log"
[ $rc -eq 0 ] || [ $rc -eq 5 ] || { stamp "GPU TESTS FAILED (rc=$rc)"; status=1; }

targets=("${OPS[@]}")
[ ${#targets[@]} -gt 0 ] || targets=(all)
bench_budget=$(atmost "${BENCH_TIMEOUT:-240}" $(( $(left) - ${HF_TIMEOUT:-90} - 15 )))
stamp "benchmarks: ${targets[*]} (preset ${SHAPES:-gpu}, budget ${bench_budget}s)"
if [ "$DRY" = 1 ]; then  # the suites and their cases, listed (not timed)
  "$PY" -m mmkernels.bench list "${OPS[@]}" >"$OUT/bench.log" 2>&1
  rc=$?
fi
# shellcheck disable=SC2086
run timeout "$bench_budget" "$PY" -m mmkernels.bench "${targets[@]}" --shapes "${SHAPES:-gpu}" \
  --out "$OUT" ${BENCH_ARGS:---warmup-ms 10 --rep-ms 40} >>"$OUT/bench.log" 2>&1
[ "$DRY" = 1 ] || rc=$?
tail -n 80 "$OUT/bench.log"
[ $rc -eq 0 ] || { stamp "BENCHMARKS FAILED (rc=$rc)"; status=1; }

# Multi-head latent attention (issue 21): D_qk 192 / D_v 128 unpadded vs padded to 256 vs SDPA memory-efficient,
# 128 heads, causal, 2k/4k/8k. Its table goes to bench.log (the device tool brings back 8 files; all are taken).
mla_budget=$(atmost "${MLA_TIMEOUT:-75}" $(( $(left) - ${HF_TIMEOUT:-90} - 15 )))
if [ "$mla_budget" -ge 20 ] && { [ ${#OPS[@]} -eq 0 ] || printf '%s\n' "${OPS[@]}" | grep -qx attention; }; then
  stamp "MLA attention rows (budget ${mla_budget}s)"
  # shellcheck disable=SC2086
  run timeout "$mla_budget" "$PY" -m mmkernels.bench attention --shapes mla \
    ${BENCH_ARGS:---warmup-ms 10 --rep-ms 40} >>"$OUT/bench.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ]; then stamp "MLA rows cut short by their ${mla_budget}s budget (MLA_TIMEOUT)";
  elif [ $rc -ne 0 ]; then stamp "MLA rows FAILED (rc=$rc)"; status=1; fi
  grep -E "MLA S=" "$OUT/bench.log" | tail -n 30
fi

# Hugging Face models patched vs unpatched (realistic sizes on a GPU): CLIP ViT-L/14-336 tower, BLIP-2's Q-Former at
# B=64, a Mixtral-shaped MoE block, Qwen2.5-VL-7B's packed tower (3 images + a video, 9764 patches; host syncs per
# forward). One merged hf.json (the device tool brings back at most 8 files).
hf_budget=$(atmost "${HF_TIMEOUT:-90}" $(( $(left) - 15 )))
if [ "$hf_budget" -ge 20 ]; then
  stamp "HF patch benchmarks (budget ${hf_budget}s)"
  mkdir -p "$OUT/hf"
  hf_t0=$(date +%s)
  for model in clip blip2-qformer mixtral-moe qwen2_5_vl; do
    remaining=$(( hf_budget - ($(date +%s) - hf_t0) ))
    [ "$remaining" -ge 10 ] || { stamp "hf: no time left for $model"; break; }
    run timeout "$remaining" "$PY" -m mmkernels.bench hf --model "$model" --out "$OUT/hf" \
      ${HF_ARGS:---warmup-ms 10 --rep-ms 40} >>"$OUT/bench.log" 2>&1 || { stamp "hf $model FAILED"; status=1; }
  done
  "$PY" - "$OUT/hf" "$OUT/hf.json" <<'PYEOF'
import json, pathlib, sys
rows = {p.stem[3:]: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("hf_*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
PYEOF
  rm -rf "$OUT/hf"
  grep -A12 -E "^mmkernels-bench hf|patched" "$OUT/bench.log" | tail -n 40
fi

{
  cat "$OUT/info.txt" 2>/dev/null && rm -f "$OUT/info.txt"  # folded in: the device tool brings back 8 files at most
  echo "gpu_suite on $( [ "$DRY" = 1 ] && echo "DRY RUN" || nvidia-smi --query-gpu=name --format=csv,noheader | head -n1), $(date -u +%FT%TZ)"
  echo "ops: ${targets[*]}; status: $status; wall: $(( $(date +%s) - t0 ))s"
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1
} | tee "$OUT/summary.txt"
exit $status
