"""The KL penalty's one home, sb3_textrl.common.kl: exact values on small arrays, and the buffer, the evaluation and the
distributed hook computing through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from helpers import toy_ppo, toy_vec_env
from stable_baselines3.common.callbacks import BaseCallback

from sb3_textrl.common import kl_controller
from sb3_textrl.common.kl import (
    KLController,
    action_log_probs,
    episode_kl,
    mean_episode_kl,
    penalized_rewards,
    token_kl,
)
from sb3_textrl.evaluation import Sample, kl_to_reference

N_STEPS, N_ENVS = 12, 2


# -- the functions, by hand -------------------------------------------------------------------------------------
def test_token_kl_is_the_log_ratio_of_the_sampled_token_and_zero_when_idle():
    log_probs = np.array([[-1.0, -2.5], [-0.25, -3.0]], dtype=np.float32)
    ref_log_probs = np.array([[-1.5, -2.0], [-0.25, -1.0]], dtype=np.float32)
    idle = np.array([[False, False], [False, True]])
    kl = token_kl(log_probs, ref_log_probs, idle=idle)
    assert kl.dtype == np.float32
    np.testing.assert_array_equal(kl, [[0.5, -0.5], [0.0, 0.0]])
    np.testing.assert_array_equal(token_kl(log_probs, ref_log_probs), [[0.5, -0.5], [0.0, -2.0]])


def test_penalized_rewards_subtract_beta_times_the_estimate():
    rewards = np.array([[0.0, 1.0], [0.0, 2.0]], dtype=np.float32)
    kl = np.array([[0.5, -0.5], [0.0, 0.0]], dtype=np.float32)
    penalized = penalized_rewards(rewards, kl, 0.5)
    assert penalized.dtype == np.float32
    np.testing.assert_array_equal(penalized, [[-0.25, 1.25], [0.0, 2.0]])


def test_episode_kl_sums_each_episode_in_float64():
    kl = np.array([0.5, -0.5, 0.25, 1.0, 2.0], dtype=np.float32)
    sums = episode_kl(kl, [2, 0, 3])
    assert sums.dtype == np.float64
    np.testing.assert_array_equal(sums, [0.0, 0.0, 3.25])
    np.testing.assert_array_equal(episode_kl(kl, [1, 1, 1, 1, 1]), kl)
    assert episode_kl(np.zeros(0, dtype=np.float32), []).shape == (0,)
    with pytest.raises(ValueError, match="5 token estimates for episodes of 4 tokens"):
        episode_kl(kl, [2, 2])


def test_mean_episode_kl_is_the_mean_per_episode_or_none():
    assert mean_episode_kl(np.array([0.0, 3.25, -0.25])) == 1.0
    assert mean_episode_kl([]) is None


def test_reference_log_probs_are_normalised_as_the_policys_categorical():
    logits = th.randn(7, 11, generator=th.Generator().manual_seed(0)) / 0.7
    actions = th.tensor([0, 3, 10, 5, 5, 1, 9])
    expected = th.distributions.Categorical(logits=logits).log_prob(actions)
    assert th.equal(action_log_probs(logits, actions), expected)  # bit for bit: an untuned policy's KL is exactly 0
    assert not token_kl(expected.numpy(), action_log_probs(logits, actions).numpy()).any()


def test_the_controller_keeps_its_old_import_path():
    assert kl_controller.KLController is KLController
    assert KLController(0.1, kl_target=1.0).adaptive and not KLController(0.1).adaptive


# -- the buffer and the evaluation ------------------------------------------------------------------------------
class RolloutEnd(BaseCallback):
    """Keeps the rollout's last ``dones`` (what the buffer's compute_returns_and_advantage got) and its β."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.dones = np.asarray(self.locals["dones"]).copy()
        self.kl_coef = self.model.policy.kl_controller.value


def one_rollout(task: str, lm: str, kl_reducer=None, callbacks=(), **policy_kwargs):
    """One rollout (and one update with learning rate 0: the policy stays the one that sampled), with ``callbacks``."""
    # top_k truncates the sampling distribution, so the KL to the untruncated reference is > 0 at every token.
    kwargs = dict(kl_coef=0.1, top_k=1000) | policy_kwargs
    model = toy_ppo(
        toy_vec_env(task, n_envs=N_ENVS),
        lm,
        n_steps=N_STEPS,
        batch_size=N_STEPS * N_ENVS,
        learning_rate=0.0,
        policy_kwargs=kwargs,
        rollout_buffer_kwargs=dict(kl_warn_threshold=None),
    )
    model.rollout_buffer.kl_reducer = kl_reducer
    callback = RolloutEnd()
    model.learn(N_STEPS * N_ENVS, callback=[callback, *callbacks])
    return model, callback


def whole_episodes(buffer, dones: np.ndarray) -> list:
    return [
        s
        for s in buffer.segments
        if buffer.episode_starts[s.start, s.env] and (s.start + s.length < buffer.buffer_size or dones[s.env])
    ]


def test_buffer_penalises_and_reports_the_kl_of_its_stored_log_probs(ragged_task, tiny_lm):
    model, end = one_rollout(ragged_task, tiny_lm)
    buffer = model.rollout_buffer
    kl = token_kl(buffer.log_probs, buffer.ref_log_probs, idle=buffer.waits)
    # The penalty: exactly kl.py's, and by hand.
    np.testing.assert_array_equal(buffer.rewards, penalized_rewards(buffer.task_rewards, kl, 0.1))
    by_hand = buffer.task_rewards - np.float32(0.1) * (buffer.log_probs - buffer.ref_log_probs)
    np.testing.assert_allclose(buffer.rewards, by_hand, rtol=0, atol=1e-6)
    assert (kl > 0).all()  # top-k sampling against the untruncated reference
    # rollout/kl_to_ref: the mean over the rollout's whole episodes of each one's summed estimate.
    whole = whole_episodes(buffer, end.dones)
    assert 0 < len(whole) < len(buffer.segments)  # ragged stops: some episodes are cut by the rollout's ends
    sums = [
        float(
            np.sum(
                buffer.log_probs[s.start : s.start + s.length, s.env].astype(np.float64)
                - buffer.ref_log_probs[s.start : s.start + s.length, s.env]
            )
        )
        for s in whole
    ]
    assert buffer.metrics["kl_to_ref"] == pytest.approx(np.mean(sums), rel=1e-6)
    flat = np.concatenate([kl[s.start : s.start + s.length, s.env] for s in whole])
    assert buffer.metrics["kl_to_ref"] == mean_episode_kl(episode_kl(flat, [s.length for s in whole]))

    # The evaluation's per-completion KL of those same episodes (one teacher-forced forward of each model) is the
    # same statistic: it matches the rollout's sums to float rounding (KV-cache steps against one forward).
    samples = []
    for s in whole:
        ids = buffer.contexts[s.context].astype(np.int64)
        mask = buffer.context_masks[s.context].copy()
        last = int(np.flatnonzero(mask)[-1])
        ids[last + 1 : last + 1 + s.length] = buffer.actions[s.start : s.start + s.length, s.env]
        mask[last + 1 : last + 1 + s.length] = True
        samples.append(Sample(0, "", "", None, 0.0, s.length, observation=dict(input_ids=ids, attention_mask=mask)))
    model.policy.set_training_mode(False)
    np.testing.assert_allclose(kl_to_reference(model.policy, samples, batch_size=3), sums, rtol=0, atol=1e-4)


def test_kl_reducer_decides_what_beta_adapts_from(ragged_task, tiny_lm):
    calls = []

    def reducer(kl, n_tokens):
        calls.append((kl, n_tokens))
        return 100.0, 500  # far above the target: the error is clipped to +0.2

    model, end = one_rollout(ragged_task, tiny_lm, reducer, kl_target=1.0, kl_horizon=1000)
    buffer = model.rollout_buffer
    assert calls == [(buffer.metrics["kl_to_ref"], N_STEPS * N_ENVS)]  # once a rollout, no waiting steps here
    assert buffer.metrics["kl_coef"] == 0.1  # the β the rollout was penalised with
    assert end.kl_coef == pytest.approx(0.1 * (1 + 0.2 * 500 / 1000))
    assert model.policy.kl_controller.value == end.kl_coef

    model, end = one_rollout(ragged_task, tiny_lm, lambda kl, n_tokens: (None, n_tokens), kl_target=1.0)
    assert end.kl_coef == 0.1  # no KL: β stays
