#!/usr/bin/env bash
# PPO throughput on a GPU (benchmarks/gpu_throughput.py): the embedded SmolLM2-135M, 64 envs, bf16.
# Prints "skipped: no CUDA device" and exits 0 where torch sees no GPU. Extra arguments go to the script.
#
# A bare GPU machine may lack this project's pure-Python dependencies (stable-baselines3, gymnasium, rouge-score...):
# wheels carried in .whl/ (see docs/benchmarks.md) are installed into a private folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sb3_textrl_site .whl/*.whl
    export PYTHONPATH="/tmp/sb3_textrl_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_throughput.py "$@"
