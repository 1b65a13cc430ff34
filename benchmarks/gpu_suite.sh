#!/usr/bin/env bash
# Every GPU benchmark in one short run, for a lent CUDA machine (one call of the `device` tool; see docs/benchmarks.md).
#
#   bash benchmarks/gpu_suite.sh LOG_DIR [DATASET]
#
# Each benchmark gets its own time limit and log (LOG_DIR/<name>.log), so one that fails or runs long does not
# cost the others. A bare machine lacks this project's pure-Python dependencies: wheels carried in .whl/ (built
# as docs/benchmarks.md says) are installed into a private folder first. DATASET defaults to the sibling
# ../shared/data/news_dev.jsonl, which does not travel to such a machine: copy it into the checkout and name it.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${1:?usage: gpu_suite.sh LOG_DIR [DATASET]}"
DATASET="${2:-../shared/data/news_dev.jsonl}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$LOG_DIR"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sb3_textrl_site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/sb3_textrl_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

run() {  # run NAME SECONDS ARGS...: one benchmark, its output in LOG_DIR/NAME.log and on stdout
    local name="$1" seconds="$2"
    shift 2
    echo "=== $name (limit ${seconds} s): $*"
    local start=$SECONDS
    timeout "$seconds" "$PYTHON" "$@" > "$LOG_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$LOG_DIR/$name.log"
    echo "=== $name: rc $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU', 'transformers', transformers.__version__)"

# Issue #11's GPU mode: long prompts, 64 envs, bf16, every layer vs trainable_layers, and generate().
run long_prompt 230 benchmarks/long_prompt_throughput.py --device cuda --n-envs 64 --mixed-precision bf16 \
    --layers all,8,4,2 --rounds 3 --dataset "$DATASET"
# PPO end to end at the embedded model's size, 64 envs, 128 + 64 tokens, peak GPU memory.
run gpu_throughput 100 benchmarks/gpu_throughput.py --device cuda
# Evaluation decoding against generate() on one batch of 8 and of 64 real articles.
run eval_throughput 60 benchmarks/eval_throughput.py --device cuda --dataset "$DATASET"
run eval_throughput_64 60 benchmarks/eval_throughput.py --device cuda --n-prompts 64 --dataset "$DATASET"
# Short prompts: the fast path against its floor (and the naive env loop, once).
run ppo_throughput 80 benchmarks/ppo_throughput.py --device cuda --quick
echo "=== suite done after $SECONDS s"
