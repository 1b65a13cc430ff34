"""Lock-step waiting steps, recognised by TextRolloutBuffer from the observations alone.

Under :func:`~sb3_textrl.envs.groups.make_group_vec_env`'s lock-step a member that finished early holds its next
prompt until its siblings finish; SB3 gives a buffer no ``infos``, so the buffer recognises those steps from the
observations: an observation without generated tokens (:func:`prompt_only`) begins an episode, and when the next step
of the same env shows it again without an episode start, the env generated nothing, it waited. The real episode starts
at the *last* of such a run of prompt-only observations, which is the step its group key uses, so siblings that waited
for different numbers of steps still form one group. Waiting steps are idle: in no segment (never trained, never
scored by the reference), no KL penalty, in no metric; ``rollout/group_wait_steps`` counts them, apart from
``rollout/group_dropped_steps``. Whether the rollout's very last step waited shows only in the observation after it,
read from the calling algorithm (:func:`final_waits`); without one, that step counts as a cut episode's start.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def prompt_only(attention_mask: np.ndarray, prompt_width: int | None) -> np.ndarray:
    """
    Observations without a generated token: an episode's first step, or a wait for the group.

    :param attention_mask: (n_envs, W) the step's observation masks
    :param prompt_width: columns of the prompt (``TextObservationSpace.max_prompt_tokens``); None: no prompt region
        known, so no observation counts
    :return: (n_envs,) bool
    """
    mask = np.asarray(attention_mask)
    if prompt_width is None:
        return np.zeros(len(mask), dtype=bool)
    # np.asarray: numpy's stubs type a reduction over an axis as a scalar or an array; over axis 1 it is an array.
    return ~np.asarray(mask[:, prompt_width:].astype(bool).any(axis=1))


def waited(at_prompt_before: np.ndarray, at_prompt: np.ndarray, done: np.ndarray) -> np.ndarray:
    """
    The envs whose previous step was a wait: it showed the prompt alone, this step shows it again, no episode ended.

    :param at_prompt_before: (n_envs,) whether the previous step's observation was :func:`prompt_only`
    :param at_prompt: (n_envs,) whether this step's is
    :param done: (n_envs,) whether an episode ended in between (SB3's episode start of this step)
    :return: (n_envs,) bool
    """
    return at_prompt_before & at_prompt & ~np.asarray(done).astype(bool).reshape(len(at_prompt))


def final_waits(at_prompt: np.ndarray, next_obs: Any, dones: np.ndarray, prompt_width: int | None, width: int) -> np.ndarray:
    """
    The envs whose rollout's last step waited: it showed the prompt alone, and so does the observation after it,
    without a done in between.

    :param at_prompt: (n_envs,) whether the last step's observation was :func:`prompt_only`
    :param next_obs: the observation after the rollout (the algorithm's ``_last_obs``), or anything else when unknown
    :param dones: (n_envs,) the dones after the last step
    :param prompt_width: columns of the prompt, or None
    :param width: columns of an observation
    :return: (n_envs,) bool, all False when the next observation is unknown or has another shape
    """
    n_envs = len(at_prompt)
    next_mask = next_obs.get("attention_mask") if isinstance(next_obs, dict) else None
    if prompt_width is None or next_mask is None or np.shape(next_mask) != (n_envs, width):
        return np.zeros(n_envs, dtype=bool)
    return waited(at_prompt, prompt_only(next_mask, prompt_width), dones)
