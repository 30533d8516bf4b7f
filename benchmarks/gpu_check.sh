#!/usr/bin/env bash
# One command for a GPU machine with no internet: build, GPU tests, GPU benchmarks, tables last.
#   bash benchmarks/gpu_check.sh        (logs and results bundled in $OUT/gpu_check.tgz)
# The whole run stays under DEADLINE seconds (default 540, inside a 10-minute call): every step
# gets the smaller of its own limit and the time left, and each benchmark's table is printed as
# soon as it exists, so a cut-off run still reports what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
END=$((SECONDS + ${DEADLINE:-540}))
export PYMERGE_CUDA_ARCHS=${PYMERGE_CUDA_ARCHS:-90}   # Hopper only: halves the nvcc time
status=()

step() {  # step NAME SECONDS CMD...: runs CMD with a limit, logs to $OUT/NAME.log, records the outcome
  local name=$1 limit=$2; shift 2
  local left=$((END - SECONDS))
  if [ "$left" -lt 20 ]; then status+=("$(printf '%-20s skipped (no time left)' "$name")"); return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  status+=("$(printf '%-20s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  echo "-- $name (rc=$rc, $((SECONDS - t0)) s)"; tail -n 4 "$OUT/$name.log"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

step build 240 $PY -m pip install --no-build-isolation --no-deps -e . || { tail -30 "$OUT/build.log"; exit 1; }
$PY -c "import pymerge._cuda as c, pymerge._cpu as p; print('cuda ext devices:', c.device_count(), 'cpu simd:', p.simd_level())"

# Correctness on the GPU first: the op's backends, then every other gpu-marked test.
step tests_ops 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_weighted_sum_gpu_backends.py
step tests_gpu 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/ --ignore=tests/test_weighted_sum_gpu_backends.py

# Throughput; each table is printed as soon as it is written.
show() { for f in "$@"; do [ -f "$f" ] && { echo; cat "$f"; }; done; }
gpu_results() { ls -d benchmarks/results/*/ 2>/dev/null | grep -v -e '/cpu/$' -e '/gpu_check/$'; }
step bench_weighted_sum 150 $PY benchmarks/bench_weighted_sum.py --device cuda && show $(gpu_results | sed 's|$|weighted_sum.md|')
step bench_pool 120 $PY benchmarks/bench_pool.py --device cuda --params 128e6 && show $(gpu_results | sed 's|$|bench_pool.md|')
[ -f benchmarks/bench_methods_gpu.py ] && step bench_methods_gpu 90 $PY benchmarks/bench_methods_gpu.py
step bench_merge_gpu 150 $PY benchmarks/bench_merge_gpu.py --device cuda --out-root /tmp

tar czf "$OUT/gpu_check.tgz" "$OUT"/*.log "$OUT/gpu.txt" $(gpu_results) 2>/dev/null
echo
echo "== steps"
printf '%s\n' "${status[@]}"
echo
echo "== results"
for d in $(gpu_results); do show "$d"*.md; done
