"""NLPO-style action masking (Ramamurthy et al., 2023, "Is Reinforcement Learning (Not) for Natural Language
Processing?"): at each step the policy may only pick a token from the top-p set of a *masking policy*, a copy of
the policy that is refreshed every few rollouts.

The option lives on :class:`~sb3_textrl.TransformerLMPolicy` (``policy_kwargs=dict(nlpo_top_p=0.9)``), so it works
with plain ``PPO`` (and ``A2C``) as well as with ``MaskablePPO``; :class:`NLPOMaskRefresh` is the callback that
refreshes the masking policy. This module holds the pieces that do not need the policy's internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

if TYPE_CHECKING:
    from sb3_textrl.policies import TransformerLMPolicy

# Name of the peft adapter that holds the masking policy's weights (LoRA policies: one LM in memory).
NLPO_ADAPTER = "nlpo_mask"
# Observation key of the allowed-token sets stored at rollout time: (N, V) bool, one row per step.
NLPO_ALLOWED = "nlpo_allowed"


def top_p_allowed(logits: th.Tensor, top_p: float, env_mask: th.Tensor | None = None) -> th.Tensor:
    """
    The masking policy's top-p set: the smallest set of most likely tokens whose probability reaches ``top_p``.

    With an env mask the masking distribution is first restricted to (renormalised over) the env's valid tokens,
    so the set is a non-empty subset of them whenever the env allows any token.

    :param logits: (N, V) logits of the masking policy
    :param top_p: probability mass to keep, in (0, 1]
    :param env_mask: (N, V) bool, True where the env allows the token; None: all tokens are valid
    :return: (N, V) bool, True for the allowed tokens
    """
    logits = logits.float()
    if env_mask is not None:
        logits = logits.masked_fill(~env_mask, float("-inf"))
    sorted_logits, order = th.sort(logits, dim=-1, descending=True)
    probs = th.softmax(sorted_logits, dim=-1)
    # Keep a token while the tokens before it have not reached top_p yet (so the most likely one always stays).
    keep_sorted = (probs.cumsum(dim=-1) - probs) < top_p
    keep_sorted[..., 0] = True
    allowed = th.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if env_mask is not None:  # zero-probability tokens whose predecessors sum to less than top_p stay out
        allowed &= env_mask
    return allowed


def pack_allowed(allowed: th.Tensor) -> np.ndarray:
    """(N, V) bool tensor -> (N, ceil(V / 8)) uint8 array: one bit per token, for the rollout buffer."""
    return np.packbits(allowed.detach().cpu().numpy(), axis=-1)


def unpack_allowed(packed: np.ndarray, n_tokens: int) -> np.ndarray:
    """Inverse of :func:`pack_allowed`: (N, ceil(V / 8)) uint8 -> (N, V) bool."""
    return np.unpackbits(packed, axis=-1, count=n_tokens).astype(bool)


class NLPOMaskRefresh(BaseCallback):
    """
    Refresh the NLPO masking policy of a :class:`~sb3_textrl.TransformerLMPolicy` built with ``nlpo_top_p``: every
    ``every_n_rollouts`` rollouts its weights become the policy's current ones.

    The refresh happens when a rollout starts, never between a rollout and the training on it, so the masks that
    the rollout sampled under are the ones training uses. Records ``rollout/nlpo_refreshes``.

    :param every_n_rollouts: rollouts between two refreshes (NLPO's μ); the first refresh comes before rollout number
        ``every_n_rollouts`` (counting from 0), after that many rounds of training
    :param verbose: 1 prints a line per refresh
    """

    def __init__(self, every_n_rollouts: int, verbose: int = 0):
        super().__init__(verbose)
        if every_n_rollouts < 1:
            raise ValueError(f"every_n_rollouts must be >= 1, got {every_n_rollouts}")
        self.every_n_rollouts = every_n_rollouts
        self.n_rollouts = 0
        self.n_refreshes = 0

    def _init_callback(self) -> None:
        policy = self.model.policy
        if getattr(policy, "nlpo_top_p", None) is None:
            raise ValueError(
                "NLPOMaskRefresh needs a TransformerLMPolicy with NLPO masking: pass "
                "policy_kwargs=dict(nlpo_top_p=0.9) (any value in (0, 1]) to the algorithm."
            )

    def _on_rollout_start(self) -> None:
        if self.n_rollouts > 0 and self.n_rollouts % self.every_n_rollouts == 0:
            policy: TransformerLMPolicy = self.model.policy  # type: ignore[assignment]
            policy.refresh_masking_policy()
            self.n_refreshes += 1
            if self.verbose:
                print(f"NLPO: masking policy refreshed ({self.n_refreshes}) at step {self.num_timesteps}")
        self.n_rollouts += 1
        self.logger.record("rollout/nlpo_refreshes", self.n_refreshes)

    def _on_step(self) -> bool:
        return True
