"""bf16 copies of the frozen weights under CPU autocast (lm/precision.py): bitwise what plain autocast computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from helpers import outputs_and_grads, ragged_stop_ids, register_toy_task, toy_ppo, toy_vec_env

from sb3_textrl.common.segments import flat_steps
from sb3_textrl.lm.precision import FrozenWeightCasts


def bf16_ppo(lm: str, task: str, casts: bool, **policy_kwargs):
    model = toy_ppo(toy_vec_env(task, n_envs=3), lm, n_steps=9, policy_kwargs=dict(mixed_precision="bf16") | policy_kwargs)
    if not casts:
        model.policy.frozen_weight_casts = None  # plain autocast: every weight cast at every op
    generator = th.Generator().manual_seed(1)
    with th.no_grad():  # move every trainable weight (LoRA starts as the identity) the same way in both models
        for name, param in model.policy.named_parameters():
            if param.requires_grad:
                scale = 0.5 if "lora_B" in name else 0.05
                param.add_(th.randn(param.shape, generator=generator) * scale)
    return model


def rollout(model, n_steps: int = 9):
    buffer = model.rollout_buffer
    _, callback = model._setup_learn(n_steps, reset_num_timesteps=True)
    callback.on_training_start(locals(), globals())
    model.policy.set_training_mode(False)
    th.manual_seed(0)  # the same sampling stream for every model
    assert model.collect_rollouts(model.env, callback, buffer, n_rollout_steps=n_steps)
    return buffer


@pytest.mark.parametrize(
    "policy_kwargs",
    [dict(), dict(trainable_layers=2), dict(trainable_layers=2, use_lora=False), dict(gradient_checkpointing=True)],
    ids=["lora", "lora-top2", "full-top2", "lora-checkpointing"],
)
def test_copies_give_bitwise_the_rollout_outputs_and_gradients_of_plain_autocast(family_lm, policy_kwargs):
    task = register_toy_task(f"Casts{abs(hash((family_lm, str(policy_kwargs))))}-v0", family_lm,
                             max_new_tokens=7, stop_token_ids=ragged_stop_ids())
    cached, plain = (bf16_ppo(family_lm, task, casts, **policy_kwargs) for casts in (True, False))
    buffers = [rollout(model) for model in (cached, plain)]
    assert cached.policy.frozen_weight_casts.size_in_bytes() > 0  # the copies were used
    for field in ("actions", "log_probs", "values", "rewards"):
        np.testing.assert_array_equal(getattr(buffers[0], field), getattr(buffers[1], field), err_msg=field)
    chunk = buffers[0].segments
    obs, actions = buffers[0].segment_batch(chunk), th.as_tensor(flat_steps(buffers[0].actions, chunk))
    for model in (cached, plain):
        model.policy.set_training_mode(True)  # with checkpointing: the layers are recomputed in backward
    *cached_out, cached_grads = outputs_and_grads(cached.policy, obs, actions)
    *plain_out, plain_grads = outputs_and_grads(plain.policy, obs, actions)
    for x, y in zip(cached_out, plain_out):
        assert th.equal(x, y)
    assert cached_grads.keys() == plain_grads.keys() and cached_grads
    for name in cached_grads:
        assert th.equal(cached_grads[name], plain_grads[name]), name
    assert th.equal(cached.policy.reference_log_probs(obs, actions), plain.policy.reference_log_probs(obs, actions))


def test_a_weight_written_through_data_is_copied_again(tiny_lm):
    task = register_toy_task("CastsData-v0", tiny_lm, max_new_tokens=5)
    cached, plain = (bf16_ppo(tiny_lm, task, casts) for casts in (True, False))
    obs = cached.env.reset()
    obs_tensor, _ = cached.policy.obs_to_tensor(obs)
    before = cached.policy.get_distribution(obs_tensor).distribution.logits
    for model in (cached, plain):  # as peft's merge_adapter() does: in place, through .data (no version bump)
        base = next(m for n, m in model.policy.lm.named_modules() if n.endswith("c_attn.base_layer"))
        base.weight.data += th.randn(base.weight.shape, generator=th.Generator().manual_seed(2))
        model.policy.set_training_mode(True)  # a new phase drops the rollout KV cache (not the weight copies)
        model.policy.set_training_mode(False)
    after = cached.policy.get_distribution(obs_tensor).distribution.logits
    expected = plain.policy.get_distribution(obs_tensor).distribution.logits
    assert not th.equal(before, after)
    assert th.equal(after, expected)


def test_no_copies_in_float32_and_a_copied_policy_starts_empty(tiny_lm):
    task = register_toy_task("CastsFloat32-v0", tiny_lm, max_new_tokens=5)
    model = toy_ppo(toy_vec_env(task, n_envs=2), tiny_lm, n_steps=6)
    rollout(model, n_steps=6)
    assert model.policy.autocast_dtype() is None and model.policy.frozen_weight_casts.size_in_bytes() == 0

    casts = FrozenWeightCasts()
    linear = th.nn.Linear(4, 3).requires_grad_(False)
    with casts.autocast(linear, th.bfloat16, th.device("cpu")):
        out = linear(th.ones(2, 4))
        assert linear.weight.dtype == th.bfloat16  # the copy is in place during the forward...
    assert linear.weight.dtype == th.float32 and isinstance(linear.weight, th.nn.Parameter)  # ...and only then
    with th.autocast("cpu", dtype=th.bfloat16):
        assert th.equal(out, linear(th.ones(2, 4)))
    assert casts.size_in_bytes() == (12 + 3) * 2
    import copy

    assert copy.deepcopy(casts).size_in_bytes() == 0
