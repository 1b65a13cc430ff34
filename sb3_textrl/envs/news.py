"""NewsSummary-v0: summarise a news article; the reward is ROUGE against the reference summary."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from transformers import PreTrainedTokenizerBase

from sb3_textrl.envs.memo import tokenizer_memo
from sb3_textrl.envs.news_data import generate_news_examples, load_summary_dataset
from sb3_textrl.envs.registry import TokenizerSpec, resolve_tokenizer
from sb3_textrl.envs.text_env import TextGenerationEnv, TextPrompt, log_once
from sb3_textrl.rewards.base import RewardFn, TextReward
from sb3_textrl.rewards.rouge import RougeReward

TASK_ID = "NewsSummary-v0"
INSTRUCTION = "Summarize the following news article in one or two sentences."
_ARTICLE_MARKER = "\x00ARTICLE\x00"
# Tokens kept free in the prompt budget: tokenising the pieces apart can differ by a token at each seam.
_SEAM_MARGIN = 4


def prompt_template(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, bool]:
    """
    The text before and after the article, suited to the LM: its chat template when it has one (instruction-tuned
    models such as SmolLM2-Instruct), else a "TL;DR:" cue that base LMs complete with a summary.

    :param tokenizer: the task's tokenizer
    :return: (prefix, suffix, whether the template already holds the special tokens)
    """
    if getattr(tokenizer, "chat_template", None):
        message = {"role": "user", "content": f"{INSTRUCTION}\n\n{_ARTICLE_MARKER}"}
        text = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
        prefix, suffix = str(text).split(_ARTICLE_MARKER)
        return prefix, suffix, True
    return "", "\n\nTL;DR:", False


def build_news_prompts(
    rows: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int, task_id: str = TASK_ID
) -> tuple[list[TextPrompt], bool]:
    """
    Prompts whose articles are cut to fit ``max_prompt_tokens`` with the template; the cuts are counted and logged.

    :param rows: dicts with ``article`` and ``summary``
    :param tokenizer: the task's tokenizer
    :param max_prompt_tokens: prompt budget in tokens
    :param task_id: used in messages
    :return: the prompts, and whether they already contain the model's special tokens
    """
    prefix, suffix, templated = prompt_template(tokenizer)
    overhead = len(tokenizer(prefix + suffix, add_special_tokens=not templated)["input_ids"])
    budget = max_prompt_tokens - overhead - _SEAM_MARGIN
    if budget < 16:
        raise ValueError(
            f"{task_id}: max_prompt_tokens={max_prompt_tokens} leaves {budget} tokens for the article after the "
            f"{overhead}-token prompt template; raise max_prompt_tokens (256 or more is usual)."
        )
    encoded = tokenizer([row["article"] for row in rows], add_special_tokens=False, return_offsets_mapping=True)
    prompts, cut = [], 0
    for row, ids, offsets in zip(rows, encoded["input_ids"], encoded["offset_mapping"]):
        article = row["article"]
        if len(ids) > budget:
            article = article[: offsets[budget - 1][1]].rstrip() + " ..."
            cut += 1
        prompts.append(TextPrompt(prefix + article + suffix, row["summary"], {"article": row["article"]}))
    if cut:
        log_once(
            f"{task_id}: {cut} of {len(rows)} articles are longer than the {budget}-token article budget "
            f"(max_prompt_tokens={max_prompt_tokens}) and were truncated; raise max_prompt_tokens to keep more."
        )
    return prompts, templated


def shared_news_prompts(
    rows: tuple[dict[str, str], ...], tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int
) -> tuple[list[TextPrompt], bool]:
    """
    :func:`build_news_prompts`, computed once for all the envs of a VecEnv: each env gets its own prompt objects.

    :param rows: the (cached) dataset rows; the result is kept for this very tuple
    :param tokenizer: the task's tokenizer
    :param max_prompt_tokens: prompt budget in tokens
    :return: the prompts, and whether they already contain the model's special tokens
    """
    key = ("news_prompts", id(rows), max_prompt_tokens, getattr(tokenizer, "chat_template", None))
    # The rows are kept with the result: while it is stored, no other tuple can take their id.
    _, prompts, templated = tokenizer_memo(
        tokenizer, key, lambda: (rows, *build_news_prompts(list(rows), tokenizer, max_prompt_tokens))
    )
    return [dataclasses.replace(p, meta=dict(p.meta)) for p in prompts], templated


@functools.lru_cache(maxsize=8)
def _load_rows(
    dataset: str | None, split: str, limit: int | None, n_articles: int, data_seed: int, fields: tuple[str | None, str | None]
) -> tuple[dict[str, str], ...]:
    # Cached: the envs of a VecEnv share one copy of the data.
    if dataset is None:
        # limit= applies to the built-in data too (example i depends only on (seed, i), so this is a prefix)
        return tuple(generate_news_examples(n_articles if limit is None else min(limit, n_articles), seed=data_seed))
    rows = load_summary_dataset(dataset, split=split, article_field=fields[0], summary_field=fields[1], limit=limit)
    return tuple(rows)


def make_news_summary_env(
    dataset: str | os.PathLike | None = None,
    split: str = "test",
    limit: int | None = None,
    tokenizer: TokenizerSpec = None,
    max_new_tokens: int = 48,
    max_prompt_tokens: int = 320,
    reward: str | RewardFn | TextReward = "rouge1",
    n_articles: int = 512,
    data_seed: int = 0,
    article_field: str | None = None,
    summary_field: str | None = None,
    **env_kwargs: Any,
) -> TextGenerationEnv:
    """
    Make the NewsSummary task (``gym.make("NewsSummary-v0", **kwargs)`` calls this).

    :param dataset: None: the built-in generator of synthetic news articles; a ``.jsonl``/``.json``/``.csv`` path
        with article and summary fields; or a Hugging Face dataset name (``cnn_dailymail``, ``xsum``; needs the
        hub and the ``datasets`` package)
    :param split: dataset split (hub datasets, or JSON files keyed by split)
    :param limit: use at most this many rows of the dataset
    :param tokenizer: tokenizer name, path or object; None: the embedded SmolLM2's
    :param max_new_tokens: length limit of a summary, in tokens
    :param max_prompt_tokens: prompt budget; longer articles are truncated (logged with a count)
    :param reward: a ROUGE variant name (``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``), a reward callable or a
        TextReward
    :param n_articles: size of the built-in synthetic dataset
    :param data_seed: seed of the built-in synthetic dataset
    :param article_field: field holding the article in ``dataset`` (default: detected)
    :param summary_field: field holding the summary in ``dataset`` (default: detected)
    :param env_kwargs: further :class:`TextGenerationEnv` arguments
    """
    if limit is not None and limit < 1:
        raise ValueError(f"{TASK_ID}: limit must be a positive number of rows or None, got {limit}")
    tok, tok_name = resolve_tokenizer(tokenizer)
    source = None if dataset is None else os.fspath(dataset)
    source_rows = _load_rows(source, split, limit, n_articles, data_seed, (article_field, summary_field))
    prompts, templated = shared_news_prompts(source_rows, tok, max_prompt_tokens)
    reward_fn = RougeReward(reward) if isinstance(reward, str) else reward
    env_kwargs.setdefault("add_special_tokens", not templated)
    return TextGenerationEnv(
        prompts,
        reward_fn,
        tok,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        task_id=TASK_ID,
        tokenizer_name=tok_name,
        **env_kwargs,
    )
