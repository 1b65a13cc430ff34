"""Shared fixtures: a real GPT-2 BPE tokenizer (built offline) and tiny GPT-2 LMs saved to local paths."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
from helpers import ragged_stop_ids, register_toy_task

from sb3_textrl.models import load_gpt2_tokenizer, tiny_gpt2

SHARED_NEWS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "news_dev.jsonl"


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


def save_tiny_lm(directory: Path, tokenizer, vocab_size: int | None = None, **config) -> str:
    tiny_gpt2(vocab_size or len(tokenizer), **config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, gpt2_tokenizer) -> str:
    """Path of a 2-layer, 64-wide GPT-2 with the GPT-2 tokenizer."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2"), gpt2_tokenizer)


@pytest.fixture(scope="session")
def shared_news() -> Path:
    if not SHARED_NEWS.is_file():
        pytest.skip(f"{SHARED_NEWS} (the shared real-news data) is not present")
    return SHARED_NEWS


@pytest.fixture(scope="session")
def ragged_task(tiny_lm) -> str:
    """A toy task whose every 8th token id stops a completion, so that envs end their episodes at different steps."""
    task = "KlToy-v0"
    if task not in gym.registry:
        register_toy_task(task, tiny_lm, max_new_tokens=5, stop_token_ids=ragged_stop_ids())
    return task
