"""What TextRolloutBuffer computes its advantages from, besides SB3's GAE: group baselines and normalised rewards.

**Group advantages.** ``advantage="rloo"`` and ``"grpo"`` use no critic: they compare each completion with the other
completions of the same prompt (a *group*: the episodes that start the same context at the same step, e.g. the k envs
of :func:`~sb3_textrl.envs.groups.make_group_vec_env`). With the episode's return including the KL penalty,

    R_i = r_task_i − β · Σ_t (log π(a_t) − log π_ref(a_t))    (summed over the episode's tokens)

every token of completion i of a group of n gets the same advantage

    rloo: A_i = R_i − (Σ_j R_j − R_i) / (n − 1)            (Ahmadian et al. 2024)
    grpo: A_i = (R_i − mean_j R_j) / (std_j R_j + 1e-8)     (Shao et al. 2024; sample std, ddof=1, as TRL)

and ``returns = advantages + values``. An episode takes part only if it starts and ends inside this rollout and every
episode of its group does too, and the group has n ≥ 2 (:func:`complete_groups`); the steps of all other episodes
(cut by the rollout's ends, siblings unfinished, no sibling) are left out of every minibatch (zero weight, not a zero
advantage) and counted in ``rollout/group_dropped_steps``; ``rollout/groups`` counts the groups used.

**Normalised rewards** (``normalize_rewards=True``): :func:`normalized_task_rewards`. :func:`critic_warning` checks
that the policy's value head fits the advantage.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd

from sb3_textrl.common.metric_keys import REWARD_NORM_MEAN, REWARD_NORM_STD
from sb3_textrl.common.segments import Segment, scatter_steps

ADVANTAGES = ("gae", "rloo", "grpo")


def critic_warning(advantage: str, critic: bool) -> str | None:
    """
    Refuse GAE without a value head; for RLOO / GRPO with one, the warning to give: it is trained for nothing.

    :param advantage: one of :data:`ADVANTAGES`
    :param critic: whether the policy has a trained value head (``critic=True``)
    :return: the warning, or None
    """
    if advantage == "gae" and not critic:
        raise ValueError(
            "advantage='gae' needs the value head, but the policy was built with critic=False: use "
            "rollout_buffer_kwargs=dict(advantage='rloo') or 'grpo', or policy_kwargs=dict(critic=True)"
        )
    if advantage != "gae" and critic:
        return (
            f"advantage={advantage!r} uses no critic, but the policy's value head is trained (vf_coef > 0 fits "
            "it to returns nothing reads): build the policy with policy_kwargs=dict(critic=False)"
        )
    return None


def complete_groups(keys: Sequence[Hashable | None], finished: Sequence[bool]) -> list[list[int]]:
    """
    The groups that take part in the group advantages: two or more episodes of one key, every one finished.

    :param keys: each segment's group key (the step and context its episode starts with), None for a segment whose
        episode started before the rollout (it belongs to no group)
    :param finished: whether each segment's episode ends inside the rollout
    :return: the groups, as lists of segment indices, in the order of their first members
    """
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(index)
    return [members for members in groups.values() if len(members) >= 2 and all(finished[i] for i in members)]


def group_advantages(
    kind: str, segments: Sequence[Segment], keys: Sequence[Hashable | None], finished: Sequence[bool], rewards: np.ndarray
) -> tuple[np.ndarray, list[int], int]:
    """
    The RLOO / GRPO advantages of a rollout (see the module docstring).

    :param kind: ``"rloo"`` or ``"grpo"``
    :param segments: the rollout's segments
    :param keys: each segment's group key, None outside any group (see :func:`complete_groups`)
    :param finished: whether each segment's episode ends inside the rollout
    :param rewards: (buffer_size, n_envs) the rewards, KL penalty included
    :return: ``(advantages, trained, n_groups)``: (buffer_size, n_envs) float32 advantages (0 outside the groups), the
        sorted indices of the segments that take part, and the number of groups
    """
    groups = complete_groups(keys, finished)
    advantages = np.zeros(rewards.shape, dtype=np.float32)
    for members in groups:
        chunk = [segments[i] for i in members]
        returns = np.array([float(rewards[s.start : s.start + s.length, s.env].sum(dtype=np.float64)) for s in chunk])
        scatter_steps(advantages, chunk, np.repeat(relative_advantages(returns, kind), [s.length for s in chunk]))
    return advantages, sorted(i for members in groups for i in members), len(groups)


def no_group_message(advantage: str, training: bool) -> str:
    """
    What to say when a rollout holds no complete group: a warning once its advantages are computed, an error when PPO
    asks it for minibatches (``training``).
    """
    if training:
        return (
            f"advantage={advantage!r}: this rollout holds no complete group of two or more episodes of the "
            "same prompt, so PPO has nothing to train on. Build the VecEnv with sb3_textrl.make_group_vec_env("
            "..., samples_per_prompt=k) (lock-step keeps groups together) and make n_steps at least "
            "max_new_tokens; rollout/group_dropped_steps shows what was left out"
        )
    return (
        f"advantage={advantage!r}: no complete group of two or more episodes of the same prompt started "
        "in this rollout, so PPO has nothing to train on; build the VecEnv with "
        "sb3_textrl.make_group_vec_env(..., samples_per_prompt=k) and make n_steps a few times max_new_tokens"
    )


def relative_advantages(returns: np.ndarray, kind: str) -> np.ndarray:
    """
    Each completion's advantage against its group (see the module docstring).

    :param returns: (n,) float64 returns R_i of one group's episodes, n ≥ 2
    :param kind: ``"rloo"`` or ``"grpo"``
    :return: (n,) float64 advantages
    """
    if kind == "rloo":
        return returns - (returns.sum() - returns) / (len(returns) - 1)
    return (returns - returns.mean()) / (returns.std(ddof=1) + 1e-8)


def normalized_task_rewards(
    task_rewards: np.ndarray, episode_starts: np.ndarray, dones: np.ndarray, rms: RunningMeanStd, clip: float
) -> tuple[np.ndarray, dict[str, float]]:
    """
    The task rewards standardised with running statistics of the episodes' last-step rewards.

    The reward at each episode's last step becomes (r − mean) / std, at the other steps r / std, clipped to ±``clip``;
    ``rms`` is first updated with this rollout's last-step rewards.

    :param task_rewards: (buffer_size, n_envs) the rollout's task rewards
    :param episode_starts: (buffer_size, n_envs) its episode starts
    :param dones: (n_envs,) the dones after its last step
    :param rms: the running statistics (updated in place)
    :param clip: bound of the normalised rewards
    :return: the float32 rewards and ``reward_norm_mean`` / ``reward_norm_std``
    """
    n_envs = episode_starts.shape[1]
    # An episode's last step: the next step starts a new episode, or the rollout ends with a done.
    ends = np.zeros(episode_starts.shape, dtype=bool)
    ends[:-1] = episode_starts[1:] > 0
    ends[-1] = np.asarray(dones).reshape(n_envs) > 0
    if ends.any():
        rms.update(task_rewards[ends].astype(np.float64))
    mean, std = float(rms.mean), math.sqrt(float(rms.var) + 1e-8)
    normalized = task_rewards / std
    normalized[ends] = (task_rewards[ends] - mean) / std
    normalized = np.clip(normalized, -clip, clip).astype(np.float32)
    return normalized, {REWARD_NORM_MEAN: mean, REWARD_NORM_STD: std}
