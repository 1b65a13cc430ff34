"""Critic options and guards (issue #12 items 2-3): value-head warm-up, explained variance over trained steps,
missing-EOS / length penalties, reward normalisation (buffer option and VecNormalize), KL-to-reference warnings."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium.spaces import Discrete
from helpers import register_toy_task, shout, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.utils import explained_variance
from stable_baselines3.common.vec_env import VecNormalize
from test_group_advantages import SPACE, fill, ragged_rollout

from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy, make_group_vec_env, make_text_vec_env
from sb3_textrl.callbacks import TextEvalCallback
from sb3_textrl.evaluation import generate_samples

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def task(tiny_lm):
    return register_toy_task("Guards-v0", tiny_lm, max_new_tokens=NEW_TOKENS)


class Recorder(KVWriter):
    """A logger output that keeps every dumped row."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def write(self, key_values, key_excluded, step=0) -> None:
        self.rows.append(dict(key_values))


def recording(model: PPO) -> Recorder:
    recorder = Recorder()
    model.set_logger(Logger(None, [recorder]))
    return recorder


def lm_weights(policy: TransformerLMPolicy) -> dict[str, th.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_net")}


# -- value-head warm-up ---------------------------------------------------------------------------------------
def test_value_warmup_trains_only_the_value_head_and_survives_save_load(task, tiny_lm, tmp_path):
    env = toy_vec_env(task, n_envs=2)
    model = toy_ppo(env, tiny_lm, n_steps=6, batch_size=6, n_epochs=2, learning_rate=1e-2,
                    policy_kwargs=dict(value_warmup_rollouts=2))
    lm_before = lm_weights(model.policy)
    assert lm_before  # LoRA adapters
    head_before = model.policy.value_net.weight.detach().clone()
    model.learn(12)  # rollout 1 of 2 of the warm-up
    model.save(tmp_path / "warm")
    model = PPO.load(tmp_path / "warm", env=env, device="cpu")
    assert int(model.policy.n_rollouts) == 1 and model.policy.value_warmup_rollouts == 2
    model.learn(12, reset_num_timesteps=False)  # rollout 2: still warming up after the reload
    policy = model.policy
    for name, weight in lm_weights(policy).items():
        assert th.equal(weight, lm_before[name]), name  # bit-identical
    assert not th.equal(policy.value_net.weight, head_before)
    # Adam holds state for the value head only: the LM weights got no step and no moments.
    head = {id(p) for p in policy.value_net.parameters()}
    assert policy.optimizer.state and all(id(p) in head for p in policy.optimizer.state)
    model.learn(12, reset_num_timesteps=False)  # rollout 3: the whole policy trains
    assert not policy.in_value_warmup
    assert any(not th.equal(w, lm_before[n]) for n, w in lm_weights(policy).items())


def test_value_warmup_bad_settings_refused(task, tiny_lm):
    env = toy_vec_env(task, n_envs=1)
    with pytest.raises(ValueError, match="critic=False has no trainable value head"):
        toy_ppo(env, tiny_lm, batch_size=10, policy_kwargs=dict(critic=False, value_warmup_rollouts=1))
    with pytest.raises(ValueError, match="value_warmup_rollouts must be an int >= 0"):
        toy_ppo(env, tiny_lm, batch_size=10, policy_kwargs=dict(value_warmup_rollouts=-1))
    with pytest.raises(ValueError, match="vf_coef=0 gives it no loss"):
        toy_ppo(env, tiny_lm, n_steps=3, batch_size=3, vf_coef=0.0, policy_kwargs=dict(value_warmup_rollouts=1)).learn(3)
    with pytest.raises(ValueError, match="needs TextRolloutBuffer"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-step buffer's slowness warning
        toy_ppo(env, tiny_lm, grouped=False, n_steps=3, batch_size=3, policy_kwargs=dict(value_warmup_rollouts=1)).learn(3)


# -- explained variance ---------------------------------------------------------------------------------------
def test_explained_variance_over_trained_steps_by_hand():
    buffer = ragged_rollout("rloo")  # trained: env 0 steps 0-1, env 1 steps 0-2, env 2 steps 0-3 (group A)
    rng = np.random.default_rng(0)
    buffer.values[:] = rng.normal(size=buffer.values.shape)
    buffer.returns = buffer.advantages + buffer.values + rng.normal(scale=0.3, size=buffer.values.shape)
    values = np.concatenate([buffer.values[:2, 0], buffer.values[:3, 1], buffer.values[:, 2]])
    returns = np.concatenate([buffer.returns[:2, 0], buffer.returns[:3, 1], buffer.returns[:, 2]])
    expected = 1 - np.var(returns - values) / np.var(returns)
    assert buffer.trained_steps().sum() == 9
    assert buffer.explained_variance() == pytest.approx(expected, rel=1e-5)
    assert buffer.explained_variance() != pytest.approx(explained_variance(buffer.values.ravel(), buffer.returns.ravel()))
    gae = ragged_rollout("gae")  # every step is trained: SB3's number
    assert gae.explained_variance() == explained_variance(gae.values.ravel(), gae.returns.ravel())


def test_logged_explained_variance_is_the_trained_steps_one(task, tiny_lm):
    envs = make_group_vec_env(task, n_envs=4, samples_per_prompt=2, seed=0)
    with pytest.warns(UserWarning, match="uses no critic"):  # a trained value head with RLOO: EV is defined
        model = toy_ppo(envs, tiny_lm, n_steps=5, batch_size=10, rollout_buffer_kwargs=dict(advantage="rloo"))
        recorder = recording(model)
        expected = []
        buffer = model.rollout_buffer
        reset = buffer.reset

        def reset_and_note():  # the value of the rollout just trained, computed by hand before the buffer clears it
            if buffer.full:
                mask = np.zeros(buffer.values.shape, dtype=bool)
                for i in buffer.trained_segments:
                    s = buffer.segments[i]
                    mask[s.start : s.start + s.length, s.env] = True
                expected.append(explained_variance(buffer.values[mask], buffer.returns[mask]))
            reset()

        buffer.reset = reset_and_note
        model.learn(3 * 20)
    logged = [row["train/explained_variance"] for row in recorder.rows if "train/explained_variance" in row]
    assert len(logged) == 2 and np.allclose(logged, expected[:2], equal_nan=True)
    envs.close()


def test_explained_variance_is_nan_without_critic(task, tiny_lm):
    envs = make_group_vec_env(task, n_envs=4, samples_per_prompt=2, seed=0)
    model = toy_ppo(envs, tiny_lm, n_steps=5, batch_size=10, rollout_buffer_kwargs=dict(advantage="grpo"),
                    policy_kwargs=dict(critic=False))
    recorder = recording(model)
    model.learn(2 * 20)
    logged = [row["train/explained_variance"] for row in recorder.rows if "train/explained_variance" in row]
    assert logged and all(math.isnan(v) for v in logged)  # SB3 alone logs 0.0 here (values are all 0)
    envs.close()


# -- missing-EOS and length penalties -------------------------------------------------------------------------
def run_episode(env: gym.Env, tokens: list[int]) -> tuple[float, dict]:
    env.reset(seed=0)
    for token in tokens:
        _, reward, terminated, truncated, info = env.step(token)
        if terminated or truncated:
            return reward, info
    raise AssertionError("the episode did not end")


def test_missing_eos_and_length_penalties(task):
    env = gym.make(task, missing_eos_penalty=0.5, length_penalty=0.1)
    eos = env.unwrapped.tokenizer.eos_token_id
    hello = env.unwrapped.tokenizer.encode(" HELLO")
    reward, info = run_episode(env, (hello * NEW_TOKENS)[:NEW_TOKENS])  # hits max_new_tokens: no stop token
    score = shout([], [info["completion"]], [])[0]
    assert info["task_reward"] == score  # the reward function's score, as evaluation reports it
    assert info["reward_parts"] == pytest.approx({"shout": score, "missing_eos_penalty": -0.5, "length_penalty": -0.3})
    assert reward == pytest.approx(score - 0.5 - 0.3)
    reward, info = run_episode(env, [hello[0], eos])  # ended by EOS: only the length penalty (2 tokens)
    assert "missing_eos_penalty" not in info["reward_parts"] and reward == pytest.approx(info["task_reward"] - 0.2)
    reward, info = run_episode(gym.make(task), (hello * NEW_TOKENS)[:NEW_TOKENS])  # off by default
    assert list(info["reward_parts"]) == ["shout"] and reward == info["task_reward"]


def test_penalties_through_news_summary_and_batched_scoring(tiny_lm, task):
    env = gym.make("NewsSummary-v0", tokenizer=tiny_lm, n_articles=2, max_new_tokens=2, missing_eos_penalty=1.0)
    reward, info = run_episode(env, [11, 12])
    assert reward == pytest.approx(info["task_reward"] - 1.0)
    kwargs = dict(missing_eos_penalty=0.25, length_penalty=0.05)
    rewards = {}
    for batched in (True, False):
        venv = make_text_vec_env(task, n_envs=2, seed=3, env_kwargs=kwargs, batched_rewards=batched)
        assert type(venv).__name__ == ("BatchedRewardVecEnv" if batched else "DummyVecEnv")
        venv.reset()
        for _ in range(NEW_TOKENS):
            _, step_rewards, dones, infos = venv.step(np.array([11, 12]))
        assert dones.all() and all(info["reward_parts"]["missing_eos_penalty"] == -0.25 for info in infos)
        rewards[batched] = step_rewards
        venv.close()
    np.testing.assert_allclose(rewards[True], rewards[False])


@pytest.mark.parametrize("name", ["missing_eos_penalty", "length_penalty"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_penalties_refused(task, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        gym.make(task, **{name: value})


# -- reward normalisation -------------------------------------------------------------------------------------
def test_normalize_rewards_standardises_last_step_rewards():
    rng = np.random.default_rng(1)
    buffer = TextRolloutBuffer(4, SPACE, Discrete(10), "cpu", n_envs=4, normalize_rewards=True)
    finals = []
    for _ in range(3):  # three rollouts of two 2-step episodes per env, rewards around 5 with std 2
        buffer.reset()
        episodes = []
        for _ in range(4):
            r1, r2 = 5 + 2 * rng.normal(size=2)
            episodes.append([([1, 2], [0.0, r1]), ([3, 4], [0.0, r2])])
            finals += [r1, r2]
        fill(buffer, episodes)
        buffer.compute_returns_and_advantage(th.zeros(4), np.ones(4))
    assert buffer.reward_rms.mean == pytest.approx(np.mean(finals), rel=1e-3)
    assert buffer.reward_rms.var == pytest.approx(np.var(finals), rel=1e-3)
    last = buffer.rewards[[1, 3]]  # the last rollout's episode ends, normalised with the stats of all rollouts
    raw = buffer.task_rewards[[1, 3]]
    np.testing.assert_allclose(last, (raw - np.mean(finals)) / np.std(finals), rtol=1e-3, atol=1e-3)
    assert np.all(buffer.rewards[[0, 2]] == 0)
    assert buffer.metrics["task_reward"] == pytest.approx(raw.mean(), rel=1e-5)  # the raw reward stays logged
    assert buffer.metrics["reward_norm_std"] == pytest.approx(np.std(finals), rel=1e-3)


def test_normalize_rewards_trains(task, tiny_lm):
    model = toy_ppo(toy_vec_env(task, n_envs=2), tiny_lm, n_steps=6, batch_size=6,
                    rollout_buffer_kwargs=dict(normalize_rewards=True))
    before = lm_weights(model.policy)
    model.learn(24)
    assert model.rollout_buffer.reward_rms.count > 4
    assert any(not th.equal(w, before[n]) for n, w in lm_weights(model.policy).items())


def test_vec_normalize_rewards_only_works_with_text_envs(task, tiny_lm):
    venv = VecNormalize(toy_vec_env(task, n_envs=2), norm_obs=False, norm_reward=True, gamma=1.0)
    model = toy_ppo(venv, tiny_lm, n_steps=6, batch_size=6)
    eval_env = VecNormalize(toy_vec_env(task, n_envs=2), norm_obs=False, norm_reward=True, training=False)
    callback = TextEvalCallback(eval_env, prompt_indices=[0, 1], verbose=0)  # get_attr through the wrapper
    model.learn(12, callback=callback)
    assert venv.ret_rms.count > 1  # the rewards went through VecNormalize
    assert model.rollout_buffer.contexts.dtype == np.int32 and "task_reward" in callback.last_metrics
    samples = generate_samples(model, venv, [0, 1, 2])  # the env loop, through the wrapper
    assert len(samples) == 3 and all(isinstance(s.completion, str) for s in samples)
    with pytest.raises(ValueError, match="norm_obs=False"):  # refused when PPO is built (tests/test_default_buffer.py)
        toy_ppo(VecNormalize(toy_vec_env(task, n_envs=2)), tiny_lm, n_steps=3, batch_size=6)


# -- KL warnings ----------------------------------------------------------------------------------------------
class ShiftedReferencePolicy(TransformerLMPolicy):
    """A reference that is off by a constant log-prob per token (as a mismatched reference model would be)."""

    shift = 0.0

    def reference_log_probs(self, obs, actions):
        return super().reference_log_probs(obs, actions) + self.shift


def kl_run(tiny_lm, task, shift: float, verbose: int = 0, **buffer_kwargs) -> list[str]:
    ShiftedReferencePolicy.shift = shift
    model = PPO(ShiftedReferencePolicy, toy_vec_env(task, n_envs=2), n_steps=6, batch_size=6, n_epochs=1, seed=0,
                device="cpu", rollout_buffer_class=TextRolloutBuffer, rollout_buffer_kwargs=buffer_kwargs,
                policy_kwargs=dict(lm=tiny_lm), verbose=verbose)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(24)  # 2 rollouts: each condition warns once
    return [str(w.message) for w in caught if "kl_to_ref" in str(w.message)]


def test_kl_warnings_forced_and_not_normally(task, tiny_lm, capsys):
    assert kl_run(tiny_lm, task, shift=0.0) == []  # an untouched LoRA policy: KL exactly 0, no warning
    negative = kl_run(tiny_lm, task, shift=+1.0, verbose=1)  # log π − log π_ref = −1 per token
    assert len(negative) == 1 and "negative beyond noise" in negative[0]
    assert "Warning: rollout/kl_to_ref" in capsys.readouterr().out  # also the run's own log
    high = kl_run(tiny_lm, task, shift=-10.0)  # +10 per token: 30 nats per completion
    assert len(high) == 1 and "exceeds kl_warn_threshold=20" in high[0] and "Lower the learning rate" in high[0]
    assert kl_run(tiny_lm, task, shift=-10.0, kl_warn_threshold=None) == []


def test_bad_kl_thresholds_refused():
    with pytest.raises(ValueError, match="kl_warn_threshold must be a finite number >= 0"):
        TextRolloutBuffer(4, SPACE, Discrete(10), "cpu", kl_warn_threshold=-1.0)
    with pytest.raises(ValueError, match="kl_negative_tolerance must be a finite number >= 0"):
        TextRolloutBuffer(4, SPACE, Discrete(10), "cpu", kl_negative_tolerance=float("nan"))
