"""SB3 learners besides PPO: A2C trains TransformerLMPolicy with the grouped buffer; the unsupported ones fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from helpers import ragged_stop_ids, register_toy_task, toy_vec_env
from sb3_contrib import TRPO, RecurrentPPO
from stable_baselines3 import A2C, DQN

from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy
from sb3_textrl.nlpo import unpack_allowed


@pytest.fixture
def toy_task(tiny_lm):
    return register_toy_task("AlgoToy-v0", tiny_lm, max_new_tokens=6, stop_token_ids=ragged_stop_ids())


def a2c(env, lm: str, **kwargs) -> A2C:
    policy_kwargs = dict(lm=lm) | kwargs.pop("policy_kwargs", {})
    return A2C(TransformerLMPolicy, env, rollout_buffer_class=TextRolloutBuffer, policy_kwargs=policy_kwargs,
               seed=0, device="cpu", **kwargs)


def test_a2c_update_follows_the_advantages(toy_task, tiny_lm):
    # vf_coef=0 and ent_coef=0: the update is A2C's policy gradient alone, so it must raise sum(A * log pi).
    model = a2c(toy_vec_env(toy_task, n_envs=3), tiny_lm, n_steps=7, learning_rate=1e-3, vf_coef=0.0, ent_coef=0.0)
    policy = model.policy
    assert isinstance(policy.optimizer, th.optim.RMSprop)  # A2C's own optimizer reached the policy
    model.learn(21)  # one rollout, one update
    buffer = model.rollout_buffer
    assert len(buffer.segments) > 3  # ragged episodes: several segments per env
    (batch,) = list(buffer.get(batch_size=None))  # A2C trains on the whole rollout in one batch of segments
    actions = batch.actions.long().flatten()
    with th.no_grad():
        _, after, _ = policy.evaluate_actions(batch.observations, actions)
    before = batch.old_log_prob  # the rollout's log-probs, before the update
    advantages = batch.advantages
    assert float((after - before).abs().max()) > 1e-4, "the update changed nothing"
    assert float((advantages * (after - before)).sum()) > 0
    # The grouped buffer applied the KL penalty and recorded its metrics in A2C's logger.
    beta = policy.kl_controller.value
    np.testing.assert_allclose(buffer.rewards, buffer.task_rewards - beta * (buffer.log_probs - buffer.ref_log_probs),
                               rtol=1e-5, atol=1e-6)
    for key in ("rollout/kl_to_ref", "rollout/task_reward", "train/policy_loss", "train/value_loss"):
        assert key in model.logger.name_to_value, key


def test_a2c_rollout_and_training_log_probs_agree(toy_task, tiny_lm):
    model = a2c(toy_vec_env(toy_task, n_envs=2), tiny_lm, n_steps=6, learning_rate=0.0,
                policy_kwargs=dict(temperature=0.7, nlpo_top_p=0.6))
    model.learn(12)
    buffer = model.rollout_buffer
    (batch,) = list(buffer.get(batch_size=None))
    with th.no_grad():
        _, log_prob, _ = model.policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
    np.testing.assert_allclose(log_prob.numpy(), batch.old_log_prob.numpy(), rtol=1e-4, atol=1e-4)
    # NLPO works under A2C too: every action lies in the set stored for its step.
    allowed = unpack_allowed(buffer.nlpo_allowed.reshape(-1, buffer.nlpo_allowed.shape[-1]), int(model.action_space.n))
    assert allowed[np.arange(len(allowed)), buffer.actions.reshape(-1)].all()
    assert allowed.sum(axis=1).max() < allowed.shape[1]


def test_a2c_save_and_load(toy_task, tiny_lm, tmp_path):
    model = a2c(toy_vec_env(toy_task, n_envs=2), tiny_lm, n_steps=6, policy_kwargs=dict(kl_coef=0.2))
    model.learn(12)
    model.save(tmp_path / "a2c")
    loaded = A2C.load(tmp_path / "a2c", env=toy_vec_env(toy_task, n_envs=2), device="cpu")
    assert loaded.policy.kl_coef == 0.2
    assert all(th.equal(a, b) for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()))


@pytest.mark.parametrize(
    ("algorithm", "error"),
    [(DQN, "q_net"), (RecurrentPPO, "lstm_actor")],
    ids=["DQN", "RecurrentPPO"],
)
def test_unsupported_learners_fail_at_construction(toy_task, tiny_lm, algorithm, error):
    # Documented in docs/algorithms.md: they need another policy type (Q-network, recurrent state), not an LM policy.
    with pytest.raises(AttributeError, match=error):
        algorithm(TransformerLMPolicy, toy_vec_env(toy_task, n_envs=1), policy_kwargs=dict(lm=tiny_lm), device="cpu")


def test_trpo_is_refused_with_a_clear_error(toy_task, tiny_lm):
    # TRPO reads training batches through get_distribution(); with TextRolloutBuffer they are episode segments.
    model = TRPO(TransformerLMPolicy, toy_vec_env(toy_task, n_envs=2), rollout_buffer_class=TextRolloutBuffer, n_steps=8,
                 batch_size=16, policy_kwargs=dict(lm=tiny_lm), device="cpu")
    with pytest.raises(NotImplementedError, match=r"get_distribution\(\) got a training batch.*PPO, A2C or MaskablePPO"):
        model.learn(16)
