"""NLPO-style masking: the masking policy's refresh schedule, generated tokens in its top-p set, exact masked
log-probs between rollout and training, save/load, and the top-p set itself."""

from __future__ import annotations

import copy
import io
import zipfile

import numpy as np
import pytest
import torch as th
from helpers import ragged_stop_ids, register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from sb3_textrl.buffers import TextRolloutBuffer
from sb3_textrl.nlpo import NLPO_ADAPTER, NLPO_ALLOWED, NLPOMasking, NLPOMaskRefresh, top_p_allowed, unpack_allowed
from sb3_textrl.policies import TransformerLMPolicy

TOP_P = 0.5  # the tiny random LM is nearly uniform: its top-0.5 set holds about 44% of the vocabulary


@pytest.fixture
def ragged_task(tiny_lm):
    return register_toy_task("NlpoToy-v0", tiny_lm, max_new_tokens=7, stop_token_ids=ragged_stop_ids())


def perturb_lora(policy: TransformerLMPolicy, seed: int) -> None:
    """Random weights for the trained LoRA adapter only (B starts at 0), so the policy differs from its masking copy."""
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for name, param in policy.lm.named_parameters():
            if "lora_B.default" in name:
                param.copy_(th.randn(param.shape, generator=generator) * 0.5)


def perturb_full(policy: TransformerLMPolicy, seed: int) -> None:
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for param in policy.lm.parameters():
            param.add_(th.randn(param.shape, generator=generator) * 0.05)


def masking_lm(policy: TransformerLMPolicy):
    """An independent plain HF model with the masking policy's weights (a copy, the masking adapter active)."""
    if policy.nlpo.mask_lm is not None:
        return policy.nlpo.mask_lm
    model = copy.deepcopy(policy.lm)
    model.set_adapter(NLPO_ADAPTER)
    return model


def step_observations(buffer: TextRolloutBuffer) -> tuple[list[th.Tensor], list[int]]:
    """Every stored step as (token ids of its observation without padding, the action taken)."""
    sequences, actions = [], []
    for segment in buffer.segments:
        context = buffer.contexts[segment.context][buffer.context_masks[segment.context]]
        taken = buffer.actions[segment.start : segment.start + segment.length, segment.env]
        for step in range(segment.length):
            sequences.append(th.as_tensor(np.concatenate([context, taken[:step]]), dtype=th.long))
            actions.append(int(taken[step]))
    return sequences, actions


def context_lengths(buffer: TextRolloutBuffer) -> list[int]:
    """The number of context (prompt) tokens of every stored step, in step_observations' order."""
    return [int(buffer.context_masks[s.context].sum()) for s in buffer.segments for _ in range(s.length)]


def masking_top_p_rank(model, sequence: th.Tensor, action: int) -> float:
    """Probability mass (float64) of the tokens the masking model ranks above ``action``: < top_p iff it is allowed."""
    with th.no_grad():
        logits = model(input_ids=sequence[None]).logits[0, -1].double()
    probs = th.softmax(logits, dim=-1)
    return float(probs[probs > probs[action]].sum())


def test_masking_policy_refreshes_on_schedule(ragged_task, tiny_lm):
    class Recorder(BaseCallback):
        """Runs after NLPOMaskRefresh: is the masking adapter equal to the trained one when each rollout starts?"""

        def __init__(self):
            super().__init__()
            self.equal, self.logged = [], []

        def _on_rollout_start(self) -> None:
            params = dict(self.model.policy.lm.named_parameters())
            pairs = [(p, params[n.replace(NLPO_ADAPTER, "default")]) for n, p in params.items() if NLPO_ADAPTER in n]
            assert pairs and all(not mask.requires_grad for mask, _ in pairs)  # the masking policy is frozen
            self.equal.append(all(th.equal(mask, trained) for mask, trained in pairs))
            self.logged.append(self.logger.name_to_value["rollout/nlpo_refreshes"])

        def _on_step(self) -> bool:
            return True

    model = toy_ppo(toy_vec_env(ragged_task, n_envs=2), tiny_lm, n_steps=5, learning_rate=1e-2,
                    policy_kwargs=dict(nlpo_top_p=TOP_P))
    refresh, recorder = NLPOMaskRefresh(every_n_rollouts=2), Recorder()
    model.learn(5 * 2 * 5, callback=[refresh, recorder])  # 5 rollouts, each followed by training
    # Refreshed before rollouts 2 and 4: equal to the trained adapter then (and at the start), stale in between.
    assert recorder.equal == [True, False, True, False, True]
    assert recorder.logged == [0, 0, 1, 1, 2]
    assert refresh.n_refreshes == 2


def test_refresh_callback_needs_nlpo(ragged_task, tiny_lm):
    model = toy_ppo(toy_vec_env(ragged_task, n_envs=1), tiny_lm, n_steps=5, batch_size=5)
    with pytest.raises(ValueError, match="nlpo_top_p"):
        model.learn(5, callback=NLPOMaskRefresh(every_n_rollouts=1))
    with pytest.raises(ValueError, match="nlpo_top_p"):
        model.policy.refresh_masking_policy()
    with pytest.raises(ValueError, match=r"nlpo_top_p must be in \(0, 1\]"):
        toy_ppo(toy_vec_env(ragged_task, n_envs=1), tiny_lm, policy_kwargs=dict(nlpo_top_p=1.5))


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_every_generated_token_lies_in_the_masking_top_p_set(ragged_task, tiny_lm, use_lora):
    model = toy_ppo(toy_vec_env(ragged_task, n_envs=3), tiny_lm, n_steps=12, learning_rate=0.0,
                    policy_kwargs=dict(nlpo_top_p=TOP_P, use_lora=use_lora))
    policy = model.policy
    perturb = perturb_lora if use_lora else perturb_full
    perturb(policy, seed=1)
    policy.refresh_masking_policy()  # the masking policy: the weights after the first perturbation
    perturb(policy, seed=2)  # the policy moves on
    model.learn(12)  # one rollout (learning rate 0: the weights stay put)
    buffer = model.rollout_buffer
    mask_model = masking_lm(policy)
    sequences, actions = step_observations(buffer)
    ranks = [masking_top_p_rank(mask_model, s, a) for s, a in zip(sequences, actions)]
    assert max(ranks) < TOP_P, "a generated token lies outside the masking policy's top-p set"
    # The stored sets are the masking policy's top-p sets (a token whose rank mass is within 1e-4 of top_p may flip).
    stored = unpack_allowed(np.concatenate([buffer.nlpo_allowed[s.start : s.start + s.length, s.env]
                                            for s in buffer.segments]), int(policy.action_space.n))
    for row, sequence in enumerate(sequences[:6]):
        with th.no_grad():
            probs = th.softmax(mask_model(input_ids=sequence[None]).logits[0, -1].double(), dim=-1)
        order = th.argsort(probs, descending=True)
        exclusive = th.zeros_like(probs).scatter(0, order, probs[order].cumsum(0) - probs[order])
        expected = (exclusive < TOP_P).numpy()
        unsure = (np.abs(exclusive.numpy() - TOP_P) < 1e-4)
        assert np.array_equal(stored[row] & ~unsure, expected & ~unsure)

    # The check can fail: the same rollout without masking samples outside the masking policy's set.
    policy.nlpo_top_p = None
    model.learn(12)
    sequences, actions = step_observations(model.rollout_buffer)
    assert max(masking_top_p_rank(mask_model, s, a) for s, a in zip(sequences, actions)) > TOP_P


def test_masked_log_probs_equal_in_rollout_and_evaluate_actions(ragged_task, tiny_lm):
    # n_steps=9 is no multiple of the episode lengths: segments cross the buffer's ends.
    model = toy_ppo(toy_vec_env(ragged_task, n_envs=3), tiny_lm, n_steps=9,
                    policy_kwargs=dict(nlpo_top_p=TOP_P, top_k=30000, temperature=0.8))
    policy = model.policy
    perturb_lora(policy, seed=1)
    policy.refresh_masking_policy()
    perturb_lora(policy, seed=2)
    model.learn(9)  # one rollout and one epoch of training
    buffer = model.rollout_buffer
    policy.set_training_mode(False)
    model.collect_rollouts(model.env, model._init_callback(None), buffer, n_rollout_steps=9)  # with the new weights
    assert len(buffer.segments) > 3
    compared = 0
    for batch in buffer.get(batch_size=8):
        actions = batch.actions.long().flatten()
        obs = batch.observations
        assert NLPO_ALLOWED in obs
        with th.no_grad():
            _, log_prob, entropy = policy.evaluate_actions(obs, actions)
            # Masks recomputed by a teacher-forced forward of the masking policy, as without stored sets.
            recomputed = {k: v for k, v in obs.items() if k != NLPO_ALLOWED}
            _, recomputed_log_prob, _ = policy.evaluate_actions(recomputed, actions)
            # The same actions without the mask: the mask does change the log-probs.
            policy.nlpo_top_p = None
            _, unmasked_log_prob, _ = policy.evaluate_actions(recomputed, actions)
            policy.nlpo_top_p = TOP_P
        np.testing.assert_allclose(log_prob.numpy(), batch.old_log_prob.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(recomputed_log_prob.numpy(), batch.old_log_prob.numpy(), rtol=1e-4, atol=1e-4)
        assert bool(th.isfinite(entropy).all())
        assert float((unmasked_log_prob - log_prob).abs().min()) > 0.1
        compared += len(actions)
    assert compared == 27


def test_save_load_keeps_the_masking_policy(ragged_task, tiny_lm, tmp_path):
    model = toy_ppo(toy_vec_env(ragged_task, n_envs=2), tiny_lm, n_steps=5, learning_rate=1e-2,
                    policy_kwargs=dict(nlpo_top_p=0.8))
    model.learn(20, callback=NLPOMaskRefresh(every_n_rollouts=1))
    model.save(tmp_path / "nlpo")
    loaded = PPO.load(tmp_path / "nlpo", env=toy_vec_env(ragged_task, n_envs=2), device="cpu")
    assert loaded.policy.nlpo_top_p == 0.8
    original, restored = model.policy.state_dict(), loaded.policy.state_dict()
    masking = [k for k in original if NLPO_ADAPTER in k]
    assert masking and all(th.equal(original[k], restored[k]) for k in masking)
    # The masking adapter (refreshed before the last rollout) differs from the trained one (trained after it).
    trained = {k: original[k.replace(NLPO_ADAPTER, "default")] for k in masking}
    assert not all(th.equal(original[k], trained[k]) for k in masking)


def test_policy_delegates_to_its_nlpo_masking(ragged_task, tiny_lm):
    off = toy_ppo(toy_vec_env(ragged_task, n_envs=1), tiny_lm).policy
    assert off.nlpo is None and off.nlpo_top_p is None
    assert off.nlpo_allowed({"input_ids": th.zeros(1, 4), "attention_mask": th.ones(1, 4)}) is None
    with pytest.raises(ValueError, match="build it with policy_kwargs=dict"):
        off.nlpo_top_p = 0.5
    on = toy_ppo(toy_vec_env(ragged_task, n_envs=1), tiny_lm, policy_kwargs=dict(nlpo_top_p=TOP_P)).policy
    assert isinstance(on.nlpo, NLPOMasking) and on.nlpo.top_p == on.nlpo_top_p == TOP_P
    assert "nlpo" in dict(on.named_modules())  # a submodule: saved and moved with the policy
    with pytest.raises(ValueError, match=r"nlpo_top_p must be in \(0, 1\]"):
        on.nlpo_top_p = 2.0


def test_full_masking_copy_saved_before_nlpo_masking_loads(ragged_task, tiny_lm, tmp_path):
    """Without LoRA the frozen copy's weights were saved under "mask_lm." (the policy's attribute before NLPOMasking)."""
    env = toy_vec_env(ragged_task, n_envs=1)
    model = toy_ppo(env, tiny_lm, policy_kwargs=dict(nlpo_top_p=TOP_P, use_lora=False))
    perturb_full(model.policy, seed=1)
    model.policy.refresh_masking_policy()  # the masking copy now differs from a freshly built one
    model.save(tmp_path / "new")
    # The same zip as an older sb3_textrl wrote it: the policy's state under the old keys.
    with zipfile.ZipFile(tmp_path / "new.zip") as new, zipfile.ZipFile(tmp_path / "old.zip", "w") as old:
        for name in new.namelist():
            data = new.read(name)
            if name == "policy.pth":
                state = th.load(io.BytesIO(data), weights_only=True)
                assert any(key.startswith("nlpo.mask_lm.") for key in state)
                state = {key.replace("nlpo.mask_lm.", "mask_lm.", 1): value for key, value in state.items()}
                buffer = io.BytesIO()
                th.save(state, buffer)
                data = buffer.getvalue()
            old.writestr(name, data)
    loaded = PPO.load(tmp_path / "old.zip", env=env, device="cpu")
    original, restored = model.policy.state_dict(), loaded.policy.state_dict()
    assert original.keys() == restored.keys() and all(th.equal(original[k], restored[k]) for k in original)
    sequence = th.as_tensor([[11, 22, 33]])
    with th.no_grad():
        expected = masking_lm(model.policy)(input_ids=sequence).logits
        assert th.equal(masking_lm(loaded.policy)(input_ids=sequence).logits, expected)


def test_top_p_set_with_an_env_mask():
    logits = th.log(th.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    assert top_p_allowed(logits, 0.75).tolist() == [[True, True, False, False]] * 2
    env_mask = th.tensor([[True, True, True, True], [False, False, True, True]])
    # Restricted to the env's tokens {2, 3} the masking distribution is (0.75, 0.25): top-0.75 is {2}, never empty.
    assert top_p_allowed(logits, 0.75, env_mask).tolist() == [[True, True, False, False], [False, False, True, False]]
    assert top_p_allowed(logits, 1.0, env_mask)[1].tolist() == [False, False, True, True]


def test_nlpo_mask_applies_before_top_k():
    policy = TransformerLMPolicy.__new__(TransformerLMPolicy)
    policy.temperature, policy.top_k, policy.top_p = 1.0, 2, None
    logits = th.log(th.tensor([[0.4, 0.3, 0.2, 0.1]]))
    allowed = th.tensor([[False, True, True, True]])
    kept = TransformerLMPolicy._process_logits(policy, logits, allowed) > -1e30
    assert kept.tolist() == [[False, True, True, False]]  # top-2 among the allowed tokens



def position_mask(prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
    """Env mask that changes every step: token i is allowed at step t when i % 3 == t % 3 (and EOS always)."""
    mask = np.zeros(50257, dtype=bool)
    mask[len(generated_ids) % 3 :: 3] = True
    mask[50256] = True
    return mask


def test_maskable_ppo_combines_env_masks_and_nlpo(tiny_lm):
    from sb3_contrib import MaskablePPO

    from sb3_textrl.maskable import MaskableTextRolloutBuffer, MaskableTransformerLMPolicy

    task = register_toy_task("NlpoMasked-v0", tiny_lm, max_new_tokens=6, action_mask=position_mask)
    model = MaskablePPO(MaskableTransformerLMPolicy, toy_vec_env(task, n_envs=2), n_steps=6, batch_size=12,
                        n_epochs=1, seed=0, device="cpu", learning_rate=0.0, rollout_buffer_class=MaskableTextRolloutBuffer,
                        policy_kwargs=dict(lm=tiny_lm, nlpo_top_p=TOP_P))
    policy = model.policy
    perturb_lora(policy, seed=1)
    policy.refresh_masking_policy()
    perturb_lora(policy, seed=2)
    model.learn(12)
    buffer = model.rollout_buffer
    mask_model = masking_lm(policy)
    sequences, actions = step_observations(buffer)
    for sequence, action, start in zip(sequences, actions, context_lengths(buffer)):
        env_mask = th.as_tensor(position_mask(sequence[:start].numpy(), sequence[start:].numpy()))
        generated = len(sequence) - start
        assert action == 50256 or action % 3 == generated % 3  # in the env's mask
        # ... and in the masking policy's top-p set of its distribution restricted to the env's mask.
        with th.no_grad():
            logits = mask_model(input_ids=sequence[None]).logits[0, -1].double()
        probs = th.softmax(logits.masked_fill(~env_mask, float("-inf")), dim=-1)
        assert float(probs[probs > probs[action]].sum()) < TOP_P
    # The masks combined are what training uses: rollout and evaluate_actions log-probs agree.
    for batch in buffer.get(batch_size=6):
        with th.no_grad():
            _, log_prob, _ = policy.evaluate_actions(batch.observations, batch.actions.long().flatten(),
                                                     action_masks=batch.action_masks)
        np.testing.assert_allclose(log_prob.numpy(), batch.old_log_prob.numpy(), rtol=1e-4, atol=1e-4)
    # Without NLPO the same policy leaves the masking policy's top-p set (the check above can fail).
    policy.nlpo_top_p = None
    model.learn(12)
    outside = 0
    for sequence, action, start in zip(*step_observations(model.rollout_buffer), context_lengths(model.rollout_buffer)):
        env_mask = th.as_tensor(position_mask(sequence[:start].numpy(), sequence[start:].numpy()))
        with th.no_grad():
            logits = mask_model(input_ids=sequence[None]).logits[0, -1].double()
        probs = th.softmax(logits.masked_fill(~env_mask, float("-inf")), dim=-1)
        outside += float(probs[probs > probs[action]].sum()) >= TOP_P
    assert outside > 0
