"""Mixed precision (autocast), gradient checkpointing and the rollout buffer's memory growth."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from helpers import ragged_stop_ids, register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer

from sb3_textrl import TextRolloutBuffer
from sb3_textrl.common.segments import flat_steps
from sb3_textrl.policies import TransformerLMPolicy


@pytest.fixture
def ragged_task(tiny_lm):
    return register_toy_task("PrecisionToy-v0", tiny_lm, max_new_tokens=7, stop_token_ids=ragged_stop_ids())


def randomize_lora(policy: TransformerLMPolicy, seed: int = 1) -> None:
    """LoRA starts as the identity (B = 0): random B makes the policy differ from its reference, and A get gradients."""
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for name, param in policy.lm.named_parameters():
            if "lora_B" in name:
                param.copy_(th.randn(param.shape, generator=generator) * 0.5)


def rollout_segments(model: PPO, n_steps: int = 9) -> tuple[dict[str, th.Tensor], th.Tensor, np.ndarray]:
    """Collect one rollout with the current weights; return its segment batch, actions and rollout log-probs."""
    buffer: TextRolloutBuffer = model.rollout_buffer
    _, callback = model._setup_learn(n_steps, reset_num_timesteps=model._last_obs is None)
    model.policy.set_training_mode(False)
    model.collect_rollouts(model.env, callback, buffer, n_rollout_steps=n_steps)
    chunk = buffer.segments
    actions = th.as_tensor(flat_steps(buffer.actions, chunk))
    return buffer.segment_batch(chunk), actions, flat_steps(buffer.log_probs, chunk)


def evaluated_log_probs(model: PPO, obs: dict[str, th.Tensor], actions: th.Tensor) -> np.ndarray:
    with th.no_grad():
        _, log_probs, _ = model.policy.evaluate_actions(obs, actions)
    return log_probs.numpy()


def test_auto_precision_on_cpu_is_exact_float32(ragged_task, tiny_lm):
    auto = toy_ppo(toy_vec_env(ragged_task), tiny_lm, n_steps=9)
    plain = toy_ppo(toy_vec_env(ragged_task), tiny_lm, n_steps=9, policy_kwargs=dict(mixed_precision="no"))
    assert auto.policy.mixed_precision == "auto" and auto.policy.autocast_dtype() is None
    randomize_lora(auto.policy)
    plain.policy.load_state_dict(auto.policy.state_dict())
    obs, actions, _ = rollout_segments(auto)
    np.testing.assert_array_equal(evaluated_log_probs(auto, obs, actions), evaluated_log_probs(plain, obs, actions))


def test_bf16_autocast_runs_ppo_and_keeps_rollout_and_training_log_probs_consistent(ragged_task, tiny_lm):
    model = toy_ppo(toy_vec_env(ragged_task), tiny_lm, n_steps=9, learning_rate=1e-2,
                    policy_kwargs=dict(mixed_precision="bf16"))
    policy = model.policy
    assert policy.autocast_dtype() == th.bfloat16  # explicit bf16 autocasts on CPU too
    randomize_lora(policy)
    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    model.learn(27)
    after = [p.detach() for p in policy.parameters() if p.requires_grad]
    assert all(p.dtype == th.float32 and th.isfinite(p).all() for p in after)  # master weights stay float32
    assert any(not th.equal(a, b) for a, b in zip(before, after))

    obs, actions, rollout = rollout_segments(model)
    training = evaluated_log_probs(model, obs, actions)
    # Cached one-token steps and one teacher-forced forward round differently in bf16, but must agree closely.
    np.testing.assert_allclose(training, rollout, atol=0.1)
    # ... and bf16 really ran: the float32 policy with the same weights gives (slightly) different numbers.
    policy.mixed_precision = "no"
    exact = evaluated_log_probs(model, obs, actions)
    difference = np.abs(exact - training).max()
    assert 0 < difference < 0.1, difference


@pytest.mark.parametrize("value", ["fp16", "float16"])
def test_fp16_is_refused_with_the_fix(ragged_task, tiny_lm, value):
    with pytest.raises(ValueError, match="GradScaler.*'bf16'"):
        toy_ppo(toy_vec_env(ragged_task), tiny_lm, policy_kwargs=dict(mixed_precision=value))


def test_unknown_precision_is_refused(ragged_task, tiny_lm):
    with pytest.raises(ValueError, match=r"mixed_precision must be one of \('auto', 'bf16', 'no'\), got 'bfloat'"):
        toy_ppo(toy_vec_env(ragged_task), tiny_lm, policy_kwargs=dict(mixed_precision="bfloat"))


def test_save_load_keeps_precision_and_checkpointing(ragged_task, tiny_lm, tmp_path):
    model = toy_ppo(toy_vec_env(ragged_task), tiny_lm,
                    policy_kwargs=dict(mixed_precision="bf16", gradient_checkpointing=True))
    model.save(tmp_path / "run")
    loaded = PPO.load(tmp_path / "run", env=toy_vec_env(ragged_task), device="cpu")
    assert loaded.policy.mixed_precision == "bf16" and loaded.policy.gradient_checkpointing is True
    assert loaded.policy.hf_model.is_gradient_checkpointing


def gradients(model: PPO, obs: dict[str, th.Tensor], actions: th.Tensor) -> tuple[dict[str, th.Tensor], int]:
    """Gradients of a PPO-like loss from one training-mode evaluate_actions, and the layer calls during backward."""
    policy = model.policy
    policy.set_training_mode(True)
    policy.optimizer.zero_grad()
    first_layer = next(iter(policy.hf_model.transformer.h[0].children()))
    calls = []
    hook = first_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        values, log_probs, entropy = policy.evaluate_actions(obs, actions)
        loss = -log_probs.mean() + values.pow(2).mean() - 0.01 * entropy.mean()
        forward_calls = len(calls)
        loss.backward()
    finally:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return grads, len(calls) - forward_calls


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients(ragged_task, tiny_lm):
    plain = toy_ppo(toy_vec_env(ragged_task), tiny_lm, n_steps=9)
    checkpointed = toy_ppo(toy_vec_env(ragged_task), tiny_lm, n_steps=9, policy_kwargs=dict(gradient_checkpointing=True))
    randomize_lora(plain.policy)
    checkpointed.policy.load_state_dict(plain.policy.state_dict())
    obs, actions, rollout = rollout_segments(checkpointed)  # rollouts run with the KV cache, no checkpointing
    assert checkpointed.policy._rollout_cache.past is not None
    np.testing.assert_allclose(evaluated_log_probs(plain, obs, actions), rollout, atol=1e-4)

    expected, plain_recomputes = gradients(plain, obs, actions)
    got, recomputes = gradients(checkpointed, obs, actions)
    assert plain_recomputes == 0 and recomputes > 0  # the backward re-ran the layers
    assert expected.keys() == got.keys() and any("lora_A" in name for name in got)
    for name in expected:
        th.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    checkpointed.policy.set_training_mode(False)  # no dropout ever: the LM's own modules stayed in eval mode
    assert not any(m.training for m in checkpointed.policy.lm.modules())


def test_ppo_learns_with_gradient_checkpointing_and_full_fine_tuning(ragged_task, tiny_lm):
    model = toy_ppo(toy_vec_env(ragged_task), tiny_lm, n_steps=9, learning_rate=1e-3,
                    policy_kwargs=dict(gradient_checkpointing=True, use_lora=False))
    before = model.policy.hf_model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    model.learn(18)
    assert not th.equal(before, model.policy.hf_model.transformer.h[0].mlp.c_fc.weight)
    # The frozen reference copy neither trains nor checkpoints.
    assert not model.policy.ref_lm.transformer.h[0].mlp.c_fc.weight.requires_grad


def filled_buffer(width: int, steps: int, episode: int = 8, n_envs: int = 4, vocab: int = 50257) -> TextRolloutBuffer:
    """A TextRolloutBuffer of ``steps`` steps per env, fed episodes of ``episode`` tokens after a 10-token prompt."""
    observation_space = spaces.Dict({
        "input_ids": spaces.Box(0, vocab - 1, (width,), dtype=np.int64),
        "attention_mask": spaces.Box(0, 1, (width,), dtype=np.int64),
    })
    buffer = TextRolloutBuffer(steps, observation_space, spaces.Discrete(vocab), device="cpu", n_envs=n_envs)
    ids = np.zeros((n_envs, width), dtype=np.int64)
    mask = np.zeros((n_envs, width), dtype=np.int64)
    mask[:, width - 10 :] = 1
    for step in range(steps):
        start = np.full(n_envs, step % episode == 0)
        buffer.add({"input_ids": ids, "attention_mask": mask}, np.ones(n_envs), np.zeros(n_envs), start,
                   th.zeros(n_envs), th.zeros(n_envs))
    return buffer


def test_rollout_buffer_memory_grows_with_tokens_not_with_context_width():
    small, double = filled_buffer(width=64, steps=64), filled_buffer(width=64, steps=128)
    # Linear in tokens, besides the lock-step's one flag per env (does its previous step show the prompt alone?).
    per_env = small.size_in_bytes()["_at_prompt"]
    assert per_env == double.size_in_bytes()["_at_prompt"] == 4
    assert double.size_in_bytes()["total"] - per_env == 2 * (small.size_in_bytes()["total"] - per_env)

    narrow, wide = filled_buffer(width=64, steps=64), filled_buffer(width=1024, steps=64)
    assert len(wide.segments) == len(narrow.segments) == 4 * 64 // 8
    per_step = {k: v for k, v in wide.size_in_bytes().items() if k not in ("contexts", "context_masks", "total")}
    assert per_step == {k: narrow.size_in_bytes()[k] for k in per_step}
    # Only the one context per episode widens: 5 bytes (int32 id + bool mask) per column and episode.
    growth = wide.size_in_bytes()["total"] - narrow.size_in_bytes()["total"]
    assert growth == len(wide.segments) * (1024 - 64) * 5
    # SB3's dict buffer stores every step's whole observation: tokens x width.
    space = wide.observation_space
    stock = DictRolloutBuffer(64, space, wide.action_space, device="cpu", n_envs=4)
    stock_observations = sum(array.nbytes for array in stock.observations.values())
    assert stock_observations == 64 * 4 * sum(box.shape[0] * box.dtype.itemsize for box in space.spaces.values())
    assert wide.size_in_bytes()["total"] < stock_observations / 20
