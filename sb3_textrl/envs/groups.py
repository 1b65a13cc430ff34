"""k completions of one prompt: VecEnvs whose consecutive envs, k at a time, sample the same prompts in lock-step.

A group's members visit the prompts in one seeded order. A member that ends its completion before its siblings (a
stop token) would start its next prompt alone, and its episodes would never meet a sibling again; under the
lock-step it *waits* instead: it has already been reset to its next prompt (the one its siblings will get next, by
the shared order) and holds that prompt-only observation, its actions ignored, reward 0, not done,
``info["group_wait"] = True``, until every sibling has finished; then the group starts the prompt together.

Two pieces make it, so that it works with any SB3 VecEnv (``DummyVecEnv``, ``SubprocVecEnv``) without touching it:

- :class:`GroupWaitWrapper`, the outermost gym wrapper of every member (above SB3's ``Monitor``, so that waiting
  steps never reach Monitor's episode lengths and returns), takes :data:`WAIT_ACTION` as "hold this step";
- :class:`GroupLockstepVecEnv`, over the VecEnv, knows which members wait and replaces their actions by
  :data:`WAIT_ACTION`. Its state is a bool per env, so no extra round trip to the env processes is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from sb3_textrl.envs.batched import with_batched_rewards

# The action GroupLockstepVecEnv gives a waiting member: no token id, so no text env could take it by mistake.
WAIT_ACTION = -1


class GroupWaitWrapper(gym.Wrapper):
    """
    A group member that can wait at the first observation of its episode: the action :data:`WAIT_ACTION` returns
    that observation again, with reward 0, not done, ``info["group_wait"] = True``, and leaves the env untouched.

    Put it above ``Monitor`` (as :func:`make_group_vec_env` does) so that waiting steps count in no episode.

    :param env: a text env (under any wrappers, e.g. ``Monitor``)
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._first_obs: Any = None  # the reset's observation while no real step has followed it, else None

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._first_obs = obs
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        if np.size(action) == 1 and int(np.asarray(action).item()) == WAIT_ACTION:
            if self._first_obs is None:
                raise RuntimeError(
                    "GroupWaitWrapper: a member can wait only at the first observation of its episode (after a reset, "
                    "before its first token); step it with a token, or reset it"
                )
            return _copy_obs(self._first_obs), 0.0, False, False, {"group_wait": True}
        self._first_obs = None
        return self.env.step(action)


def _copy_obs(obs: Any) -> Any:
    return {key: np.copy(value) for key, value in obs.items()} if isinstance(obs, dict) else np.copy(obs)


class GroupLockstepVecEnv(VecEnvWrapper):
    """
    Keeps the groups of ``samples_per_prompt`` consecutive envs in lock-step: a member that finishes its episode
    waits (at its next prompt, see :class:`GroupWaitWrapper`) until all its siblings have finished theirs, and then
    the group starts together. Envs that wait are marked ``info["group_wait"] = True``; :attr:`waiting` says which
    envs will wait at the next step.

    Rewards, dones, Monitor's episode statistics and SB3's auto-reset are those of the real episodes; waiting steps
    add only steps with reward 0. :class:`~sb3_textrl.buffers.TextRolloutBuffer` recognises them from the
    observations and leaves them out of training and of its metrics (``rollout/group_wait_steps`` counts them).

    :param venv: a VecEnv whose envs are each wrapped in :class:`GroupWaitWrapper`, envs ``g*k .. g*k+k-1`` visiting
        the prompts in the same order (:func:`make_group_vec_env` builds one)
    :param samples_per_prompt: k, the size of a group
    """

    def __init__(self, venv: VecEnv, samples_per_prompt: int):
        super().__init__(venv)
        _check_group_size(venv.num_envs, samples_per_prompt)
        if not all(venv.env_is_wrapped(GroupWaitWrapper)):
            raise TypeError(
                "GroupLockstepVecEnv needs every env wrapped in sb3_textrl.envs.groups.GroupWaitWrapper (above its "
                "Monitor); build the VecEnv with sb3_textrl.make_group_vec_env(...)"
            )
        self.samples_per_prompt = samples_per_prompt
        self.waiting = np.zeros(self.num_envs, dtype=bool)  # (n_envs,) envs whose next step is a wait

    def reset(self) -> VecEnvObs:
        self.waiting[:] = False  # every env starts a new episode, so every group starts together
        return self.venv.reset()

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.array(actions, dtype=np.int64)  # a copy: the caller's actions stay as they were sampled
        actions[self.waiting] = WAIT_ACTION
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        # A member that finished (and was auto-reset) waits; a group whose members have all finished starts again.
        groups = (self.waiting | dones).reshape(-1, self.samples_per_prompt)  # (n_groups, k)
        self.waiting = (groups & ~groups.all(axis=1, keepdims=True)).reshape(-1)
        return obs, rewards, dones, infos


def _check_group_size(n_envs: int, samples_per_prompt: int) -> None:
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if n_envs % samples_per_prompt:
        raise ValueError(
            f"n_envs={n_envs} is not a multiple of samples_per_prompt={samples_per_prompt}: each group is "
            f"{samples_per_prompt} consecutive envs"
        )


def make_group_vec_env(
    env_id: str,
    n_envs: int,
    samples_per_prompt: int,
    seed: int = 0,
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None = None,
    env_kwargs: dict[str, Any] | None = None,
    lockstep: bool = True,
    batched_rewards: bool = True,
    vec_env_kwargs: dict[str, Any] | None = None,
) -> VecEnv:
    """
    A VecEnv of a text task in which envs ``g*k .. g*k+k-1`` (a group) complete the same prompts together.

    Each group's envs get ``prompt_order_seed = seed + g``, so a group's members visit the prompts in the same order;
    different groups draw different orders. The envs' own seeds stay SB3's ``seed + rank`` (the sampling of tokens is
    the policy's). With ``lockstep`` (default) a member that ends its completion early (a stop token) waits at its
    next prompt until its siblings have ended theirs (:class:`GroupLockstepVecEnv`), so every episode of a member
    starts at the same step as its siblings' and :class:`~sb3_textrl.buffers.TextRolloutBuffer` with
    ``advantage="rloo"`` or ``"grpo"`` finds the whole group. Waiting steps are marked ``info["group_wait"] = True``,
    count in no Monitor episode, are left out of training and are logged as ``rollout/group_wait_steps``. Without the
    lock-step, members that drift apart no longer start together and their episodes are left out of training,
    counted in ``rollout/group_dropped_steps`` (see docs/concepts.md).

    :param env_id: a registered text task
    :param n_envs: number of envs, a multiple of ``samples_per_prompt``
    :param samples_per_prompt: k, completions of each prompt per group
    :param seed: seeds the envs (``seed + rank``) and the groups' prompt orders (``seed + group``)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``
    :param env_kwargs: further arguments of the task's env (``gym.make`` overrides)
    :param lockstep: members that finish early wait for their group (False: they go on alone, as with plain envs)
    :param batched_rewards: score the episodes that end in one step in one reward call
        (:class:`~sb3_textrl.envs.batched.BatchedRewardVecEnv`; skipped for a reward with ``batched_scoring = False``)
    :param vec_env_kwargs: keyword arguments of the VecEnv class (e.g. ``start_method`` of ``SubprocVecEnv``)
    :return: the VecEnv
    """
    _check_group_size(n_envs, samples_per_prompt)
    kwargs = dict(env_kwargs or {})
    if "prompt_order_seed" in kwargs:
        raise ValueError("make_group_vec_env sets prompt_order_seed itself (seed + group); leave it out of env_kwargs")

    k = samples_per_prompt
    fns: list[Callable[[], gym.Env]] = [
        functools.partial(_make_member, env_id, seed + rank, seed + rank // k, kwargs) for rank in range(n_envs)
    ]
    envs: VecEnv = (vec_env_cls or DummyVecEnv)(fns, **(vec_env_kwargs or {}))
    envs.seed(seed)  # first resets get seed + rank, as with make_vec_env
    if batched_rewards:
        envs = with_batched_rewards(envs, env_id, kwargs)
    return GroupLockstepVecEnv(envs, samples_per_prompt) if lockstep else envs


def _make_member(env_id: str, action_seed: int, prompt_order_seed: int, env_kwargs: dict[str, Any]) -> gym.Env:
    env = gym.make(env_id, prompt_order_seed=prompt_order_seed, **env_kwargs)
    env.action_space.seed(action_seed)
    return GroupWaitWrapper(Monitor(env))
