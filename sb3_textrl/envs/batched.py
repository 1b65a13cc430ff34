"""Batched reward scoring: the episodes that end in one vectorised step are scored together, in one reward call.

A :class:`~sb3_textrl.envs.text_env.TextGenerationEnv` scores its episode by itself when it ends (one reward call,
so one reward-model forward, per episode). :class:`BatchedRewardVecEnv` wraps a VecEnv of text envs and, before each
step, asks every env whether the step's action ends its episode (:meth:`TextGenerationEnv.episode_end_preview`),
scores all those episodes in one call and gives each env its value (:meth:`TextGenerationEnv.preset_reward`). The
step then runs as usual and pays the preset value where it would have called the reward.

The reward is known *before* the step, not patched in after it, so everything that sees the step is as without
batching: the reward at the last step, ``info["task_reward"]`` and ``info["reward_parts"]``, Monitor's episode
return (``info["episode"]``, its CSV file and ``get_episode_rewards()``), gym reward wrappers under the Monitor,
``terminal_observation`` and SB3's ``ep_info_buffer``. (Deferring the reward to after the step would leave
Monitor's own records at 0.) The cost is one extra round trip to the envs per step (through the pipes for
``SubprocVecEnv``, all envs at once).

``make_text_vec_env(task, n_envs, ...)`` builds a VecEnv with batched scoring; ``gym.make`` and SB3's
``make_vec_env`` keep per-episode scoring.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from sb3_textrl.envs.subproc import TextSubprocVecEnv
from sb3_textrl.rewards.base import RewardFn, TextReward, reward_name, score_batch


def supports_batching(reward: RewardFn | TextReward) -> bool:
    """
    Whether a reward may score the episodes of several envs in one call.

    Every reward takes batches (``(prompts, completions, references) -> floats``), so the answer is yes unless the
    reward says otherwise with an attribute ``batched_scoring = False`` (for a reward whose value for an episode
    would depend on the other episodes of its call, e.g. one that normalises within the batch).

    :param reward: a reward callable or :class:`~sb3_textrl.rewards.TextReward`
    :return: ``getattr(reward, "batched_scoring", True)``
    """
    return bool(getattr(reward, "batched_scoring", True))


class BatchedRewardVecEnv(VecEnvWrapper):
    """
    Scores the episodes that end in a vectorised step in one reward call (one reward-model forward) instead of one
    call per episode; rewards, dones and infos are those of the wrapped VecEnv without it.

    Every env of ``venv`` must be a :class:`~sb3_textrl.envs.text_env.TextGenerationEnv` (under any gym wrappers,
    e.g. SB3's ``Monitor``) of the same task and reward. ``DummyVecEnv`` and ``SubprocVecEnv`` are supported; with
    ``SubprocVecEnv`` the scoring runs in this (the main) process.

    :param venv: a VecEnv of text envs, e.g. from SB3's ``make_vec_env``
    :param reward: the reward to score with; default: the first env's ``reward_fn`` (with ``SubprocVecEnv`` it is
        pickled back from the worker, so pass it when it does not pickle, e.g. a lambda). It must have the name of
        the envs' reward, so that ``info["reward_parts"]`` stays right.
    :raises ValueError: if the envs have different tasks or rewards, if ``reward`` is not theirs, or if the reward
        declares ``batched_scoring = False``
    """

    def __init__(self, venv: VecEnv, reward: RewardFn | TextReward | None = None) -> None:
        super().__init__(venv)
        if not venv.has_attr("episode_end_preview"):
            raise TypeError(
                "BatchedRewardVecEnv needs a VecEnv of text envs (sb3_textrl.TextGenerationEnv); this one's envs have no "
                "episode_end_preview()"
            )
        task_ids = venv.get_attr("task_id")
        names = venv.get_attr("reward_name")
        if len(set(task_ids)) > 1 or len(set(names)) > 1:
            raise ValueError(
                f"BatchedRewardVecEnv scores every env with one reward, but the envs hold different tasks or rewards "
                f"(tasks {task_ids}, rewards {names}); batch each task in its own VecEnv"
            )
        self.task_id: str = task_ids[0]
        self.reward_fn = venv.get_attr("reward_fn", [0])[0] if reward is None else reward
        if reward_name(self.reward_fn) != names[0]:
            raise ValueError(
                f"{self.task_id}: the reward given to BatchedRewardVecEnv is {reward_name(self.reward_fn)!r}, but the "
                f"envs' reward is {names[0]!r}; pass the envs' own reward (or none: it is then read from the first env)"
            )
        if not supports_batching(self.reward_fn):
            raise ValueError(
                f"{self.task_id}: reward {names[0]!r} declares batched_scoring=False (it must score each episode on its "
                "own); use the VecEnv without BatchedRewardVecEnv (make_text_vec_env(..., batched_rewards=False))"
            )
        self.n_reward_calls = 0  # reward calls made so far (one per step that ends an episode)
        self.n_scored = 0  # episodes scored so far
        self._actions: np.ndarray | None = None

    def step_async(self, actions: np.ndarray) -> None:
        # The step starts in step_wait, once the episodes it ends are scored.
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        actions, self._actions = self._actions, None
        if actions is None:
            raise RuntimeError("BatchedRewardVecEnv.step_wait() called without step_async(); use step(actions)")
        self._preset_rewards(actions)
        self.venv.step_async(actions)
        return self.venv.step_wait()

    def reset(self):
        return self.venv.reset()

    def _preset_rewards(self, actions: np.ndarray) -> None:
        previews = self._call_each("episode_end_preview", [(action,) for action in actions])
        ending = [i for i, preview in enumerate(previews) if preview is not None]
        if not ending:
            return
        pending = [previews[i] for i in ending]
        prompts = [p["prompt"] for p in pending]
        completions = [p["completion"] for p in pending]
        references = [p["reference"] for p in pending]
        try:
            rewards = score_batch(self.reward_fn, prompts, completions, references, self.task_id)
        except Exception as error:
            if sys.version_info >= (3, 11):  # add_note is new in 3.11; on 3.10 the error goes up without the note
                error.add_note(f"(batched scoring of the episodes that env(s) {ending} of the VecEnv ended in one step)")
            raise
        self.n_reward_calls += 1
        self.n_scored += len(ending)
        self._call_each(
            "preset_reward",
            [(actions[i], completion, float(r)) for i, completion, r in zip(ending, completions, rewards)],
            ending,
        )

    def _call_each(self, method: str, args: Sequence[tuple], indices: Sequence[int] | None = None) -> list[Any]:
        """``env_method(method, *args[k])`` on env ``indices[k]``, each with its own arguments; all envs at once."""
        indices = list(range(self.num_envs)) if indices is None else list(indices)
        if isinstance(self.venv, SubprocVecEnv):
            # SubprocVecEnv.env_method sends the same arguments to every env: talk to the workers directly (SB3's
            # worker protocol), all requests first, so the envs of the step answer in parallel.
            for i, arguments in zip(indices, args):
                self.venv.remotes[i].send(("env_method", (method, arguments, {})))
            return [self.venv.remotes[i].recv() for i in indices]
        return [self.venv.env_method(method, *arguments, indices=[i])[0] for i, arguments in zip(indices, args)]


def make_text_vec_env(
    env_id: str | Callable[..., gym.Env],
    n_envs: int = 1,
    seed: int | None = None,
    start_index: int = 0,
    monitor_dir: str | None = None,
    wrapper_class: Callable[[gym.Env], gym.Env] | None = None,
    env_kwargs: dict[str, Any] | None = None,
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None = None,
    vec_env_kwargs: dict[str, Any] | None = None,
    monitor_kwargs: dict[str, Any] | None = None,
    wrapper_kwargs: dict[str, Any] | None = None,
    batched_rewards: bool = True,
) -> VecEnv:
    """
    SB3's ``make_vec_env`` for text tasks, with the episodes that end in a step scored in one reward call
    (:class:`BatchedRewardVecEnv`). The arguments up to ``wrapper_kwargs`` are ``make_vec_env``'s.

    With ``SubprocVecEnv`` the scoring runs in this process, with the reward given in ``env_kwargs["reward"]``,
    registered with the task or bound in a ``functools.partial`` factory (the same object, not a copy); otherwise it
    is read from the first env (a pickled copy).

    :param env_id: a registered text task (``"NewsSummary-v0"``) or a function that makes its env
    :param n_envs: number of envs
    :param seed: seed of the first env (env ``i`` gets ``seed + i``)
    :param start_index: index of the first env (for Monitor file names)
    :param monitor_dir: where Monitor writes its CSV files (None: not written)
    :param wrapper_class: gym wrapper applied to each env (inside the Monitor)
    :param env_kwargs: keyword arguments of the task (``tokenizer=``, ``reward=``, ``max_new_tokens=`` ...)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv`` (made a
        :class:`~sb3_textrl.envs.subproc.TextSubprocVecEnv`: a worker's exception is raised here as it was raised)
    :param vec_env_kwargs: keyword arguments of the VecEnv class
    :param monitor_kwargs: keyword arguments of the Monitor
    :param wrapper_kwargs: keyword arguments of ``wrapper_class``
    :param batched_rewards: False gives the plain VecEnv (each env scores its episode by itself); so does a reward
        that declares ``batched_scoring = False``
    :return: the VecEnv
    """
    if vec_env_cls is SubprocVecEnv:  # the same, with the workers' errors raised here as they were raised there
        vec_env_cls = TextSubprocVecEnv
    venv = make_vec_env(
        env_id, n_envs=n_envs, seed=seed, start_index=start_index, monitor_dir=monitor_dir, wrapper_class=wrapper_class,
        env_kwargs=env_kwargs, vec_env_cls=vec_env_cls, vec_env_kwargs=vec_env_kwargs, monitor_kwargs=monitor_kwargs,
        wrapper_kwargs=wrapper_kwargs,
    )
    return with_batched_rewards(venv, env_id, env_kwargs) if batched_rewards else venv


def with_batched_rewards(
    venv: VecEnv, env_id: str | Callable[..., gym.Env], env_kwargs: dict[str, Any] | None = None
) -> VecEnv:
    """
    ``venv`` under :class:`BatchedRewardVecEnv`, or ``venv`` itself when its reward declares ``batched_scoring = False``.

    :param venv: a VecEnv of text envs made from ``env_id``
    :param env_id: the task or factory the envs were made from (to find the reward object of this process)
    :param env_kwargs: the keyword arguments the envs were made with
    :return: the VecEnv that scores in batches (``venv`` is closed if wrapping it fails)
    """
    reward = _main_process_reward(env_id, env_kwargs or {}) if isinstance(venv, SubprocVecEnv) else None
    if reward is None:
        reward = venv.get_attr("reward_fn", [0])[0]  # read once: from a worker it is a fresh copy (a model reload)
    if not supports_batching(reward):
        return venv
    try:
        return BatchedRewardVecEnv(venv, reward)
    except Exception:
        venv.close()
        raise


def _main_process_reward(env_id: str | Callable[..., gym.Env], env_kwargs: dict[str, Any]) -> RewardFn | TextReward | None:
    # The reward object as this process holds it (no worker copy to pickle back): an explicit reward=, the one the
    # task was registered with, or the one bound into a functools.partial factory. A task that builds its reward from
    # a name (NewsSummary's "rouge1") gives None: the reward is then read from the first env.
    candidates = [env_kwargs.get("reward")]
    if isinstance(env_id, str) and env_id in gym.registry:
        candidates.append(gym.spec(env_id).kwargs.get("reward"))
    elif isinstance(env_id, functools.partial):
        candidates.append(env_id.keywords.get("reward"))
    for candidate in candidates:
        if candidate is not None:
            return candidate if callable(candidate) else None
    return None
