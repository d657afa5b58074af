#!/usr/bin/env bash
# The hybrid-parallel benchmark on CUDA GPUs with NCCL: parity with one process, pipeline bubble,
# throughput (tokens/s and speedup over one GPU), communication bytes, memory per rank, AdamW parity.
# It is benchmarks/parallel.py with --accelerator cuda: one GPU per rank, so 2 GPUs run the 2-rank
# layouts and 4 run them all; the JSON lists the others as skipped, with the reason.
#
#   benchmarks/parallel_gpu.sh                       # -> benchmarks/results/parallel_gpu.json (+ .md)
#   benchmarks/parallel_gpu.sh OUT.json --layouts tp2,pp2_1f1b_m8 --n-embd 768
#
# PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/parallel_gpu.json}"
[ $# -gt 0 ] && shift
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "parallel_gpu.sh: nvidia-smi is not on PATH: this benchmark needs NVIDIA GPUs (on CPU: python benchmarks/parallel.py)" >&2
    exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
exec "${PYTHON:-python}" benchmarks/parallel.py --accelerator cuda --out "$out" "$@"
