"""Registering text tasks as Gymnasium environments: ``register_text_task("MyTask-v0", prompts=..., reward=...)``."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
from transformers import PreTrainedTokenizerBase

from sb3_textrl.common.text_files import jsonl_lines, read_text_file
from sb3_textrl.envs.chat import (
    ChatTemplateMode,
    check_chat_options,
    checked_messages,
    conversation_text,
    note_templating,
    template_prompts,
    uses_chat_template,
)
from sb3_textrl.envs.task_ids import list_text_tasks, mark_text_task  # noqa: F401 (list_text_tasks: its old import path)
from sb3_textrl.envs.text_env import TextGenerationEnv, TextPrompt
from sb3_textrl.models import load_tokenizer
from sb3_textrl.rewards.base import RewardFn, TextReward

PromptSource = Sequence[str | TextPrompt | dict | list] | Callable[[], Sequence[Any]] | str | os.PathLike
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


_ACCEPTED = (
    "a str, a conversation (a list of {'role': ..., 'content': ...} dicts, as in TRL's conversational datasets), a "
    f"dict whose field {list(_PROMPT_FIELDS)[0]!r} (or one of {list(_PROMPT_FIELDS)[1:]}) holds either, or a TextPrompt"
)


def _prompt_from_record(record: Any, where: str) -> TextPrompt:
    if isinstance(record, TextPrompt):
        return record
    if isinstance(record, (str, list, tuple)):
        return _prompt_from_value(record, None, {}, where)
    if isinstance(record, dict):
        key = next((k for k in _PROMPT_FIELDS if record.get(k) is not None), None)
        if key is None:
            raise ValueError(
                f"{where}: a prompt record needs one of the fields {list(_PROMPT_FIELDS)}; it has {sorted(record)}"
            )
        reference_key = next((k for k in _REFERENCE_FIELDS if record.get(k) is not None), None)
        reference = None if reference_key is None else _reference_text(record[reference_key], f"{where}, {reference_key!r}")
        meta = {k: v for k, v in record.items() if k not in _PROMPT_FIELDS + _REFERENCE_FIELDS}
        return _prompt_from_value(record[key], reference, meta, f"{where}, {key!r}")
    raise TypeError(f"{where}: a prompt must be {_ACCEPTED}; got {type(record).__name__}")


def _prompt_from_value(value: Any, reference: str | None, meta: dict[str, Any], where: str) -> TextPrompt:
    # A list is a conversation, never the string of a list: its messages are checked and kept for the chat template.
    if isinstance(value, str):
        return TextPrompt(value, reference, meta)
    if isinstance(value, (list, tuple)):
        messages = checked_messages(value, where)
        return TextPrompt(conversation_text(messages), reference, meta, messages=messages)
    raise TypeError(f"{where}: a prompt must be {_ACCEPTED}; got {type(value).__name__}")


def _reference_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric answer, e.g. {"answer": 42}
    # TRL's conversational completion: [{"role": "assistant", "content": "..."}]
    if (
        isinstance(value, (list, tuple))
        and len(value) == 1
        and isinstance(value[0], dict)
        and value[0].get("role") == "assistant"
        and isinstance(value[0].get("content"), str)
    ):
        return str(value[0]["content"])
    raise TypeError(
        f"{where}: a reference must be a str, a number or one assistant message "
        f"[{{'role': 'assistant', 'content': str}}] (TRL's conversational completion); got {value!r:.120}"
    )


def _read_prompt_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise ValueError(f"Prompt file {path}: unsupported extension {suffix!r}; use .txt (one prompt a line), .jsonl or .csv")
    text = read_text_file(path, "the prompt file")
    if suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(jsonl_lines(text), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        return records
    return list(csv.DictReader(io.StringIO(text, newline="")))


def load_prompts(
    prompts: PromptSource, references: Sequence[str | None] | None = None, task_id: str = "task"
) -> list[TextPrompt]:
    """
    Turn any supported prompt source into a list of :class:`TextPrompt`.

    :param prompts: a sequence of strings, conversations (lists of ``{"role", "content"}`` dicts), dicts (a ``prompt``
        field holding a string or a conversation, as TRL's datasets, and an optional ``reference``) or TextPrompts;
        a callable returning such a sequence (called lazily, when the env is made); or a ``.txt``, ``.jsonl``
        or ``.csv`` file path. A conversation's ``text`` is its last user message; it gets the chat template
        when the env is made (:func:`make_text_task_env`)
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
    chat_template: ChatTemplateMode = "auto",
    system_prompt: str | None = None,
    **env_kwargs: Any,
) -> TextGenerationEnv:
    """
    Entry point behind every task registered with :func:`register_text_task` (``gym.make`` kwargs override).

    :param prompts: see :func:`load_prompts`
    :param reward: ``(prompts, completions, references) -> floats`` or a :class:`~sb3_textrl.rewards.TextReward`;
        it is given each prompt's plain text (``TextPrompt.text``), not the templated string
    :param references: optional references, one per prompt
    :param tokenizer: name, path or tokenizer object; None: the embedded default LM's tokenizer
    :param max_new_tokens: length limit of a completion
    :param max_prompt_tokens: prompt budget in tokens, the chat template's included (longer prompts are truncated on
        the left, logged)
    :param task_id: the registered id
    :param chat_template: ``"auto"``: give the LM every prompt in the tokenizer's chat template when the tokenizer
        has one (a string prompt as a user message), else as it is; True: the same, and a tokenizer without a chat
        template is an error; False: string prompts as they are, conversations refused (see :mod:`sb3_textrl.envs.chat`)
    :param system_prompt: a system message put first in every templated prompt (needs the chat template)
    :param env_kwargs: further :class:`TextGenerationEnv` arguments (``stop_token_ids``, ``render_mode``, ...)
    """
    if not callable(reward):
        raise TypeError(f"{task_id}: reward must be a callable (prompts, completions, references) -> floats")
    check_chat_options(chat_template, system_prompt, task_id)
    tok, tok_name = resolve_tokenizer(tokenizer)
    loaded = load_prompts(prompts, references, task_id)
    if uses_chat_template(chat_template, tok, loaded, system_prompt, task_id):
        templated = template_prompts(loaded, tok, system_prompt, task_id)
        note_templating(tok, loaded, chat_template, env_kwargs.get("stop_token_ids"), task_id)
        loaded = templated
    return TextGenerationEnv(
        loaded,
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
    chat_template: ChatTemplateMode = "auto",
    system_prompt: str | None = None,
    **env_kwargs: Any,
) -> None:
    """
    Register a text task with Gymnasium so that ``gym.make(id)`` and ``PPO(TransformerLMPolicy, id)`` work.

    Every argument becomes a default that ``gym.make(id, **overrides)`` (or ``make_vec_env(id, env_kwargs=...)``)
    can override.

    :param id: Gymnasium id, e.g. ``"Shout-v0"``
    :param prompts: list of strings, conversations (TRL's ``[{"role": ..., "content": ...}]``), dicts
        (``{"prompt": str or conversation, "reference": ...}``) or TextPrompts, a callable returning one, or a
        .txt/.jsonl/.csv path
    :param reward: ``(prompts, completions, references) -> sequence of float``, or a TextReward object; the prompts
        it gets are the plain texts (a conversation's last user message), not the templated strings
    :param references: optional references, one per prompt
    :param tokenizer: tokenizer name, path or object; None: the embedded default LM's tokenizer
    :param max_new_tokens: length limit of a completion
    :param max_prompt_tokens: prompt budget in tokens, the chat template's included
    :param chat_template: ``"auto"`` (default): prompts go to the LM in the tokenizer's chat template when it has
        one (the embedded SmolLM2-Instruct's does: string prompts become user messages), else as they are; True:
        the same, a tokenizer without a chat template refused; False: never (text the LM should continue as it is)
    :param system_prompt: a system message put first in every templated prompt
    :param env_kwargs: further :class:`TextGenerationEnv` arguments
    """
    if not callable(reward):
        raise TypeError(f"{id}: reward must be a callable (prompts, completions, references) -> floats")
    check_chat_options(chat_template, system_prompt, id)
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
            chat_template=chat_template,
            system_prompt=system_prompt,
            **env_kwargs,
        ),
    )
    mark_text_task(id)
