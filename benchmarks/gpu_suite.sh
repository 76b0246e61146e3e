#!/usr/bin/env bash
# The one script to run on a GPU machine: build mmkernels offline, run the GPU tests, time every op.
#
#   benchmarks/gpu_suite.sh OUTDIR [OP ...]     (ops as `mmkernels-bench list` names them; default: all)
#
# Writes to OUTDIR: build.log, info.txt, tests.log, bench.log, results.json, results.csv, summary.txt.
# Budget: 8 minutes on an H100 including the build. Env: PYTHON (default python3), SHAPES (bench preset,
# default "gpu": each op's budgeted subset), MMKERNELS_CUDA_ARCHS (default: this GPU's arch, e.g. 90a on Hopper),
# BENCH_ARGS (mmkernels-bench flags, default "--warmup-ms 10 --rep-ms 40"), TEST_TIMEOUT / BENCH_TIMEOUT
# (seconds, default 150 / 240). Results are written after every case, so a run cut short keeps what it timed.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [OP ...]}
shift
OPS=("$@")
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "[gpu_suite +$(( $(date +%s) - t0 ))s] $*"; }
status=0

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_suite: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2
  exit 2
fi
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '. ')
[ "$cap" = "90" ] && cap="90a"
export MMKERNELS_CUDA_ARCHS=${MMKERNELS_CUDA_ARCHS:-$cap}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/info.txt"

stamp "building (archs $MMKERNELS_CUDA_ARCHS, log: $OUT/build.log)"
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  stamp "BUILD FAILED"
  exit 1
fi
grep -F "[mmkernels build]" "$OUT/build.log" | sed 's/^ *//'
"$PY" -m mmkernels.info | tee -a "$OUT/info.txt"

filter=()
if [ ${#OPS[@]} -gt 0 ]; then
  expr=$(printf ' or %s' "${OPS[@]}")
  filter=(-k "${expr:4}")
fi
# Most of the GPU tests' time is Triton compiling each kernel specialisation once: spread it over processes.
parallel=()
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}")
stamp "GPU tests: pytest -m gpu ${parallel[*]} ${filter[*]}"
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider "${parallel[@]}" "${filter[@]}" \
  >"$OUT/tests.log" 2>&1
rc=$?
tail -n 15 "$OUT/tests.log"
[ $rc -eq 0 ] || [ $rc -eq 5 ] || { stamp "GPU TESTS FAILED (rc=$rc)"; status=1; }

targets=("${OPS[@]}")
[ ${#targets[@]} -gt 0 ] || targets=(all)
stamp "benchmarks: ${targets[*]} (preset ${SHAPES:-gpu})"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-240}" "$PY" -m mmkernels.bench "${targets[@]}" --shapes "${SHAPES:-gpu}" \
  --out "$OUT" ${BENCH_ARGS:---warmup-ms 10 --rep-ms 40} >"$OUT/bench.log" 2>&1
rc=$?
tail -n 80 "$OUT/bench.log"
[ $rc -eq 0 ] || { stamp "BENCHMARKS FAILED (rc=$rc)"; status=1; }

{
  echo "gpu_suite on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1), $(date -u +%FT%TZ)"
  echo "ops: ${targets[*]}; status: $status; wall: $(( $(date +%s) - t0 ))s"
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1
} | tee "$OUT/summary.txt"
exit $status
