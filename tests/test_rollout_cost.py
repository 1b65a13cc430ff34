"""What a rollout spends: one prefill per distinct prompt, no prefill for bootstrap values that GAE discards."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch as th
from helpers import register_toy_task, toy_ppo, toy_vec_env
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer, LinearAttentionLayer

from sb3_textrl import TextRolloutBuffer
from sb3_textrl.common.kv_cache import RolloutKVCache, last_valid_index
from sb3_textrl.common.segments import flat_steps


def counting_trunk(calls: list[int]):
    """A stand-in trunk: hidden state = token id (4 features), keys = hidden, values = 2 x hidden; counts rows run."""

    def trunk(ids, mask, positions, past):
        calls.append(len(ids))
        hidden = ids.unsqueeze(-1).float().expand(-1, -1, 4) * mask[:, -ids.shape[1]:].unsqueeze(-1)  # (B, S, 4)
        cache = DynamicCache() if past is None else past
        cache.update(hidden.unsqueeze(1), hidden.unsqueeze(1) * 2, 0)
        return hidden, cache, hidden + 1

    return trunk


def test_envs_on_the_same_prompt_share_one_prefill():
    calls = []
    trunk = counting_trunk(calls)
    ids = th.tensor([[0, 5, 6, 7], [0, 5, 6, 7], [9, 8, 7, 6], [0, 5, 6, 7]])
    mask = th.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    cache = RolloutKVCache(trunk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache.step(ids, mask)
    assert calls[0] == 2 and cache.prefilled_rows == 2  # 4 envs, 2 distinct prompts: one prefill row each
    keys = cache.past.layers[0].keys[:, 0, :, 0]  # (B, C): the rows' contexts, right-aligned
    assert th.equal(keys[0], keys[1]) and th.equal(keys[0], keys[3]) and not th.equal(keys[0], keys[2])
    features, found = cache.features_of(ids, mask)
    assert found.all()
    th.testing.assert_close(features, (ids * mask).unsqueeze(-1).float().expand(-1, -1, 4) + mask.unsqueeze(-1))


@pytest.mark.parametrize("layer_class", [DummyLayer, LinearAttentionLayer])
@pytest.mark.parametrize("shared", [False, True])
def test_a_cache_with_other_layers_than_full_attention_is_refused(layer_class, shared):
    """Also when rows share a prefill: its keys are copied to the rows, which other layer types lack."""

    def trunk(ids, mask, positions, past):
        hidden = ids.unsqueeze(-1).float().expand(-1, -1, 4)
        cache = DynamicCache() if past is None else past
        cache.update(hidden.unsqueeze(1), hidden.unsqueeze(1) * 2, 0)
        if past is None:
            cache.layers.append(layer_class())
        return hidden, cache, None

    ids = th.tensor([[5, 6, 7], [5, 6, 7] if shared else [1, 6, 7]])
    with warnings.catch_warnings(), pytest.raises(NotImplementedError, match="full-attention layers only"):
        warnings.simplefilter("ignore")
        RolloutKVCache(trunk).step(ids, th.ones_like(ids))


def collect(model, n_steps: int):
    _, callback = model._setup_learn(n_steps * model.n_envs, reset_num_timesteps=model._last_obs is None)
    callback.on_training_start(locals(), globals())
    model.policy.set_training_mode(False)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=n_steps)
    return model.rollout_buffer


def test_envs_on_one_prompt_prefill_it_once_and_train_on_the_same_log_probs(tiny_lm):
    task = register_toy_task("OnePrompt-v0", tiny_lm, max_new_tokens=5)
    model = toy_ppo(toy_vec_env(task, n_envs=4), tiny_lm, n_steps=5)
    model.env.env_method("queue_prompts", [2] * 8)  # every env starts prompt 2, twice
    buffer = collect(model, n_steps=5)
    cache = model.policy._rollout_cache
    assert cache.prefilled_rows == 1  # 4 envs, one prompt: one prefill row (the new episodes' bootstrap is skipped)
    chunk = buffer.segments
    with th.no_grad():
        actions = th.as_tensor(flat_steps(buffer.actions, chunk))
        _, log_prob, _ = model.policy.evaluate_actions(buffer.segment_batch(chunk), actions)
    np.testing.assert_allclose(log_prob.numpy(), flat_steps(buffer.log_probs, chunk), atol=1e-5)


class KeepBootstrap(TextRolloutBuffer):
    """A buffer that does not tell the policy that the next values are the rollout's bootstrap."""

    def add(self, *args, **kwargs):
        super().add(*args, **kwargs)
        if self.policy is not None:
            self.policy.bootstrap_after_rollout = False


def test_bootstrap_of_new_episodes_skips_their_prefill_and_changes_no_advantage(tiny_lm):
    task = register_toy_task("Bootstrap-v0", tiny_lm, max_new_tokens=5, stop_token_ids=[-1])  # every episode: 5 steps
    runs = {}
    for name, buffer_class in (("skip", TextRolloutBuffer), ("keep", KeepBootstrap)):
        model = toy_ppo(toy_vec_env(task, n_envs=3), tiny_lm, n_steps=5, rollout_buffer_class=buffer_class)
        for env, prompts in enumerate(([0, 3], [1, 4], [2, 0])):  # distinct prompts in every episode
            model.env.env_method("queue_prompts", prompts, indices=[env])
        buffer = collect(model, n_steps=5)
        runs[name] = (buffer, model.policy._rollout_cache.prefilled_rows)
    (skip, skip_rows), (keep, keep_rows) = runs["skip"], runs["keep"]
    assert (skip_rows, keep_rows) == (3, 6)  # the kept bootstrap prefilled the 3 new prompts for nothing
    np.testing.assert_array_equal(skip.actions, keep.actions)
    np.testing.assert_allclose(skip.advantages, keep.advantages, atol=1e-6)
    np.testing.assert_allclose(skip.returns, keep.returns, atol=1e-6)


def observation(rows: list[tuple[list[int], list[int]]], prompt_width: int = 3, width: int = 6) -> tuple[th.Tensor, th.Tensor]:
    """(ids, mask) of text observations, each (prompt, generated tokens): prompt left-padded, tokens after it."""
    ids, mask = th.zeros(len(rows), width, dtype=th.long), th.zeros(len(rows), width, dtype=th.long)
    for row, (prompt, generated) in enumerate(rows):
        tokens = th.tensor(prompt + generated)
        columns = slice(prompt_width - len(prompt), prompt_width + len(generated))
        ids[row, columns], mask[row, columns] = tokens, 1
    return ids, mask


# Three envs under the lock-step: env 0 ends first and waits at prompt R; env 1 ends and meets it there one step later.
WAITING_STEPS = [
    [([5, 6], []), ([5, 6], []), ([9], [])],  # first observations: P, P, Q
    [([5, 6], [1]), ([5, 6], [2]), ([9], [3])],
    [([4, 4, 8], []), ([5, 6], [2, 1]), ([9], [3, 3])],  # env 0 ended: its next prompt R
    [([4, 4, 8], []), ([4, 4, 8], []), ([9], [3, 3, 2])],  # env 0 waits; env 1 ended: R, which env 0 holds
    [([4, 4, 8], []), ([4, 4, 8], []), ([9], [3, 3, 2])],  # the same observations again (as predict_values asks)
    [([4, 4, 8], []), ([4, 4, 8], []), ([7], [])],  # env 2 ended: the group meets at R
    [([4, 4, 8], [1]), ([4, 4, 8], [3]), ([7], [2])],
]


def test_a_waiting_row_is_not_prefilled_again():
    calls = []
    cache = RolloutKVCache(counting_trunk(calls))
    prefilled, widths = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rows in WAITING_STEPS:
            hidden = cache.step(*observation(rows))
            prefilled.append(cache.prefilled_rows)
            widths.append(cache.mask.shape[1])
            # The hidden state of each row's last token (the stand-in trunk's hidden state is its id).
            ids, mask = observation(rows)
            assert th.equal(hidden[:, 0], th.gather(ids, 1, last_valid_index(mask).unsqueeze(1)).squeeze(1).float())
    # P and Q once, R once for env 0 (env 1 copies it, and waiting costs nothing), the new prompt of env 2 once.
    assert prefilled == [2, 2, 3, 3, 3, 4, 4]
    assert len(calls) == 9  # one one-token forward a step, 3 prefills, nothing for the repeated observations
    assert max(widths) <= 6  # waiting adds no columns that stay: the cache is as wide as its longest context
    keys = cache.past.layers[0].keys[:, 0, :, 0]  # (B, C)
    assert th.equal(keys[0, -4:], th.tensor([4.0, 4, 8, 1])) and th.equal(keys[1, -4:], th.tensor([4.0, 4, 8, 3]))


def test_waiting_and_copied_rows_keep_exact_hidden_states(tiny_lm):
    task = register_toy_task("WaitExact-v0", tiny_lm, max_new_tokens=3)
    model = toy_ppo(toy_vec_env(task, n_envs=3), tiny_lm, n_steps=3)
    policy, cache = model.policy, model.policy._rollout_cache
    for rows in WAITING_STEPS:
        ids, mask = observation([([t + 100 for t in p], [t + 200 for t in g]) for p, g in rows], prompt_width=16, width=19)
        cached = cache.step(ids, mask)
        with th.no_grad():
            full = policy._last_hidden_per_step({"input_ids": ids, "attention_mask": mask})
        th.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
    assert cache.prefilled_rows == 4
