"""Every code block of the README and docs/ runs: python blocks of a file in one fresh interpreter (in order, so later
blocks use earlier names), bash blocks line by line, both in an empty working folder. A block that cannot run in a
test (an install, a server waiting for people, a run of many minutes) is preceded by
``<!-- docs-test: skip (reason) -->``; the reason is required."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = r"(?P<skip><!-- docs-test: skip (?P<reason>\(.*?\))? ?-->\n)?"
BLOCK = re.compile(SKIP + r"```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S)


def blocks(path: Path) -> list[dict[str, str | None]]:
    return [m.groupdict() for m in BLOCK.finditer(path.read_text())]


def test_every_skipped_block_says_why():
    for path in DOCUMENTS:
        for block in blocks(path):
            if block["skip"]:
                assert block["reason"], f"{path.name}: a skipped code block needs a reason: <!-- docs-test: skip (why) -->"


@pytest.mark.slow
@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_code_blocks_run(path: Path, tmp_path: Path):
    runnable = [b for b in blocks(path) if not b["skip"]]
    if not runnable:
        pytest.skip(f"{path.name} has no runnable code block")
    env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    python = "\n".join(str(b["code"]) for b in runnable if b["lang"] == "python")
    if python:
        result = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{path.name} python blocks failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    for block in runnable:
        if block["lang"] != "bash":
            continue
        script = "set -euo pipefail\n" + str(block["code"])
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{path.name} bash block failed:\n{block['code']}\n{result.stderr[-5000:]}"
