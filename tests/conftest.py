"""Shared fixtures: a real GPT-2 BPE tokenizer (built offline) and tiny GPT-2 LMs saved to local paths."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import torch as th
from helpers import ragged_stop_ids, register_toy_task
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

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


N_BLOCKS = 4


def _llama_like(config_class, model_class, vocab: int):
    config = config_class(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=N_BLOCKS,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, eos_token_id=vocab - 1, bos_token_id=vocab - 1, pad_token_id=vocab - 1)
    with th.random.fork_rng(devices=[]):
        th.manual_seed(0)
        return model_class(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def family_lm(request, tmp_path_factory, gpt2_tokenizer) -> str:
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    if request.param == "gpt2":
        return save_tiny_lm(directory, gpt2_tokenizer, n_layer=N_BLOCKS)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[request.param]
    _llama_like(*classes, len(gpt2_tokenizer)).save_pretrained(directory)
    gpt2_tokenizer.save_pretrained(directory)
    return str(directory)
