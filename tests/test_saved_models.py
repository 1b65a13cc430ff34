"""Saved models keep loading: a model.zip written by sb3_textrl 0.1.0 loads with today's code and acts the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import greedy_episode
from stable_baselines3 import PPO

from sb3_textrl import TextGenerationEnv
from sb3_textrl.models import load_tokenizer

FIXTURE = Path(__file__).resolve().parent / "data" / "v0_1_0"


@pytest.fixture()
def v0_1_0_dir(tmp_path, monkeypatch) -> Path:
    """A copy of the 0.1.0 fixture as the working directory (the zip names its LM by the relative path 'tiny-lm')."""
    directory = tmp_path / "v0_1_0"
    shutil.copytree(FIXTURE, directory)
    monkeypatch.chdir(directory)
    return directory


def test_v0_1_0_model_zip_loads_and_predicts_the_same_tokens(v0_1_0_dir):
    expected = json.loads((v0_1_0_dir / "expected.json").read_text())
    assert expected["sb3_textrl_version"] == "0.1.0"
    model = PPO.load(v0_1_0_dir / "model.zip", device="cpu")  # no custom_objects: every pickled path still imports
    tokenizer = load_tokenizer("tiny-lm")
    # the classes SB3 pickled by import path in 0.1.0
    assert type(model.policy).__module__ + "." + type(model.policy).__qualname__ == "sb3_textrl.policies.TransformerLMPolicy"
    assert type(model.observation_space).__name__ == "TextObservationSpace"
    for index, prompt in enumerate(expected["prompts"]):
        env = TextGenerationEnv(
            expected["prompts"],
            lambda p, c, r: [0.0] * len(c),
            tokenizer,
            max_new_tokens=4,
            max_prompt_tokens=8,
            tokenizer_name="tiny-lm",
        )
        obs, info = env.reset(seed=0, options={"prompt_index": index})
        assert info["prompt"] == prompt
        obs_tensor, _ = model.policy.obs_to_tensor(obs)
        first = np.asarray(expected["greedy_tokens"][index][0])
        with torch.no_grad():
            value, log_prob, _ = model.policy.evaluate_actions(obs_tensor, torch.as_tensor(first).reshape(1))
        assert float(value.reshape(-1)[0]) == pytest.approx(expected["first_token_values"][index], abs=1e-5)
        assert float(log_prob.reshape(-1)[0]) == pytest.approx(expected["first_token_log_probs"][index], abs=1e-5)
        tokens = greedy_episode(model, env, obs)
        assert tokens == expected["greedy_tokens"][index]
