#!/usr/bin/env bash
# One prepared GPU check (torch + transformers + this project; no Ray, no vLLM, no network), under 5 minutes:
# FSDP2 bf16 on SmolLM2-135M against the unsharded model (loss), step time, peak memory per GPU.
# Exits 0 with "skipped: no GPU" on a machine without one. Flags go to the benchmark it runs,
# benchmarks/gpu_check.py (e.g. --model DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec timeout 300 "$PY" -m mosaic_ray.benchmarks.gpu_check "$@"
