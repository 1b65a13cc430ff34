"""benchmarks/long_prompt_throughput.py: its whole measurement path as a seconds-long smoke run."""

from __future__ import annotations

import os
import re
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
    done = run("--tiny", "--mixed-precision", "bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "RANDOM weights of SmolLM2-135M's architecture (4 layers" in out
    rows = ("| all layers |", "| all layers, as before trainable_layers (bootstrap prefill kept) |",
            "| trainable_layers=2 |", "| trainable_layers=2, plain autocast (no bf16 weight copies) |",
            "| HF generate() (KV cache, no grad): the floor |")
    for row in rows:
        assert row in out, out
    assert "- trainable_layers=2: rollout" in out and "load average at start" in out
    copies = dict(re.findall(r"^(- [^:]+): rollout .*bf16 weight copies (\d+) MiB", out, flags=re.MULTILINE))
    assert copies["- trainable_layers=2, plain autocast (no bf16 weight copies)"] == "0", copies
    assert int(copies["- trainable_layers=2"]) > 0, copies  # the frozen weights' copies of the bf16 run


def test_layer_variants_parse():
    sys.path.insert(0, str(SCRIPT.parent))
    import long_prompt_throughput as bench

    settings = bench.layer_settings("all, all:plain,4,4:plain,before")
    assert settings == [None, "all:plain", 4, "4:plain", "before"]
    assert [bench.trainable_of(s) for s in settings] == [None, None, 4, 4, None]


def test_cuda_without_a_gpu_skips_cleanly():
    done = run("--device", "cuda")
    assert done.returncode == 0 and done.stdout.startswith("skipped: no CUDA device"), (done.stdout, done.stderr)
