"""benchmarks/eval_throughput.py runs end to end in --tiny mode (a smoke run, not a timing test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "eval_throughput.py"


def test_tiny_run_prints_the_table_and_checks_the_tokens():
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("uptime at start:")
    for variant in ("env loop: generate_samples(fast=False)", "fast path: generate_samples() (env stop tokens)",
                    "fast path, no stop: decode(stop_token_ids=())", "HF generate() (min_new_tokens=max_new_tokens)"):
        assert f"| {variant} |" in out
    assert "- fast path (no stop) / generate() = " in out and "- fast path / env loop = " in out
    assert "identical to the env loop's: yes" in out  # the script exits 1 otherwise
