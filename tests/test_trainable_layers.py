"""trainable_layers: top blocks trained from the lower blocks' output kept by the rollout, exactly as a full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from conftest import N_BLOCKS, save_tiny_lm
from helpers import outputs_and_grads, ragged_stop_ids, register_toy_task, toy_ppo, toy_vec_env
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from transformers import LlamaConfig

from sb3_textrl import MaskableTextRolloutBuffer, MaskableTransformerLMPolicy, TextRolloutBuffer
from sb3_textrl.common.kv_cache import positions_from_mask
from sb3_textrl.common.layer_split import LayerSplit, find_blocks, position_wise_parts
from sb3_textrl.common.segments import flat_steps
from sb3_textrl.policies import SPLIT_HIDDEN


@pytest.fixture(scope="module")
def gpt2_lm(tmp_path_factory, gpt2_tokenizer) -> str:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2-4"), gpt2_tokenizer, n_layer=N_BLOCKS)


def task_for(lm: str, name: str, **kwargs) -> str:
    # Every 8th token id stops a completion: envs end at different steps, segments start mid-rollout.
    return register_toy_task(name, lm, max_new_tokens=7, stop_token_ids=ragged_stop_ids(), **kwargs)


def perturb_trainable(policy, seed: int = 1) -> None:
    """Move every trainable weight (LoRA starts as the identity): the policy differs from its reference."""
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for name, param in policy.named_parameters():
            if param.requires_grad and "value_net" not in name:
                scale = 0.5 if "lora_B" in name else 0.05
                param.add_(th.randn(param.shape, generator=generator) * scale)


def collect(model, n_steps: int = 9):
    buffer = model.rollout_buffer
    _, callback = model._setup_learn(n_steps, reset_num_timesteps=model._last_obs is None)
    callback.on_training_start(locals(), globals())
    model.policy.set_training_mode(False)
    assert model.collect_rollouts(model.env, callback, buffer, n_rollout_steps=n_steps)
    return buffer


def split_and_full_batches(buffer):
    chunk = buffer.segments
    split = buffer.segment_batch(chunk)
    assert SPLIT_HIDDEN in split
    full = {k: v for k, v in split.items() if k != SPLIT_HIDDEN}
    actions = th.as_tensor(flat_steps(buffer.actions, chunk))
    return split, full, actions


def assert_split_equals_full(policy, buffer, atol: float = 1e-5, grad_rtol: float = 1e-4):
    split, full, actions = split_and_full_batches(buffer)
    a, b = outputs_and_grads(policy, split, actions), outputs_and_grads(policy, full, actions)
    for x, y in zip(a[:3], b[:3]):
        th.testing.assert_close(x, y, atol=atol, rtol=0)
    assert a[3].keys() == b[3].keys() and a[3]
    for name in a[3]:
        th.testing.assert_close(a[3][name], b[3][name], rtol=grad_rtol, atol=grad_rtol * b[3][name].abs().max().item())
    th.testing.assert_close(policy.reference_log_probs(split, actions), policy.reference_log_probs(full, actions),
                            atol=atol, rtol=0)
    return split, full, actions


@pytest.mark.parametrize("use_lora", [True, False])
def test_top_blocks_from_kept_hidden_states_equal_the_full_forward(family_lm, use_lora):
    task = task_for(family_lm, f"SplitExact{use_lora}-v0")
    model = toy_ppo(toy_vec_env(task, n_envs=3), family_lm, n_steps=9,
                    policy_kwargs=dict(trainable_layers=2, use_lora=use_lora))
    policy = model.policy
    perturb_trainable(policy)
    buffer = collect(model)
    # Rollouts were cut mid-episode and envs ended at different steps: segments that start after a context.
    assert len(buffer.segments) > 3
    split, full, actions = assert_split_equals_full(policy, buffer)
    # The kept hidden states are those of a full teacher-forced forward at the first trainable block.
    hf = policy.hf_model
    mask = full["attention_mask"]
    with policy.layer_split.capture(hf) as captured:
        policy._trunk(hf, full["input_ids"], mask, positions_from_mask(mask))
    last_action = (full["segment_starts"] + full["segment_lengths"]).unsqueeze(1)  # its column is never an input
    used = mask.bool() & (th.arange(mask.shape[1]).unsqueeze(0) < last_action)
    th.testing.assert_close(split[SPLIT_HIDDEN][used], captured[0][used], atol=1e-5, rtol=1e-5)
    # And training on them reproduces the rollout's own log-probs.
    with th.no_grad():
        _, log_prob, _ = policy.evaluate_actions(split, actions)
    np.testing.assert_allclose(log_prob.numpy(), flat_steps(buffer.log_probs, buffer.segments), atol=1e-4)


def test_lower_blocks_alone_give_the_full_forwards_split_hidden_and_the_kl_pass_uses_them(family_lm, monkeypatch):
    """split_hidden's recompute runs the lower blocks only (the top ones stand aside) and gets what a whole forward
    hands the first trainable block; kl_to_reference reads the top blocks of policy and reference from there."""
    from sb3_textrl.evaluation import generate_samples, kl_to_reference

    task = task_for(family_lm, "SplitLowerOnly-v0")
    env = toy_vec_env(task, n_envs=3)
    model = toy_ppo(env, family_lm, n_steps=9, policy_kwargs=dict(trainable_layers=2))
    policy = model.policy
    perturb_trainable(policy)
    samples = generate_samples(model, env, [0, 1, 2, 3])
    ids = th.as_tensor(np.stack([s.observation["input_ids"] for s in samples]))
    mask = th.as_tensor(np.stack([s.observation["attention_mask"] for s in samples]))
    hf, split = policy.hf_model, policy.layer_split
    with split.capture(hf) as whole:
        policy._trunk(hf, ids, mask, positions_from_mask(mask))
    ran: list[int] = []
    for block in split.blocks(hf)[split.first_trainable :]:
        block.register_forward_pre_hook(lambda module, args, kwargs: ran.append(1), with_kwargs=True)
    policy._rollout_cache.reset()  # nothing kept: split_hidden recomputes every row
    recomputed = policy.split_hidden(ids, mask)
    assert not ran  # the top blocks stood aside
    th.testing.assert_close(recomputed, whole[0] * mask.unsqueeze(-1), atol=0, rtol=0)
    kl = kl_to_reference(policy, samples)
    assert len(ran) == 2 * 2 * 1  # one batch: the top 2 blocks of the policy and of the reference, once each
    monkeypatch.setattr(policy, "layer_split", None)  # the full forwards of both, as without trainable_layers
    np.testing.assert_allclose(kl, kl_to_reference(policy, samples), atol=1e-5, rtol=0)
    assert np.abs(kl).max() > 1e-3  # the policy moved off its reference: the comparison means something


def rows_seen_by_last_block_parts(policy, obs, actions) -> dict[str, int]:
    """Rows of input each position-wise part of the last block computed in one evaluate_actions (and backward)."""
    seen: dict[str, int] = {}
    last = policy.layer_split.blocks(policy.hf_model)[-1]

    def recorder(key: str):
        return lambda module, args: seen.__setitem__(key, args[0].reshape(-1, args[0].shape[-1]).shape[0])

    handles = [getattr(parent, name).register_forward_pre_hook(recorder(f"{type(parent).__name__}.{name}"))
               for parent, name in position_wise_parts(last)]
    try:
        _, log_prob, _ = policy.evaluate_actions(obs, actions)
        log_prob.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_the_last_block_runs_its_position_wise_parts_only_where_actions_are_read(family_lm):
    task = task_for(family_lm, "SplitLastBlock-v0")
    model = toy_ppo(toy_vec_env(task, n_envs=3), family_lm, n_steps=9, policy_kwargs=dict(trainable_layers=2))
    policy = model.policy
    buffer = collect(model)
    split, full, actions = split_and_full_batches(buffer)
    parts = position_wise_parts(policy.layer_split.blocks(policy.hf_model)[-1])
    # The MLP and the attention's output projection in every family; the query projection where it is its own.
    assert len(parts) == (2 if "gpt2" in family_lm else 3)
    restricted = rows_seen_by_last_block_parts(policy, split, actions)
    everywhere = rows_seen_by_last_block_parts(policy, full, actions)
    assert set(restricted.values()) == {len(actions)}  # one row per action (the exactness tests check the values)
    assert min(everywhere.values()) > len(actions)  # the full forward: every used column of every segment
    policy.hf_model.gradient_checkpointing_enable()  # its backward re-runs the block outside the restriction
    policy.hf_model.train()
    assert min(rows_seen_by_last_block_parts(policy, split, actions).values()) > len(actions)


def test_only_the_top_blocks_train_and_the_reference_shares_the_lower_ones(family_lm):
    task = task_for(family_lm, "SplitFrozen-v0")
    lora = toy_ppo(toy_vec_env(task, n_envs=2), family_lm, policy_kwargs=dict(trainable_layers=1)).policy
    split = lora.layer_split
    assert (split.n_blocks, split.first_trainable) == (N_BLOCKS, N_BLOCKS - 1)
    trained = [name for name, p in lora.lm.named_parameters() if p.requires_grad]
    assert trained and all(f".{split.blocks_name}.{N_BLOCKS - 1}." in f".{name}" for name in trained)
    full = toy_ppo(toy_vec_env(task, n_envs=2), family_lm, policy_kwargs=dict(trainable_layers=1, use_lora=False)).policy
    blocks = find_blocks(full.lm)[1]
    assert not any(p.requires_grad for block in blocks[: N_BLOCKS - 1] for p in block.parameters())
    assert all(p.requires_grad for p in blocks[N_BLOCKS - 1].parameters())
    assert not full.lm.get_input_embeddings().weight.requires_grad  # feeds the lower blocks (and a tied head)
    optimized = {id(p) for group in full.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in full.parameters() if p.requires_grad}
    # The frozen copy's lower blocks are the policy's weights: its hidden state at the split is the policy's.
    for block, ref_block in zip(blocks[: N_BLOCKS - 1], find_blocks(full.ref_lm)[1]):
        assert all(th.equal(a, b) for a, b in zip(block.parameters(), ref_block.parameters()))


def test_gradient_checkpointing_and_bf16_with_trainable_layers(gpt2_lm):
    task = task_for(gpt2_lm, "SplitCheckpoint-v0")
    model = toy_ppo(toy_vec_env(task, n_envs=3), gpt2_lm, n_steps=9,
                    policy_kwargs=dict(trainable_layers=2, gradient_checkpointing=True))
    perturb_trainable(model.policy)
    model.policy.set_training_mode(True)  # checkpointing is active in training mode only
    buffer = collect(model)
    model.policy.set_training_mode(True)
    assert_split_equals_full(model.policy, buffer)

    bf16 = toy_ppo(toy_vec_env(task, n_envs=3), gpt2_lm, n_steps=9,
                   policy_kwargs=dict(trainable_layers=2, mixed_precision="bf16"))
    perturb_trainable(bf16.policy)
    buffer = collect(bf16)
    split, full, actions = split_and_full_batches(buffer)
    with th.no_grad():
        _, split_log_prob, _ = bf16.policy.evaluate_actions(split, actions)
        _, full_log_prob, _ = bf16.policy.evaluate_actions(full, actions)
    # bf16 rounds the lower blocks differently in a cached step and a teacher-forced forward; both stay close.
    np.testing.assert_allclose(split_log_prob.numpy(), full_log_prob.numpy(), atol=0.1)
    np.testing.assert_allclose(split_log_prob.numpy(), flat_steps(buffer.log_probs, buffer.segments), atol=0.1)


def test_maskable_ppo_masks_and_nlpo_with_trainable_layers(gpt2_lm):
    def every_other(prompt_ids, generated_ids):
        mask = np.zeros(50257, dtype=bool)
        mask[len(generated_ids) % 2 :: 2] = True
        mask[50256] = True
        return mask

    task = task_for(gpt2_lm, "SplitMasked-v0", action_mask=every_other)
    model = MaskablePPO(MaskableTransformerLMPolicy, toy_vec_env(task, n_envs=3), n_steps=9, batch_size=16, n_epochs=1,
                        seed=0, device="cpu", rollout_buffer_class=MaskableTextRolloutBuffer,
                        policy_kwargs=dict(lm=gpt2_lm, trainable_layers=2, nlpo_top_p=0.9))
    perturb_trainable(model.policy)
    buffer = collect(model)
    split, full, actions = split_and_full_batches(buffer)
    masks = th.as_tensor(buffer._masks(buffer.segments))
    split["nlpo_allowed"] = full["nlpo_allowed"] = buffer._get_samples(buffer.segments).observations["nlpo_allowed"]
    with th.no_grad():
        a = model.policy.evaluate_actions(split, actions, action_masks=masks)
        b = model.policy.evaluate_actions(full, actions, action_masks=masks)
        for x, y in zip(a, b):
            th.testing.assert_close(x, y, atol=1e-5, rtol=0)
        th.testing.assert_close(model.policy.reference_log_probs(split, actions, action_masks=masks),
                                model.policy.reference_log_probs(full, actions, action_masks=masks), atol=1e-5, rtol=0)
    np.testing.assert_allclose(a[1].numpy(), flat_steps(buffer.log_probs, buffer.segments), atol=1e-4)


class PredictBetweenSteps(BaseCallback):
    """Uses the policy on other observations after each env step, before the buffer stores the step."""

    def __init__(self, parity: bool):
        super().__init__()
        self.parity = parity

    def _on_step(self) -> bool:
        if self.n_calls % 2 == int(self.parity):
            # The next observations: the cache moves on by one token (or, for a finished env, to a new prompt).
            self.model.policy.predict(self.locals["new_obs"])
        else:
            other = {k: v.clone() for k, v in self.locals["obs_tensor"].items()}
            first = other["attention_mask"].argmax(dim=1)  # another first prompt token: the cache drops the step's rows
            rows = th.arange(len(first))
            other["input_ids"][rows, first] = (other["input_ids"][rows, first] + 1) % 50257
            self.model.policy.predict({k: v.numpy() for k, v in other.items()})
        return True


@pytest.mark.parametrize("parity", [False, True])
def test_buffer_gets_the_step_hidden_states_even_when_the_cache_moved_on(gpt2_lm, parity):
    task = task_for(gpt2_lm, "SplitMovedOn-v0")
    model = toy_ppo(toy_vec_env(task, n_envs=2), gpt2_lm, n_steps=9, policy_kwargs=dict(trainable_layers=2))
    perturb_trainable(model.policy)
    buffer = model.rollout_buffer
    _, callback = model._setup_learn(9, callback=PredictBetweenSteps(parity))
    callback.on_training_start(locals(), globals())
    model.policy.set_training_mode(False)
    assert model.collect_rollouts(model.env, callback, buffer, n_rollout_steps=9)
    assert_split_equals_full(model.policy, buffer)


def test_ppo_learns_saves_and_loads_with_trainable_layers(gpt2_lm, tmp_path):
    task = task_for(gpt2_lm, "SplitLearn-v0")
    model = toy_ppo(toy_vec_env(task, n_envs=2), gpt2_lm, n_steps=8, n_epochs=2, learning_rate=1e-3,
                    policy_kwargs=dict(trainable_layers=1, kl_coef=0.1))
    before = {n: p.clone() for n, p in model.policy.named_parameters()}
    model.learn(32)
    changed = {n for n, p in model.policy.named_parameters() if not th.equal(p, before[n])}
    assert changed and all("lora" in n or "value_net" in n for n in changed)
    assert all(f".h.{N_BLOCKS - 1}." in n for n in changed if "lora" in n)
    sizes = model.rollout_buffer.size_in_bytes()
    hidden = model.policy.layer_split and model.policy.hf_model.config.n_embd
    assert sizes["step_split"] == 8 * 2 * hidden * 4 and sizes["context_split"] > 0
    model.save(tmp_path / "run")
    loaded = PPO.load(tmp_path / "run", env=toy_vec_env(task, n_envs=2), device="cpu")
    assert loaded.policy.trainable_layers == 1 and loaded.policy.layer_split.first_trainable == N_BLOCKS - 1
    state, restored = model.policy.state_dict(), loaded.policy.state_dict()
    assert all(th.equal(state[k], restored[k]) for k in state)
    loaded.learn(16)


@pytest.mark.parametrize("value", [0, -1, N_BLOCKS + 1, 2.5, True, "2"])
def test_bad_trainable_layers_name_the_block_count(gpt2_lm, value):
    task = task_for(gpt2_lm, "SplitBad-v0")
    with pytest.raises(ValueError, match=rf"trainable_layers must be an integer from 1 to {N_BLOCKS} .*GPT2LMHeadModel"):
        toy_ppo(toy_vec_env(task, n_envs=1), gpt2_lm, policy_kwargs=dict(trainable_layers=value))


def test_lora_targets_outside_the_top_blocks_and_other_refusals(gpt2_lm):
    task = task_for(gpt2_lm, "SplitTargets-v0")
    env = toy_vec_env(task, n_envs=1)
    with pytest.raises(ValueError, match=r"select no module in the top 2 blocks \(blocks 2-3 of 'transformer.h'\)"):
        toy_ppo(env, gpt2_lm, policy_kwargs=dict(trainable_layers=2, lora_config=dict(target_modules=["wte"])))
    with pytest.raises(ValueError, match=r"target_modules as a list of module names"):
        toy_ppo(env, gpt2_lm, policy_kwargs=dict(trainable_layers=2, lora_config=dict(target_modules=r".*\.c_attn")))
    with pytest.raises(ValueError, match="needs use_kv_cache=True"):
        toy_ppo(env, gpt2_lm, policy_kwargs=dict(trainable_layers=2, use_kv_cache=False))
    # All blocks is every layer: nothing is frozen or kept.
    every = toy_ppo(env, gpt2_lm, policy_kwargs=dict(trainable_layers=N_BLOCKS)).policy
    assert every.layer_split is None


def test_a_model_without_a_block_list_is_refused():
    class NoBlocks(th.nn.Module):
        config = LlamaConfig(num_hidden_layers=3)

    with pytest.raises(ValueError, match="cannot find the transformer blocks of NoBlocks"):
        LayerSplit(NoBlocks(), 1)


def test_seq2seq_policy_refuses_trainable_layers(tmp_path, gpt2_tokenizer):
    from sb3_textrl import Seq2SeqLMPolicy
    from sb3_textrl.models import tiny_t5

    directory = tmp_path / "t5"
    tiny_t5(len(gpt2_tokenizer)).save_pretrained(directory)
    gpt2_tokenizer.save_pretrained(directory)
    task = register_toy_task("SplitT5-v0", str(directory))
    with pytest.raises(ValueError, match="Seq2SeqLMPolicy does not support trainable_layers"):
        PPO(Seq2SeqLMPolicy, toy_vec_env(task, n_envs=1), policy_kwargs=dict(lm=str(directory), trainable_layers=1),
            rollout_buffer_class=TextRolloutBuffer, device="cpu")


def test_sb3_default_buffer_with_trainable_layers_trains_through_every_block(gpt2_lm):
    task = task_for(gpt2_lm, "SplitDefaultBuffer-v0")
    with pytest.warns(UserWarning, match="rollout_buffer_class=DictRolloutBuffer"):  # passed explicitly: warned
        model = toy_ppo(toy_vec_env(task, n_envs=2), gpt2_lm, grouped=False, n_steps=4, batch_size=8,
                        policy_kwargs=dict(trainable_layers=1))
    perturb_trainable(model.policy)
    model.learn(8)
    buffer = model.rollout_buffer  # after training, SB3 has flattened its arrays to (steps * envs, ...)
    obs = {k: th.as_tensor(v[:4]) for k, v in buffer.observations.items()}
    actions = th.as_tensor(buffer.actions[:4]).reshape(-1)
    with th.no_grad():  # single steps carry no kept hidden states: the full forward, as the rollout computed them
        _, log_prob, _ = model.policy.evaluate_actions(obs, actions)
        distribution = model.policy.get_distribution(obs)
    th.testing.assert_close(log_prob, distribution.log_prob(actions), atol=1e-5, rtol=0)
