"""The argument checks of :class:`~sb3_textrl.envs.text_env.TextGenerationEnv`: each error names the task and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sb3_textrl.envs.chat import end_of_turn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def checked_penalty(name: str, value: float | None, task_id: str) -> float:
    """
    A reward penalty as a float (None: 0), refused unless finite and >= 0.

    :param name: the argument's name, for the message
    :param value: the penalty
    :param task_id: the task, for the message
    :return: the penalty
    """
    value = 0.0 if value is None else float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{task_id}: {name} must be a finite number >= 0 (it is subtracted from the reward), got {value}; "
            "use 0 or None for no penalty"
        )
    return value


def check_lengths_and_render_mode(
    max_new_tokens: int, max_prompt_tokens: int, render_mode: str | None, render_modes: Sequence[str], task_id: str
) -> None:
    """
    Refuse lengths under 1 and an unknown render mode.

    :param max_new_tokens: the env's completion budget
    :param max_prompt_tokens: the env's prompt budget
    :param render_mode: the requested render mode, or None
    :param render_modes: the env's render modes
    :param task_id: the task, for the messages
    """
    if max_new_tokens < 1:
        raise ValueError(f"{task_id}: max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_prompt_tokens < 1:
        raise ValueError(f"{task_id}: max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if render_mode is not None and render_mode not in render_modes:
        # A TypeError makes SB3's make_vec_env (which asks for "rgb_array" by default) retry without it.
        raise TypeError(f"{task_id}: render_mode must be one of {render_modes}, got {render_mode!r}")


def resolve_stop_ids(tokenizer: PreTrainedTokenizerBase, stop_token_ids: Sequence[int] | None, task_id: str) -> set[int]:
    """
    The tokens that end a completion: ``stop_token_ids``, or by default the tokenizer's EOS (and ``<|im_end|>`` for
    chat-template tokenizers); refused when empty.

    :param tokenizer: the env's tokenizer
    :param stop_token_ids: the tokens given, or None
    :param task_id: the task, for the message
    :return: the stop token ids
    """
    stop = default_stop_ids(tokenizer) if stop_token_ids is None else set(stop_token_ids)
    if not stop:
        raise ValueError(f"{task_id}: the tokenizer has no EOS token; pass stop_token_ids=[...]")
    return stop


def default_stop_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """
    A text env's stop tokens when none are given: the tokenizer's EOS, and a chat template's end-of-turn token
    (``<|im_end|>``, or the special token the template writes after an assistant message, e.g. ``<|eot_id|>``).
    """
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if not getattr(tokenizer, "chat_template", None):
        return stop
    # Chat-tuned models end their turn with an end-of-turn token that is not always the tokenizer's EOS.
    turn_end = end_of_turn(tokenizer)
    for token in (tokenizer.convert_tokens_to_ids("<|im_end|>"), None if turn_end is None else turn_end[1]):
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            stop.add(token)
    return stop
