"""``import sb3_textrl`` and the CLI's parser load none of the heavy libraries; every exported name still imports.

Each check runs in a fresh interpreter: this test process has imported torch long before (conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "stable_baselines3", "sb3_contrib")
PACKAGES = ("sb3_textrl", "sb3_textrl.envs", "sb3_textrl.rewards", "sb3_textrl.reward_model", "sb3_textrl.metrics")


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter that imports this checkout; it prints one JSON value, returned here."""
    env = os.environ | {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_and_parser_load_no_heavy_library():
    found = run_python(f"""
import json, sys
import gymnasium as gym
import {", ".join(PACKAGES)}
from sb3_textrl.cli import build_parser

build_parser().format_help()
print(json.dumps({{
    "heavy": [name for name in {HEAVY!r} if name in sys.modules],
    "registered": [task for task in ("NewsSummary-v0", "sb3_textrl/NewsSummary-v0") if task in gym.registry],
    "tasks": sb3_textrl.list_text_tasks(),
    "missing_from_dir": {{p: sorted(set(sys.modules[p].__all__) - set(dir(sys.modules[p]))) for p in {PACKAGES!r}}},
    "submodules": [sb3_textrl.demo_config.__name__, sb3_textrl.envs.news_data.__name__],  # as when imported eagerly
    "heavy_after_list_text_tasks": [name for name in {HEAVY!r} if name in sys.modules],
}}))
""")
    assert found["heavy"] == []
    assert found["registered"] == ["NewsSummary-v0", "sb3_textrl/NewsSummary-v0"]
    assert {"NewsSummary-v0", "sb3_textrl/NewsSummary-v0"} <= set(found["tasks"])
    assert found["missing_from_dir"] == {package: [] for package in PACKAGES}
    assert found["submodules"] == ["sb3_textrl.demo_config", "sb3_textrl.envs.news_data"]
    assert found["heavy_after_list_text_tasks"] == []


def test_every_exported_name_imports():
    found = run_python(f"""
import importlib, json
import sb3_textrl

for name in sb3_textrl.__all__:
    exec(f"from sb3_textrl import {{name}}")
problems = []
for package in {PACKAGES!r}:
    module = importlib.import_module(package)
    problems += [f"{{package}}.{{name}} is missing" for name in module.__all__ if not hasattr(module, name)]
from sb3_textrl.policies import TransformerLMPolicy
from sb3_textrl.envs.registry import list_text_tasks, mark_text_task
if sb3_textrl.TransformerLMPolicy is not TransformerLMPolicy or sb3_textrl.list_text_tasks is not list_text_tasks:
    problems.append("a lazily exported name is not the object of its module")
try:
    sb3_textrl.no_such_name
    problems.append("sb3_textrl.no_such_name did not raise AttributeError")
except AttributeError as error:
    if "no_such_name" not in str(error):
        problems.append(str(error))
print(json.dumps(problems))
""")
    assert found == []


@pytest.mark.parametrize(
    "command",
    [[], ["install-assets"], ["demo"], ["tasks"], ["sample"], ["sft"], ["rate"], ["train-rm"], ["eval"], ["export"], ["plot"]],
)
def test_help_of_every_command(command: list[str]):
    env = os.environ | {"PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "sb3_textrl.cli", *command, "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: sb3-textrl {' '.join(command)}".rstrip() + " ")
