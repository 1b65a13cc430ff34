"""Seq2SeqLMPolicy (tiny T5 built from a config): cache and training exactness, reference, errors, save/load, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from helpers import ragged_stop_ids, register_toy_task, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.utils import obs_as_tensor
from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

from sb3_textrl import Seq2SeqLMPolicy, TextRolloutBuffer, TransformerLMPolicy
from sb3_textrl.common.segments import flat_steps
from sb3_textrl.envs.news_data import generate_news_examples
from sb3_textrl.evaluation import generate_samples
from sb3_textrl.models import tiny_gpt2, tiny_t5, train_small_tokenizer

VOCAB = 300
PROMPT_TOKENS = 16  # register_toy_task's max_prompt_tokens


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_small_tokenizer([r["article"] for r in generate_news_examples(50)], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tiny_t5_path(tmp_path_factory, small_tokenizer) -> str:
    """A 2+2-layer, 64-wide T5 with a 300-token BPE vocabulary (id 0: eos, pad and decoder start)."""
    path = tmp_path_factory.mktemp("tiny-t5")
    tiny_t5(len(small_tokenizer)).save_pretrained(path)
    small_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ragged_task(tiny_t5_path):
    # Every 8th token stops a completion: envs end their episodes at different steps.
    return register_toy_task("Seq2SeqRagged-v0", tiny_t5_path, max_new_tokens=7, stop_token_ids=ragged_stop_ids()[:38])


def t5_ppo(env, lm: str, seed: int = 0, **kwargs) -> PPO:
    policy_kwargs = dict(lm=lm) | kwargs.pop("policy_kwargs", {})
    defaults = dict(n_steps=10, batch_size=16, n_epochs=1, seed=seed, device="cpu", rollout_buffer_class=TextRolloutBuffer)
    return PPO(Seq2SeqLMPolicy, env, policy_kwargs=policy_kwargs, **(defaults | kwargs))


def perturb(policy: Seq2SeqLMPolicy, seed: int = 1) -> None:
    """Random LoRA B (it starts at 0) and value head, so the policy differs from its reference and V is not 0."""
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name or name.startswith("value_net"):
                param.copy_(th.randn(param.shape, generator=generator) * 0.5)


def test_cached_rollout_matches_full_forwards(ragged_task, tiny_t5_path):
    env = toy_vec_env(ragged_task, n_envs=4)
    policy = t5_ppo(env, tiny_t5_path).policy
    perturb(policy)
    obs = env.reset()
    episodes_ended = 0
    for _ in range(30):
        obs_tensor = obs_as_tensor(obs, policy.device)
        with th.no_grad():
            actions, values, log_probs = policy(obs_tensor)  # cached: encoder once per episode, one decoder token
            policy.use_kv_cache = False
            full_values = policy.predict_values(obs_tensor)
            distribution = policy.get_distribution(obs_tensor)
            policy.use_kv_cache = True
        np.testing.assert_allclose(log_probs.numpy(), distribution.log_prob(actions).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values.numpy(), full_values.numpy(), rtol=1e-4, atol=1e-5)
        obs, _, dones, _ = env.step(actions.numpy())
        episodes_ended += int(dones.sum())
    assert episodes_ended >= 8, "the test needs envs that end their episodes at different steps"
    assert np.abs(values.numpy()).max() > 1e-3  # the value head was perturbed: values are compared for real


def step_observations(segments: dict[str, th.Tensor]) -> dict[str, th.Tensor]:
    """Every step's observation of every segment, as SB3's per-step DictRolloutBuffer would store it."""
    ids, mask = [], []
    for row in range(len(segments["segment_lengths"])):
        start = int(segments["segment_starts"][row])
        for step in range(int(segments["segment_lengths"][row])):
            visible = th.arange(segments["input_ids"].shape[1]) <= start + step
            ids.append(segments["input_ids"][row] * visible)
            mask.append(segments["attention_mask"][row] * visible)
    return {"input_ids": th.stack(ids), "attention_mask": th.stack(mask)}


def test_segment_training_matches_rollout_and_per_step(ragged_task, tiny_t5_path):
    # n_steps=9 is no multiple of the episode lengths: some segments start mid-episode at the buffer's start.
    env = toy_vec_env(ragged_task, n_envs=3)
    model = t5_ppo(env, tiny_t5_path, n_steps=9, policy_kwargs=dict(top_k=50, temperature=0.8))
    perturb(model.policy)
    model.learn(9)  # one rollout and one epoch of training: the weights moved
    buffer = model.rollout_buffer
    model.policy.set_training_mode(False)
    model.collect_rollouts(model.env, model._init_callback(None), buffer, n_rollout_steps=9)
    mid_episode = [s for s in buffer.segments if buffer.context_masks[s.context][PROMPT_TOKENS:].any()]
    assert mid_episode, "no segment starts mid-episode"
    for batch in buffer.get(batch_size=8):
        actions = batch.actions.long().flatten()
        with th.no_grad():
            values, log_prob, entropy = model.policy.evaluate_actions(batch.observations, actions)
        # One encoder + one teacher-forced decoder forward per segment == the rollout's cached one-token steps.
        np.testing.assert_allclose(log_prob.numpy(), batch.old_log_prob.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values.flatten().numpy(), batch.old_values.numpy(), rtol=1e-4, atol=1e-5)
        # ... and == SB3's per-step-buffer path, one full forward per step.
        with th.no_grad():
            step_values, step_log_prob, step_entropy = model.policy.evaluate_actions(
                step_observations(batch.observations), actions
            )
        np.testing.assert_allclose(log_prob.numpy(), step_log_prob.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(entropy.numpy(), step_entropy.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values.numpy(), step_values.numpy(), rtol=1e-4, atol=1e-5)


def test_reference_is_the_t5_with_adapters_disabled(ragged_task, tiny_t5_path):
    env = toy_vec_env(ragged_task, n_envs=2)
    model = t5_ppo(env, tiny_t5_path, n_steps=6, batch_size=12, learning_rate=0.0)  # lr 0: the weights stay put
    policy = model.policy
    # Untrained, LoRA is the identity: the reference's log-probs equal the policy's, exactly when both are
    # teacher-forced, to float noise against the rollout's cached steps.
    model.learn(12)
    buffer = model.rollout_buffer
    batch = buffer.segment_batch(buffer.segments)
    actions = th.as_tensor(flat_steps(buffer.actions, buffer.segments))
    with th.no_grad():
        _, policy_log_probs, _ = policy.evaluate_actions(batch, actions)
    assert th.equal(policy_log_probs, policy.reference_log_probs(batch, actions))
    np.testing.assert_allclose(buffer.log_probs, buffer.ref_log_probs, rtol=0, atol=1e-5)

    # With perturbed adapters the reference must stay the plain T5 (independent check through HF's own forward).
    perturb(policy)
    model.learn(12)
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_path).eval()
    for segment in buffer.segments:
        context = th.as_tensor(buffer.contexts[segment.context], dtype=th.long)
        context_mask = th.as_tensor(buffer.context_masks[segment.context])
        prompt = context[:PROMPT_TOKENS][context_mask[:PROMPT_TOKENS]]
        earlier = context[PROMPT_TOKENS:][context_mask[PROMPT_TOKENS:]]  # tokens generated before the segment
        actions = th.as_tensor(buffer.actions[segment.start : segment.start + segment.length, segment.env])
        decoder_ids = th.cat([th.zeros(1, dtype=th.long), earlier, actions])[None]  # decoder start id 0
        with th.no_grad():
            logits = base(input_ids=prompt[None], decoder_input_ids=decoder_ids).logits[0]
        log_probs = th.log_softmax(logits.float(), dim=-1)[len(earlier) : len(earlier) + len(actions)]
        expected = log_probs.gather(1, actions.view(-1, 1)).squeeze(1)
        got = buffer.ref_log_probs[segment.start : segment.start + segment.length, segment.env]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
    beta = policy.kl_controller.value
    np.testing.assert_allclose(
        buffer.rewards, buffer.task_rewards - beta * (buffer.log_probs - buffer.ref_log_probs), rtol=1e-5, atol=1e-6
    )
    assert np.abs(buffer.log_probs - buffer.ref_log_probs).max() > 1e-3


def test_per_step_hidden_runs_the_model_it_is_given(ragged_task, tiny_t5_path):
    # LMForwards._last_hidden_per_step(obs, model) runs ``model`` (NLPO's masking policy passes its own); the seq2seq
    # override took no model argument.
    env = toy_vec_env(ragged_task, n_envs=2)
    policy = t5_ppo(env, tiny_t5_path, policy_kwargs=dict(use_lora=False)).policy  # ref_lm: a frozen copy
    obs = env.reset()
    for _ in range(3):  # some generated tokens in the decoder's input
        obs, _, _, _ = env.step(env.action_space.sample()[None].repeat(2))
    obs_tensor = obs_as_tensor(obs, policy.device)
    generator = th.Generator().manual_seed(0)
    with th.no_grad():
        before = policy._last_hidden_per_step(obs_tensor)
        for param in policy.lm.parameters():  # the trained weights move, the reference's do not
            param.add_(th.randn(param.shape, generator=generator) * 0.1)
        after = policy._last_hidden_per_step(obs_tensor)
        reference = policy._last_hidden_per_step(obs_tensor, policy.ref_lm)
    assert not th.allclose(after, before, atol=1e-3)
    th.testing.assert_close(reference, before)


def test_lora_targets_t5_attention_in_encoder_and_decoder(ragged_task, tiny_t5_path):
    policy = t5_ppo(toy_vec_env(ragged_task, n_envs=1), tiny_t5_path).policy
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert any("encoder" in n and ".q.lora_A" in n for n in trainable)
    assert any("decoder" in n and ".v.lora_B" in n for n in trainable)
    assert all("lora_" in n or n.startswith("value_net") for n in trainable)


def test_model_of_the_wrong_family_is_refused(ragged_task, tiny_t5_path, small_tokenizer, tmp_path):
    env = toy_vec_env(ragged_task, n_envs=1)
    tiny_gpt2(len(small_tokenizer), eos_token_id=0).save_pretrained(tmp_path)
    small_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"decoder-only \(causal\) LM \(gpt2\).*use sb3_textrl.TransformerLMPolicy"):
        t5_ppo(env, str(tmp_path))
    with pytest.raises(ValueError, match=r"encoder-decoder LM \(t5\).*use sb3_textrl.Seq2SeqLMPolicy"):
        PPO(TransformerLMPolicy, env, policy_kwargs=dict(lm=tiny_t5_path), device="cpu")
    with pytest.raises(ValueError, match=r"needs an encoder-decoder LM: pass policy_kwargs=dict\(lm="):
        PPO(Seq2SeqLMPolicy, env, device="cpu")


def test_absolute_position_decoder_needs_the_cache_off(tmp_path, small_tokenizer, ragged_task):
    config = BartConfig(vocab_size=len(small_tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        pad_token_id=0, eos_token_id=0, bos_token_id=0, decoder_start_token_id=0)
    BartForConditionalGeneration(config).save_pretrained(tmp_path)
    small_tokenizer.save_pretrained(tmp_path)
    env = toy_vec_env(ragged_task, n_envs=1)
    with pytest.raises(ValueError, match=r"'bart'.*use_kv_cache=False"):
        t5_ppo(env, str(tmp_path))
    t5_ppo(env, str(tmp_path), n_steps=4, batch_size=4, policy_kwargs=dict(use_kv_cache=False)).learn(4)


def test_nlpo_is_refused_when_the_policy_is_built(ragged_task, tiny_t5_path, tmp_path):
    env = toy_vec_env(ragged_task, n_envs=1)
    message = r"does not support nlpo_top_p.*causal-LM forwards.*Pass nlpo_top_p=None, or use TransformerLMPolicy"
    with pytest.raises(ValueError, match=message):
        t5_ppo(env, tiny_t5_path, policy_kwargs=dict(nlpo_top_p=0.9))
    with pytest.raises(ValueError, match=message):  # before any LM is loaded: this path does not exist
        t5_ppo(env, str(tmp_path / "never-loaded"), policy_kwargs=dict(nlpo_top_p=0.9))
    assert t5_ppo(env, tiny_t5_path, policy_kwargs=dict(nlpo_top_p=None)).policy.nlpo is None


def test_save_load_keeps_weights_arguments_and_generations(ragged_task, tiny_t5_path, tmp_path):
    policy_kwargs = dict(kl_coef=0.1, top_k=40, temperature=0.9, lora_config=dict(r=4, lora_alpha=8))
    model = t5_ppo(toy_vec_env(ragged_task, n_envs=2), tiny_t5_path, learning_rate=1e-2, policy_kwargs=policy_kwargs)
    model.learn(20)
    perturb(model.policy)  # the untrained tiny T5's greedy completions are empty
    model.save(tmp_path / "run")
    loaded = PPO.load(tmp_path / "run", env=toy_vec_env(ragged_task, n_envs=2), device="cpu")
    assert isinstance(loaded.policy, Seq2SeqLMPolicy)
    original, restored = model.policy.state_dict(), loaded.policy.state_dict()
    assert original.keys() == restored.keys() and any("lora_A" in k for k in original)
    assert all(th.equal(original[k], restored[k]) for k in original)
    params = loaded.policy._get_constructor_parameters()
    assert all(params[key] == value for key, value in policy_kwargs.items()) and params["lm"] == tiny_t5_path
    prompts = [0, 1, 2, 3]
    first = [s.completion for s in generate_samples(model, toy_vec_env(ragged_task, n_envs=2), prompts)]
    second = [s.completion for s in generate_samples(loaded, toy_vec_env(ragged_task, n_envs=2), prompts)]
    assert first == second and any(text.strip() for text in first)


def test_ppo_raises_the_reward_of_a_toy_task(tiny_t5_path):
    """Honest learning test: seeded PPO with a tiny T5 must clearly raise the share of upper-case letters."""
    task = register_toy_task("Seq2SeqShout-v0", tiny_t5_path, max_new_tokens=4)
    model = t5_ppo(toy_vec_env(task, n_envs=16, seed=0), tiny_t5_path, n_steps=8, batch_size=64, n_epochs=4,
                   learning_rate=3e-3, gamma=1.0, ent_coef=0.0, policy_kwargs=dict(use_lora=False, kl_coef=0.0))
    eval_env = toy_vec_env(task, n_envs=5, seed=100)

    def mean_sampled_reward() -> float:
        samples = generate_samples(model, eval_env, list(range(5)) * 8, deterministic=False)
        return float(np.mean([s.reward for s in samples]))

    before = mean_sampled_reward()
    model.learn(16 * 8 * 8)  # 8 rollouts of 16 envs x 8 tokens (0.21 -> 0.82 when written)
    after = mean_sampled_reward()
    assert before < 0.3 and after > before + 0.4, (before, after)


def test_gradient_checkpointing_gives_the_same_update(ragged_task, tiny_t5_path):
    def trained(**policy_kwargs) -> np.ndarray:
        model = t5_ppo(toy_vec_env(ragged_task, n_envs=2, seed=0), tiny_t5_path, learning_rate=1e-2,
                       policy_kwargs=policy_kwargs)
        model.learn(20)
        return np.concatenate([p.detach().flatten().numpy() for p in model.policy.parameters() if p.requires_grad])

    plain, checkpointed = trained(), trained(gradient_checkpointing=True)
    assert np.abs(plain).max() > 1e-2  # the adapters moved
    np.testing.assert_allclose(checkpointed, plain, rtol=0, atol=1e-4)
