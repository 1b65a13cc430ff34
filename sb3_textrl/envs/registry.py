"""Registering text tasks as Gymnasium environments: ``register_text_task("MyTask-v0", prompts=..., reward=...)``."""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
from transformers import PreTrainedTokenizerBase

from sb3_textrl.envs.task_ids import list_text_tasks, mark_text_task  # noqa: F401 (list_text_tasks: its old import path)
from sb3_textrl.envs.text_env import TextGenerationEnv, TextPrompt
from sb3_textrl.models import load_tokenizer
from sb3_textrl.rewards.base import RewardFn, TextReward

PromptSource = Sequence[str | TextPrompt | dict] | Callable[[], Sequence[Any]] | str | os.PathLike
TokenizerSpec = str | os.PathLike | PreTrainedTokenizerBase | None

_PROMPT_FIELDS = ("prompt", "text", "input", "question")
_REFERENCE_FIELDS = ("reference", "target", "summary", "answer", "completion")


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    # Each env of a VecEnv would otherwise load the same tokenizer again.
    return load_tokenizer(name)


def resolve_tokenizer(tokenizer: TokenizerSpec) -> tuple[PreTrainedTokenizerBase, str]:
    """
    A tokenizer object and the name it is known by.

    :param tokenizer: a loaded tokenizer, a name or path, or None for the embedded default LM's tokenizer
    :return: (tokenizer, name)
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer, str(getattr(tokenizer, "name_or_path", ""))
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a name, a path or a tokenizer object, got {type(tokenizer).__name__}")
    name = None if tokenizer is None else os.fspath(tokenizer)
    return _cached_tokenizer(name), name or "embedded"


def _prompt_from_record(record: Any, where: str) -> TextPrompt:
    if isinstance(record, TextPrompt):
        return record
    if isinstance(record, str):
        return TextPrompt(record)
    if isinstance(record, dict):
        text = next((record[k] for k in _PROMPT_FIELDS if record.get(k) is not None), None)
        if text is None:
            raise ValueError(
                f"{where}: a prompt record needs one of the fields {list(_PROMPT_FIELDS)}; it has {sorted(record)}"
            )
        reference = next((record[k] for k in _REFERENCE_FIELDS if record.get(k) is not None), None)
        meta = {k: v for k, v in record.items() if k not in _PROMPT_FIELDS + _REFERENCE_FIELDS}
        return TextPrompt(str(text), None if reference is None else str(reference), meta)
    raise TypeError(f"{where}: a prompt must be a str, a dict or a TextPrompt, got {type(record).__name__}")


def _read_prompt_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        return records
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    raise ValueError(f"Prompt file {path}: unsupported extension {suffix!r}; use .txt (one prompt a line), .jsonl or .csv")


def load_prompts(
    prompts: PromptSource, references: Sequence[str | None] | None = None, task_id: str = "task"
) -> list[TextPrompt]:
    """
    Turn any supported prompt source into a list of :class:`TextPrompt`.

    :param prompts: a sequence of strings, dicts (``prompt`` and optional ``reference`` fields) or TextPrompts;
        a callable returning such a sequence (called lazily, when the env is made); or a ``.txt``, ``.jsonl``
        or ``.csv`` file path
    :param references: optional references, one per prompt (overrides references found in records)
    :param task_id: used in error messages
    """
    if callable(prompts):
        prompts = prompts()
    if isinstance(prompts, (str, os.PathLike)):
        records: Sequence[Any] = _read_prompt_file(Path(prompts))
        where = f"{task_id} ({prompts})"
    else:
        records, where = prompts, task_id
    result = [_prompt_from_record(record, f"{where}, prompt {i}") for i, record in enumerate(records)]
    if not result:
        raise ValueError(f"{where}: the prompt set is empty; give at least one prompt")
    if references is not None:
        if len(references) != len(result):
            raise ValueError(f"{task_id}: {len(references)} references for {len(result)} prompts; give one per prompt")
        for prompt, reference in zip(result, references):
            prompt.reference = reference
    return result


def make_text_task_env(
    prompts: PromptSource,
    reward: RewardFn | TextReward,
    references: Sequence[str | None] | None = None,
    tokenizer: TokenizerSpec = None,
    max_new_tokens: int = 32,
    max_prompt_tokens: int = 256,
    task_id: str = "TextTask",
    **env_kwargs: Any,
) -> TextGenerationEnv:
    """
    Entry point behind every task registered with :func:`register_text_task` (``gym.make`` kwargs override).

    :param prompts: see :func:`load_prompts`
    :param reward: ``(prompts, completions, references) -> floats`` or a :class:`~sb3_textrl.rewards.TextReward`
    :param references: optional references, one per prompt
    :param tokenizer: name, path or tokenizer object; None: the embedded default LM's tokenizer
    :param max_new_tokens: length limit of a completion
    :param max_prompt_tokens: prompt budget in tokens (longer prompts are truncated on the left, logged)
    :param task_id: the registered id
    :param env_kwargs: further :class:`TextGenerationEnv` arguments (``stop_token_ids``, ``render_mode``, ...)
    """
    if not callable(reward):
        raise TypeError(f"{task_id}: reward must be a callable (prompts, completions, references) -> floats")
    tok, tok_name = resolve_tokenizer(tokenizer)
    return TextGenerationEnv(
        load_prompts(prompts, references, task_id),
        reward,
        tok,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        task_id=task_id,
        tokenizer_name=tok_name,
        **env_kwargs,
    )


def register_text_task(
    id: str,
    prompts: PromptSource,
    reward: RewardFn | TextReward,
    references: Sequence[str | None] | None = None,
    tokenizer: TokenizerSpec = None,
    max_new_tokens: int = 32,
    max_prompt_tokens: int = 256,
    **env_kwargs: Any,
) -> None:
    """
    Register a text task with Gymnasium so that ``gym.make(id)`` and ``PPO(TransformerLMPolicy, id)`` work.

    Every argument becomes a default that ``gym.make(id, **overrides)`` (or ``make_vec_env(id, env_kwargs=...)``)
    can override.

    :param id: Gymnasium id, e.g. ``"Shout-v0"``
    :param prompts: list of strings/dicts/TextPrompts, a callable returning one, or a .txt/.jsonl/.csv path
    :param reward: ``(prompts, completions, references) -> sequence of float``, or a TextReward object
    :param references: optional references, one per prompt
    :param tokenizer: tokenizer name, path or object; None: the embedded default LM's tokenizer
    :param max_new_tokens: length limit of a completion
    :param max_prompt_tokens: prompt budget in tokens
    :param env_kwargs: further :class:`TextGenerationEnv` arguments
    """
    if not callable(reward):
        raise TypeError(f"{id}: reward must be a callable (prompts, completions, references) -> floats")
    gym.register(
        id=id,
        entry_point="sb3_textrl.envs.registry:make_text_task_env",
        kwargs=dict(
            prompts=prompts,
            reward=reward,
            references=references,
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            task_id=id,
            **env_kwargs,
        ),
    )
    mark_text_task(id)
