"""benchmarks/long_prompt_throughput.py: its whole measurement path as a seconds-long smoke run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "long_prompt_throughput.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_tiny_run_prints_every_variant_against_the_generate_floor():
    done = run("--tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "RANDOM weights of SmolLM2-135M's architecture (4 layers" in out
    rows = ("| all layers |", "| all layers, as before trainable_layers (bootstrap prefill kept) |",
            "| trainable_layers=2 |", "| HF generate() (KV cache, no grad): the floor |")
    for row in rows:
        assert row in out, out
    assert "- trainable_layers=2: rollout" in out and "load average at start" in out


def test_cuda_without_a_gpu_skips_cleanly():
    done = run("--device", "cuda")
    assert done.returncode == 0 and done.stdout.startswith("skipped: no CUDA device"), (done.stdout, done.stderr)
