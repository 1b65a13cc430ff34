"""Chat templates for text tasks: conversational prompts in TRL's shape, their checks, and the prompt the LM is given.

A conversational prompt is a list of messages, ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``,
as in TRL's conversational datasets (``{"prompt": [{"role": "user", "content": "..."}]}``). When a task applies the
tokenizer's chat template (``chat_template="auto"``, the default, for a tokenizer that has one, or ``True``), the LM
is given ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``; a string prompt is
the conversation ``[{"role": "user", "content": text}]``, after a ``{"role": "system"}`` message if the task has a
``system_prompt``. The reward and the people who rate completions see the prompt's plain text (``TextPrompt.text``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sb3_textrl.envs.text_env import TextPrompt

ChatTemplateMode = bool | Literal["auto"]
ROLES = ("system", "user", "assistant")
MESSAGE_SHAPE = "{'role': 'system' | 'user' | 'assistant', 'content': str}"
_REPLY_MARKER = "\x00REPLY\x00"


def check_chat_options(chat_template: Any, system_prompt: Any, task_id: str) -> None:
    """
    Refuse a ``chat_template`` other than ``"auto"``, True or False, and a ``system_prompt`` that is not a string.

    :param chat_template: the task's ``chat_template`` argument
    :param system_prompt: the task's ``system_prompt`` argument
    :param task_id: the task, for the messages
    """
    if not (isinstance(chat_template, bool) or (isinstance(chat_template, str) and chat_template == "auto")):
        raise ValueError(
            f"{task_id}: chat_template must be 'auto' (apply the tokenizer's chat template when it has one), True "
            f"(require it) or False (never apply it), got {chat_template!r}"
        )
    if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt):
        raise TypeError(f"{task_id}: system_prompt must be a non-empty string or None, got {system_prompt!r}")


def checked_messages(value: Sequence[Any], where: str) -> list[dict[str, Any]]:
    """
    A conversation's messages, checked: dicts with a known ``role`` and a string ``content``, a system message only
    first, at least one user message, and a user or assistant message last.

    :param value: the conversation as given
    :param where: the task and prompt, for the messages
    :return: a copy of the messages (further keys are kept for the template)
    """
    if len(value) == 0:
        raise ValueError(f"{where}: the conversation is empty; give at least one message {MESSAGE_SHAPE}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}, message {i}: a message is a dict {MESSAGE_SHAPE}, got {message!r:.120}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}, message {i}: unknown role {role!r}; a message's role is one of {list(ROLES)}")
        if not isinstance(content, str):
            raise TypeError(
                f"{where}, message {i}: content must be a string, got {type(content).__name__} (content lists, as in "
                "multimodal datasets, are not supported: give the text)"
            )
        if role == "system" and i > 0:
            raise ValueError(f"{where}, message {i}: a system message may only come first")
        messages.append(dict(message))
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{where}: the conversation has no user message; add {{'role': 'user', 'content': ...}}")
    return messages


def conversation_text(messages: Sequence[dict[str, Any]]) -> str:
    """The plain text of a conversation's prompt, what rewards and raters see: the content of its last user message."""
    return next(str(m["content"]) for m in reversed(messages) if m["role"] == "user")


def uses_chat_template(
    chat_template: ChatTemplateMode,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[TextPrompt],
    system_prompt: str | None,
    task_id: str,
) -> bool:
    """
    Whether a task applies the tokenizer's chat template to its prompts; refused when it is needed but cannot be.

    :param chat_template: ``"auto"``: when the tokenizer has a chat template; True: always (one is required);
        False: never (conversations and a system prompt are then refused)
    :param tokenizer: the task's tokenizer
    :param prompts: the loaded prompts (conversations carry ``messages``)
    :param system_prompt: the task's system prompt, or None
    :param task_id: the task, for the messages
    :return: whether to apply the template
    """
    conversations = [i for i, p in enumerate(prompts) if p.messages is not None and p.templated is None]
    needs = [
        reason
        for reason, needed in (
            (f"prompts {conversations[:5]} are conversations", bool(conversations)),
            ("system_prompt is set", system_prompt is not None),
        )
        if needed
    ]
    if chat_template is False:
        if needs:
            raise ValueError(
                f"{task_id}: {' and '.join(needs)}, which only the chat template can put in the prompt, but "
                "chat_template=False; pass chat_template='auto' (or True), or give plain string prompts"
            )
        return False
    if getattr(tokenizer, "chat_template", None):
        return True
    if chat_template is True:
        needs.insert(0, "chat_template=True")
    if needs:
        raise ValueError(
            f"{task_id}: {' and '.join(needs)}, but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
            "chat template; use a chat model's tokenizer, set tokenizer.chat_template to a Jinja template, or pass "
            "chat_template=False with plain string prompts"
        )
    return False


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], where: str) -> str:
    """
    The string the LM is given for a conversation: the chat template with the generation prompt, or, when the last
    message is the assistant's (a reply begun in the prompt), that message continued.

    :param tokenizer: a tokenizer with a chat template
    :param messages: checked messages
    :param where: the task and prompt, for the messages
    :return: the templated prompt
    """
    prefill = messages[-1]["role"] == "assistant"
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not prefill, continue_final_message=prefill
        )
    except Exception as error:  # a template raises what it likes (jinja2's exception(), ValueError, TypeError)
        raise ValueError(f"{where}: the tokenizer's chat template refused the conversation: {error}") from error
    return str(text)


def template_prompts(
    prompts: Sequence[TextPrompt], tokenizer: PreTrainedTokenizerBase, system_prompt: str | None, task_id: str
) -> list[TextPrompt]:
    """
    The prompts with the chat template applied (``messages`` and ``templated`` set; ``text`` stays the plain text).

    :param prompts: the loaded prompts; those already templated are kept as they are
    :param tokenizer: a tokenizer with a chat template
    :param system_prompt: a system message put first in every conversation, or None
    :param task_id: the task, for the messages
    :return: new prompts (the given ones are not changed)
    """
    markers = _template_tokens(tokenizer)
    result = []
    for i, prompt in enumerate(prompts):
        where = f"{task_id}, prompt {i}"
        if prompt.templated is not None:
            result.append(prompt)
            continue
        if prompt.messages is None and not prompt.text:
            raise ValueError(f"{where} is empty; remove it")
        messages = [{"role": "user", "content": prompt.text}] if prompt.messages is None else list(prompt.messages)
        found = next((m for m in markers for message in messages if m in message["content"]), None)
        if found is not None:
            raise ValueError(
                f"{where} already contains {found!r}, a token of the chat template (was the template applied by "
                "hand?); pass chat_template=False to give the prompts to the LM as they are, or give the plain text"
            )
        if system_prompt is not None:
            if messages[0]["role"] == "system":
                raise ValueError(
                    f"{where} has its own system message and the task has a system_prompt; keep one of the two"
                )
            messages.insert(0, {"role": "system", "content": system_prompt})
        result.append(dataclasses.replace(prompt, messages=messages, templated=render_chat(tokenizer, messages, where)))
    return result


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    return set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)


def _template_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The special tokens that the chat template writes around a user message (``<|im_start|>``, ``<|im_end|>``)."""
    try:
        rendered = str(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False))
    except Exception:  # a template that refuses a lone user message; rendering the prompts themselves says why
        return []
    return sorted(t for t in _special_tokens(tokenizer) if t and t in rendered)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> tuple[str, int | None] | None:
    """
    What the chat template writes right after an assistant message, which a chat model generates to end its turn.

    :param tokenizer: a tokenizer
    :return: (that text, its token id when it is one special token of the tokenizer, else None); None when the
        tokenizer has no chat template or the template writes nothing there
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _REPLY_MARKER}]
    try:
        text = str(tokenizer.apply_chat_template(conversation, tokenize=False))
    except Exception:  # a template that refuses this conversation says nothing about its end of turn
        return None
    after = text.partition(_REPLY_MARKER)[2].lstrip()
    if not after:
        return None
    special = [t for t in _special_tokens(tokenizer) if t and after.startswith(t)]
    if special:
        token = max(special, key=len)
        token_id = tokenizer.convert_tokens_to_ids(token)  # typed for lists too; one token gives one id
        return token, token_id if isinstance(token_id, int) else None
    return after.split()[0], None


def note_templating(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[TextPrompt], chat_template: ChatTemplateMode,
    stop_token_ids: Sequence[int] | None, task_id: str,
) -> None:
    """
    Log, once, what a templated task should know: that ``"auto"`` templated its string prompts (new behaviour), and
    that completions cannot end at the template's end of turn when it is not one token.

    :param tokenizer: the task's tokenizer
    :param prompts: the prompts as loaded, before templating
    :param chat_template: the task's ``chat_template`` argument
    :param stop_token_ids: the task's ``stop_token_ids`` argument, or None
    :param task_id: the task, for the messages
    """
    from sb3_textrl.envs.text_env import log_once

    if chat_template == "auto" and any(p.messages is None and p.templated is None for p in prompts):
        log_once(
            f"{task_id}: its string prompts are given to the LM as user messages in the tokenizer's chat template "
            "(chat_template='auto', the default; string prompts were given as they are before). Pass "
            "chat_template=True to keep this and silence this note, or chat_template=False for text the LM should "
            "continue as it is."
        )
    turn_end = end_of_turn(tokenizer)
    if stop_token_ids is None and turn_end is not None and turn_end[1] is None:
        log_once(
            f"{task_id}: the chat template ends a turn with {turn_end[0]!r}, which is not one token of the tokenizer, "
            "so completions end only at EOS or max_new_tokens; add it as a special token (tokenizer.add_special_tokens) "
            "or pass stop_token_ids=[...]."
        )


def env_prompts(prompts: Sequence[Any], task_id: str) -> list[TextPrompt]:
    """
    The prompts of a :class:`~sb3_textrl.envs.text_env.TextGenerationEnv`, refused unless strings or TextPrompts
    whose text the LM can be given as it is (never a conversation turned into the string of a list).

    :param prompts: the env's ``prompts`` argument
    :param task_id: the task, for the messages
    :return: one TextPrompt per prompt
    """
    from sb3_textrl.envs.text_env import TextPrompt

    how = (
        "; conversations ([{'role': ..., 'content': ...}, ...]) and prompt records go through "
        "sb3_textrl.make_text_task_env or register_text_task, which load them and apply the chat template"
    )
    result = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            prompt = TextPrompt(prompt)
        if not isinstance(prompt, TextPrompt) or not isinstance(prompt.text, str):
            what = type(prompt.text if isinstance(prompt, TextPrompt) else prompt).__name__
            raise TypeError(f"{task_id}: prompt {index} is a {what}; TextGenerationEnv takes strings and TextPrompts{how}")
        if prompt.messages is not None and prompt.templated is None:
            raise ValueError(f"{task_id}: prompt {index} is a conversation whose chat template was not applied{how}")
        result.append(prompt)
    return result


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[TextPrompt], add_special_tokens: bool
) -> list[list[int]]:
    """
    The token ids of each prompt's LM text (``TextPrompt.lm_text``).

    A templated prompt already holds its special tokens (a template's BOS among them), so it is encoded without the
    tokenizer's: a tokenizer that adds a BOS would give it a second one (TRL encodes templated prompts the same way).

    :param tokenizer: the env's tokenizer
    :param prompts: the env's prompts
    :param add_special_tokens: whether the tokenizer adds its special tokens to the prompts that are not templated
    :return: one list of ids per prompt
    """
    encoded: list[list[int]] = [[] for _ in prompts]
    templated = [i for i, p in enumerate(prompts) if p.templated is not None]
    plain = [i for i, p in enumerate(prompts) if p.templated is None]
    for special, indices in ((add_special_tokens, plain), (False, templated)):
        if indices:
            ids = tokenizer([prompts[i].lm_text for i in indices], add_special_tokens=special)["input_ids"]
            for i, row in zip(indices, ids):
                encoded[i] = list(row)
    return encoded
