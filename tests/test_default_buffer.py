"""Issue #14 points 1 and 4: stock ``PPO(TransformerLMPolicy, env)`` trains with the text buffer (KL penalty, one forward
per episode), an explicit per-step buffer is kept and warned about at construction, and observation normalisation is
refused (sb3_textrl.lm.algorithm)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch as th
from helpers import register_toy_task, toy_vec_env
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecNormalize

from sb3_textrl import MaskableTextRolloutBuffer, MaskableTransformerLMPolicy, TextRolloutBuffer, TransformerLMPolicy

NEW_TOKENS = 5
SMALL = dict(n_steps=10, batch_size=10, n_epochs=1, seed=0, device="cpu")  # small rollouts: no n_steps warning
VEC_NORMALIZE_FIX = re.escape("VecNormalize(venv, norm_obs=False, norm_reward=True)")


@pytest.fixture(scope="module")
def task(tiny_lm):
    return register_toy_task("DefaultBuffer-v0", tiny_lm, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def masked_task(tiny_lm):
    def even_tokens(prompt_ids, generated_ids):
        mask = np.zeros(50257, dtype=bool)
        mask[::2] = True
        mask[50256] = True  # EOS
        return mask

    return register_toy_task("DefaultBufferMasked-v0", tiny_lm, max_new_tokens=NEW_TOKENS, action_mask=even_tokens)


def per_step_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "re-encodes the whole context" in str(w.message)]


def logged(model, tmp_path, steps: int) -> pd.DataFrame:
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(steps)
    return pd.read_csv(tmp_path / "progress.csv")


# -- point 1: the default buffer --------------------------------------------------------------------------------
def test_one_liner_trains_with_the_text_buffer_and_the_kl_penalty(task, tiny_lm, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PPO(TransformerLMPolicy, task, policy_kwargs=dict(lm=tiny_lm), **SMALL)  # the env by its id, as the card
    assert per_step_warnings(caught) == []
    buffer = model.rollout_buffer
    assert type(buffer) is TextRolloutBuffer and model.rollout_buffer_class is TextRolloutBuffer
    # Built with the arguments SB3 gives its own buffer.
    assert (buffer.buffer_size, buffer.n_envs, buffer.gamma, buffer.gae_lambda) == (10, 1, model.gamma, model.gae_lambda)
    assert buffer.device == model.device and buffer.observation_space is model.observation_space
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = logged(model, tmp_path, 20)
    assert per_step_warnings(caught) == []  # training ran on whole segments
    assert {"rollout/kl_to_ref", "rollout/kl_coef", "rollout/task_reward"} <= set(log.columns)
    assert (log["rollout/kl_coef"] == 0.05).all() and log["rollout/kl_to_ref"].notna().all()
    assert model.policy.n_rollouts == 2  # the text buffer counted its rollouts


def test_save_and_load_keep_the_text_buffer(task, tiny_lm, tmp_path):
    model = PPO(TransformerLMPolicy, toy_vec_env(task, n_envs=2), policy_kwargs=dict(lm=tiny_lm), **SMALL)
    model.learn(12)
    model.save(tmp_path / "run")
    loaded = PPO.load(tmp_path / "run", env=toy_vec_env(task, n_envs=2), device="cpu")
    assert type(loaded.rollout_buffer) is TextRolloutBuffer and loaded.rollout_buffer_class is TextRolloutBuffer
    loaded.learn(12)
    assert np.isfinite(loaded.rollout_buffer.metrics["kl_to_ref"])


def test_explicit_per_step_buffer_is_kept_and_warned_about_once_at_construction(task, tiny_lm, tmp_path):
    with pytest.warns(UserWarning, match=r"rollout_buffer_class=DictRolloutBuffer.*NOT applied") as caught:
        model = PPO(TransformerLMPolicy, toy_vec_env(task, n_envs=2), rollout_buffer_class=DictRolloutBuffer,
                    policy_kwargs=dict(lm=tiny_lm), **SMALL)
    (warning,) = [w for w in caught.list if "re-encodes the whole context" in str(w.message)]
    message = str(warning.message)
    assert "Fix: leave rollout_buffer_class out" in message and "rollout_buffer_class=sb3_textrl.TextRolloutBuffer" in message
    assert warning.filename == __file__  # attributed to the user's PPO(...) line
    assert type(model.rollout_buffer) is DictRolloutBuffer
    with warnings.catch_warnings(record=True) as caught_in_learn:
        warnings.simplefilter("always")
        model.learn(12)
    assert per_step_warnings(caught_in_learn) == []  # not again at the first minibatch

    # Loading keeps the saved per-step buffer; training it warns once, with the fix for a loaded model.
    model.save(tmp_path / "per_step")
    with warnings.catch_warnings(record=True) as caught_in_load:
        warnings.simplefilter("always")
        loaded = PPO.load(tmp_path / "per_step", env=toy_vec_env(task, n_envs=2), device="cpu")
        assert per_step_warnings(caught_in_load) == []  # a load for predict() only is not warned about
        loaded.learn(12)
    assert type(loaded.rollout_buffer) is DictRolloutBuffer
    (message,) = per_step_warnings(caught_in_load)
    assert "custom_objects=dict(rollout_buffer_class=sb3_textrl.TextRolloutBuffer)" in message
    fixed = PPO.load(tmp_path / "per_step", env=toy_vec_env(task, n_envs=2), device="cpu",
                     custom_objects=dict(rollout_buffer_class=TextRolloutBuffer))  # the fix it names
    assert type(fixed.rollout_buffer) is TextRolloutBuffer


def test_maskable_ppo_default_gets_the_maskable_text_buffer(masked_task, tiny_lm, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = MaskablePPO(MaskableTransformerLMPolicy, toy_vec_env(masked_task, n_envs=2),
                            policy_kwargs=dict(lm=tiny_lm), **SMALL)
        log = logged(model, tmp_path, 12)
    assert per_step_warnings(caught) == []
    assert type(model.rollout_buffer) is MaskableTextRolloutBuffer and model.rollout_buffer_class is MaskableTextRolloutBuffer
    assert log["rollout/kl_to_ref"].notna().all()
    tokens = model.rollout_buffer.actions[: model.rollout_buffer.pos].astype(int)
    assert np.all((tokens % 2 == 0) | (tokens == 50256))  # and the env's masks were applied
    model.save(tmp_path / "masked")
    assert type(MaskablePPO.load(tmp_path / "masked", device="cpu").rollout_buffer) is MaskableTextRolloutBuffer


def test_maskable_ppo_explicit_per_step_buffer_is_kept_and_warned_about(masked_task, tiny_lm):
    with pytest.warns(UserWarning, match=r"MaskableDictRolloutBuffer.*float32 mask.*MaskableTextRolloutBuffer"):
        model = MaskablePPO(MaskableTransformerLMPolicy, toy_vec_env(masked_task, n_envs=2),
                            rollout_buffer_class=MaskableDictRolloutBuffer, policy_kwargs=dict(lm=tiny_lm), **SMALL)
    assert type(model.rollout_buffer) is MaskableDictRolloutBuffer


def test_a2c_default_gets_the_text_buffer(task, tiny_lm):
    model = A2C(TransformerLMPolicy, toy_vec_env(task, n_envs=2), n_steps=5, policy_kwargs=dict(lm=tiny_lm), device="cpu")
    assert type(model.rollout_buffer) is TextRolloutBuffer
    model.learn(10)
    assert np.isfinite(model.rollout_buffer.metrics["kl_to_ref"])


def test_a_policy_built_by_hand_still_works(task, tiny_lm):
    env = toy_vec_env(task, n_envs=2)
    policy = TransformerLMPolicy(env.observation_space, env.action_space, lambda _: 3e-4, lm=tiny_lm)
    actions, _ = policy.predict(env.reset())
    assert actions.shape == (2,)
    # Nor does a policy built inside a running algorithm, outside its _setup_model, touch that algorithm.
    model = PPO(TransformerLMPolicy, env, rollout_buffer_class=DictRolloutBuffer, policy_kwargs=dict(lm=tiny_lm),
                **SMALL)

    def build(self):  # a method of the algorithm, as a callback's code would run inside learn()
        return TransformerLMPolicy(env.observation_space, env.action_space, lambda _: 3e-4, lm=tiny_lm)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(model)
    assert per_step_warnings(caught) == [] and type(model.rollout_buffer) is DictRolloutBuffer


def test_sb3_default_n_steps_is_warned_about_with_the_numbers(task, tiny_lm):
    env = toy_vec_env(task, n_envs=2)
    with pytest.warns(UserWarning, match=r"default n_steps=2048 counts tokens") as caught:
        model = PPO(TransformerLMPolicy, env, policy_kwargs=dict(lm=tiny_lm), device="cpu")
    (message,) = [str(w.message) for w in caught.list if "n_steps=2048" in str(w.message)]
    assert "4,096 generated tokens" in message and f"at least {2048 // NEW_TOKENS} completions" in message
    assert f"n_steps={4 * NEW_TOKENS}" in message and "n_epochs=10" in message
    assert type(model.rollout_buffer) is TextRolloutBuffer and model.rollout_buffer.buffer_size == 2048
    with warnings.catch_warnings(record=True) as caught_small:
        warnings.simplefilter("always")
        PPO(TransformerLMPolicy, env, n_steps=64, batch_size=64, policy_kwargs=dict(lm=tiny_lm), device="cpu")
    assert not [w for w in caught_small if "counts tokens" in str(w.message)]  # any other n_steps silences it


# -- point 4: VecNormalize --------------------------------------------------------------------------------------
@pytest.mark.parametrize("buffer_class", [None, DictRolloutBuffer])
def test_vec_normalize_of_observations_is_refused_at_construction(task, tiny_lm, buffer_class):
    with pytest.raises(ValueError, match=r"norm_obs=True.*'input_ids', 'attention_mask'.*" + VEC_NORMALIZE_FIX):
        PPO(TransformerLMPolicy, VecNormalize(toy_vec_env(task, n_envs=2)), rollout_buffer_class=buffer_class,
            policy_kwargs=dict(lm=tiny_lm), **SMALL)


def test_vec_normalize_of_observations_is_refused_by_maskable_ppo(masked_task, tiny_lm):
    with pytest.raises(ValueError, match=VEC_NORMALIZE_FIX):
        MaskablePPO(MaskableTransformerLMPolicy, VecNormalize(toy_vec_env(masked_task, n_envs=2), norm_reward=False),
                    policy_kwargs=dict(lm=tiny_lm), **SMALL)


def test_vec_normalize_of_rewards_only_trains(task, tiny_lm):
    venv = VecNormalize(toy_vec_env(task, n_envs=2), norm_obs=False, norm_reward=True, gamma=1.0)
    model = PPO(TransformerLMPolicy, venv, policy_kwargs=dict(lm=tiny_lm), **SMALL)
    before = {name: p.detach().clone() for name, p in model.policy.named_parameters() if p.requires_grad}
    model.learn(24)
    assert venv.ret_rms.count > 1 and type(model.rollout_buffer) is TextRolloutBuffer
    assert any(not th.equal(p, before[name]) for name, p in model.policy.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("buffer_class", [TextRolloutBuffer, DictRolloutBuffer])
def test_vec_normalize_set_after_construction_is_refused_in_the_rollout(task, tiny_lm, buffer_class):
    model = PPO(TransformerLMPolicy, toy_vec_env(task, n_envs=2), rollout_buffer_class=buffer_class,
                policy_kwargs=dict(lm=tiny_lm), **SMALL)
    model.set_env(VecNormalize(toy_vec_env(task, n_envs=2)))  # SB3 checks the spaces only: they are unchanged
    with pytest.raises(ValueError, match=r"token ids that are not whole numbers.*" + VEC_NORMALIZE_FIX):
        model.learn(12)
