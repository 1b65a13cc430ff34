"""Env-side action masks with sb3-contrib's ``MaskablePPO``: a maskable LM policy and a grouped maskable buffer.

::

    from sb3_contrib import MaskablePPO
    from sb3_textrl import MaskableTextRolloutBuffer, MaskableTransformerLMPolicy

    model = MaskablePPO(MaskableTransformerLMPolicy, "NewsSummary-v0", env_kwargs=...,  # the env's action_mask=
                        rollout_buffer_class=MaskableTextRolloutBuffer)  # the default, written out

Where the mask enters (the same in rollouts, in ``evaluate_actions`` and in ``predict``): temperature, then the env's
mask (and NLPO's top-p set, a subset of it, when ``nlpo_top_p`` is on), then top-k / top-p, which so choose among the
allowed tokens. The KL penalty compares the masked policy with the reference restricted to the same env mask
(both renormalised over the allowed tokens), so an untuned policy's KL is exactly 0 and the penalty measures only
what training changed, not the probability mass that the mask removes.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, cast

import numpy as np
import torch as th
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer, MaskableDictRolloutBufferSamples
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.vec_env import VecNormalize

from sb3_textrl.buffers import Segment, TextRolloutBuffer
from sb3_textrl.common.kl import action_log_probs
from sb3_textrl.lm.heads import masked_fill_value
from sb3_textrl.policies import TransformerLMPolicy

MaskArray = th.Tensor | np.ndarray | None


class _MaskableActorCriticBase(MaskableActorCriticPolicy):
    """
    MaskableActorCriticPolicy without its MLP: in the MRO after SB3's ActorCriticPolicy, whose ``__init__`` calls this
    one with BasePolicy's arguments. It gives ``isinstance(policy, MaskableActorCriticPolicy)`` (MaskablePPO checks it)
    and ``predict(..., action_masks=...)``; everything else comes from TransformerLMPolicy.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        BasePolicy.__init__(self, *args, **kwargs)


# A MaskableActorCriticPolicy for isinstance() only: TransformerLMPolicy's categorical action_dist (no MLP, no
# _get_action_dist_from_latent) replaces sb3-contrib's maskable one, whose mask API the methods below override.
class MaskableTransformerLMPolicy(TransformerLMPolicy, _MaskableActorCriticBase):  # type: ignore[misc]
    """
    :class:`~sb3_textrl.TransformerLMPolicy` for ``sb3_contrib.MaskablePPO``: the env's action masks (its
    ``action_masks()``, see :mod:`sb3_textrl.envs.masks`) restrict the tokens the LM may take, identically in
    rollouts, in ``evaluate_actions`` and in ``predict(..., action_masks=...)``. The rollout KV cache, the grouped
    training (with :class:`MaskableTextRolloutBuffer`) and the KL penalty to the reference are kept; the KL is
    measured between the masked policy and the reference masked the same way.

    Takes the same arguments as :class:`~sb3_textrl.TransformerLMPolicy`.
    """

    # -- the allowed tokens ---------------------------------------------------------------------------------------
    def _env_mask(self, action_masks: MaskArray, n_rows: int, device: th.device) -> th.Tensor | None:
        """The env's masks as an (N, V) bool tensor, checked (MaskablePPO passes (N, V) arrays, its buffer flat ones)."""
        if action_masks is None:
            return None
        n_tokens = int(self.action_space.n)
        masks = th.as_tensor(action_masks, device=device).bool()
        if masks.numel() != n_rows * n_tokens:
            raise ValueError(
                f"action_masks has shape {tuple(masks.shape)}, expected ({n_rows}, {n_tokens}): one bool per token of the "
                "vocabulary for every observation (the env's action_masks() gives one row per env)"
            )
        masks = masks.reshape(n_rows, n_tokens)
        if not bool(masks.any(dim=1).all()):
            raise ValueError("an action mask allows no token; every mask must allow at least one (e.g. the EOS token)")
        return masks

    def _allowed(self, obs: PyTorchObs, action_masks: MaskArray, logits: th.Tensor, rollout: bool = False) -> th.Tensor | None:
        """(N, V) tokens the distribution may take: the env's mask, or NLPO's top-p set within it."""
        env_mask = self._env_mask(action_masks, len(logits), logits.device)
        nlpo = self.nlpo_allowed(obs, action_masks=env_mask, rollout=rollout)
        return env_mask if nlpo is None else nlpo

    # -- rollout, prediction, training ------------------------------------------------------------------------------
    def forward(
        self, obs: PyTorchObs, deterministic: bool = False, action_masks: MaskArray = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """
        One rollout step for every env: sample the next tokens among the allowed ones.

        :param obs: batch of text observations
        :param deterministic: greedy decoding (the most likely allowed token) instead of sampling
        :param action_masks: (B, V) bool, True where the env allows the token; None: no env mask
        :return: actions (B,), values (B, 1), log-probs (B,) of the masked sampling distribution
        """
        return self._sample_step(obs, deterministic, action_masks)

    def get_distribution(self, obs: PyTorchObs, action_masks: MaskArray = None) -> Distribution:  # type: ignore[override]
        """
        :param obs: batch of text observations (the current step of each env)
        :param action_masks: (B, V) bool env masks, or None
        :return: the masked next-token distribution
        """
        return self._next_token_distribution(obs, action_masks)

    def _predict(
        self, observation: PyTorchObs, deterministic: bool = False, action_masks: MaskArray = None
    ) -> th.Tensor:
        return self.get_distribution(observation, action_masks).get_actions(deterministic=deterministic)

    def evaluate_actions(
        self, obs: PyTorchObs, actions: th.Tensor, action_masks: MaskArray = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """
        Values, log-probs and entropies of the given actions under the masked distribution, with gradients.

        :param obs: whole episode segments (MaskableTextRolloutBuffer: one forward per segment) or single steps
        :param actions: (N,) actions
        :param action_masks: (N, V) (or flat) env masks of those steps, as stored at rollout time
        """
        return self._evaluate(obs, actions, action_masks)

    @th.no_grad()
    def reference_log_probs(self, obs: PyTorchObs, actions: th.Tensor, action_masks: MaskArray = None) -> th.Tensor:
        """
        Log-probs of ``actions`` under the reference model restricted to the env's masks (renormalised over the allowed
        tokens, with the policy's temperature), so that the KL penalty compares two distributions on the same support.

        :param obs: segment observations (see TextRolloutBuffer)
        :param actions: (N,) actions, segment by segment
        :param action_masks: (N, V) env masks of those steps; None: the unmasked reference
        :return: (N,) log π_ref(action | allowed tokens)
        """
        if action_masks is None:
            return super().reference_log_probs(obs, actions)
        assert isinstance(obs, dict)
        with self.reference_model() as ref:
            hidden = self._segment_hidden(ref, obs)
            logits = self._logits(ref, hidden) / self.temperature
        env_mask = self._env_mask(action_masks, len(logits), logits.device)
        assert env_mask is not None
        logits = logits.masked_fill(~env_mask, masked_fill_value(logits.dtype))  # as the policy's _process_logits
        return action_log_probs(logits, actions)  # normalised as Categorical does

    @classmethod
    def text_rollout_buffer_class(cls) -> type[RolloutBuffer]:
        """:class:`MaskableTextRolloutBuffer`: MaskablePPO's rollout loop needs a maskable buffer."""
        return MaskableTextRolloutBuffer


class MaskableTextRolloutBuffer(TextRolloutBuffer, MaskableDictRolloutBuffer):
    """
    :class:`~sb3_textrl.TextRolloutBuffer` for ``MaskablePPO`` (its ``rollout_buffer_class`` when none is passed, see
    :mod:`sb3_textrl.lm.algorithm`): stores every step's env mask as bits (``np.packbits``: V/8 bytes a step instead
    of sb3-contrib's 4·V) and yields minibatches of whole episode segments with their per-step masks, so training
    stays one forward per episode. The KL penalty scores the reference under the same masks.

    Arguments as :class:`~sb3_textrl.TextRolloutBuffer`.
    """

    def reset(self) -> None:
        super().reset()  # TextRolloutBuffer's: sb3-contrib's would allocate a float32 (steps, envs, V) array
        self.mask_dims = int(self.action_space.n)  # type: ignore[attr-defined]
        # All allowed until a step brings a mask (MaskablePPO.learn(use_masking=False) brings none).
        self.packed_masks = np.full((self.buffer_size, self.n_envs, (self.mask_dims + 7) // 8), 0xFF, dtype=np.uint8)

    # Typed as sb3-contrib's get (TextRolloutBuffer's yields through _get_samples below, masks included).
    def get(self, batch_size: int | None = None) -> Generator[MaskableDictRolloutBufferSamples, None, None]:  # type: ignore[override]
        """Minibatches of whole segments (see :meth:`TextRolloutBuffer.get`), with their steps' env masks."""
        return cast(Generator[MaskableDictRolloutBufferSamples, None, None], super().get(batch_size))

    def add(self, *args: Any, action_masks: np.ndarray | None = None, **kwargs: Any) -> None:
        """
        Store one step of every env (SB3's arguments) and its env masks.

        :param action_masks: (n_envs, V) bool masks the step was sampled under, or None
        """
        if action_masks is not None:
            masks = np.asarray(action_masks, dtype=bool).reshape(self.n_envs, self.mask_dims)
            self.packed_masks[self.pos] = np.packbits(masks, axis=-1)
        super().add(*args, **kwargs)

    def _masks(self, chunk: list[Segment]) -> np.ndarray:
        """(N, V) bool masks of the chunk's steps, segment after segment."""
        return np.unpackbits(self._flat(self.packed_masks, chunk), axis=-1, count=self.mask_dims).astype(bool)

    def _get_samples(  # type: ignore[override]
        self, chunk: list[Segment], env: VecNormalize | None = None
    ) -> MaskableDictRolloutBufferSamples:
        samples = super()._get_samples(chunk)
        return MaskableDictRolloutBufferSamples(*samples, action_masks=th.as_tensor(self._masks(chunk), device=self.device))

    def _reference_log_probs(self, policy: TransformerLMPolicy, chunk: list[Segment], actions: th.Tensor) -> th.Tensor:
        """(N,) log π_ref of one chunk's actions under their steps' masks."""
        if not isinstance(policy, MaskableTransformerLMPolicy):
            return super()._reference_log_probs(policy, chunk, actions)
        masks = th.as_tensor(self._masks(chunk), device=self.device)
        return policy.reference_log_probs(self.segment_batch(chunk), actions, action_masks=masks)
