"""``SubprocVecEnv`` whose workers' errors reach the main process as they were raised.

SB3's ``SubprocVecEnv`` worker loop catches nothing: an exception in an env's ``step`` or ``reset`` (a reward model
that fails, a bad prompt file) kills the worker, which prints its traceback to stderr, and the main process gets an
empty ``EOFError`` (or ``ConnectionResetError``) from the pipe. :class:`TextSubprocVecEnv` wraps each env in
:class:`ReportErrors`, which catches the exception in the worker and sends it, pickled, in the step's ``info``; the
main process raises it again, with the worker's traceback as its cause. ``make_text_vec_env(...,
vec_env_cls=SubprocVecEnv)`` uses it.
"""

from __future__ import annotations

import functools
import pickle
import traceback
from collections.abc import Callable, Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
from stable_baselines3.common.vec_env import SubprocVecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

ERROR_KEY = "sb3_textrl_worker_error"  # the info entry that carries a worker's exception


class WorkerError(RuntimeError):
    """The traceback of an exception raised in a ``SubprocVecEnv`` worker (the cause of the exception raised again)."""


class ReportErrors(gym.Wrapper):
    """
    Catch what the env raises in ``step``/``reset`` and return it in ``info`` (key :data:`ERROR_KEY`) instead of
    dying, so that :class:`TextSubprocVecEnv` can raise it in the main process. Used inside worker processes only.
    """

    def _failed(self, error: Exception) -> dict[str, Any]:
        text = traceback.format_exc()
        try:  # the exception itself when it pickles (its type and arguments come back), else its text
            pickle.dumps(error)
            payload: Any = error
        except Exception:
            payload = RuntimeError(f"{type(error).__name__}: {error}")
        return {ERROR_KEY: (payload, text)}

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        try:
            return self.env.step(action)
        except Exception as error:
            # Not done: the worker must not reset on our behalf; the main process raises before using the result.
            return self.observation_space.sample(), 0.0, False, False, self._failed(error)

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        try:
            return self.env.reset(**kwargs)
        except Exception as error:
            return self.observation_space.sample(), self._failed(error)


def _reporting(env_fn: Callable[[], gym.Env]) -> gym.Env:
    return ReportErrors(env_fn())


def raise_worker_error(infos: Sequence[dict[str, Any]]) -> None:
    """
    Raise the first exception a worker sent (see :class:`ReportErrors`), with its traceback as the cause.

    :param infos: the step's infos (or the reset infos), one per env
    """
    for index, info in enumerate(infos):
        if ERROR_KEY in info:
            error, text = info[ERROR_KEY]
            raise error from WorkerError(f"raised in the SubprocVecEnv worker of env {index}:\n{text}")


class TextSubprocVecEnv(SubprocVecEnv):
    """
    SB3's ``SubprocVecEnv``, except that an exception in a worker's env is raised in the main process as it was
    raised (type and message), with the worker's traceback as its ``__cause__``, instead of an empty ``EOFError``.

    :param env_fns: functions that make the envs (as for ``SubprocVecEnv``)
    :param start_method: multiprocessing start method (as for ``SubprocVecEnv``)
    """

    def __init__(self, env_fns: list[Callable[[], gym.Env]], start_method: str | None = None) -> None:
        super().__init__([functools.partial(_reporting, env_fn) for env_fn in env_fns], start_method=start_method)

    def step_wait(self) -> VecEnvStepReturn:
        result = super().step_wait()
        raise_worker_error(result[3])
        return result

    def reset(self) -> Any:
        observations = super().reset()
        raise_worker_error(self.reset_infos)
        return observations
