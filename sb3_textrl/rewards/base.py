"""The reward interface shared by every text task.

A reward scores a *batch* of finished episodes at once: it receives the prompts, the generated completions and
the references (``None`` where a task has none) and returns one float per completion. Plain callables work;
:class:`TextReward` is the base class for reward objects that carry state (a scorer, a model, a connection).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str | None]], Sequence[float]]
"""``reward(prompts, completions, references) -> one float per completion``."""


class TextReward(ABC):
    """
    Base class for rewards that score a batch of completions.

    Subclasses implement :meth:`score`; calling the object delegates to it, so a ``TextReward`` can be used
    wherever a plain :data:`RewardFn` callable is accepted.

    :param name: Key under which the reward is reported (episode ``info``, logs). Defaults to the class
        attribute ``name``.
    """

    name: str = "reward"

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    @abstractmethod
    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
    ) -> np.ndarray:
        """
        Score a batch of completions.

        :param prompts: The prompt (task input) of each episode.
        :param completions: The generated text of each episode.
        :param references: The reference text of each episode, ``None`` where the task has none.
        :return: Array of shape ``(len(completions),)``, one reward per completion.
        """

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
    ) -> np.ndarray:
        return self.score(prompts, completions, references)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def __deepcopy__(self, memo: dict) -> TextReward:
        # gym.make deep-copies a registered task's kwargs for every env: a reward (a model, a connection, a human
        # rater's queue) is a service the envs of a process share, not per-env state. Pickling (SubprocVecEnv) still
        # gives each process its own.
        return self


def reward_name(reward: RewardFn | TextReward) -> str:
    """
    A short, human-readable name for a reward, for messages and log keys.

    :param reward: A :class:`TextReward` or a plain callable.
    :return: Its ``name`` attribute, else its ``__name__`` (functions), else its ``repr``.
    """
    for attribute in ("name", "__name__"):
        name = getattr(reward, attribute, None)
        if isinstance(name, str) and name:
            return name
    return repr(reward)


def _to_float(value: Any) -> float | None:
    """``float(value)`` for number-like values (numpy scalars, 0-d tensors); ``None`` for anything else."""
    # Strings convert silently with float("0.5"); a reward returning text is a bug, so refuse it
    if value is None or isinstance(value, (str, bytes, complex)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def score_batch(
    reward: RewardFn | TextReward,
    prompts: Sequence[str],
    completions: Sequence[str],
    references: Sequence[str | None],
    task_id: str = "",
) -> np.ndarray:
    """
    Call a reward on a batch and check what it returns.

    :param reward: A :class:`TextReward` or a plain callable ``(prompts, completions, references) -> floats``.
    :param prompts: The prompt of each episode.
    :param completions: The generated text of each episode.
    :param references: The reference of each episode (``None`` where there is none).
    :param task_id: Id of the task being scored, named in error messages.
    :return: float64 array of shape ``(len(completions),)``.
    :raises ValueError: If the inputs have different lengths, or the reward returns the wrong number of values,
        a non-numeric value, or NaN/inf.
    :raises Exception: An exception raised by the reward itself comes back as the same type (RuntimeError where that
        type cannot be rebuilt from a message), its message prefixed with the reward's name and the task id.
    """
    n = len(completions)
    if len(prompts) != n or len(references) != n:
        raise ValueError(
            f"score_batch got {len(prompts)} prompts, {n} completions and {len(references)} references"
            f"{_for_task(task_id)}; pass one prompt and one reference (or None) per completion."
        )
    where = f"Reward {reward_name(reward)!r}{_for_task(task_id)}"
    try:
        raw = reward(prompts, completions, references)
    except Exception as error:
        message = f"{where} raised {type(error).__name__} while scoring {n} completion(s): {error}"
        raise _with_context(error, message) from error

    # Tensors (on GPU, requiring grad, or bf16) cannot go through np.asarray directly
    if hasattr(raw, "detach") and hasattr(raw, "double"):
        raw = raw.detach().cpu().double().numpy()
    if not hasattr(raw, "__len__") and hasattr(raw, "__iter__"):
        raw = list(raw)  # a generator

    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__") or (isinstance(raw, np.ndarray) and raw.ndim == 0):
        raise ValueError(
            f"{where} returned a single value ({raw!r}) for a batch of {n} completions; "
            f"a reward must return a sequence with one float per completion, e.g. [r_1, ..., r_{n}]."
        )
    # dtype=object keeps what was returned: np.asarray([1.0, "0.5"]) would silently turn 1.0 into a string
    values = raw if isinstance(raw, np.ndarray) else np.asarray(raw, dtype=object)
    if values.ndim != 1:
        raise ValueError(
            f"{where} returned an array of shape {values.shape} for {n} completions; "
            f"return a flat sequence of {n} floats (e.g. squeeze a trailing dimension)."
        )
    if len(values) != n:
        raise ValueError(
            f"{where} returned {len(values)} values for {n} completions; "
            f"it must return exactly one float per completion, in the same order."
        )

    values = _as_float64(values, where)
    not_finite = np.flatnonzero(~np.isfinite(values))
    if len(not_finite) > 0:
        examples = ", ".join(f"[{i}]={values[i]}" for i in not_finite[:3])
        raise ValueError(
            f"{where} returned {len(not_finite)} NaN/inf value(s) ({examples}); "
            f"rewards must be finite. Guard divisions and empty completions/references in the reward "
            f"(e.g. return 0.0 for an empty completion)."
        )
    return values


def _as_float64(values: np.ndarray, where: str) -> np.ndarray:
    """
    A reward's values as float64, refused (ValueError) when one is not a number.

    :param values: the reward's values, a flat array (``dtype=object`` unless the reward returned an array)
    :param where: the reward and task, naming them in the error
    :return: float64 array of the same length
    """
    if values.dtype.kind in "biuf":
        return values.astype(np.float64)
    converted = [_to_float(v) for v in values.tolist()]
    bad = [i for i, v in enumerate(converted) if v is None]
    if bad:
        examples = ", ".join(f"[{i}]={values[i]!r}" for i in bad[:3])
        raise ValueError(
            f"{where} returned {len(bad)} non-numeric value(s) ({examples}); every entry must be a number (int or float)."
        )
    return np.asarray(converted, dtype=np.float64)


def _with_context(error: Exception, message: str) -> Exception:
    """
    An exception of ``error``'s type carrying ``message`` (which quotes the original); a RuntimeError for exception
    types that cannot be built from one message. Callers that catch a reward's own type (``TimeoutError`` of
    :class:`~sb3_textrl.rewards.human.HumanReward`) still catch it.
    """
    try:
        wrapped = type(error)(message)
    except Exception:
        wrapped = RuntimeError(message)
    return wrapped


def _for_task(task_id: str) -> str:
    return f" for task {task_id!r}" if task_id else ""
