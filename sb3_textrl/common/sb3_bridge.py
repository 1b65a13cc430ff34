"""
The links between SB3's rollout loop and sb3_textrl's buffer that SB3 has no place for, in one module.

:class:`~sb3_textrl.buffers.TextRolloutBuffer` needs three things SB3 never hands a rollout buffer. The order of
SB3's own calls (``stable_baselines3.common.on_policy_algorithm.OnPolicyAlgorithm``) rules out passing them in:

- ``_setup_model()`` builds the buffer *before* the policy, from ``rollout_buffer_class(n_steps, observation_space,
  action_space, device=..., gamma=..., gae_lambda=..., n_envs=..., **rollout_buffer_kwargs)``: there is no policy
  yet to pass, and no argument for one (nor for the algorithm or its logger, which ``learn()`` sets up later).
- ``collect_rollouts()`` then calls, at every step, ``actions, values, log_probs = self.policy(obs)`` and
  ``rollout_buffer.add(obs, actions, rewards, episode_starts, values, log_probs)``: the only objects that travel from
  the policy to the buffer are these tensors; and at the end ``rollout_buffer.compute_returns_and_advantage(
  last_values, dones)``, with no logger and not the observation after the rollout. (sb3-contrib's
  ``MaskablePPO.collect_rollouts`` has the same shape, with ``action_masks`` added to both calls.)

So the links are:

1. **The policy** (:func:`attach_rollout_extras` / :func:`rollout_extras`). The buffer scores the reference model,
   applies the KL penalty, adapts β, keeps ``trainable_layers`` hidden states and tells the policy a rollout ended:
   it needs the policy object. The policy's ``forward`` attaches itself to the log-prob tensor it returns (attribute
   ``textrl_policy``) and ``add`` reads it back. The attribute lives on that step's tensor only; nothing is saved
   (``PPO.save`` pickles no rollout tensor).
2. **NLPO's allowed-token sets** (same functions). With ``nlpo_top_p`` the rollout samples within a top-p set of the
   masking policy; training must mask exactly as the rollout did, so ``add`` stores each step's set, which the
   policy attaches to the same tensor (attribute ``nlpo_allowed``). ``collect_rollouts`` passes nothing else the
   policy computed.
3. **The algorithm** (:func:`find_algorithm` / :func:`record_metrics`). The buffer records its rollout metrics
   (``rollout/task_reward``, ``rollout/kl_to_ref``..., and ``train/explained_variance`` over the trained steps) in
   the algorithm's logger, warns there, checks ``vf_coef`` against a value warm-up, and reads ``_last_obs`` (the
   observation after the rollout) to tell whether its last step waited. Its ``reset`` and
   ``compute_returns_and_advantage`` run inside the algorithm's ``collect_rollouts``, so the algorithm is the
   ``self`` of a frame a few levels up the call stack: :func:`find_algorithm` walks at most :data:`MAX_DEPTH`
   frames up from its caller. Outside an algorithm (a buffer filled by hand, as in tests) there is none, and
   :func:`record_metrics` does nothing.

If SB3 ever offers a hook, each link has a direct replacement: a policy (or algorithm) argument to the buffer, or a
``bind(policy, algorithm)`` call after ``_setup_model``, would replace links 1 and 3 (``self.policy`` and
``self.algorithm.logger``); an ``extras`` dict returned by the policy and passed to ``add`` (as sb3-contrib passes
``action_masks``) would replace link 2. Until then the rest of sb3_textrl goes through these functions only, so a
change is made here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_textrl.common.metric_keys import ROLLOUT

if TYPE_CHECKING:
    from sb3_textrl.policies import TransformerLMPolicy

POLICY_ATTRIBUTE = "textrl_policy"  # on a rollout step's log-prob tensor: the policy that sampled it
NLPO_ALLOWED_ATTRIBUTE = "nlpo_allowed"  # on the same tensor: (B, V) bool, the tokens NLPO allowed at that step
MAX_DEPTH = 8  # frames find_algorithm looks at; the buffer calls it at most 5 frames below collect_rollouts


@dataclass(frozen=True)
class RolloutExtras:
    """What a rollout step's log-prob tensor carries besides its values (each None when absent)."""

    policy: TransformerLMPolicy | None = None
    nlpo_allowed: th.Tensor | None = None


def attach_rollout_extras(
    log_prob: th.Tensor, *, policy: TransformerLMPolicy, nlpo_allowed: th.Tensor | None = None
) -> th.Tensor:
    """
    Attach the policy (and NLPO's allowed-token sets) to the log-prob tensor a policy's ``forward`` returns to SB3.

    :param log_prob: (B,) log-probs of the step's actions
    :param policy: the policy that sampled them
    :param nlpo_allowed: (B, V) bool tokens NLPO allowed at this step; None: not NLPO (nothing attached)
    :return: ``log_prob`` itself, carrying them for :func:`rollout_extras`
    """
    setattr(log_prob, POLICY_ATTRIBUTE, policy)
    if nlpo_allowed is not None:
        setattr(log_prob, NLPO_ALLOWED_ATTRIBUTE, nlpo_allowed)
    return log_prob


def rollout_extras(log_prob: th.Tensor) -> RolloutExtras:
    """
    What :func:`attach_rollout_extras` attached to a log-prob tensor, as the rollout buffer's ``add`` receives it.

    :param log_prob: the log-probs SB3 passed to ``rollout_buffer.add``
    :return: the policy and NLPO sets; both None for a tensor from another policy (or a plain tensor)
    """
    return RolloutExtras(getattr(log_prob, POLICY_ATTRIBUTE, None), getattr(log_prob, NLPO_ALLOWED_ATTRIBUTE, None))


def _algorithm_from(frame: FrameType | None, max_depth: int) -> BaseAlgorithm | None:
    """The first ``self`` that is an SB3 algorithm in ``frame`` or the ``max_depth - 1`` frames above it."""
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, BaseAlgorithm):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame kept alive keeps every local of the stack alive


def _caller(frame: FrameType | None) -> FrameType | None:
    return frame.f_back if frame is not None else None


def find_algorithm(max_depth: int = MAX_DEPTH) -> BaseAlgorithm | None:
    """
    The SB3 algorithm whose method (``collect_rollouts``, ``learn``...) is running the caller (see the module docstring).

    :param max_depth: how many frames to look at, starting with the caller's
    :return: the algorithm, or None when none is on the stack within ``max_depth`` frames
    """
    return _algorithm_from(_caller(inspect.currentframe()), max_depth)


def record_metrics(metrics: Mapping[str, float], prefix: str = ROLLOUT, max_depth: int = MAX_DEPTH) -> bool:
    """
    Record ``metrics`` in the logger of the algorithm running the caller (:func:`find_algorithm`), as ``prefix + key``.

    :param metrics: names (without the prefix) and values
    :param prefix: the logger section, e.g. ``"rollout/"`` or ``"train/"``
    :param max_depth: as for :func:`find_algorithm`
    :return: whether an algorithm was found (False: nothing recorded)
    """
    algorithm = _algorithm_from(_caller(inspect.currentframe()), max_depth)
    if algorithm is None:
        return False
    for key, value in metrics.items():
        algorithm.logger.record(f"{prefix}{key}", value)
    return True
