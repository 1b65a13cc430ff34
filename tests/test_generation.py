"""The fast decoding path (sb3_textrl/common/generation.py) against the env loop it replaces, HF generate(), its stop
rules, masks, NLPO, seeding and fallback; and the KL pass evaluate() skips when the policy is its own reference."""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from helpers import PROMPTS, register_toy_task, toy_ppo
from sb3_contrib import MaskablePPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv
from transformers import GPT2Config, GPT2LMHeadModel

import sb3_textrl.evaluation.run as evaluation_run
from sb3_textrl import MaskableTextRolloutBuffer, MaskableTransformerLMPolicy
from sb3_textrl.common.generation import decode, fast_path_unsupported, text_env_of
from sb3_textrl.evaluation import evaluate, generate_samples, reference_identity
from sb3_textrl.sampling import DecodingSettings, decoding

EOS = 50256  # GPT-2's <|endoftext|>: the toy tasks' stop token
MORE_PROMPTS = PROMPTS + [
    "Scientists said on Monday that",
    "A",
    "The weather tomorrow, according to the national forecast service which issued a warning,",
]
ORDER = [0, 1, 2, 3, 4, 5, 6, 7, 2, 0]


@pytest.fixture(scope="module")
def eos_lm(tmp_path_factory, gpt2_tokenizer) -> str:
    """A tiny GPT-2 whose greedy completions end at EOS after 1 to 8 tokens for some prompts and not for others.

    An untied LM head keeps greedy decoding from repeating the last token; scaling the EOS row of the head by 4 makes
    EOS the most likely token at some steps only.
    """
    config = GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        tie_word_embeddings=False, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    with th.random.fork_rng(devices=[]):
        th.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    with th.no_grad():
        model.lm_head.weight[EOS] *= 4.0
    directory = tmp_path_factory.mktemp("eos-gpt2")
    model.save_pretrained(directory)
    gpt2_tokenizer.save_pretrained(directory)
    return str(directory)


def toy_task(task_id: str, lm: str, **kwargs) -> str:
    from helpers import shout

    from sb3_textrl import register_text_task

    register_text_task(task_id, prompts=MORE_PROMPTS, reward=shout, tokenizer=lm, max_prompt_tokens=16,
                       max_new_tokens=kwargs.pop("max_new_tokens", 8), **kwargs)
    return task_id


def randomize_lora(model, scale: float = 0.3, seed: int = 0) -> None:
    """Move the policy off its reference: random LoRA B matrices."""
    generator = th.Generator().manual_seed(seed)
    with th.no_grad():
        for name, parameter in model.policy.lm.named_parameters():
            if "lora_B" in name and ".default." in name:
                parameter.copy_(scale * th.randn(parameter.shape, generator=generator))


def assert_same_samples(old, new) -> None:
    for a, b in zip(old, new, strict=True):
        assert (a.prompt_index, a.prompt, a.reference) == (b.prompt_index, b.prompt, b.reference)
        assert (a.completion, a.completion_tokens, a.ended_by_stop_token) == (b.completion, b.completion_tokens,
                                                                               b.ended_by_stop_token)
        assert a.reward == pytest.approx(b.reward, abs=1e-12)
        for key in ("input_ids", "attention_mask"):
            assert a.observation[key].dtype == b.observation[key].dtype
            np.testing.assert_array_equal(a.observation[key], b.observation[key])


def run_both(model, env, order=ORDER, deterministic=True, seed=0):
    out = []
    for fast in (False, True):
        th.manual_seed(seed)
        out.append(generate_samples(model, env, order, deterministic=deterministic, fast=fast))
    return out


# -- exactness against the env loop ------------------------------------------------------------------------------


def test_greedy_gives_the_env_loops_tokens_with_early_stops(eos_lm):
    env = make_vec_env(toy_task("GenGreedy-v0", eos_lm), n_envs=3, seed=0)
    model = toy_ppo(env, eos_lm)
    randomize_lora(model)  # LoRA layers that change the outputs, on the decode path too
    old, new = run_both(model, env)
    assert_same_samples(old, new)
    lengths = [s.completion_tokens for s in new]
    # The test means something: rows of one batch stop at different steps, and some run to the limit.
    assert any(s.ended_by_stop_token for s in new) and not all(s.ended_by_stop_token for s in new)
    assert len(set(lengths)) >= 3, lengths
    prompt_lengths = {len(text_env_of(env).prompt_ids[i]) for i in ORDER}
    assert min(prompt_lengths) == 1 and max(prompt_lengths) >= 15 and len(prompt_lengths) >= 5, prompt_lengths


def test_sampling_draws_the_env_loops_tokens_one_prompt_at_a_time(eos_lm):
    """With one env the env loop and the fast path make the same draws from torch's generator in the same order, so
    equal tokens mean equal distributions (temperature, top-k and top-p included)."""
    env = make_vec_env(toy_task("GenSample-v0", eos_lm, max_new_tokens=10), n_envs=1, seed=0)
    model = toy_ppo(env, eos_lm, policy_kwargs=dict(temperature=1.3, top_k=200, top_p=0.9))
    randomize_lora(model)
    old, new = run_both(model, env, order=[0, 3, 6, 1], deterministic=False, seed=5)
    assert_same_samples(old, new)
    assert len({s.completion for s in new}) > 1


def test_seeded_sampling_is_reproducible(eos_lm):
    env = make_vec_env(toy_task("GenSeed-v0", eos_lm), n_envs=4, seed=0)
    model = toy_ppo(env, eos_lm)

    def sample(seed):
        th.manual_seed(seed)
        return [s.completion for s in generate_samples(model, env, ORDER, deterministic=False)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


# -- stop rules, against HF generate() -----------------------------------------------------------------------------


def test_stop_rules_and_greedy_tokens_match_hf_generate(eos_lm):
    env = make_vec_env(toy_task("GenStop-v0", eos_lm), n_envs=1, seed=0)
    model = toy_ppo(env, eos_lm)  # fresh LoRA: the policy's distribution is the plain LM's
    policy, prompts = model.policy, text_env_of(env).prompt_ids
    out = decode(policy, prompts, max_new_tokens=8, stop_token_ids={EOS}, deterministic=True)
    lm = policy.hf_model
    for row, prompt in enumerate(prompts):
        expected = lm.generate(th.as_tensor(prompt)[None], attention_mask=th.ones(1, len(prompt), dtype=th.long),
                               max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)[0, len(prompt):]
        tokens = out.tokens[row]
        np.testing.assert_array_equal(tokens, expected[: len(tokens)].numpy())
        stops = np.flatnonzero(tokens == EOS)
        # A stop token ends its row and is kept; a row without one runs to max_new_tokens.
        assert out.ended_by_stop_token[row] == (len(stops) == 1 and stops[0] == len(tokens) - 1)
        assert out.ended_by_stop_token[row] or (len(tokens) == 8 and len(stops) == 0)
    assert 0 < out.ended_by_stop_token.sum() < len(prompts)

    no_stop = decode(policy, prompts, max_new_tokens=8, stop_token_ids=(), deterministic=True)
    assert all(len(t) == 8 for t in no_stop.tokens) and not no_stop.ended_by_stop_token.any()
    for short, full in zip(out.tokens, no_stop.tokens):  # dropping finished rows does not change the others
        np.testing.assert_array_equal(short, full[: len(short)])
    several = decode(policy, prompts, max_new_tokens=8, stop_token_ids=set(range(0, 50257, 5)), deterministic=True)
    for tokens, ended in zip(several.tokens, several.ended_by_stop_token):
        hits = np.flatnonzero(tokens % 5 == 0)
        assert (list(hits) == [len(tokens) - 1]) if ended else (len(hits) == 0 and len(tokens) == 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode(policy, prompts, max_new_tokens=0, stop_token_ids={EOS})


# -- masks and NLPO ----------------------------------------------------------------------------------------------


def position_mask(prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
    """A per-step mask: token i is allowed at step t when i % 3 == (t + len(prompt)) % 3; EOS always."""
    mask = np.zeros(50257, dtype=bool)
    mask[(len(generated_ids) + len(prompt_ids)) % 3 :: 3] = True
    mask[EOS] = True
    return mask


@pytest.mark.parametrize("action_mask", [position_mask, "per-episode banned"])
def test_maskable_policy_decodes_under_the_env_masks_as_the_env_loop(eos_lm, action_mask):
    env = make_vec_env(toy_task(f"GenPlain{id(action_mask)}-v0", eos_lm), n_envs=3, seed=0)
    unmasked = generate_samples(toy_ppo(env, eos_lm), env, ORDER)
    if action_mask == "per-episode banned":  # ban what the unmasked policy says first: the mask must change things
        first = {int(s.observation["input_ids"][16]) for s in unmasked} - {EOS}
        action_mask = {"banned": sorted(first)}
    task = toy_task(f"GenMasked{id(action_mask)}-v0", eos_lm, action_mask=action_mask)
    env = make_vec_env(task, n_envs=3, seed=0)
    model = MaskablePPO(MaskableTransformerLMPolicy, env, policy_kwargs=dict(lm=eos_lm), n_steps=8, batch_size=24,
                        rollout_buffer_class=MaskableTextRolloutBuffer, seed=0, device="cpu")
    old, new = run_both(model, env)
    assert_same_samples(old, new)
    assert [s.completion for s in new] != [s.completion for s in unmasked]
    env0 = text_env_of(env)
    for sample in new:  # every token lies in the mask of its step
        ids = sample.observation["input_ids"]
        prompt_ids = env0.prompt_ids[sample.prompt_index]
        for t in range(sample.completion_tokens):
            generated = ids[16 : 16 + t]
            assert env0.action_mask(env0.prompts[sample.prompt_index], prompt_ids, generated)[ids[16 + t]]


@pytest.mark.parametrize("deterministic", [True, False])
def test_nlpo_top_p_sets_as_in_the_env_loop(eos_lm, deterministic):
    n_envs = 3 if deterministic else 1  # sampled: one env, so both paths draw in the same order
    env = make_vec_env(toy_task(f"GenNLPO{deterministic}-v0", eos_lm), n_envs=n_envs, seed=0)
    model = toy_ppo(env, eos_lm, policy_kwargs=dict(nlpo_top_p=0.3))
    randomize_lora(model, scale=1.0)  # the policy moves away from its masking policy (the weights at build)
    old, new = run_both(model, env, order=ORDER if deterministic else [0, 4, 7], deterministic=deterministic, seed=3)
    assert_same_samples(old, new)
    model.policy.nlpo_top_p = None
    th.manual_seed(3)
    free = generate_samples(model, env, ORDER if deterministic else [0, 4, 7], deterministic=deterministic)
    assert [s.completion for s in free] != [s.completion for s in new]  # the NLPO sets did restrict the tokens


# -- fallback ------------------------------------------------------------------------------------------------------


class DoubleReward(gym.RewardWrapper):
    def reward(self, reward):
        return 2 * reward


def test_env_loop_fallback_is_automatic_and_logged(tiny_lm, caplog):
    task = register_toy_task("GenFallback-v0", tiny_lm)
    env = DummyVecEnv([lambda: DoubleReward(gym.make(task))])
    model = toy_ppo(env, tiny_lm)
    assert "DoubleReward" in fast_path_unsupported(model, env)
    assert fast_path_unsupported(model, make_vec_env(task, n_envs=2)) is None
    calls = []
    env_step = env.step
    env.step = lambda actions: calls.append(1) or env_step(actions)
    with caplog.at_level(logging.WARNING, logger="sb3_textrl"):
        samples = generate_samples(model, env, [0, 1])
    assert calls and len(samples) == 2  # the env loop ran
    assert any("env loop" in r.message and "DoubleReward" in r.message for r in caplog.records)


def test_reward_batching_vec_env_keeps_the_fast_path(eos_lm):
    """make_text_vec_env's BatchedRewardVecEnv (what evaluate() and the examples build) changes when rewards are
    scored, not what they are: the fast path applies to it and gives the env loop's samples."""
    from sb3_textrl import make_text_vec_env
    from sb3_textrl.envs.batched import BatchedRewardVecEnv

    env = make_text_vec_env(toy_task("GenBatched-v0", eos_lm), n_envs=3, seed=0)
    assert isinstance(env, BatchedRewardVecEnv)
    model = toy_ppo(env, eos_lm)
    randomize_lora(model)
    assert fast_path_unsupported(model, env) is None
    assert text_env_of(env) is env.venv.envs[0].unwrapped
    old, new = run_both(model, env)
    assert_same_samples(old, new)


# -- the KL pass evaluate() skips -------------------------------------------------------------------------------------


def test_reference_identity_reads_the_weights(tiny_lm):
    env = make_vec_env(register_toy_task("GenIdentity-v0", tiny_lm), n_envs=1)
    lora = toy_ppo(env, tiny_lm)
    assert "LoRA B" in reference_identity(lora.policy)
    with th.no_grad():  # a single non-zero entry in one B matrix makes the policy differ
        next(p for n, p in lora.policy.lm.named_parameters() if "lora_B" in n)[0, 0] = 1e-3
    assert reference_identity(lora.policy) is None

    full = toy_ppo(env, tiny_lm, policy_kwargs=dict(use_lora=False))
    assert "frozen reference copy" in reference_identity(full.policy)
    with th.no_grad():
        full.policy.lm.get_output_embeddings().weight[0, 0] += 1e-3
    assert reference_identity(full.policy) is None


def test_evaluate_skips_the_kl_pass_only_when_the_policy_is_its_reference(tiny_lm, monkeypatch):
    task = register_toy_task("GenKL-v0", tiny_lm, max_new_tokens=4)
    env = make_vec_env(task, n_envs=2, seed=0)
    model = toy_ppo(env, tiny_lm)
    calls = []
    real_kl = evaluation_run.kl_to_reference
    monkeypatch.setattr(evaluation_run, "kl_to_reference", lambda *args, **kwargs: calls.append(1) or real_kl(*args, **kwargs))
    kwargs = dict(task=task, n=3, n_envs=2, device="cpu", progress_bar=False)

    result = evaluate(model, decoding=["greedy", "sample", "sample:top_p=0.5"], **kwargs)
    assert result.config["kl_skipped"] == ["model:greedy", "model:sample:temperature=1.0"]
    assert len(calls) == 1  # top-p truncation makes π differ from π_ref even on equal weights: measured
    assert result.metrics["model:greedy"]["kl_to_ref"] == 0.0
    assert result.metrics["model:sample:temperature=1.0,top_p=0.5"]["kl_to_ref"] > 0
    note = next(n for n in result.notes if "0 by construction" in n)
    assert "model:greedy, model:sample:temperature=1.0" in note and "LoRA B matrix is zero" in note

    randomize_lora(model)
    calls.clear()
    moved = evaluate(model, **kwargs)
    assert calls == [1] and moved.config["kl_skipped"] == [] and moved.metrics["model:greedy"]["kl_to_ref"] != 0
    assert not any("0 by construction" in n for n in moved.notes)


def test_decoding_context_reaches_the_fast_path(eos_lm):
    """sampling.decoding() settings act on the fast path exactly as on the env loop (one env, same draws)."""
    env = make_vec_env(toy_task("GenContext-v0", eos_lm), n_envs=1, seed=0)
    model = toy_ppo(env, eos_lm)
    with decoding(model.policy, DecodingSettings(greedy=False, temperature=0.7, top_k=20)):
        old, new = run_both(model, env, order=[1, 2], deterministic=False, seed=11)
    assert_same_samples(old, new)
    assert (model.policy.temperature, model.policy.top_k) == (1.0, None)


# -- shared prefills and per-row determinism ----------------------------------------------------------------------


def count_prefill_rows(model, monkeypatch) -> list[int]:
    """Record the batch size of every multi-token forward of the policy's trunk (the prefills)."""
    rows: list[int] = []
    trunk = model.policy._trunk

    def counting(lm, input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1:
            rows.append(int(input_ids.shape[0]))
        return trunk(lm, input_ids, *args, **kwargs)

    monkeypatch.setattr(model.policy, "_trunk", counting)
    return rows


def test_repeated_prompts_are_prefilled_once_and_decode_as_alone(eos_lm, monkeypatch):
    env = make_vec_env(toy_task("GenRepeat-v0", eos_lm), n_envs=1, seed=0)
    model = toy_ppo(env, eos_lm)
    randomize_lora(model)
    text_env = text_env_of(env)
    order = [3, 0, 3, 6, 0, 3]
    alone = {i: decode(model.policy, [text_env.prompt_ids[i]], 8, text_env.stop_token_ids).tokens[0] for i in set(order)}
    prefills = count_prefill_rows(model, monkeypatch)
    out = decode(model.policy, [text_env.prompt_ids[i] for i in order], 8, text_env.stop_token_ids)
    assert prefills == [3]  # one row per distinct prompt
    for i, tokens in zip(order, out.tokens, strict=True):
        np.testing.assert_array_equal(tokens, alone[i])
    assert len({len(alone[i]) for i in alone}) > 1  # rows that stop at different steps, some of them copies


def test_per_row_determinism_gives_each_row_its_all_greedy_or_all_sampled_tokens(eos_lm):
    """No stop tokens, so every row lives to the end and the draws are comparable row by row: a mixed batch's greedy
    rows are the all-greedy batch's, its sampled rows the all-sampled batch's under the same seed."""
    env = make_vec_env(toy_task("GenMixed-v0", eos_lm), n_envs=1, seed=0)
    model = toy_ppo(env, eos_lm, policy_kwargs=dict(temperature=1.5))
    randomize_lora(model)
    prompts = [text_env_of(env).prompt_ids[i] for i in (1, 1, 4, 4, 7)]
    flags = [True, False, False, True, False]

    def run(deterministic):
        th.manual_seed(3)
        return decode(model.policy, prompts, 8, [], deterministic).tokens

    greedy, sampled, mixed = run(True), run(False), run(flags)
    for row, flag in enumerate(flags):
        np.testing.assert_array_equal(mixed[row], (greedy if flag else sampled)[row])
    assert not np.array_equal(sampled[0], greedy[0])  # the test means something: sampling moved off the greedy tokens
    with pytest.raises(ValueError, match="3 flags for 5 prompts"):
        decode(model.policy, prompts, 8, [], [True, False, True])


def test_sample_sets_match_separate_calls_and_restore_the_random_state(eos_lm, monkeypatch):
    from sb3_textrl.evaluation import generate_sample_sets

    env = make_vec_env(toy_task("GenSets-v0", eos_lm), n_envs=2, seed=0)
    model = toy_ppo(env, eos_lm)
    randomize_lora(model)
    order = [0, 5, 2]
    state = th.get_rng_state()
    prefills = count_prefill_rows(model, monkeypatch)
    sets = generate_sample_sets(model, env, order, n_sampled=3, seed=11)
    assert th.equal(th.get_rng_state(), state)
    assert prefills == [2, 1]  # env.num_envs = 2 prompts per batch, each prefilled once for its 4 completions
    monkeypatch.undo()
    assert_same_samples(sets.greedy, generate_samples(model, env, order, deterministic=True, fast=False))
    assert [[s.prompt_index for s in draw] for draw in sets.sampled] == [order] * 3
    again = generate_sample_sets(model, env, order, n_sampled=3, seed=11)
    assert [[s.completion for s in d] for d in again.sampled] == [[s.completion for s in d] for d in sets.sampled]
    other = generate_sample_sets(model, env, order, n_sampled=3, seed=12)
    assert [[s.completion for s in d] for d in other.sampled] != [[s.completion for s in d] for d in sets.sampled]
    means = sets.sampled_rewards()
    assert means == pytest.approx([np.mean([d[i].reward for d in sets.sampled]) for i in range(3)])
    # The env loop (the fallback) gives the same greedy completions and as many draws.
    monkeypatch.setattr("sb3_textrl.common.generation.fast_path_unsupported", lambda model, env: "forced")
    slow = generate_sample_sets(model, env, order, n_sampled=2, seed=11)
    assert_same_samples(slow.greedy, sets.greedy)
    assert [[s.prompt_index for s in draw] for draw in slow.sampled] == [order] * 2
