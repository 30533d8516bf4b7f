#!/usr/bin/env bash
# GPU merge throughput check (see benchmarks/gpu_check.py): generates the benchmark models once
# under ${WORKDIR:-/tmp/pymerge-bench}, then compares pymerge --device cuda with pinned H2D bandwidth
# and safetensors' safe_open(device="cuda"). Exit 0 when the issue's targets are met.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" benchmarks/gpu_check.py --workdir "${WORKDIR:-/tmp/pymerge-bench}" "$@"
