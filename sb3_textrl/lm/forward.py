"""The LM forwards of the policies: the observation keys of episode segments, where each action's hidden state lies in
a batch of segments, and :class:`LMForwards`, the policy methods that run the LM (trunk, hidden states, heads)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import TYPE_CHECKING, Any, cast

import torch as th
from peft import PeftModel
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from sb3_textrl.common.kv_cache import last_valid_index, longest_extensions, positions_from_mask
from sb3_textrl.common.segments import SEGMENT_LENGTHS, SEGMENT_STARTS, SPLIT_HIDDEN, action_positions, used_columns
from sb3_textrl.lm import precision
from sb3_textrl.lm.algorithm import check_token_ids
from sb3_textrl.lm.heads import head_values, lm_logits, process_logits

if TYPE_CHECKING:
    from gymnasium import spaces

    from sb3_textrl.common.kv_cache import RolloutKVCache
    from sb3_textrl.common.layer_split import LayerSplit

@functools.cache
def cache_kwarg(module_class: type[nn.Module]) -> str:
    """The name of a Hugging Face module's past-cache argument (transformers 5.2x renamed ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters else "past_key_values"


def run_with_cache(module: nn.Module, past: Any, use_cache: bool, **inputs: th.Tensor) -> tuple[th.Tensor, Any]:
    """
    A Hugging Face trunk, encoder-decoder's decoder... on ``inputs``: its final hidden states, and the updated cache
    (``use_cache``; else None), whichever name the module's transformers version gives the cache argument.
    """
    cache_name = cache_kwarg(type(module))  # type: ignore[arg-type]  # a class is hashable (python/mypy#11470)
    out = module(**inputs, use_cache=use_cache, **{cache_name: past})
    if not use_cache:
        return out.last_hidden_state, None
    return out.last_hidden_state, out["cache"] if "cache" in out else out["past_key_values"]


def observation_tokens(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
    """
    The token ids and attention mask of text observations (single steps or segments), as int64. Float ids must be
    whole numbers (SB3's per-step buffers store float32): normalised ones are refused, not truncated to token 0.
    """
    assert isinstance(obs, dict)
    check_token_ids(obs["input_ids"])
    return obs["input_ids"].long(), obs["attention_mask"].long()


class LMForwards:
    """
    The methods of :class:`~sb3_textrl.TransformerLMPolicy` that run its LM: the trunk under the policy's autocast,
    the hidden states that predict the actions of rollout steps, single steps and episode segments, and the heads.
    Subclasses for other model kinds override them (:class:`~sb3_textrl.Seq2SeqLMPolicy`).

    A mixin of the policy, it reads the policy's attributes declared below.
    """

    lm: PreTrainedModel | PeftModel
    layer_split: LayerSplit | None
    share_prefixes: bool
    mixed_precision: str
    temperature: float
    top_k: int | None
    top_p: float | None
    action_space: spaces.Discrete
    action_dist: CategoricalDistribution
    value_net: nn.Linear
    _rollout_cache: RolloutKVCache
    device: th.device

    _tokens = staticmethod(observation_tokens)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The Hugging Face model the policy runs: ``lm`` itself, or the model that peft's LoRA wraps (its layers hold
        the adapters)."""
        return self._hf_model()

    def _hf_model(self) -> PreTrainedModel:
        # peft types its base model as a plain nn.Module: here it is the Hugging Face model it wraps.
        return cast(PreTrainedModel, self.lm.get_base_model()) if isinstance(self.lm, PeftModel) else self.lm

    def called_modules(self) -> list[nn.Module]:
        """The modules this policy calls directly, whose forwards data-parallel engines hook
        (:func:`sb3_textrl.distributed.make_data_parallel`): the LM's trunk, its output head, the value head."""
        model = self._hf_model()
        return [model.base_model, model.get_output_embeddings(), self.value_net]

    # -- precision ----------------------------------------------------------------------------------------
    def autocast_dtype(self) -> th.dtype | None:
        """The dtype LM forwards autocast to on the policy's current device, or None for float32."""
        return precision.autocast_dtype(self.mixed_precision, self.device)

    def _autocast(self, model: nn.Module | None = None) -> contextlib.AbstractContextManager:
        """The policy's autocast; with ``model``, the forward of that module reads its frozen weights' copies."""
        casts = getattr(self, "frozen_weight_casts", None)
        return precision.autocast(self.autocast_dtype(), self.device, model, casts)

    # -- the trunk ----------------------------------------------------------------------------------------
    def _trunk(
        self,
        model: PreTrainedModel,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        position_ids: th.Tensor,
        past: DynamicCache | None = None,
        use_cache: bool = False,
    ) -> tuple[th.Tensor, DynamicCache | None]:
        """
        Run the LM without its head, under the policy's autocast: (B, S) tokens -> (B, S, H) final hidden states.

        :param model: the Hugging Face causal LM (not its peft wrapper); its ``base_model`` is the trunk
        :param past: the KV cache to extend, or None
        :param use_cache: return the updated cache (else None)
        """
        with self._autocast(model):
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return run_with_cache(model.base_model, past, use_cache, **inputs)

    def _cached_trunk(
        self, input_ids: th.Tensor, attention_mask: th.Tensor, position_ids: th.Tensor, past: DynamicCache | None
    ) -> tuple[th.Tensor, DynamicCache, th.Tensor | None]:
        """The rollout cache's trunk; with ``trainable_layers`` it also keeps the hidden state entering the top blocks."""
        model, split = self._hf_model(), self.layer_split
        with contextlib.nullcontext() if split is None else split.capture(model) as captured:
            hidden, past = self._trunk(model, input_ids, attention_mask, position_ids, past, use_cache=True)
        assert past is not None
        return hidden, past, None if captured is None else captured[-1]

    @th.no_grad()
    def split_hidden(self, input_ids: th.Tensor, attention_mask: th.Tensor) -> th.Tensor:
        """
        With ``trainable_layers``: the hidden state entering the first trainable block at every token of rollout
        observations, kept by the rollout KV cache (a row it no longer holds is recomputed, exactly).

        :param input_ids: (B, L) observations
        :param attention_mask: (B, L) 0/1 mask
        :return: (B, L, H) hidden states, zero on padding
        """
        split = self.layer_split
        if split is None:
            raise RuntimeError("split_hidden() needs a policy built with trainable_layers")
        kept = self._rollout_cache.features_of(input_ids, attention_mask)
        if kept is not None and bool(kept[1].all()):
            return kept[0]
        # The cache has moved on (e.g. a callback generated with this policy between the step and the buffer's add).
        rows = th.ones(len(input_ids), dtype=th.bool, device=input_ids.device) if kept is None else ~kept[1]
        model = self._hf_model()
        mask = attention_mask[rows]
        with split.lower_only(model) as captured:  # the top blocks are not needed for their input
            self._trunk(model, input_ids[rows], mask, positions_from_mask(mask))
        recomputed = captured[-1] * mask.unsqueeze(-1)
        if kept is None:
            return recomputed
        features = kept[0]
        features[rows] = recomputed.to(features.dtype)
        return features

    # -- hidden states that predict actions ------------------------------------------------------------------
    def _segment_hidden(self, model: PreTrainedModel, obs: dict[str, th.Tensor]) -> th.Tensor:
        """(N, H) hidden states that predict each action, one teacher-forced forward per segment."""
        ids, mask = self._tokens(obs)
        starts, lengths = obs[SEGMENT_STARTS].long(), obs[SEGMENT_LENGTHS].long()
        # Crop the columns no segment uses: left padding shared by all rows, right padding after the last action.
        first, end = used_columns(mask, starts, lengths)
        ids, mask = ids[:, first:end], mask[:, first:end]
        rows, columns = action_positions(starts - first, lengths)  # (N,) each: where each action is predicted
        if SPLIT_HIDDEN in obs and self.layer_split is not None:  # only the top blocks, from the rollout's hidden states
            read = rows * ids.shape[1] + columns  # the last block's position-wise parts run at these positions only
            with self.layer_split.from_split(model, obs[SPLIT_HIDDEN][:, first:end], read_positions=read):
                hidden, _ = self._trunk(model, ids, mask, positions_from_mask(mask))  # (S, W, H)
        else:
            hidden, _ = self._trunk(model, ids, mask, positions_from_mask(mask))  # (S, W, H)
        return hidden[rows, columns]  # (N, H)

    def _last_hidden_per_step(self, obs: PyTorchObs, model: PreTrainedModel | None = None) -> th.Tensor:
        """(B, H) hidden state at each observation's last token, one forward per distinct sequence."""
        model = self._hf_model() if model is None else model
        ids, mask = self._tokens(obs)
        rows = th.arange(len(ids), device=ids.device)
        if self.share_prefixes and len(ids) > 1:
            # Observations that are prefixes of another (steps of one episode) are read off the longer one's forward.
            cover = longest_extensions(ids, mask)
            sequences, rows = th.unique(cover, return_inverse=True)
            hidden, _ = self._trunk(model, ids[sequences], mask[sequences], positions_from_mask(mask[sequences]))
        else:
            hidden, _ = self._trunk(model, ids, mask, positions_from_mask(mask))
        return hidden[rows, last_valid_index(mask)]

    # -- heads ----------------------------------------------------------------------------------------------
    def _logits(self, model: PreTrainedModel, hidden: th.Tensor) -> th.Tensor:
        """LM head on selected hidden states, restricted to the env's vocabulary: (N, H) -> (N, V) float32."""
        return lm_logits(model, hidden, int(self.action_space.n), self._autocast(model.get_output_embeddings()))

    def _process_logits(self, logits: th.Tensor, allowed: th.Tensor | None = None) -> th.Tensor:
        """
        The sampling distribution's logits: temperature, then the allowed tokens (NLPO, env masks), then top-k /
        top-p truncation (which so choose among the allowed tokens). (N, V) logits and (N, V) bool allowed -> (N, V)
        """
        return process_logits(logits, self.temperature, self.top_k, self.top_p, allowed)

    def _distribution(self, logits: th.Tensor, allowed: th.Tensor | None = None) -> CategoricalDistribution:
        return self.action_dist.proba_distribution(action_logits=self._process_logits(logits, allowed))

    def _value(self, hidden: th.Tensor) -> th.Tensor:
        return head_values(self.value_net, hidden)
