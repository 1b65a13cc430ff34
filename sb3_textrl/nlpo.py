"""NLPO-style action masking (Ramamurthy et al., 2023, "Is Reinforcement Learning (Not) for Natural Language
Processing?"): at each step the policy may only pick a token from the top-p set of a *masking policy*, a copy of
the policy that is refreshed every few rollouts.

The option lives on :class:`~sb3_textrl.TransformerLMPolicy` (``policy_kwargs=dict(nlpo_top_p=0.9)``), so it works
with plain ``PPO`` (and ``A2C``) as well as with ``MaskablePPO``; :class:`NLPOMaskRefresh` is the callback that
refreshes the masking policy. A policy built with ``nlpo_top_p`` owns an :class:`NLPOMasking` (``policy.nlpo``; None
without NLPO), which holds the masking policy and computes the allowed tokens; the policy delegates to it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th
from peft import PeftModel
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from sb3_textrl.common import metric_keys as keys
from sb3_textrl.common.kv_cache import RolloutKVCache
from sb3_textrl.common.segments import SEGMENT_LENGTHS

if TYPE_CHECKING:
    from sb3_textrl.policies import TransformerLMPolicy

# Name of the peft adapter that holds the masking policy's weights (LoRA policies: one LM in memory).
NLPO_ADAPTER = "nlpo_mask"
# Observation key of the allowed-token sets stored at rollout time: (N, V) bool, one row per step.
NLPO_ALLOWED = "nlpo_allowed"
# Key prefixes of the masking policy's weights in a policy's state dict, as saved before NLPOMasking -> today.
RENAMED_STATE_PREFIXES = {"mask_lm.": "nlpo.mask_lm."}


def check_nlpo_top_p(nlpo_top_p: float | None) -> float | None:
    """``nlpo_top_p`` itself if it is in (0, 1] or None; else a ValueError."""
    if nlpo_top_p is not None and not 0 < nlpo_top_p <= 1:
        raise ValueError(f"nlpo_top_p must be in (0, 1] (e.g. 0.9), or None to turn NLPO masking off; got {nlpo_top_p}")
    return nlpo_top_p


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


class NLPOMasking(nn.Module):
    """
    The NLPO masking policy of a :class:`~sb3_textrl.TransformerLMPolicy` built with ``nlpo_top_p``, and the tokens it
    allows: the policy owns one as ``policy.nlpo`` (a submodule, so it is saved and moved with the policy).

    With LoRA the masking policy is a frozen second adapter (:data:`NLPO_ADAPTER`) of the policy's LM (one LM in
    memory); without, a frozen copy of the LM (:attr:`mask_lm`). It starts equal to the policy; :meth:`refresh` copies
    the policy's current weights into it. It scores observations with the policy's own forwards (its segment, per-step
    and KV-cached trunk passes, its head) run on the masking model, through its own rollout KV cache.

    :param policy: the policy, its LM built
    :param top_p: probability mass of the allowed sets, in (0, 1]; set to None later, it pauses the masking
    """

    _policy: TransformerLMPolicy  # set with object.__setattr__ (not a submodule), so declared here

    def __init__(self, policy: TransformerLMPolicy, top_p: float):
        super().__init__()
        # A plain reference, not a submodule: the policy owns this module, not the other way round.
        object.__setattr__(self, "_policy", policy)
        self.top_p: float | None = check_nlpo_top_p(top_p)
        self.mask_lm: PreTrainedModel | None = None
        self.cache = RolloutKVCache(self._cached_trunk)  # the masking policy's own rollout cache
        lm = policy.lm
        if isinstance(lm, PeftModel):
            active = lm.active_adapter
            lm.add_adapter(NLPO_ADAPTER, copy.deepcopy(lm.peft_config[active]))
            lm.set_adapter(active)  # the trained adapter stays active and trainable, the new one frozen
            self.refresh()
        else:
            self.mask_lm = copy.deepcopy(lm).requires_grad_(False).eval()

    @th.no_grad()
    def refresh(self) -> None:
        """Copy the policy's current weights into the masking policy."""
        lm = self._policy.lm
        if self.mask_lm is not None:
            self.mask_lm.load_state_dict(lm.state_dict())
        else:
            assert isinstance(lm, PeftModel)
            params = dict(lm.named_parameters())
            mask_key, policy_key = f".{NLPO_ADAPTER}.", f".{lm.active_adapter}."
            for name, param in params.items():
                if mask_key in name:
                    param.copy_(params[name.replace(mask_key, policy_key)])
        self.cache.reset()

    @contextlib.contextmanager
    def masking_model(self) -> Iterator[PreTrainedModel]:
        """Context in which the returned model is the frozen masking policy."""
        if self.mask_lm is not None:
            yield self.mask_lm
            return
        lm = self._policy.lm
        assert isinstance(lm, PeftModel)  # without LoRA the masking policy is mask_lm
        active = lm.active_adapter
        lm.set_adapter(NLPO_ADAPTER, inference_mode=True)
        try:
            yield self._policy._hf_model()
        finally:
            lm.set_adapter(active)  # also gives the trained adapter its requires_grad back

    def _cached_trunk(
        self, input_ids: th.Tensor, attention_mask: th.Tensor, position_ids: th.Tensor, past: DynamicCache | None
    ) -> tuple[th.Tensor, DynamicCache, None]:
        policy = self._policy
        model = self.mask_lm if self.mask_lm is not None else policy._hf_model()  # called inside masking_model()
        hidden, past = policy._trunk(model, input_ids, attention_mask, position_ids, past, use_cache=True)
        assert past is not None
        return hidden, past, None

    @th.no_grad()
    def allowed(self, obs: PyTorchObs, action_masks: Any = None, rollout: bool = False) -> th.Tensor | None:
        """
        The tokens each step may take, (N, V) bool, or None while paused (``top_p`` None).

        Segments from TextRolloutBuffer carry the sets stored at rollout time; otherwise the masking policy scores
        the observations (rollout steps through its own KV cache, one one-token forward per step; segments by one
        teacher-forced forward each; single steps by a full forward).

        :param obs: rollout observations, segments or single steps
        :param action_masks: the env's action masks ((N, V) or flat, as MaskablePPO passes them), combined: the top-p
            set is taken on the masking distribution restricted to the env's valid tokens, so it is a non-empty
            subset of them
        :param rollout: ``obs`` holds the current step of every env (use the masking policy's KV cache)
        :return: (N, V) bool, True for allowed tokens
        """
        if self.top_p is None:
            return None
        assert isinstance(obs, dict)
        if NLPO_ALLOWED in obs:
            return obs[NLPO_ALLOWED].bool()
        policy = self._policy
        with self.masking_model() as model:
            if SEGMENT_LENGTHS in obs:
                hidden = policy._segment_hidden(model, obs)
            elif rollout and policy.use_kv_cache:
                hidden = self.cache.step(*policy._tokens(obs))
            else:
                hidden = policy._last_hidden_per_step(obs, model)
            logits = policy._logits(model, hidden)
        env_mask = None
        if action_masks is not None:
            env_mask = th.as_tensor(action_masks, device=logits.device).reshape(logits.shape).bool()
        return top_p_allowed(logits, self.top_p, env_mask)

    def with_taken_actions(self, obs: PyTorchObs, allowed: th.Tensor | None, actions: th.Tensor) -> th.Tensor | None:
        """
        Training: ``allowed`` with each step's taken action allowed when the sets were recomputed (the observations
        hold no stored sets): another forward than the rollout's may round a set differently, and the rollout did
        allow that action. ``allowed`` (N, V) is changed in place.
        """
        if self.top_p is not None and allowed is not None and NLPO_ALLOWED not in obs:
            allowed[th.arange(len(actions), device=allowed.device), actions.long().flatten()] = True
        return allowed


def renamed_state_keys(state_dict: Mapping[str, th.Tensor]) -> Mapping[str, th.Tensor]:
    """
    A policy state dict with the masking policy's weights under today's keys (:data:`RENAMED_STATE_PREFIXES`: the
    frozen copy without LoRA was the policy's ``mask_lm`` before NLPOMasking); ``state_dict`` itself if none moved.
    """
    if not any(key.startswith(old) for key in state_dict for old in RENAMED_STATE_PREFIXES):
        return state_dict

    def renamed(key: str) -> str:
        for old, new in RENAMED_STATE_PREFIXES.items():
            if key.startswith(old) or key == old[:-1]:
                return new[:-1] + key[len(old) - 1 :]
        return key

    result = collections.OrderedDict((renamed(key), value) for key, value in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module metadata, keyed by module prefix (without the dot)
        result._metadata = collections.OrderedDict((renamed(key), value) for key, value in metadata.items())  # type: ignore[attr-defined]
    return result


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
        self.logger.record(keys.ROLLOUT + keys.NLPO_REFRESHES, self.n_refreshes)

    def _on_step(self) -> bool:
        return True
