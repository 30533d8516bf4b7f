#!/usr/bin/env bash
# Scale-out on the GPU, checked for correctness (and timed): the same code paths as the gloo tests,
# with --device cuda and NCCL.
#  1. benchmarks/gpu_dist_pool_check.py under torchrun (NCCL, one GPU per rank, R = min(GPUs, 4);
#     R = 1 on one GPU still runs DTensors, strided shards and the collectives): sharded pools
#     into FSDP2, FSDP2 x TP, HSDP and TP-with-replicas models equal the single-process pool on the
#     GPU for linear, task_arithmetic, TIES, DARE-TIES, SLERP and Model Stock; a distributed search
#     (TP forward inside evaluate) proposes the single-process search's candidates; ms per candidate.
#  2. `torchrun -m pymerge merge --device cuda` (a gloo + NCCL group, each rank streaming its part
#     on its GPU) equals a one-process merge bit for bit: linear at 1 and 2 ranks, TIES at 2 (two
#     ranks share GPU 0 where there is one: no tensor crosses the process group).
# One line per check; exits non-zero if any differs or fails.
#   bash benchmarks/gpu_dist_check.sh              on a GPU machine (gpu_check.sh runs every gpu_*_check.sh)
#   REHEARSE=1 bash benchmarks/gpu_dist_check.sh   here: the same checks with gloo on the CPU (4 ranks)
# Every command has a timeout (LIMIT, default 120 s); about 1 minute on a GPU, 3 on this 2-core CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${REHEARSE:-0}" = 1 ]; then DEVICE=cpu; else DEVICE=${DEVICE:-cuda}; fi
LIMIT=${LIMIT:-120}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pymerge-dist-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYMERGE_DIST_TIMEOUT=60 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
failed=0

if [ "$DEVICE" = cuda ]; then
  gpus=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  R=$(( gpus < 4 ? gpus : 4 ))
else
  R=4
fi
if [ "${R:-0}" -lt 1 ]; then
  echo "FAIL pool: no GPU visible to torch"; failed=1
else
  timeout -k 10 "$LIMIT" $PY -m torch.distributed.run --standalone --nproc-per-node=$R \
    benchmarks/gpu_dist_pool_check.py --device "$DEVICE" --work "$WORK/pool" >"$WORK/pool.log" 2>&1
  rc=$?
  sed -n '/^sharded pool on/,$p' "$WORK/pool.log" | grep -E '^(sharded|ok|FAIL|time)'
  if [ "$rc" -ne 0 ] || ! grep -q '^ok' "$WORK/pool.log"; then
    echo "FAIL pool: exit $rc"; grep -vE '^(ok|time|sharded)' "$WORK/pool.log" | tail -n 20; failed=1
  fi
fi

timeout "$LIMIT" $PY - "$WORK" <<'PYEOF' || exit 1
import sys, yaml, torch
sys.path.insert(0, "tests")
import llama_factory as lf
root = sys.argv[1]
dims = lf.LlamaDims(hidden=512, layers=4, intermediate=1408, vocab=4096, heads=8, kv_heads=8)
base, fts = lf.make_family(root, n_finetunes=3, dims=dims, dtype=torch.bfloat16, shards=2)
models = [str(m) for m in fts]
yaml.safe_dump({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}}
                for m, w in zip(models, (0.5, 0.3, 0.2))]}, open(f"{root}/linear.yml", "w"))
yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
                "models": [{"model": m, "parameters": {"weight": 0.4, "density": 0.5}} for m in models]},
               open(f"{root}/ties.yml", "w"))
print(f"made base + 3 fine-tunes of {dims.n_params() / 1e6:.1f}M bf16 params in {root}")
PYEOF

same() {  # same A B: every tensor of folder B equals folder A's, bit for bit
  $PY - "$1" "$2" <<'PYEOF'
import sys
sys.path.insert(0, "tests")
import llama_factory as lf
from io_helpers import bits
a, b = lf.load_folder(sys.argv[1]), lf.load_folder(sys.argv[2])
bad = sorted(set(a) ^ set(b)) or [n for n in a if a[n].dtype != b[n].dtype or bits(a[n]) != bits(b[n])]
print(f"{len(a)} tensors, bit-identical" if not bad else f"DIFFERENT: {bad[:3]}")
sys.exit(1 if bad else 0)
PYEOF
}

for method in linear ties; do
  if ! timeout -k 10 "$LIMIT" $PY -m pymerge merge "$WORK/$method.yml" "$WORK/$method-one" --device "$DEVICE" --quiet; then
    echo "FAIL $method: one-process merge on $DEVICE"; failed=1; continue
  fi
  ranks_list="1 2"; [ "$method" = ties ] && ranks_list=2
  for ranks in $ranks_list; do
    out="$WORK/$method-r$ranks"
    timeout -k 10 "$LIMIT" $PY -m torch.distributed.run --standalone --nproc-per-node=$ranks -m pymerge merge \
      "$WORK/$method.yml" "$out" --device "$DEVICE" --out-shard-size 8MB >"$out.log" 2>&1
    rc=$?
    line=$(grep '^pymerge:' "$out.log" | tail -n 1)
    if [ "$rc" -ne 0 ]; then
      echo "FAIL $method R=$ranks: torchrun exit $rc"; tail -n 20 "$out.log"; failed=1; continue
    fi
    if verdict=$(same "$WORK/$method-one" "$out"); then echo "ok   $method R=$ranks: $verdict; $line"
    else echo "FAIL $method R=$ranks: $verdict"; failed=1; fi
  done
done
exit $failed
