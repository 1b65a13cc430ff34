"""benchmarks/gpu_throughput.py: a clean skip without a GPU, and its whole measurement path as a CPU smoke run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_throughput.py"


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}  # no GPU, even on a GPU machine
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("launcher", ["python", "bash"])
def test_skips_cleanly_without_a_cuda_device(launcher):
    command = [sys.executable, str(SCRIPT)] if launcher == "python" else ["bash", str(SCRIPT.with_suffix(".sh"))]
    done = run(command, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped: no CUDA device"), done.stdout
    assert len(done.stdout.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_explicit_cuda_device_without_a_gpu_also_skips():
    done = run([sys.executable, str(SCRIPT), "--device", "cuda"], timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("skipped: no CUDA device"), (done.stdout, done.stderr)


@pytest.mark.slow
def test_cpu_smoke_run_prints_the_table():
    """The GPU path's code (random SmolLM2-shaped weights, 2 layers, bf16 autocast on CPU) end to end."""
    done = run([sys.executable, str(SCRIPT), "--device", "cpu", "--lm", "random", "--n-layers", "2", "--n-envs", "2",
                "--prompt-tokens", "16", "--new-tokens", "4", "--rounds", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "RANDOM weights of SmolLM2-135M's architecture (2 layers" in out
    assert "| PPO.learn (TextRolloutBuffer + KV cache, autocast torch.bfloat16) |" in out
    assert "| HF generate() (KV cache, no grad, autocast torch.bfloat16) |" in out
    assert out.count("n/a (CPU)") == 2 and "- PPO: rollout" in out
