"""k completions of one prompt: VecEnvs whose consecutive envs, k at a time, sample the same prompts."""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv


def make_group_vec_env(
    env_id: str,
    n_envs: int,
    samples_per_prompt: int,
    seed: int = 0,
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> VecEnv:
    """
    A VecEnv of a text task in which envs ``g*k .. g*k+k-1`` (a group) visit the prompts in the same seeded order.

    Each group's envs get ``prompt_order_seed = seed + g``, so a group's members start the same prompt at their
    first reset and, as long as they end their episodes at the same steps (no stop token, or a fixed length), at
    every later reset too; different groups draw different orders. The envs' own seeds stay SB3's ``seed + rank``
    (the sampling of tokens is the policy's). :class:`~sb3_textrl.buffers.TextRolloutBuffer` with
    ``advantage="rloo"`` or ``"grpo"`` forms a group from members that start the same context at the same step;
    members that drift apart (one ended at a stop token earlier) no longer start together, and their episodes are
    left out of training, counted in ``rollout/group_dropped_steps`` (see docs/concepts.md).

    :param env_id: a registered text task
    :param n_envs: number of envs, a multiple of ``samples_per_prompt``
    :param samples_per_prompt: k, completions of each prompt per group
    :param seed: seeds the envs (``seed + rank``) and the groups' prompt orders (``seed + group``)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``
    :param env_kwargs: further arguments of the task's env (``gym.make`` overrides)
    :return: the VecEnv
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if n_envs % samples_per_prompt:
        raise ValueError(
            f"n_envs={n_envs} is not a multiple of samples_per_prompt={samples_per_prompt}: each group is "
            f"{samples_per_prompt} consecutive envs"
        )
    kwargs = dict(env_kwargs or {})
    if "prompt_order_seed" in kwargs:
        raise ValueError("make_group_vec_env sets prompt_order_seed itself (seed + group); leave it out of env_kwargs")

    k = samples_per_prompt
    fns = [functools.partial(_make_member, env_id, seed + rank, seed + rank // k, kwargs) for rank in range(n_envs)]
    envs = (vec_env_cls or DummyVecEnv)(fns)
    envs.seed(seed)  # first resets get seed + rank, as with make_vec_env
    return envs


def _make_member(env_id: str, action_seed: int, prompt_order_seed: int, env_kwargs: dict[str, Any]) -> gym.Env:
    env = gym.make(env_id, prompt_order_seed=prompt_order_seed, **env_kwargs)
    env.action_space.seed(action_seed)
    return Monitor(env)
