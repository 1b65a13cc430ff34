"""Slow tests: the embedded SmolLM2-135M-Instruct inside real PPO (CI runs these too)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import sb3_textrl  # noqa: F401  (registers NewsSummary-v0)
from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy

pytestmark = pytest.mark.slow


def test_fast_configuration_one_ppo_iteration(tmp_path):
    env = make_vec_env("NewsSummary-v0", n_envs=2, seed=0, env_kwargs=dict(max_new_tokens=8, max_prompt_tokens=192))
    model = PPO(TransformerLMPolicy, env, rollout_buffer_class=TextRolloutBuffer, n_steps=8, batch_size=16, n_epochs=1,
                gamma=1.0, seed=0, device="cpu")
    hf_model = model.policy.lm.get_base_model()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in hf_model.parameters() if not p.requires_grad) == pytest.approx(134.5e6, rel=0.01)
    model.learn(16)
    metrics = model.rollout_buffer.metrics
    assert np.isfinite(metrics["kl_to_ref"]) and 0 <= metrics["task_reward"] <= 1
    assert 1 <= metrics["completion_len"] <= 8
    model.save(tmp_path / "smol")
    loaded = PPO.load(tmp_path / "smol", device="cpu")
    assert loaded.policy.lm_name is None  # the embedded default


def test_issue_snippet_trains_with_the_text_buffer():
    # The design card's one-liner: no rollout_buffer_class, yet TextRolloutBuffer (KL penalty, one forward per episode).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PPO(TransformerLMPolicy, "NewsSummary-v0", n_steps=64, batch_size=64, n_epochs=1, device="cpu")
        model.learn(64)
    assert not [w for w in caught if "re-encodes the whole context" in str(w.message)]
    assert type(model.rollout_buffer) is TextRolloutBuffer
    assert np.isfinite(model.rollout_buffer.metrics["kl_to_ref"]) and model.rollout_buffer.metrics["kl_coef"] == 0.05
