"""Env-side action masks: built-in masks, callables, the env's action_masks() and its errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from helpers import PROMPTS, register_toy_task, shout

import sb3_textrl  # noqa: F401  (registers NewsSummary-v0)
from sb3_textrl import TextGenerationEnv, TextPrompt
from sb3_textrl.envs.masks import ArticleMask, BannedTokens, token_table

ARTICLE = "Police in Leeds arrested two men after a robbery at a jewellery shop on Monday, officers said."


def ids_of(tokenizer, *words: str) -> list[int]:
    out = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (word, ids)
        out.append(ids[0])
    return out


def make_env(tokenizer, action_mask, prompts=None, **kwargs) -> TextGenerationEnv:
    prompts = prompts or [TextPrompt("Summarize: " + ARTICLE + "\nTL;DR:", meta={"article": ARTICLE})]
    return TextGenerationEnv(prompts, shout, tokenizer, max_new_tokens=4, max_prompt_tokens=64, task_id="MaskToy-v0",
                             action_mask=action_mask, **kwargs)


def test_token_table_groups_bpe_variants(gpt2_tokenizer):
    table = token_table(gpt2_tokenizer)
    assert table is token_table(gpt2_tokenizer)  # built once per tokenizer
    the = ids_of(gpt2_tokenizer, "the", " the", "The", " The")
    assert len({int(table.forms[i]) for i in the}) == 1
    assert table.forms[ids_of(gpt2_tokenizer, " then")[0]] != table.forms[the[0]]
    assert table.punctuation[ids_of(gpt2_tokenizer, ".", ",", " (")].all()
    assert not table.punctuation[ids_of(gpt2_tokenizer, "{", " the", "\n")].any()


def test_article_mask_allows_article_words_in_any_bpe_variant(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer, "article")
    env.reset(seed=0)
    mask = env.action_masks()
    assert mask.dtype == bool and mask.shape == (len(gpt2_tokenizer),)
    allowed = ids_of(gpt2_tokenizer, " Police", "Police", " police", " arrested", " Leeds", ".", ",", " the", " of")
    assert mask[allowed].all()
    assert mask[gpt2_tokenizer.eos_token_id]
    # Not in the article: other words, the prompt's own instruction, odd symbols, newlines.
    refused = ids_of(gpt2_tokenizer, " banana", " Sum", "{", "\n", "\n\n", " London")
    assert not mask[refused].any()
    assert 50 < mask.sum() < 1000  # the article's words and their variants, function words, punctuation


def test_article_mask_without_article_meta_uses_the_prompt(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer, "article", prompts=["The quick brown fox"])
    env.reset(seed=0)
    mask = env.action_masks()
    assert mask[ids_of(gpt2_tokenizer, " quick", " Fox", " fox", " brown")].all()
    assert not mask[ids_of(gpt2_tokenizer, " Police", " dog")].any()


def test_banned_tokens_by_id_and_word(gpt2_tokenizer):
    comma = ids_of(gpt2_tokenizer, ",")[0]
    env = make_env(gpt2_tokenizer, {"banned": ["the", comma]})
    env.reset(seed=0)
    mask = env.action_masks()
    assert not mask[ids_of(gpt2_tokenizer, "the", " the", "The", " The", "THE", " THE", ",")].any()
    assert mask.sum() == len(gpt2_tokenizer) - 7  # only those
    with pytest.raises(ValueError, match=r"MaskToy-v0.*not single tokens.*token ids"):
        make_env(gpt2_tokenizer, BannedTokens(["Leedsbury"]))
    with pytest.raises(ValueError, match=r"MaskToy-v0.*not in \[0, 50257\)"):
        make_env(gpt2_tokenizer, {"banned": [60000]})


def test_callable_mask_sees_prompt_and_generated_ids_each_step(gpt2_tokenizer):
    calls = []
    vocab = len(gpt2_tokenizer)

    def even_after_odd(prompt_ids, generated_ids):
        calls.append((prompt_ids.copy(), generated_ids.copy()))
        mask = np.zeros(vocab, dtype=bool)
        mask[len(generated_ids) % 2 :: 2] = True  # parity alternates with the position
        return mask

    env = make_env(gpt2_tokenizer, even_after_odd)
    env.reset(seed=0)
    for step, token in enumerate([10, 21, 30]):
        mask = env.action_masks()
        assert mask[token] and not mask[token + 1]
        env.step(token)
        assert len(calls) == step + 1  # once per step: action_masks() and step() share it
    np.testing.assert_array_equal(calls[-1][0], env.prompt_ids[0])
    np.testing.assert_array_equal(calls[-1][1], [10, 21])
    *_, info = env.step(41)
    assert info["masked_out_tokens"] == 0


def test_tokens_outside_the_mask_are_counted(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer, "article")
    env.reset(seed=0)
    banana = ids_of(gpt2_tokenizer, " banana")[0]
    for _ in range(4):
        *_, info = env.step(banana)
    assert info["masked_out_tokens"] == 4


def test_intersection_of_masks(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer, ["article", {"banned": ["police"]}])
    env.reset(seed=0)
    mask = env.action_masks()
    assert mask[ids_of(gpt2_tokenizer, " arrested")].all()
    assert not mask[ids_of(gpt2_tokenizer, " Police", " police", " banana")].any()


@pytest.mark.parametrize(
    ("action_mask", "message"),
    [
        (lambda p, g: np.ones(100, dtype=bool), r"MaskToy-v0: the action mask .* returned shape \(100,\).*\(50257,\)"),
        (lambda p, g: np.zeros(50257, dtype=bool), r"MaskToy-v0: the action mask .* allows no token.*at least one token"),
    ],
    ids=["wrong-length", "allows-nothing"],
)
def test_bad_masks_raise_naming_the_task(gpt2_tokenizer, action_mask, message):
    env = make_env(gpt2_tokenizer, action_mask)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.action_masks()


def test_bad_specs_raise_naming_the_task(gpt2_tokenizer):
    with pytest.raises(ValueError, match=r"MaskToy-v0: unknown action_mask 'articles'.*'article'"):
        make_env(gpt2_tokenizer, "articles")
    with pytest.raises(TypeError, match=r"MaskToy-v0: action_mask must be"):
        make_env(gpt2_tokenizer, 3.5)
    with pytest.raises(ValueError, match=r"MaskToy-v0: a dict action_mask takes the one key 'banned'"):
        make_env(gpt2_tokenizer, {"allowed": [1]})


def test_action_masks_before_reset_is_an_error(gpt2_tokenizer):
    with pytest.raises(RuntimeError, match=r"MaskToy-v0: action_masks\(\) called before reset\(\)"):
        make_env(gpt2_tokenizer, "article").action_masks()


def test_registered_task_and_gym_make_take_a_mask(tiny_lm, gpt2_tokenizer):
    task = register_toy_task("MaskRegistered-v0", tiny_lm, action_mask="article")
    env = gym.make(task)
    env.reset(seed=0)
    mask = env.unwrapped.action_masks()
    prompt_words = set(PROMPTS[env.unwrapped._prompt_index].split())
    assert mask[ids_of(gpt2_tokenizer, " " + sorted(prompt_words)[-1].strip(",:"))].all()
    assert not mask[ids_of(gpt2_tokenizer, " banana")].any()
    # gym.make overrides the registered mask; without one, every token is allowed.
    free = gym.make(task, action_mask=None)
    free.reset(seed=0)
    assert free.unwrapped.action_masks().all()


def test_news_summary_article_mask_reads_the_article(tiny_lm, gpt2_tokenizer):
    env = gym.make("NewsSummary-v0", tokenizer=tiny_lm, n_articles=4, max_new_tokens=8, action_mask="article")
    env.reset(seed=0)
    unwrapped = env.unwrapped
    article = unwrapped.prompts[unwrapped._prompt_index].meta["article"]
    mask = unwrapped.action_masks()
    article_ids = np.asarray(gpt2_tokenizer(article, add_special_tokens=False)["input_ids"])
    assert mask[article_ids].all()
    assert not mask[ids_of(gpt2_tokenizer, " TL", " banana")].any()  # the "TL;DR:" cue is prompt, not article
    assert isinstance(unwrapped.action_mask, ArticleMask)
