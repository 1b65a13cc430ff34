"""
SFT data: (article, summary) pairs, TRL's prompt/completion rows, or a task's prompts and references, turned into
token sequences in the env's layout, batched and collated.

The prompts are built exactly as the env builds them (:func:`~sb3_textrl.envs.news.build_news_prompts` for news data;
for prompt/completion rows and a task's own prompts, the env itself: its prompt template, chat template and
truncation), and each target is the reference then EOS.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch as th
from transformers import PreTrainedTokenizerBase

from sb3_textrl.common.names import DEFAULT_TASK

if TYPE_CHECKING:
    from sb3_textrl.envs.text_env import TextGenerationEnv

logger = logging.getLogger("sb3_textrl")

_NEWS_ENTRY_POINT = "sb3_textrl.envs.news:make_news_summary_env"
_TEXT_TASK_ENTRY_POINT = "sb3_textrl.envs.registry:make_text_task_env"
IGNORE_INDEX = -100  # label of a position that is not trained on (cross_entropy's ignore_index)
SftData = str | os.PathLike | Sequence[dict[str, Any]] | None
PROMPT_COMPLETION_FIELDS = ("prompt", "completion")  # TRL's prompt/completion format


@dataclass
class SFTExample:
    """
    One training sequence.

    :param prompt_ids: the prompt's token ids, exactly as the env feeds them to the policy
    :param target_ids: the completion's token ids: the reference, then EOS (no EOS when the reference was cut)
    """

    prompt_ids: list[int]
    target_ids: list[int]


# -- building examples ---------------------------------------------------------------------------------------


def _news_defaults() -> tuple[int, int]:
    # The news env's own defaults, read from its signature so SFT and PPO cannot drift apart.
    from sb3_textrl.envs.news import make_news_summary_env

    params = inspect.signature(make_news_summary_env).parameters
    return int(params["max_prompt_tokens"].default), int(params["max_new_tokens"].default)


def _separator(prompt: str, reference: str) -> str:
    # "TL;DR:" + " The mayor..." for base LMs; a chat template's prompt already ends with a newline.
    return "" if not prompt or prompt[-1].isspace() or reference[:1].isspace() else " "


def make_sft_examples(
    prompt_texts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    references: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_target_tokens: int,
) -> tuple[list[SFTExample], int]:
    """
    Pair tokenized prompts with their tokenized references, EOS appended.

    A reference longer than ``max_target_tokens`` is cut and gets no EOS: the model should not learn to stop
    mid-sentence.

    :param prompt_texts: the prompts as text (to choose the separator before the reference)
    :param prompt_ids: the prompts' token ids, as the env tokenizes them
    :param references: one reference completion per prompt
    :param tokenizer: the LM's tokenizer (its EOS ends every target)
    :param max_target_tokens: the longest target, EOS included
    :return: the examples, and how many references were cut
    """
    if max_target_tokens < 1:
        raise ValueError(f"max_target_tokens must be >= 1, got {max_target_tokens}; it is the longest summary in tokens.")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"The tokenizer {tokenizer.name_or_path!r} has no EOS token, so the model cannot learn to stop. "
            "Set tokenizer.eos_token before fine-tuning."
        )
    texts = [_separator(p, r) + r for p, r in zip(prompt_texts, references)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    examples, cut = [], 0
    for ids, target in zip(prompt_ids, encoded):
        if len(target) + 1 > max_target_tokens:
            target, cut = target[:max_target_tokens], cut + 1
        else:
            target = [*target, tokenizer.eos_token_id]
        examples.append(SFTExample([int(i) for i in ids], [int(i) for i in target]))
    if cut:
        logger.warning(
            f"SFT: {cut} of {len(examples)} reference summaries are longer than max_target_tokens={max_target_tokens} "
            "and were cut (those are trained without EOS); raise max_target_tokens to keep them whole."
        )
    return examples, cut


def _check_rows(rows: Sequence[Any], where: str) -> list[dict[str, str]]:
    if len(rows) == 0:
        raise ValueError(f"{where}: the data is empty; give at least one (article, summary) pair.")
    for i, row in enumerate(rows):
        valid = isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip() for k in ("article", "summary"))
        if not valid:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{where}, row {i}: needs non-empty 'article' and 'summary' text fields, got {found}. Fix the row, or "
                "load a file with load_summary_dataset(path, article_field=..., summary_field=...) first."
            )
    return [{"article": row["article"].strip(), "summary": row["summary"].strip()} for row in rows]


def news_sft_examples(
    rows: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    max_target_tokens: int,
) -> tuple[list[SFTExample], int, int]:
    """
    SFT examples from (article, summary) rows, with NewsSummary-v0's prompt template and truncation.

    :param rows: dicts with ``article`` and ``summary``
    :param tokenizer: the LM's tokenizer
    :param max_prompt_tokens: the prompt budget (articles are cut to fit it, as in the env; logged)
    :param max_target_tokens: the longest target, EOS included
    :return: the examples, how many articles were cut, how many summaries were cut
    """
    from sb3_textrl.envs.news import build_news_prompts, prompt_template

    rows = _check_rows(rows, "SFT data")
    prompts, templated = build_news_prompts(rows, tokenizer, max_prompt_tokens)
    prefix, suffix, _ = prompt_template(tokenizer)
    prompts_cut = sum(p.text != prefix + row["article"] + suffix for p, row in zip(prompts, rows))
    # What TextGenerationEnv does with these prompts: the template's own special tokens, else the tokenizer's,
    # and the last max_prompt_tokens tokens.
    encoded = tokenizer([p.text for p in prompts], add_special_tokens=not templated)["input_ids"]
    prompt_ids = [ids[-max_prompt_tokens:] for ids in encoded]
    examples, targets_cut = make_sft_examples(
        [p.text for p in prompts], prompt_ids, [row["summary"] for row in rows], tokenizer, max_target_tokens
    )
    return examples, prompts_cut, targets_cut


def task_sft_examples(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int | None = None,
    max_target_tokens: int | None = None,
    task_kwargs: dict[str, Any] | None = None,
) -> tuple[list[SFTExample], int]:
    """
    SFT examples from a registered text task: its prompts (tokenized by the env itself) and their references.

    :param task: a registered text task id, e.g. ``"NewsSummary-v0"``
    :param tokenizer: the LM's tokenizer (it replaces the task's, so the ids are the LM's)
    :param max_prompt_tokens: the prompt budget (default: the task's)
    :param max_target_tokens: the longest target, EOS included (default: the task's ``max_new_tokens``)
    :param task_kwargs: further ``gym.make`` arguments (e.g. ``data_seed`` or ``n_articles`` of NewsSummary-v0)
    :return: the examples, and how many references were cut
    """
    import gymnasium as gym

    from sb3_textrl.envs.arguments import check_env_kwargs
    from sb3_textrl.envs.text_env import TextGenerationEnv

    if task not in gym.registry:
        raise ValueError(f"Task {task!r} is not registered. Use a registered text task (`sb3-textrl tasks` lists them).")
    check_env_kwargs(task, task_kwargs or {}, "task_kwargs (sb3-textrl sft --env-kwarg)")
    kwargs = dict(task_kwargs or {}, tokenizer=tokenizer)
    if max_prompt_tokens is not None:
        kwargs["max_prompt_tokens"] = max_prompt_tokens
    env = gym.make(task, **kwargs).unwrapped
    if not isinstance(env, TextGenerationEnv):
        raise ValueError(
            f"Task {task!r} is not a text task (its env is {type(env).__name__}); SFT needs prompts with references."
        )
    return _env_sft_examples(env, task, tokenizer, max_target_tokens)


def _env_sft_examples(
    env: TextGenerationEnv, name: str, tokenizer: PreTrainedTokenizerBase, max_target_tokens: int | None
) -> tuple[list[SFTExample], int]:
    """The examples of an env's prompts (its own token ids: template, chat template, truncation) and references."""
    # The text the LM was given (a chat-templated prompt's template ends with a newline: no separator before the target).
    pairs = [(p.lm_text, ids, p.reference) for p, ids in zip(env.prompts, env.prompt_ids) if p.reference]
    if not pairs:
        raise ValueError(
            f"Task {name!r} has no references to learn from: register it with references=... (or prompt records with "
            "a 'reference' field), or pass --dataset with (article, summary) pairs."
        )
    if len(pairs) < len(env.prompts):
        skipped = len(env.prompts) - len(pairs)
        logger.warning(f"SFT: {skipped} of {len(env.prompts)} prompts of {name} have no reference; skipped.")
    texts, ids, references = zip(*pairs)
    limit = env.max_new_tokens if max_target_tokens is None else max_target_tokens
    return make_sft_examples(texts, ids, references, tokenizer, limit)


def _no_reward(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
    # SFT reads the env's prompts only: nothing is ever scored.
    return [0.0] * len(completions)


def prompt_completion_sft_examples(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    task: str | None = None,
    max_prompt_tokens: int | None = None,
    max_target_tokens: int | None = None,
    task_kwargs: dict[str, Any] | None = None,
) -> tuple[list[SFTExample], int]:
    """
    SFT examples from TRL's prompt/completion rows, their prompts built by the env of ``task``.

    A prompt is a string or a conversation (``[{"role": "user", "content": ...}, ...]``), a completion a string or
    one assistant message (``[{"role": "assistant", "content": ...}]``). The rows replace the prompts of ``task`` (a
    task registered with :func:`~sb3_textrl.register_text_task`), so its prompt template, chat template, system
    prompt and truncation give exactly the token ids PPO on that task will show the policy; without ``task``, those
    of a task registered with the defaults (the tokenizer's chat template when it has one).

    :param rows: dicts with ``prompt`` and ``completion``
    :param tokenizer: the LM's tokenizer
    :param task: a task registered with ``register_text_task``, or None
    :param max_prompt_tokens: the prompt budget (default: the task's)
    :param max_target_tokens: the longest target, EOS included (default: the task's ``max_new_tokens``)
    :param task_kwargs: further ``gym.make`` arguments of the task
    :return: the examples, and how many completions were cut
    """
    import gymnasium as gym

    from sb3_textrl.envs.registry import make_text_task_env

    if len(rows) == 0:
        raise ValueError("SFT data: the data is empty; give at least one (prompt, completion) row.")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(row.get(k) is None for k in PROMPT_COMPLETION_FIELDS):
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"SFT data, row {i}: needs 'prompt' and 'completion' (TRL's prompt/completion format, as the first row), "
                f"got {found}. Fix the row or drop it."
            )
    # Only the two fields: a row's other fields must not be taken for the prompt or the reference.
    records = [{k: row[k] for k in PROMPT_COMPLETION_FIELDS} for row in rows]
    kwargs: dict[str, Any] = dict(task_kwargs or {}, prompts=records, references=None, tokenizer=tokenizer)
    if max_prompt_tokens is not None:
        kwargs["max_prompt_tokens"] = max_prompt_tokens
    if task is None:
        env = make_text_task_env(reward=_no_reward, task_id="SFT data", **kwargs)
    else:
        if task not in gym.registry or gym.spec(task).entry_point != _TEXT_TASK_ENTRY_POINT:
            raise ValueError(
                f"Prompt/completion data takes the prompt template of a task registered with register_text_task, but "
                f"{task!r} is {'not registered' if task not in gym.registry else 'not one'} ({DEFAULT_TASK} takes "
                "(article, summary) data). Register your task, or drop the task for the default template."
            )
        env = cast("TextGenerationEnv", gym.make(task, **kwargs).unwrapped)  # make_text_task_env's, checked above
    return _env_sft_examples(env, task or "SFT data", tokenizer, max_target_tokens)


def _data_rows(data: str | os.PathLike | Sequence[Any]) -> list[Any] | None:
    """The rows of ``data`` when they can be read here (a list, a ``.jsonl``/``.csv`` file); None: the news loader's."""
    if not isinstance(data, (str, os.PathLike)):
        return list(data)
    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        from sb3_textrl.envs.registry import _read_prompt_file

        return _read_prompt_file(path)
    return None  # .json, a hub name, a missing file: load_summary_dataset reads them and reports what is wrong


def _is_prompt_completion(
    rows: Sequence[Any] | None, article_field: str | None, summary_field: str | None, where: str
) -> bool:
    """Whether the data is TRL's prompt/completion rows (else (article, summary) pairs); refuses rows of neither."""
    from sb3_textrl.envs.news_data import ARTICLE_FIELDS, SUMMARY_FIELDS

    if not rows or not isinstance(rows[0], dict) or article_field or summary_field:
        return False  # the news checks report these
    fields = set(rows[0])
    if set(PROMPT_COMPLETION_FIELDS) <= fields:
        return True
    if fields & set(ARTICLE_FIELDS) and fields & set(SUMMARY_FIELDS):
        return False
    raise ValueError(
        f"{where}: the first row has fields {sorted(fields)}, which are neither TRL's prompt/completion format "
        f"('prompt' and 'completion', strings or conversations) nor (article, summary) pairs (an article field of "
        f"{list(ARTICLE_FIELDS)} and a summary field of {list(SUMMARY_FIELDS)}). Rename the fields, or name them with "
        "article_field=/summary_field= (CLI: --article-field/--summary-field)."
    )


def load_sft_examples(
    data: SftData,
    tokenizer: PreTrainedTokenizerBase,
    task: str | None = None,
    max_prompt_tokens: int | None = None,
    max_target_tokens: int | None = None,
    limit: int | None = None,
    article_field: str | None = None,
    summary_field: str | None = None,
    task_kwargs: dict[str, Any] | None = None,
) -> tuple[list[SFTExample], dict[str, int]]:
    """
    SFT examples from a data file, a list of rows, or a registered task.

    ``data`` (a ``.jsonl``/``.json``/``.csv`` path or a list of rows) holds ``{"article", "summary"}`` pairs,
    formatted with NewsSummary-v0's prompt template, or TRL's ``{"prompt", "completion"}`` rows, formatted as
    ``task`` shows its prompts (:func:`prompt_completion_sft_examples`); the first row decides which. ``data=None``
    takes the prompts and references of ``task`` (default: NewsSummary-v0's built-in generated news).

    :param data: a file path, a list of rows, or None for the task's own data
    :param tokenizer: the LM's tokenizer
    :param task: a registered text task; with (article, summary) data only NewsSummary-v0 (the template the data is
        put in), with prompt/completion data a task registered with ``register_text_task``
    :param max_prompt_tokens: the prompt budget (default: the task's; 320 for NewsSummary-v0)
    :param max_target_tokens: the longest target, EOS included (default: the task's ``max_new_tokens``)
    :param limit: keep the first ``limit`` examples
    :param article_field: the article's field in a data file (default: detected)
    :param summary_field: the summary's field in a data file (default: detected)
    :param task_kwargs: further ``gym.make`` arguments when the data comes from the task
    :return: the examples, and counts (``prompts_truncated``, ``targets_truncated``)
    """
    import gymnasium as gym

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}.")
    if data is None:
        examples, targets_cut = task_sft_examples(
            task or DEFAULT_TASK, tokenizer, max_prompt_tokens, max_target_tokens, task_kwargs
        )
        return examples[:limit], {"prompts_truncated": 0, "targets_truncated": targets_cut}
    rows = _data_rows(data)
    if _is_prompt_completion(rows, article_field, summary_field, f"SFT data {data}" if rows is None else "SFT data"):
        assert rows is not None
        examples, targets_cut = prompt_completion_sft_examples(
            rows[:limit], tokenizer, task, max_prompt_tokens, max_target_tokens, task_kwargs
        )
        return examples, {"prompts_truncated": 0, "targets_truncated": targets_cut}
    if task is not None and (task not in gym.registry or gym.spec(task).entry_point != _NEWS_ENTRY_POINT):
        raise ValueError(
            f"Data files hold (article, summary) pairs and are formatted with {DEFAULT_TASK}'s prompt template, but the "
            f"task is {task!r}. Drop the data to train on {task}'s own prompts and references, give the data as "
            "'prompt'/'completion' rows (formatted with the task's template), or drop the task."
        )
    if isinstance(data, (str, os.PathLike)):
        from sb3_textrl.envs.news_data import load_summary_dataset

        rows = load_summary_dataset(data, article_field=article_field, summary_field=summary_field, limit=limit)
    else:
        rows = list(data)[:limit]
    default_prompt, default_target = _news_defaults()
    examples, prompts_cut, targets_cut = news_sft_examples(
        rows,
        tokenizer,
        default_prompt if max_prompt_tokens is None else max_prompt_tokens,
        default_target if max_target_tokens is None else max_target_tokens,
    )
    return examples, {"prompts_truncated": prompts_cut, "targets_truncated": targets_cut}


# -- batches -------------------------------------------------------------------------------------------------


def collate_sft(examples: Sequence[SFTExample], pad_token_id: int) -> dict[str, Any]:
    """
    A batch in the env's layout: prompts left-padded into the first ``P`` columns, targets right-padded after them.

    :param examples: the batch's examples
    :param pad_token_id: id written in padding (masked out anyway)
    :return: ``input_ids``, ``attention_mask``, ``labels`` (all ``(B, P + T)``; labels are the target ids in
        the target columns and -100 everywhere else) and ``prompt_width`` (``P``)
    """
    width_p = max(len(e.prompt_ids) for e in examples)
    width_t = max(len(e.target_ids) for e in examples)
    shape = (len(examples), width_p + width_t)
    input_ids = th.full(shape, pad_token_id, dtype=th.long)
    attention_mask = th.zeros(shape, dtype=th.long)
    labels = th.full(shape, IGNORE_INDEX, dtype=th.long)
    for row, example in enumerate(examples):
        prompt, target = th.tensor(example.prompt_ids), th.tensor(example.target_ids)
        start, end = width_p - len(prompt), width_p + len(target)
        input_ids[row, start:width_p], input_ids[row, width_p:end] = prompt, target
        attention_mask[row, start:end] = 1
        labels[row, width_p:end] = target
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_width": width_p}


def _batches(examples: Sequence[SFTExample], batch_size: int, rng: random.Random, group_by_length: bool) -> list[list[int]]:
    """Shuffled batches of indices; with ``group_by_length``, similar lengths share a batch (less padding)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    if group_by_length:
        # Sort inside shuffled windows of 16 batches, then shuffle the batches: little padding, still random.
        window = 16 * batch_size
        length = [len(e.prompt_ids) + len(e.target_ids) for e in examples]
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda i: length[i])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def _split(examples: list[SFTExample], eval_fraction: float, rng: random.Random) -> tuple[list[SFTExample], list[SFTExample]]:
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}; 0.1 holds out a tenth of the data.")
    n_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * len(examples)))
    if len(examples) - n_eval < 1:
        raise ValueError(
            f"{len(examples)} example(s) leave none to train on after holding out {n_eval} for evaluation; give more data, "
            "lower eval_fraction, or pass separate eval_data."
        )
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]
