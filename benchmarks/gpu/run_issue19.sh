#!/usr/bin/env bash
# Issue 19's GPU check in one command, on the GPU machine from the repository root (one H200:
# under 5 minutes; no hydra, omegaconf or bitsandbytes needed):
#   bash benchmarks/gpu/run_issue19.sh
# tests/gpu, then benchmarks/gpu/check_issue19.py (single device, FSDP with an auto-wrap policy,
# with activation checkpointing, sharded state dicts, ModelParallelStrategy; see its docstring).
# Results: JSON lines on stdout and in $OUT/issue19.jsonl, pytest's tail in $OUT/pytest_gpu.txt.
set -uo pipefail  # the exit status is check_issue19.py's: 1 when a step failed
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/tests TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch,peft,transformers,lightning;print('versions',torch.__version__,peft.__version__,transformers.__version__,lightning.__version__)"
timeout ${PYTEST_S:-60} $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
timeout ${CHECK_S:-215} $PY benchmarks/gpu/check_issue19.py --budget-s ${BUDGET_S:-200} "$@" \
  2>&1 | grep -E '^\{' | tee "$OUT/issue19.jsonl"
