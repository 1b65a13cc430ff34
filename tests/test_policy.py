"""TransformerLMPolicy: KV cache exactness, grouped training exactness, decoding options, reference model."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from helpers import ragged_stop_ids, register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.utils import obs_as_tensor

from sb3_textrl.policies import TransformerLMPolicy


@pytest.fixture
def ragged_task(tiny_lm):
    return register_toy_task("RaggedToy-v0", tiny_lm, max_new_tokens=7, stop_token_ids=ragged_stop_ids())


def perturb_lora(policy: TransformerLMPolicy, seed: int = 1) -> None:
    """LoRA starts as the identity (B = 0); give it random weights so the policy differs from its reference."""
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for name, param in policy.lm.named_parameters():
            if "lora_B" in name:
                param.copy_(th.randn(param.shape, generator=generator) * 0.5)


def test_cached_and_uncached_log_probs_are_equal(ragged_task, tiny_lm):
    env = toy_vec_env(ragged_task, n_envs=4)
    model = toy_ppo(env, tiny_lm)
    policy = model.policy
    perturb_lora(policy)
    obs = env.reset()
    episodes_ended = 0
    for _ in range(30):
        obs_tensor = obs_as_tensor(obs, policy.device)
        with th.no_grad():
            actions, values, log_probs = policy(obs_tensor)  # cached path
            policy.use_kv_cache = False
            uncached_values = policy.predict_values(obs_tensor)
            dist = policy.get_distribution(obs_tensor)
            policy.use_kv_cache = True
        np.testing.assert_allclose(log_probs.numpy(), dist.log_prob(actions).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values.numpy(), uncached_values.numpy(), rtol=1e-4, atol=1e-5)
        obs, _, dones, _ = env.step(actions.numpy())
        episodes_ended += int(dones.sum())
    assert episodes_ended >= 8, "the test needs envs that end their episodes at different steps"


def test_grouped_evaluate_actions_matches_rollout_and_per_step(ragged_task, tiny_lm):
    # n_steps=9 is no multiple of the episode lengths: segments cross the buffer's ends.
    env = toy_vec_env(ragged_task, n_envs=3)
    model = toy_ppo(env, tiny_lm, n_steps=9, policy_kwargs=dict(top_k=50, temperature=0.8))
    perturb_lora(model.policy)
    model.learn(9)  # one rollout + one epoch of training
    buffer = model.rollout_buffer
    # The stored rollout came from the cached one-token path; re-collect with the trained weights.
    model.policy.set_training_mode(False)
    model.collect_rollouts(model.env, model._init_callback(None), buffer, n_rollout_steps=9)
    assert len(buffer.segments) > 3
    for batch in buffer.get(batch_size=8):
        actions = batch.actions.long().flatten()
        with th.no_grad():
            values, log_prob, entropy = model.policy.evaluate_actions(batch.observations, actions)
        # Grouped teacher-forced forward == the rollout's cached step-by-step forward.
        np.testing.assert_allclose(log_prob.numpy(), batch.old_log_prob.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values.flatten().numpy(), batch.old_values.numpy(), rtol=1e-4, atol=1e-5)
        # ... and == the per-step path of SB3's DictRolloutBuffer, on observations rebuilt step by step.
        # Both with prefix sharing (one forward per distinct sequence) and without (one forward per step).
        step_obs = per_step_observations(batch.observations)
        for share_prefixes in (True, False):
            model.policy.share_prefixes = share_prefixes
            with th.no_grad():
                step_values, step_log_prob, step_entropy = model.policy.evaluate_actions(step_obs, actions)
            np.testing.assert_allclose(log_prob.numpy(), step_log_prob.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(entropy.numpy(), step_entropy.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(values.numpy(), step_values.numpy(), rtol=1e-4, atol=1e-5)


def per_step_observations(segments: dict[str, th.Tensor]) -> dict[str, th.Tensor]:
    """The observation of every step of every segment, as SB3's per-step DictRolloutBuffer would store it."""
    ids, mask = [], []
    for row in range(len(segments["segment_lengths"])):
        start = int(segments["segment_starts"][row])
        for step in range(int(segments["segment_lengths"][row])):
            visible = th.arange(ids_width := segments["input_ids"].shape[1]) <= start + step
            ids.append(segments["input_ids"][row] * visible)
            mask.append(segments["attention_mask"][row] * visible)
            assert ids_width > start + step
    return {"input_ids": th.stack(ids), "attention_mask": th.stack(mask)}


def test_sampled_tokens_respect_top_k(ragged_task, tiny_lm):
    env = toy_vec_env(ragged_task, n_envs=2)
    model = toy_ppo(env, tiny_lm, policy_kwargs=dict(top_k=3))
    obs = env.reset()
    for _ in range(10):
        obs_tensor = obs_as_tensor(obs, "cpu")
        with th.no_grad():
            probs = model.policy.get_distribution(obs_tensor).distribution.probs
            actions, _, _ = model.policy(obs_tensor)
        assert int((probs > 0).sum(dim=1).max()) == 3
        assert bool((probs.gather(1, actions.view(-1, 1)) > 0).all())
        obs, *_ = env.step(actions.numpy())


def test_top_p_keeps_the_smallest_nucleus():
    logits = th.log(th.tensor([[0.5, 0.3, 0.15, 0.05]]))
    policy = TransformerLMPolicy.__new__(TransformerLMPolicy)
    policy.temperature, policy.top_k, policy.top_p = 1.0, None, 0.75
    kept = TransformerLMPolicy._process_logits(policy, logits) > -1e30
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75


def test_reference_is_the_model_with_adapters_disabled(ragged_task, tiny_lm):
    env = toy_vec_env(ragged_task, n_envs=2)
    model = toy_ppo(env, tiny_lm, n_steps=6, batch_size=12, learning_rate=0.0)  # lr 0: the weights stay put
    perturb_lora(model.policy)
    model.learn(12)
    buffer = model.rollout_buffer
    # Independent check: score each episode segment with a plain HF forward of the un-adapted base model.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    for segment in buffer.segments:
        context = buffer.contexts[segment.context][buffer.context_masks[segment.context]]
        actions = buffer.actions[segment.start : segment.start + segment.length, segment.env]
        sequence = th.as_tensor(np.concatenate([context, actions]), dtype=th.long)[None]
        with th.no_grad():
            log_probs = th.log_softmax(base(sequence).logits[0].float(), dim=-1)
        expected = log_probs[len(context) - 1 : -1].gather(1, th.as_tensor(actions).view(-1, 1)).squeeze(1)
        got = buffer.ref_log_probs[segment.start : segment.start + segment.length, segment.env]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    # The per-token KL penalty: reward = task reward - beta * (log pi - log pi_ref).
    beta = model.policy.kl_controller.value
    np.testing.assert_allclose(
        buffer.rewards, buffer.task_rewards - beta * (buffer.log_probs - buffer.ref_log_probs), rtol=1e-5, atol=1e-6
    )
    assert np.abs(buffer.log_probs - buffer.ref_log_probs).max() > 1e-3  # the perturbed policy differs


def test_full_fine_tuning_keeps_a_frozen_reference_copy(ragged_task, tiny_lm):
    env = toy_vec_env(ragged_task, n_envs=2)
    model = toy_ppo(env, tiny_lm, policy_kwargs=dict(use_lora=False), learning_rate=1e-2)
    policy = model.policy
    assert policy.ref_lm is not None and not any(p.requires_grad for p in policy.ref_lm.parameters())
    before = {k: v.clone() for k, v in policy.ref_lm.state_dict().items()}
    model.learn(20)
    after = policy.ref_lm.state_dict()
    assert all(th.equal(before[k], after[k]) for k in before)
    assert not th.equal(policy.lm.transformer.h[0].attn.c_attn.weight, policy.ref_lm.transformer.h[0].attn.c_attn.weight)


def test_full_observation_has_zero_value(ragged_task, tiny_lm):
    env = toy_vec_env(ragged_task, n_envs=1)
    model = toy_ppo(env, tiny_lm)
    obs = env.reset()
    full = {k: v.copy() for k, v in obs.items()}
    full["attention_mask"][:, -7:] = 1
    values = model.policy.predict_values(obs_as_tensor(full, "cpu"))
    assert values.item() == 0.0


@pytest.fixture(scope="module")
def small_vocab_lm(tmp_path_factory) -> str:
    from conftest import save_tiny_lm

    from sb3_textrl.envs.news_data import generate_news_examples
    from sb3_textrl.models import train_small_tokenizer

    tokenizer = train_small_tokenizer([r["article"] for r in generate_news_examples(50)], vocab_size=300)
    return save_tiny_lm(tmp_path_factory.mktemp("small-vocab"), tokenizer, eos_token_id=0)


def test_env_tokenizer_larger_than_lm_vocabulary_is_refused(tiny_lm, small_vocab_lm):
    task = register_toy_task("BigVocabToy-v0", tiny_lm)  # GPT-2 tokenizer: 50257 tokens
    with pytest.raises(ValueError, match=r"50257 tokens but the LM .* only \d+ output logits.*tokenizer=LM"):
        toy_ppo(toy_vec_env(task, n_envs=1), small_vocab_lm)


def test_env_tokenizer_of_another_lm_is_refused(tiny_lm, small_vocab_lm):
    task = register_toy_task("SmallVocabToy-v0", small_vocab_lm)
    with pytest.raises(ValueError, match="is not the LM's"):
        toy_ppo(toy_vec_env(task, n_envs=1), tiny_lm)


def test_lm_with_padded_embedding_matrix_is_fine(tmp_path, gpt2_tokenizer):
    from conftest import save_tiny_lm

    padded = save_tiny_lm(tmp_path / "padded", gpt2_tokenizer, vocab_size=50304)  # rounded up, as GPT-2 trainers do
    task = register_toy_task("PaddedToy-v0", padded)
    model = toy_ppo(toy_vec_env(task, n_envs=2), padded, n_steps=6, batch_size=12)
    model.learn(12)
    assert model.rollout_buffer.actions.max() < len(gpt2_tokenizer)
    assert model.policy.get_distribution(
        obs_as_tensor(toy_vec_env(task, n_envs=2).reset(), "cpu")
    ).distribution.probs.shape[-1] == len(gpt2_tokenizer)


def test_longest_extensions_finds_the_episode_a_step_belongs_to():
    from sb3_textrl.common.kv_cache import longest_extensions

    ids = th.tensor([[0, 5, 6, 0, 0], [0, 5, 6, 7, 0], [0, 5, 6, 7, 8], [0, 5, 9, 0, 0], [3, 5, 6, 0, 0]])
    mask = th.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    # rows 0-2 are one episode; row 3 diverges at its last token; row 4 has another (longer) prompt
    assert longest_extensions(ids, mask, chunk=2).tolist() == [2, 2, 2, 3, 4]


def test_kl_target_is_the_adaptive_beta_target_and_ppo_keeps_its_own_target_kl(ragged_task, tiny_lm, recwarn):
    model = toy_ppo(toy_vec_env(ragged_task, n_envs=1), tiny_lm, target_kl=0.05, policy_kwargs=dict(kl_target=2.0))
    assert model.target_kl == 0.05  # PPO's early stop, SB3's argument
    assert model.policy.kl_target == 2.0 and model.policy.kl_controller.kl_target == 2.0
    params = model.policy._get_constructor_parameters()
    assert params["kl_target"] == 2.0 and "target_kl" not in params
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "kl_target" in str(w.message)]


def test_deprecated_target_kl_still_works_and_saved_models_with_it_load(ragged_task, tiny_lm, tmp_path):
    with pytest.warns(DeprecationWarning, match=r"target_kl= is deprecated.*policy_kwargs=dict\(kl_target=2\.0\)"):
        model = toy_ppo(toy_vec_env(ragged_task, n_envs=1), tiny_lm, policy_kwargs=dict(target_kl=2.0))
    assert model.policy.kl_target == 2.0 and model.policy.kl_controller.kl_target == 2.0
    with pytest.warns(DeprecationWarning, match="read kl_target"):
        assert model.policy.target_kl == 2.0
    model.save(tmp_path / "old_kwargs")  # the zip pickles policy_kwargs=dict(lm=..., target_kl=2.0)
    with pytest.warns(DeprecationWarning, match="use policy_kwargs=dict"):
        loaded = PPO.load(tmp_path / "old_kwargs", env=toy_vec_env(ragged_task, n_envs=1), device="cpu")
    assert loaded.policy.kl_target == 2.0 and loaded.policy.kl_controller.kl_target == 2.0
    with pytest.raises(ValueError, match=r"both kl_target=1\.0 and target_kl=2\.0.*Pass kl_target only"):
        toy_ppo(toy_vec_env(ragged_task, n_envs=1), tiny_lm, policy_kwargs=dict(kl_target=1.0, target_kl=2.0))
