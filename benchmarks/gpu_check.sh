#!/usr/bin/env bash
# One command for a GPU machine with no internet: build, GPU tests, GPU benchmarks, table last.
#   bash benchmarks/gpu_check.sh            (results under $OUT, else benchmarks/results/gpu_check)
# Budget: under 5 minutes on an H100/H200. Each step has its own time limit so one hang cannot
# eat the lease; a failed step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYMERGE_CUDA_ARCHS=${PYMERGE_CUDA_ARCHS:-90}   # Hopper only: halves the nvcc time
status=()

step() {  # step NAME SECONDS CMD...: runs CMD with a limit, logs to $OUT/NAME.log, records the outcome
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  status+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  tail -n 3 "$OUT/$name.log"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

step build 240 $PY -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; cat "$OUT/build.log" | tail -30; exit 1; }
$PY -c "import pymerge._cuda as c, pymerge._cpu as p; print('cuda ext devices:', c.device_count(), 'cpu simd:', p.simd_level())"

# Correctness on the GPU: every gpu-marked test plus the Triton tests (they run on CUDA here).
step tests 240 $PY -m pytest -q -x -p no:cacheprovider tests/test_weighted_sum_gpu_backends.py
step tests_gpu_marked 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/ --ignore=tests/test_weighted_sum_gpu_backends.py

# Throughput.
step bench_weighted_sum 240 $PY benchmarks/bench_weighted_sum.py --device cuda
for extra in bench_pool bench_merge_gpu bench_methods; do
  if [ -f "benchmarks/$extra.py" ]; then
    step "$extra" 180 $PY "benchmarks/$extra.py" --device cuda
  fi
done

echo
echo "== steps"
printf '%s\n' "${status[@]}"
echo
echo "== results"
for f in benchmarks/results/*/*.md; do
  case "$f" in */results/cpu/*) continue ;; esac
  cat "$f"; echo
done
cp -r benchmarks/results "$OUT/" 2>/dev/null || true
