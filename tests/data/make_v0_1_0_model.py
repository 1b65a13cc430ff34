"""
Writes ``tests/data/v0_1_0/``: a tiny PPO ``model.zip`` saved by sb3_textrl 0.1.0, before the package layout moved.

SB3 pickles the policy class and the observation space by import path, so a test loads this file with the current
code and checks that it predicts the tokens recorded here (``expected.json``). Run from the repository root, once,
with the 0.1.0 code: ``python tests/data/make_v0_1_0_model.py``. The LM directory is stored next to the zip
(``tiny-lm``, relative: the zip keeps the path as typed) so the fixture is self-contained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_textrl
from sb3_textrl import TextGenerationEnv, TextRolloutBuffer, TransformerLMPolicy
from sb3_textrl.models import tiny_gpt2, train_small_tokenizer

PROMPTS = ["The quick brown fox", "Once upon a time", "Breaking news: the council", "My recipe starts with"]
OUT = Path(__file__).resolve().parent / "v0_1_0"


def letters_up(prompts, completions, references):
    """Share of upper-case letters in each completion."""
    return [sum(c.isupper() for c in t) / max(1, sum(c.isalpha() for c in t)) for t in completions]


def make_env(tokenizer):
    return TextGenerationEnv(PROMPTS, letters_up, tokenizer, max_new_tokens=4, max_prompt_tokens=8, tokenizer_name="tiny-lm")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    os.chdir(OUT)  # the zip keeps the LM path as typed: "tiny-lm", next to it
    tokenizer = train_small_tokenizer(PROMPTS * 4, vocab_size=300, save_dir="tiny-lm")
    tiny_gpt2(
        len(tokenizer), n_layer=2, n_embd=16, n_head=2, n_positions=32, eos_token_id=tokenizer.eos_token_id
    ).save_pretrained("tiny-lm", safe_serialization=True)
    env = DummyVecEnv([lambda: make_env(tokenizer) for _ in range(2)])
    env.seed(0)
    model = PPO(
        TransformerLMPolicy,
        env,
        rollout_buffer_class=TextRolloutBuffer,
        n_steps=4,
        batch_size=8,
        n_epochs=1,
        learning_rate=1e-2,
        seed=0,
        device="cpu",
        policy_kwargs=dict(lm="tiny-lm"),
    )
    model.learn(16)  # two updates, so the saved weights are not the initial ones
    model.save("model")
    expected = {"sb3_textrl_version": sb3_textrl.__version__, "prompts": PROMPTS} | greedy_rollouts(model, tokenizer)
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(expected)


def greedy_rollouts(model: PPO, tokenizer) -> dict[str, list]:
    """Greedy tokens of every prompt, stepped through the env, and the value and log-prob of each first token."""
    tokens, values, log_probs = [], [], []
    for index in range(len(PROMPTS)):
        env = make_env(tokenizer)
        obs, _ = env.reset(seed=0, options={"prompt_index": index})
        obs_tensor, _ = model.policy.obs_to_tensor(obs)
        first = model.predict(obs, deterministic=True)[0]
        with torch.no_grad():
            value, log_prob, _ = model.policy.evaluate_actions(obs_tensor, torch.as_tensor(np.asarray(first)).reshape(1))
        values.append(float(value.reshape(-1)[0]))
        log_probs.append(float(log_prob.reshape(-1)[0]))
        completion, done = [], False
        while not done:
            action = int(model.predict(obs, deterministic=True)[0])
            completion.append(action)
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
        tokens.append(completion)
    return {"greedy_tokens": tokens, "first_token_values": values, "first_token_log_probs": log_probs}


if __name__ == "__main__":
    main()
