"""sb3_bridge: the policy and NLPO's sets ride the log-prob tensor, the algorithm is found on the call stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from helpers import register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.logger import KVWriter, Logger

import sb3_textrl.buffers
from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy
from sb3_textrl.common import sb3_bridge
from sb3_textrl.common.sb3_bridge import (
    MAX_DEPTH,
    AlgorithmSetup,
    RolloutExtras,
    attach_rollout_extras,
    find_algorithm,
    find_algorithm_setup,
    record_metrics,
    rollout_extras,
)
from sb3_textrl.nlpo import unpack_allowed


class Capture(KVWriter):
    """A logger output that keeps every dump."""

    def __init__(self) -> None:
        self.dumps: list[dict] = []

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
        self.dumps.append(dict(key_values))

    def close(self) -> None:
        pass


@pytest.fixture
def toy_task(tiny_lm):
    return register_toy_task("BridgeToy-v0", tiny_lm, max_new_tokens=5)


# -- the log-prob tensor's extras -------------------------------------------------------------------------------
def test_a_plain_tensor_has_no_extras():
    assert rollout_extras(th.zeros(3)) == RolloutExtras(None, None)


def test_extras_come_back_from_the_same_tensor_only():
    policy, allowed = object(), th.ones(2, 5, dtype=th.bool)
    log_prob = th.zeros(2)
    assert attach_rollout_extras(log_prob, policy=policy, nlpo_allowed=allowed) is log_prob
    extras = rollout_extras(log_prob)
    assert extras.policy is policy and extras.nlpo_allowed is allowed
    assert rollout_extras(log_prob.clone()) == RolloutExtras()  # a new tensor carries nothing
    plain = attach_rollout_extras(th.zeros(2), policy=policy)  # not NLPO: no sets attached
    assert rollout_extras(plain) == RolloutExtras(policy, None)


# -- the algorithm on the call stack ----------------------------------------------------------------------------
def nested(depth: int, function):
    """``function()`` called ``depth`` frames below the caller."""
    return function() if depth == 0 else nested(depth - 1, function)


def as_method_of(algorithm, function):
    """``function()`` called from a frame whose ``self`` is ``algorithm``, as from its collect_rollouts()."""
    self = algorithm  # noqa: F841 (the frame's local is what find_algorithm reads)
    return function()


def test_no_algorithm_on_the_stack():
    assert find_algorithm() is None
    assert record_metrics({"x": 1.0}) is False  # and nothing is raised


def test_finds_the_calling_algorithm_within_max_depth(toy_task, tiny_lm):
    model = toy_ppo(toy_vec_env(toy_task, n_envs=1), tiny_lm, batch_size=10)
    # Frames looked at, from find_algorithm's caller up: the lambda's, then as_method_of's (self = model).
    assert as_method_of(model, lambda: find_algorithm(max_depth=2)) is model
    assert as_method_of(model, lambda: find_algorithm(max_depth=1)) is None
    # nested(k) adds k + 1 frames below the lambda: as_method_of's is then frame k + 3.
    assert as_method_of(model, lambda: nested(MAX_DEPTH - 3, find_algorithm)) is model
    assert as_method_of(model, lambda: nested(MAX_DEPTH - 2, find_algorithm)) is None

    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    assert as_method_of(model, lambda: record_metrics({"a": 1.0, "b": 2.0}, prefix="demo/")) is True
    model.logger.dump()
    assert capture.dumps == [{"demo/a": 1.0, "demo/b": 2.0}]


# -- the algorithm that builds the policy -----------------------------------------------------------------------
class SetupRecordingPolicy(TransformerLMPolicy):
    """Records what find_algorithm_setup() sees from a policy's __init__ (where sb3_textrl.lm.algorithm calls it)."""

    seen: list[AlgorithmSetup | None] = []

    def __init__(self, *args, **kwargs):
        SetupRecordingPolicy.seen.append(find_algorithm_setup())
        super().__init__(*args, **kwargs)


class DerivedPPO(PPO):
    """A user's PPO subclass with its own __init__: one more __init__ frame above PPO's."""

    def __init__(self, env, **kwargs):
        super().__init__(SetupRecordingPolicy, env, rollout_buffer_class=None, **kwargs)


def test_finds_the_algorithm_building_the_policy_and_its_init_arguments(toy_task, tiny_lm, tmp_path):
    assert find_algorithm_setup() is None  # no algorithm on the stack
    kwargs = dict(policy_kwargs=dict(lm=tiny_lm), batch_size=14, device="cpu")
    model = PPO(SetupRecordingPolicy, toy_vec_env(toy_task, n_envs=2), n_steps=7, rollout_buffer_class=TextRolloutBuffer,
                **kwargs)
    setup = SetupRecordingPolicy.seen[-1]
    assert setup.algorithm is model
    assert setup.init_arguments["n_steps"] == 7 and setup.init_arguments["rollout_buffer_class"] is TextRolloutBuffer
    assert "self" not in setup.init_arguments
    # PPO.load runs _setup_model outside __init__: the algorithm, without arguments (what was saved is kept).
    model.save(tmp_path / "run")
    loaded = PPO.load(tmp_path / "run", device="cpu")
    assert SetupRecordingPolicy.seen[-1] == AlgorithmSetup(loaded, None)
    # Under a subclass's __init__, the arguments are those PPO.__init__ got (the innermost __init__ frame).
    derived = DerivedPPO(toy_vec_env(toy_task, n_envs=2), n_steps=5, **(kwargs | dict(batch_size=10)))
    setup = SetupRecordingPolicy.seen[-1]
    assert setup.algorithm is derived and setup.init_arguments["n_steps"] == 5
    assert setup.init_arguments["rollout_buffer_class"] is None and type(derived.rollout_buffer) is TextRolloutBuffer
    # Outside _setup_model (a method of the algorithm, as in learn()): none.
    assert as_method_of(model, find_algorithm_setup) is None


# -- through SB3's PPO ------------------------------------------------------------------------------------------
def test_ppo_buffer_gets_the_policy_and_records_in_the_logger(toy_task, tiny_lm, monkeypatch):
    model = toy_ppo(toy_vec_env(toy_task, n_envs=2), tiny_lm, n_steps=10, batch_size=10)
    assert model.rollout_buffer.policy is None  # SB3 builds the buffer before the policy
    recorded: list[tuple[dict, str]] = []

    def spy(metrics, prefix="rollout/"):
        recorded.append((dict(metrics), prefix))
        return sb3_bridge.record_metrics(metrics, prefix=prefix)

    monkeypatch.setattr(sb3_textrl.buffers, "record_metrics", spy)
    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    model.learn(40)  # two rollouts, each dumped before its training

    assert model.rollout_buffer.policy is model.policy
    rollout = [(m, p) for m, p in recorded if p == "rollout/"]
    assert len(rollout) == 2 and len(capture.dumps) == 2
    for (metrics, _), dump in zip(rollout, capture.dumps):
        assert {"task_reward", "kl_to_ref", "kl_coef", "completion_len"} <= metrics.keys()
        for key, value in metrics.items():
            assert dump[f"rollout/{key}"] == value
    # The second rollout's reset recorded the first one's explained variance over its trained steps, before the dump.
    train = [m for m, p in recorded if p == "train/"]
    assert len(train) == 1 and capture.dumps[1]["train/explained_variance"] == pytest.approx(
        train[0]["explained_variance"], nan_ok=True
    )


def test_ppo_buffer_stores_the_nlpo_sets_the_policy_attached(toy_task, tiny_lm, monkeypatch):
    model = toy_ppo(toy_vec_env(toy_task, n_envs=2), tiny_lm, n_steps=6, batch_size=12, policy_kwargs=dict(nlpo_top_p=0.5))
    seen: list[RolloutExtras] = []

    def spy(log_prob):
        seen.append(sb3_bridge.rollout_extras(log_prob))
        return seen[-1]

    monkeypatch.setattr(sb3_textrl.buffers, "rollout_extras", spy)
    model.learn(12)  # one rollout of 6 steps
    buffer, n_tokens = model.rollout_buffer, int(model.action_space.n)
    assert len(seen) == 6 and all(extras.policy is model.policy for extras in seen)
    for step, extras in enumerate(seen):
        assert extras.nlpo_allowed.shape == (2, n_tokens)
        stored = unpack_allowed(buffer.nlpo_allowed[step], n_tokens)
        np.testing.assert_array_equal(stored, extras.nlpo_allowed.cpu().numpy())
