#!/usr/bin/env bash
# One call on a GPU machine with no internet: build, quick benchmarks, GPU tests, fuller benchmarks.
#   bash benchmarks/gpu_check.sh               on the GPU machine, inside one device call
#   PART=1 bash benchmarks/gpu_check.sh        build, quick benchmarks and the GPU tests only
#   PART=2 bash benchmarks/gpu_check.sh        build, then the fuller benchmarks, gpu_profile and the other gpu_*_check.sh;
#                                              right after PART=1, on the still-warm machine that kept its
#                                              build, with GPU_CHECK_BUILD=true (no rebuild)
#   PART=verify bash benchmarks/gpu_check.sh   build, the GPU tests, the other gpu_*_check.sh and gpu_profile: what a
#                                              code change needs checked again, without the benchmarks
#                                              (PROFILE_ARGS=--skip-merge leaves out the merge profile; about 6 minutes
#                                              on an H200: give it DEADLINE=330 or more, else the NCCL check is cut)
#   REHEARSE=1 bash benchmarks/gpu_check.sh    here, without a GPU: the same plumbing, GPU steps skipped
# Device time: a task gets 15 minutes in all, a machine's start takes a minute or more, and none starts
# with under 4 minutes left. DEADLINE (default 420 s; it was 540) keeps one call near 9 minutes with the
# start and the transfers, so a failed first call can still be rerun. PART=1 then PART=2 (its DEADLINE
# what the device time left allows) report every figure a whole run does, the first call's figures and
# test results safe whatever happens to the second.
# What comes back: $OUT/summary.md (step outcomes, then every table) and $OUT/gpu_check.tgz (every
# log and result file) -- two files, well inside what the device tool returns. Logs live in a
# scratch folder and are bundled after every step, so a run cut short still returns what it did.
# The GPU machine has no registry: packages its image lacks (cma, for the distributed search check) come as
# wheels in .devwheels/ (git-ignored; `pip download cma --no-deps -d .devwheels` here, then carry it), which this
# script installs first.
# Order matters for a cut run: build, then quick benchmarks (figures first), then the GPU tests,
# then the fuller benchmarks. Every step runs under `timeout -k` with the smaller of its own limit
# and the time left before DEADLINE (default 420 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PY=${PYTHON:-python3}
END=$((SECONDS + ${DEADLINE:-420}))
REHEARSE=${REHEARSE:-0}
PART=${PART:-all}
case "$PART" in all|1|2|verify) ;; *) echo "PART must be all, 1, 2 or verify, got $PART" >&2; exit 2;; esac
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }  # part N: this run does part N
checks() { part "$1" || [ "$PART" = verify ]; }       # the tests and checks of part N, also run by PART=verify
BUILD=${GPU_CHECK_BUILD:-"$PY -m pip install --no-build-isolation --no-deps -e ."}
export PYMERGE_CUDA_ARCHS=${PYMERGE_CUDA_ARCHS:-90}   # Hopper only: halves the nvcc time
export PYTHONUNBUFFERED=1
export PYMERGE_BENCH_RESULTS=$WORK/results    # tables land in the bundle, not in the checkout
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
fi
if [ "$REHEARSE" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
status=()

bundle() {  # every log and result so far into $OUT/gpu_check.tgz, the summary into $OUT/summary.md
  tar czf "$OUT/gpu_check.tgz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/gpu_check.tgz.tmp" "$OUT/gpu_check.tgz"
  { echo "## gpu_check steps"; printf '    %s\n' "${status[@]}"; echo
    for f in "$WORK"/*.md; do [ -f "$f" ] && { cat "$f"; echo; }; done; } >"$OUT/summary.md"
}

record() {  # record NAME LINE...
  status+=("$(printf '%-22s %s' "$1" "$2")")
}

step() {  # step NAME SECONDS CMD...: runs CMD with a limit, logs to $WORK/NAME.log, records the outcome
  local name=$1 limit=$2; shift 2
  local left=$((END - SECONDS))
  if [ "$left" -lt 20 ]; then record "$name" "skipped (no time left)"; bundle; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  local how="rc=$rc"; [ "$rc" = 124 ] || [ "$rc" = 137 ] && how="rc=$rc (cut at ${limit}s)"
  record "$name" "$(printf '%-22s %4ss' "$how" "$((SECONDS - t0))")"
  echo "-- $name ($how, $((SECONDS - t0)) s)"; tail -n 4 "$WORK/$name.log"
  bundle
  return $rc
}

gpu_step() {  # a step that needs the GPU: recorded as skipped in a rehearsal
  if [ "$REHEARSE" = 1 ]; then record "$1" "skipped (rehearsal: needs a GPU)"; return 0; fi
  step "$@"
}

table() {  # table NAME: this run's results/<machine>/NAME.md, copied for the summary and printed
  local f
  f=$(ls -t "$WORK"/results/*/"$1".md 2>/dev/null | head -1)
  [ -n "$f" ] && { cp "$f" "$WORK/$1.md"; echo; cat "$f"; bundle; }
}

if [ "$REHEARSE" = 1 ]; then DEV=cpu; else DEV=cuda; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$WORK/machine.log"

if [ -d .devwheels ] && ls .devwheels/*.whl >/dev/null 2>&1; then
  step wheels 60 $PY -m pip install --no-index --no-deps .devwheels/*.whl
fi
step build 200 $BUILD || { tail -30 "$WORK/build.log"; bundle; exit 1; }
step backends 30 $PY -m pymerge doctor || $PY -c "import pymerge._cpu as p; print('cpu simd:', p.simd_level())"

if part 1; then
  # Quick figures first: a run cut short still reports them.
  step bench_ws_quick 60 $PY benchmarks/bench_weighted_sum.py --device $DEV --quick; table weighted_sum_quick
  step bench_pool_quick 60 $PY benchmarks/bench_pool.py --device $DEV --quick; table bench_pool_quick
  gpu_step bench_methods_quick 60 $PY benchmarks/bench_methods_gpu.py --numel 16e6 --rounds 5; table methods_gpu
fi

if checks 1; then
  # Correctness on the GPU: the ops' backends first, then every other gpu-marked test.
  PYTEST="$PY -m pytest -q -p no:cacheprovider -o faulthandler_timeout=100"
  gpu_step tests_ops 120 $PYTEST -x tests/test_weighted_sum_gpu_backends.py
  gpu_step tests_gpu 150 $PYTEST -m gpu tests/ --ignore=tests/test_weighted_sum_gpu_backends.py
  [ "$REHEARSE" = 1 ] && step tests_rehearsal 120 $PYTEST -x tests/test_weighted_sum_gpu_backends.py tests/test_pool.py
fi

if part 2; then
  # Fuller figures while time lasts.
  gpu_step bench_ws 120 $PY benchmarks/bench_weighted_sum.py --device cuda; table weighted_sum
  gpu_step bench_pool 90 $PY benchmarks/bench_pool.py --device cuda --params 128e6; table bench_pool
  gpu_step bench_cpool 90 $PY benchmarks/bench_compressed_pool.py --device cuda --quick; table bench_compressed_pool_quick
  gpu_step bench_cpool_cuda 90 $PY benchmarks/bench_compressed_pool.py --device cuda --quick --backend cuda; table bench_compressed_pool_quick_cuda
  gpu_step bench_merge_gpu 120 $PY benchmarks/bench_merge_gpu.py --device cuda --out-root /tmp --results "$WORK/results/gpu"; table merge_linear_gpu
fi

if checks 2; then
  gpu_step gpu_profile 90 $PY benchmarks/gpu_profile.py ${PROFILE_ARGS:-}  # where the merge's and uncached TIES' time goes
  for extra in benchmarks/gpu_*_check.sh; do  # checks other parts of the project add (distributed, ...); each
    [ -f "$extra" ] && step "$(basename "$extra" .sh)" 150 env REHEARSE="$REHEARSE" bash "$extra"  # rehearses itself
  done
fi

bundle
echo
cat "$OUT/summary.md"
rm -rf "$WORK"
