"""The argument checks of :class:`~sb3_textrl.envs.text_env.TextGenerationEnv`: each error names the task and the fix."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

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


# transformers' model_max_length when the tokenizer's files set none (VERY_LARGE_INTEGER is 1e30); below: a real limit
_NO_TOKENIZER_LIMIT = 10**9
# Past this the env's buffers alone would take gigabytes, and no LM takes that many positions.
MAX_CONTEXT_TOKENS = 2**22


def context_fix(limit: int, max_prompt_tokens: int, max_new_tokens: int) -> str:
    """How to bring prompt + completion budgets within ``limit`` positions (the end of the messages that refuse them)."""
    if max_new_tokens >= limit:
        return f"max_new_tokens must be below {limit}"
    return f"lower them, e.g. max_prompt_tokens={limit - max_new_tokens} (longer prompts are cut to fit)"


def check_context(tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int, max_new_tokens: int, task_id: str) -> None:
    """
    Refuse prompt + completion budgets longer than the tokenizer's ``model_max_length`` (the positions of the model
    it comes with) or than any LM takes, before the env's buffers are allocated. The policy checks them against the
    LM itself when env and policy meet.

    :param tokenizer: the env's tokenizer
    :param max_prompt_tokens: the prompt budget
    :param max_new_tokens: the completion budget
    :param task_id: the task, for the message
    """
    total = max_prompt_tokens + max_new_tokens
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_TOKENIZER_LIMIT and total > limit:
        raise ValueError(
            f"{task_id}: max_prompt_tokens + max_new_tokens = {max_prompt_tokens} + {max_new_tokens} = {total} is more "
            f"than the {limit} positions of the tokenizer's model (tokenizer.model_max_length): "
            f"{context_fix(limit, max_prompt_tokens, max_new_tokens)}"
        )
    if total > MAX_CONTEXT_TOKENS:
        raise ValueError(
            f"{task_id}: max_prompt_tokens + max_new_tokens = {total} tokens is more than any LM takes; lower them"
        )


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


# gym.make's own keyword arguments (the rest go to the env's creator)
_MAKE_KWARGS = ("render_mode", "max_episode_steps", "disable_env_checker")


def _named_parameters(function: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword-passable parameter names of ``function`` and whether it also takes ``**kwargs``."""
    parameters = inspect.signature(function).parameters.values()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named - {"self"}, any(p.kind is p.VAR_KEYWORD for p in parameters)


def env_parameters(task: str) -> set[str] | None:
    """
    The keyword arguments ``gym.make(task, ...)`` accepts, or None when they cannot be known (a creator outside this
    package that takes ``**kwargs``).

    :param task: a registered task id
    :return: the argument names
    """
    import gymnasium as gym
    from gymnasium.envs.registration import load_env_creator

    spec = gym.spec(task)
    if spec.entry_point is None:
        return None
    creator = spec.entry_point if callable(spec.entry_point) else load_env_creator(spec.entry_point)
    names, open_ended = _named_parameters(creator)
    if open_ended:
        if not getattr(creator, "__module__", "").startswith("sb3_textrl."):
            return None
        # Our creators hand their **kwargs on to make_text_task_env and TextGenerationEnv.
        from sb3_textrl.envs.registry import make_text_task_env
        from sb3_textrl.envs.text_env import TextGenerationEnv

        for function in (make_text_task_env, TextGenerationEnv.__init__):
            names |= _named_parameters(function)[0]
    return names | set(spec.kwargs) | set(_MAKE_KWARGS)


def check_env_kwargs(task: str, kwargs: Mapping[str, Any], where: str = "env_kwargs") -> None:
    """
    Refuse keyword arguments the task's env does not take, before the env is made (gym.make's own error comes from
    deep inside the creator, and may blame another argument).

    :param task: a registered task id
    :param kwargs: the arguments
    :param where: where they come from, for the message (e.g. ``"--env-kwarg"``)
    """
    accepted = env_parameters(task)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{where}: {task} takes no argument {', '.join(map(repr, unknown))}; its arguments are "
            f"{', '.join(sorted(accepted - set(_MAKE_KWARGS)))} (see docs/configuration.md)"
        )
