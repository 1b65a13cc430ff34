"""Slow test: MaskablePPO on NewsSummary-v0 with the "article" mask and the embedded SmolLM2-135M (CI runs it too)."""

from __future__ import annotations

import numpy as np
import pytest
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import sb3_textrl  # noqa: F401  (registers NewsSummary-v0)
from sb3_textrl import MaskableTextRolloutBuffer, MaskableTransformerLMPolicy

pytestmark = pytest.mark.slow


class InMask(BaseCallback):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def _on_step(self) -> bool:
        actions, masks = self.locals["actions"].reshape(-1), self.locals["action_masks"]
        assert masks[np.arange(len(actions)), actions].all()
        self.steps += len(actions)
        return True


def test_maskable_ppo_trains_on_news_with_the_article_mask(tmp_path):
    env_kwargs = dict(action_mask="article", max_new_tokens=8, max_prompt_tokens=192, n_articles=16)
    env = make_vec_env("NewsSummary-v0", n_envs=2, seed=0, env_kwargs=env_kwargs)
    model = MaskablePPO(MaskableTransformerLMPolicy, env, rollout_buffer_class=MaskableTextRolloutBuffer, n_steps=8,
                        batch_size=16, n_epochs=1, gamma=1.0, seed=0, device="cpu")
    audit = InMask()
    model.learn(32, callback=audit)  # two rollouts, two updates
    assert audit.steps == 32
    metrics = model.rollout_buffer.metrics
    assert np.isfinite(metrics["kl_to_ref"]) and 0 <= metrics["task_reward"] <= 1
    # The mask is far narrower than the vocabulary: the article's words, punctuation, function words.
    masks = np.stack(env.env_method("action_masks"))
    assert masks.shape == (2, 49152) and (masks.sum(axis=1) < 5000).all()
    model.save(tmp_path / "masked")
    loaded = MaskablePPO.load(tmp_path / "masked", device="cpu")
    assert type(loaded.policy) is MaskableTransformerLMPolicy and loaded.policy.lm_name is None
