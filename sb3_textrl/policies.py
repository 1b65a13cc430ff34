"""TransformerLMPolicy: an SB3 actor-critic policy whose actor is a Hugging Face causal LM.

The parts that need no policy live in :mod:`sb3_textrl.lm` (argument checks, precision, LoRA, forwards, heads) and
NLPO's masking in :mod:`sb3_textrl.nlpo`; the names other modules import from here are re-exported.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch as th
from gymnasium import spaces
from peft import LoraConfig, PeftModel
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from transformers import PreTrainedModel

from sb3_textrl.common.kl import KLController, action_log_probs
from sb3_textrl.common.kv_cache import RolloutKVCache
from sb3_textrl.common.sb3_bridge import attach_rollout_extras
from sb3_textrl.common.segments import SEGMENT_LENGTHS, SEGMENT_STARTS, SPLIT_HIDDEN
from sb3_textrl.lm import checkpoint, lora, precision
from sb3_textrl.lm.algorithm import GROUPED_SPEEDUP, configure_algorithm, per_step_buffer_message
from sb3_textrl.lm.arguments import (
    check_arguments,
    check_context_length,
    check_spaces,
    check_vocabulary,
    kl_target_argument,
    refuse_segments,
)
from sb3_textrl.lm.forward import LMForwards
from sb3_textrl.lm.forward import cache_kwarg as _cache_kwarg
from sb3_textrl.lm.heads import make_value_head
from sb3_textrl.lm.heads import masked_fill_value as _masked_fill_value
from sb3_textrl.lm.precision import MIXED_PRECISION_OPTIONS, cpu_has_fast_bf16, fast_mixed_precision
from sb3_textrl.models import load_causal_lm
from sb3_textrl.nlpo import NLPOMasking, check_nlpo_top_p

# Imported from here by other modules (and so re-exported) though now defined in sb3_textrl.lm.
__all__ = ["SEGMENT_LENGTHS", "SEGMENT_STARTS", "SPLIT_HIDDEN", "TransformerLMPolicy", "fast_mixed_precision"]
__all__ += ["GROUPED_SPEEDUP", "MIXED_PRECISION_OPTIONS", "_cache_kwarg", "_masked_fill_value", "cpu_has_fast_bf16"]

# The policy's arguments that _get_constructor_parameters saves under their own names (``lm`` is ``lm_name``).
_SAVED_ARGUMENTS: tuple[str, ...] = ("kl_coef", "kl_target", "kl_horizon", "use_lora", "lora_config", "temperature")
_SAVED_ARGUMENTS += ("top_k", "top_p", "use_kv_cache", "share_prefixes", "check_tokenizer", "mixed_precision")
_SAVED_ARGUMENTS += ("gradient_checkpointing", "nlpo_top_p", "trainable_layers", "critic", "value_warmup_rollouts")
_SAVED_ARGUMENTS += ("save_base_lm",)


class TransformerLMPolicy(LMForwards, ActorCriticPolicy):
    """
    Actor-critic policy for text envs: the LM's own head is the actor, a scalar value head reads the LM's last
    hidden state (one LM in memory, shared trunk), and a frozen reference (the same weights with the LoRA
    adapters disabled, or a frozen copy) gives the log-probs of the KL penalty.

    During rollouts the policy keeps a KV cache per env (one batched one-token forward per SB3 step).
    With :class:`~sb3_textrl.buffers.TextRolloutBuffer`, training runs one teacher-forced forward per episode
    and the buffer applies the per-token penalty −β·(log π − log π_ref) to the rewards. A stock ``PPO(
    TransformerLMPolicy, env)`` (or ``A2C``) without ``rollout_buffer_class`` gets it: the policy gives the algorithm
    building it its :meth:`text_rollout_buffer_class`, warns when a per-step buffer is passed explicitly, and refuses
    ``VecNormalize(norm_obs=True)`` (:mod:`sb3_textrl.lm.algorithm`).

    :param observation_space: a :class:`~sb3_textrl.envs.TextObservationSpace` (from a text env)
    :param action_space: ``Discrete(len(tokenizer))``
    :param lr_schedule: learning-rate schedule (from the algorithm)
    :param lm: causal LM name or local path; None: the embedded SmolLM2-135M-Instruct
    :param kl_coef: β of the KL penalty to the reference model (0 turns it off)
    :param kl_target: target mean KL per episode (nats) for an adaptive β; None keeps β fixed. (Its old name
        ``target_kl`` still works, with a DeprecationWarning: it collided with PPO's own ``target_kl``, an early stop.)
    :param kl_horizon: horizon (tokens) of the adaptive β controller
    :param use_lora: train LoRA adapters (peft) instead of all weights; the reference is then the same model with
        the adapters disabled
    :param lora_config: keyword arguments of ``peft.LoraConfig``, or a ``peft.LoraConfig`` (default: r=16, alpha=32,
        no dropout, the model family's default target modules)
    :param temperature: sampling temperature; PPO's log-probs use the same tempered distribution
    :param top_k: keep only the k most likely tokens (same truncation in rollouts and in training)
    :param top_p: keep the smallest set of tokens whose probability reaches p (nucleus sampling)
    :param use_kv_cache: keep a KV cache across rollout steps (exact; turn off only to compare)
    :param share_prefixes: with a per-step buffer (SB3's ``DictRolloutBuffer``, passed explicitly), run one forward
        per distinct sequence of a minibatch instead of one per step: the steps of an episode are prefixes of its
        longest observation (exact; turn off only to compare)
    :param check_tokenizer: check that the env's tokenizer is the LM's (compares vocabularies)
    :param mixed_precision: autocast of every LM forward (rollout steps, training, reference scoring): ``"auto"``
        (bf16 on a CUDA device that supports it, none on CPU), ``"bf16"`` (on any device, CPU included) or ``"no"``
        (float32). The weights, the optimizer, log-probs, values and the value head stay float32. fp16 is refused:
        it needs loss scaling, which SB3's train loop does not do.
    :param gradient_checkpointing: recompute the LM's layer activations in the backward pass instead of keeping them
        (less memory for long episodes, about one more forward per update); rollouts are unaffected (no gradients,
        KV cache on)
    :param nlpo_top_p: NLPO-style masking (:mod:`sb3_textrl.nlpo`): each step may only take a token of the top-p set
        of a masking policy, a frozen copy of this policy refreshed by :class:`~sb3_textrl.nlpo.NLPOMaskRefresh`;
        None turns it off. With LoRA the masking policy is a second adapter (one LM in memory), without LoRA a
        frozen copy of the LM; both live in ``policy.nlpo`` (:class:`~sb3_textrl.nlpo.NLPOMasking`, None without NLPO)
    :param trainable_layers: train only the top N transformer blocks (LoRA adapters, or with ``use_lora=False`` their
        weights, the final norm and an untied head); the lower blocks and the embeddings are frozen and shared with the
        reference, and the hidden state entering block L−N, kept from the rollout for every token (O(tokens × hidden)
        memory in the buffer), lets the reference pass and every training epoch run only the top N blocks
        (:mod:`sb3_textrl.common.layer_split`). None (or the block count) trains every layer
    :param critic: build a trainable value head (GAE). ``False`` for the critic-free advantages of
        :class:`~sb3_textrl.buffers.TextRolloutBuffer` (``advantage="rloo"``/``"grpo"``): the head stays a frozen
        zero (values 0, nothing added to the optimizer), so PPO's value loss has no gradient and ``vf_coef`` has no
        effect (``train/value_loss`` then only reports the mean squared advantage)
    :param value_warmup_rollouts: value-head warm-up: the PPO updates of the first N rollouts train the value head
        only (the LM's hidden states are computed without gradients, so the policy and entropy losses move no LM or
        LoRA weight, and Adam skips those weights: no step, no moment). The count of rollouts seen is part of the
        policy's state, so ``save``/``load`` continue it rather than warm up again. Needs ``critic=True``,
        ``vf_coef > 0`` and :class:`~sb3_textrl.buffers.TextRolloutBuffer` (which counts the rollouts); 0: none
    :param save_base_lm: keep the base LM's frozen weights in ``state_dict()`` (so in ``model.zip``). False: a
        checkpoint holds what was trained and the LM's identity (path, weights' hash): :mod:`sb3_textrl.lm.checkpoint`
    :param kwargs: further :class:`~stable_baselines3.common.policies.ActorCriticPolicy` arguments
        (``optimizer_class``, ``optimizer_kwargs``, ...); ``net_arch`` and ``ortho_init`` have no effect: there is
        no MLP, and a pretrained LM is never re-initialised
    """

    action_space: spaces.Discrete  # check_spaces() refuses any other
    action_dist: CategoricalDistribution
    n_rollouts: th.Tensor  # a registered buffer (see _build)

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        lm: str | None = None,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10_000,
        use_lora: bool = True,
        lora_config: dict[str, Any] | LoraConfig | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_kv_cache: bool = True,
        share_prefixes: bool = True,
        check_tokenizer: bool = True,
        mixed_precision: str = "auto",
        gradient_checkpointing: bool = False,
        nlpo_top_p: float | None = None,
        trainable_layers: int | None = None,
        critic: bool = True,
        value_warmup_rollouts: int = 0,
        save_base_lm: bool = False,
        **kwargs: Any,
    ):
        check_spaces(observation_space, action_space)
        self.lm_name = checkpoint.absolute_lm(lm)  # a relative directory saved as absolute: loads from any cwd
        self.save_base_lm = save_base_lm
        self.kl_coef = kl_coef
        self.kl_target = kl_target_argument(kl_target, kwargs)  # also from target_kl=, its deprecated name
        self.kl_horizon = kl_horizon
        self.use_lora = use_lora
        self.lora_config = lora.lora_overrides(lora_config)
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.use_kv_cache = use_kv_cache
        self.share_prefixes = share_prefixes
        self.check_tokenizer = check_tokenizer
        self.mixed_precision = mixed_precision
        self.gradient_checkpointing = gradient_checkpointing
        self._nlpo_top_p_at_build = check_nlpo_top_p(nlpo_top_p)  # _build makes self.nlpo (and self.nlpo_top_p) of it
        self.trainable_layers = trainable_layers
        self.critic = critic
        self.value_warmup_rollouts = value_warmup_rollouts
        check_arguments(self)  # before the LM is loaded
        # Set by TextRolloutBuffer when its last step is stored: the next predict_values() is SB3's bootstrap.
        self.bootstrap_after_rollout = False
        self._warned_per_step = False  # configure_algorithm sets it when it warns at construction
        # Inside PPO(...): the text buffer by default, VecNormalize(norm_obs=True) refused, before the LM is loaded.
        configure_algorithm(self)
        # ActorCriticPolicy builds a flatten extractor and calls self._build(); the MLP arguments are unused.
        kwargs["ortho_init"] = False
        kwargs["net_arch"] = []
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    # -- construction -------------------------------------------------------------------------------------
    def _build(self, lr_schedule: Schedule) -> None:
        model = checkpoint.load_base_lm(self)  # a missing directory: the error names the lm= override
        base_state = model.state_dict(keep_vars=True)  # the LM as loaded, before LoRA wraps it
        check_vocabulary(model, self.action_space, self.observation_space, self.lm_name, self.check_tokenizer)
        check_context_length(model, self.observation_space, self.lm_name)
        self.layer_split = lora.make_layer_split(model, self.trainable_layers)
        lm: PreTrainedModel | PeftModel = model
        if self.use_lora:
            lm = lora.add_lora(model, self._lora_kwargs(model), self.layer_split)
        elif self.layer_split is not None:
            self.layer_split.freeze_lower(model)
        self.lm: PreTrainedModel | PeftModel = lm
        self.kl_controller = KLController(self.kl_coef, self.kl_target, self.kl_horizon)
        # Without LoRA the reference must be a separate frozen copy of the initial weights.
        self.ref_lm: PreTrainedModel | None = None
        if not self.use_lora and self.kl_controller.enabled:
            self.ref_lm = copy.deepcopy(model).requires_grad_(False).eval()
        top_p = self._nlpo_top_p_at_build
        self.nlpo: NLPOMasking | None = None if top_p is None else NLPOMasking(self, top_p)
        if self.gradient_checkpointing:
            self._checkpointed = precision.enable_gradient_checkpointing(self._hf_model())
        self.value_net = make_value_head(self._hf_model().get_output_embeddings().weight.shape[1], trainable=self.critic)
        # Rollouts completed so far (TextRolloutBuffer counts them): a buffer, so model.save/PPO.load keep it.
        self.register_buffer("n_rollouts", th.zeros((), dtype=th.int64))
        self.action_dist = CategoricalDistribution(int(self.action_space.n))
        self._rollout_cache = self._make_rollout_cache()
        # bf16 copies of the frozen weights for CPU autocast (lm/precision.py): bitwise what autocast computes, cheaper
        self.frozen_weight_casts = precision.FrozenWeightCasts()
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]
        self.base_weights = checkpoint.BaseWeights.of(self, base_state, self.ref_lm)  # what checkpoints may leave out
        self.set_training_mode(False)

    def _load_lm(self) -> PreTrainedModel:
        """The LM to fine-tune (subclasses load other model classes, e.g. encoder-decoders)."""
        return load_causal_lm(self.lm_name)

    def _make_rollout_cache(self) -> RolloutKVCache:
        """The cache that keeps every env's context across rollout steps."""
        return RolloutKVCache(self._cached_trunk)

    @classmethod
    def text_rollout_buffer_class(cls) -> type[RolloutBuffer]:
        """The rollout buffer this policy trains with when the algorithm is given none (see :mod:`sb3_textrl.lm.algorithm`)."""
        from sb3_textrl.buffers import TextRolloutBuffer  # here: buffers imports this module

        return TextRolloutBuffer

    def _lora_kwargs(self, model: PreTrainedModel) -> dict[str, Any]:
        return lora.lora_kwargs(model, self.lora_config)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(lm=self.lm_name, **{name: getattr(self, name) for name in _SAVED_ARGUMENTS})
        return data

    @property
    def target_kl(self) -> float | None:
        """Deprecated name of :attr:`kl_target` (the adaptive β's target; PPO's own ``target_kl`` is an early stop)."""
        warnings.warn("TransformerLMPolicy.target_kl is deprecated: read kl_target", DeprecationWarning, stacklevel=2)
        return self.kl_target

    # -- the LM and its reference -----------------------------------------------------------------------
    @contextlib.contextmanager
    def reference_model(self) -> Iterator[PreTrainedModel]:
        """Context in which the returned model is the frozen reference π_ref."""
        if self.ref_lm is not None:
            yield self.ref_lm
        elif isinstance(self.lm, PeftModel):
            with self.lm.disable_adapter():
                yield self._hf_model()
        else:
            raise RuntimeError("This policy has no reference model (kl_coef=0 without LoRA)")

    # -- rollout: next-token outputs ------------------------------------------------------------------------
    def _next_token_hidden(self, obs: PyTorchObs, allow_cache_reset: bool = True) -> th.Tensor:
        """(B, H) final hidden state at the last valid token of every observation."""
        ids, mask = self._tokens(obs)
        cache = self._rollout_cache
        shape_matches = cache.tokens is None or cache.tokens.shape == ids.shape
        if self.use_kv_cache and (allow_cache_reset or shape_matches):
            return cache.step(ids, mask)
        return self._last_hidden_per_step(obs)

    def _allowed(self, obs: PyTorchObs, action_masks: Any, logits: th.Tensor, rollout: bool = False) -> th.Tensor | None:
        """
        (N, V) tokens the distribution may take, or None for all: NLPO's top-p set here; MaskableTransformerLMPolicy
        adds the env's action masks (``action_masks`` is None for this policy).
        """
        return self.nlpo_allowed(obs, rollout=rollout)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """
        One rollout step for every env: sample the next tokens.

        :param obs: batch of text observations
        :param deterministic: greedy decoding instead of sampling
        :return: actions (B,), values (B, 1), log-probs (B,) of the sampling distribution. The log-prob tensor
            carries the policy (and NLPO's sets) to TextRolloutBuffer, which scores the reference and applies the KL
            penalty (:func:`~sb3_textrl.common.sb3_bridge.attach_rollout_extras`).
        """
        return self._sample_step(obs, deterministic)

    def _sample_step(
        self, obs: PyTorchObs, deterministic: bool, action_masks: Any = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        hidden = self._next_token_hidden(obs)
        logits = self._logits(self._hf_model(), hidden)
        allowed = self._allowed(obs, action_masks, logits, rollout=True)
        distribution = self._distribution(logits, allowed)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        # TextRolloutBuffer needs the policy, and stores NLPO's sets so that training sees the rollout's exactly.
        attach_rollout_extras(log_prob, policy=self, nlpo_allowed=None if self.nlpo_top_p is None else allowed)
        return actions, self._value(hidden), log_prob

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        return self._next_token_distribution(obs)

    def _next_token_distribution(self, obs: PyTorchObs, action_masks: Any = None) -> Distribution:
        refuse_segments(obs, "get_distribution")
        hidden = self._next_token_hidden(obs)
        logits = self._logits(self._hf_model(), hidden)
        return self._distribution(logits, self._allowed(obs, action_masks, logits, rollout=True))

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """
        State values (B, 1). A full observation (the completion reached ``max_new_tokens``) has no future: its
        value is 0, so SB3's time-limit bootstrap adds nothing at the end of a truncated completion. Right after
        :class:`~sb3_textrl.buffers.TextRolloutBuffer` is filled (:attr:`bootstrap_after_rollout`), rows that start a
        new episode are given 0 without a forward: they follow a done, whose bootstrap value GAE discards.
        """
        refuse_segments(obs, "predict_values")
        _, mask = self._tokens(obs)
        full = mask[:, -1].bool()
        if self.bootstrap_after_rollout:
            # SB3's bootstrap of the observations after a full rollout: a row that starts a new episode follows a
            # done, so GAE multiplies its value by 1 - done = 0. Skip its prompt's prefill (the cache is reset for
            # training anyway): on long prompts that prefill costs as much as the whole rollout's decoding.
            self.bootstrap_after_rollout = False
            prompt_width = getattr(self.observation_space, "max_prompt_tokens", None)
            if prompt_width is not None:
                full = full | ~mask[:, prompt_width:].bool().any(dim=1)
        values = th.zeros(mask.shape[0], 1, device=mask.device)
        if bool((~full).any()):
            # SB3 asks for single terminal observations too: they must not reset the rollout cache.
            rows = {key: value[~full] for key, value in obs.items()}  # type: ignore[union-attr]
            values[~full] = self._value(self._next_token_hidden(rows, allow_cache_reset=bool((~full).all())))
        return values

    # -- training ---------------------------------------------------------------------------------------------
    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """
        Values, log-probs and entropies of the given actions, with gradients.

        With TextRolloutBuffer the observations are whole episode segments (one forward per segment);
        with SB3's per-step DictRolloutBuffer they are single steps (one forward per step, much slower).
        """
        return self._evaluate(obs, actions)

    def _evaluate(
        self, obs: PyTorchObs, actions: th.Tensor, action_masks: Any = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        assert isinstance(obs, dict)
        if SEGMENT_LENGTHS not in obs and self.value_warmup_rollouts:
            raise ValueError(
                "value_warmup_rollouts needs TextRolloutBuffer, which counts the rollouts: "
                "PPO(..., rollout_buffer_class=sb3_textrl.TextRolloutBuffer)"
            )
        # Value-head warm-up: no graph through the LM, so only the value head gets gradients.
        with th.no_grad() if self.in_value_warmup else contextlib.nullcontext():
            if SEGMENT_LENGTHS in obs:
                hidden = self._segment_hidden(self._hf_model(), obs)
            else:
                self._warn_per_step()
                hidden = self._last_hidden_per_step(obs)
            logits = self._logits(self._hf_model(), hidden)
            allowed = self._allowed(obs, action_masks, logits)
            if self.nlpo is not None:  # NLPO sets recomputed by another forward than the rollout's: the action stays in
                allowed = self.nlpo.with_taken_actions(obs, allowed, actions)
            distribution = self._distribution(logits, allowed)
        return self._value(hidden), distribution.log_prob(actions), distribution.entropy()

    @property
    def in_value_warmup(self) -> bool:
        """Whether PPO's update of the current rollout trains the value head only (see ``value_warmup_rollouts``)."""
        return 0 < int(self.n_rollouts) <= self.value_warmup_rollouts

    def note_rollout(self) -> None:
        """Count one more completed rollout (TextRolloutBuffer calls it once its advantages are computed)."""
        self.n_rollouts += 1

    @th.no_grad()
    def reference_log_probs(self, obs: PyTorchObs, actions: th.Tensor) -> th.Tensor:
        """
        Log-probs of ``actions`` under the reference model π_ref, for segments laid out by TextRolloutBuffer.

        The reference uses the same temperature as the policy but no top-k/top-p truncation: it is the untuned
        model's distribution, of which the policy's sampling distribution is a (possibly truncated) fine-tuning.

        :param obs: segment observations (see TextRolloutBuffer)
        :param actions: (N,) actions, segment by segment
        :return: (N,) log π_ref(action)
        """
        assert isinstance(obs, dict)
        with self.reference_model() as ref:
            hidden = self._segment_hidden(ref, obs)
            logits = self._logits(ref, hidden) / self.temperature
        return action_log_probs(logits, actions)  # normalised as torch's Categorical normalises the policy's

    # -- NLPO masking: delegated to self.nlpo (sb3_textrl.nlpo.NLPOMasking) ----------------------------------
    @property
    def nlpo_top_p(self) -> float | None:
        """NLPO's top-p (None: no masking). Setting None pauses the masking (the masking policy is kept)."""
        return None if self.nlpo is None else self.nlpo.top_p

    @nlpo_top_p.setter
    def nlpo_top_p(self, value: float | None) -> None:
        if self.nlpo is not None:
            self.nlpo.top_p = check_nlpo_top_p(value)
        elif value is not None:
            raise ValueError("This policy has no NLPO masking policy: build it with policy_kwargs=dict(nlpo_top_p=...).")

    def refresh_masking_policy(self) -> None:
        """Copy the policy's current weights into the NLPO masking policy (what NLPOMaskRefresh calls)."""
        if self.nlpo is None or self.nlpo_top_p is None:
            raise ValueError("This policy has no NLPO masking policy: build it with policy_kwargs=dict(nlpo_top_p=0.9).")
        self.nlpo.refresh()

    def masking_model(self) -> contextlib.AbstractContextManager[PreTrainedModel]:
        """Context in which the returned model is the frozen NLPO masking policy."""
        if self.nlpo is None:
            raise RuntimeError("This policy has no NLPO masking policy (nlpo_top_p=None)")
        return self.nlpo.masking_model()

    def nlpo_allowed(self, obs: PyTorchObs, action_masks: Any = None, rollout: bool = False) -> th.Tensor | None:
        """
        NLPO: the tokens each step may take, (N, V) bool, or None without NLPO masking
        (:meth:`~sb3_textrl.nlpo.NLPOMasking.allowed`).

        :param obs: rollout observations, segments or single steps
        :param action_masks: the env's action masks ((N, V) or flat): the top-p set is taken within them
        :param rollout: ``obs`` holds the current step of every env (use the masking policy's KV cache)
        """
        return None if self.nlpo is None else self.nlpo.allowed(obs, action_masks, rollout)

    def _warn_per_step(self) -> None:
        """Warn once when trained on single steps with a per-step buffer not seen at construction (e.g. after load)."""
        if self._warned_per_step:
            return
        self._warned_per_step = True
        warnings.warn(per_step_buffer_message(self, None, self.text_rollout_buffer_class()), UserWarning, stacklevel=3)

    # -- mode and state ---------------------------------------------------------------------------------------
    def set_training_mode(self, mode: bool) -> None:
        """Dropout stays off (PPO's ratio needs the rollout distribution); training invalidates the KV cache."""
        super().set_training_mode(mode)
        self.lm.eval()
        for module in getattr(self, "_checkpointed", []):
            module.training = mode  # only these flags: checkpointing in training, never dropout
        if mode:
            self._rollout_cache.reset()

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The state without the base LM's frozen, unchanged weights, unless ``save_base_lm`` (see ``lm/checkpoint.py``)."""
        from sb3_textrl.distributed import refuse_sharded  # distributed imports the buffers, which import this module

        refuse_sharded(self, "state_dict")
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return checkpoint.without_base_weights(self, super().state_dict(*args, **kwargs), prefix)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._rollout_cache.reset()
        self.frozen_weight_casts.clear()
        if self.nlpo is not None:
            self.nlpo.cache.reset()
        state_dict = checkpoint.loadable_state_dict(self, state_dict)  # older layouts, base LM weights left out
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
