"""TransformerLMPolicy: an SB3 actor-critic policy whose actor is a Hugging Face causal LM."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch as th
from gymnasium import spaces
from peft import LoraConfig, PeftModel, get_peft_model
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from sb3_textrl.common.kl_controller import KLController
from sb3_textrl.common.kv_cache import RolloutKVCache, last_valid_index, longest_extensions, positions_from_mask
from sb3_textrl.common.layer_split import LayerSplit
from sb3_textrl.common.sb3_bridge import attach_rollout_extras
from sb3_textrl.envs.text_env import TextObservationSpace, tokenizer_fingerprint
from sb3_textrl.models import load_causal_lm, load_tokenizer
from sb3_textrl.nlpo import NLPO_ADAPTER, NLPO_ALLOWED, top_p_allowed

# Keys of the observations that TextRolloutBuffer yields: whole episode segments instead of single steps.
SEGMENT_STARTS = "segment_starts"  # (S,) column of the hidden state that predicts the segment's first action
SEGMENT_LENGTHS = "segment_lengths"  # (S,) number of actions in the segment
# With trainable_layers: (S, W, H) hidden states entering the first trainable block, in the columns of input_ids.
SPLIT_HIDDEN = "split_hidden"

# Throughput measured by benchmarks/ppo_throughput.py (see docs/benchmarks.md): grouped buffer + KV cache
# against SB3's default buffer with one full forward per token, end to end in PPO.learn (43x on 2 CPU cores).
GROUPED_SPEEDUP = "about 40x"


@functools.cache
def _cache_kwarg(trunk_class: type) -> str:
    # transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both generations of models.
    return "cache" if "cache" in inspect.signature(trunk_class.forward).parameters else "past_key_values"


def _masked_fill_value(dtype: th.dtype) -> float:
    return th.finfo(dtype).min


MIXED_PRECISION_OPTIONS = ("auto", "bf16", "no")


@functools.cache
def _cuda_supports_bf16(index: int | None) -> bool:
    try:  # torch >= 2.3 can tell native bf16 (Ampere and later) from an emulated one
        return th.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return th.cuda.is_bf16_supported()


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """
    Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), with which torch's bf16 matmuls run
    ~3-4x faster than float32 (measured on a 2-core AMD EPYC, docs/benchmarks.md); without them bf16 is emulated and slow.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: do not guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_mixed_precision(device: str | th.device = "auto") -> str:
    """
    The ``mixed_precision`` setting that is fastest on ``device``: ``"bf16"`` on a GPU with native bfloat16 or a CPU
    with bf16 instructions (:func:`cpu_has_fast_bf16`), else ``"no"``. The policy's own ``"auto"`` stays float32 on CPUs.

    :param device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    """
    if str(device) == "auto":
        device = "cuda" if th.cuda.is_available() else "cpu"
    device = th.device(device)
    if device.type == "cuda":
        return "bf16" if _cuda_supports_bf16(device.index) else "no"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "no"


class TransformerLMPolicy(ActorCriticPolicy):
    """
    Actor-critic policy for text envs: the LM's own head is the actor, a scalar value head reads the LM's last
    hidden state (one LM in memory, shared trunk), and a frozen reference (the same weights with the LoRA
    adapters disabled, or a frozen copy) gives the log-probs of the KL penalty.

    During rollouts the policy keeps a KV cache per env (one batched one-token forward per SB3 step).
    With :class:`~sb3_textrl.buffers.TextRolloutBuffer`, training runs one teacher-forced forward per episode
    and the buffer applies the per-token penalty −β·(log π − log π_ref) to the rewards.

    :param observation_space: a :class:`~sb3_textrl.envs.TextObservationSpace` (from a text env)
    :param action_space: ``Discrete(len(tokenizer))``
    :param lr_schedule: learning-rate schedule (from the algorithm)
    :param lm: causal LM name or local path; None: the embedded SmolLM2-135M-Instruct
    :param kl_coef: β of the KL penalty to the reference model (0 turns it off)
    :param target_kl: target mean KL per episode (nats) for an adaptive β; None keeps β fixed
    :param kl_horizon: horizon (tokens) of the adaptive β controller
    :param use_lora: train LoRA adapters (peft) instead of all weights; the reference is then the same model with
        the adapters disabled
    :param lora_config: keyword arguments of ``peft.LoraConfig`` (default: r=16, alpha=32, no dropout, the
        model family's default target modules)
    :param temperature: sampling temperature; PPO's log-probs use the same tempered distribution
    :param top_k: keep only the k most likely tokens (same truncation in rollouts and in training)
    :param top_p: keep the smallest set of tokens whose probability reaches p (nucleus sampling)
    :param use_kv_cache: keep a KV cache across rollout steps (exact; turn off only to compare)
    :param share_prefixes: with SB3's default (per-step) buffer, run one forward per distinct sequence of a minibatch
        instead of one per step: the steps of an episode are prefixes of its longest observation (exact; turn off
        only to compare)
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
        frozen copy of the LM
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
    :param kwargs: further :class:`~stable_baselines3.common.policies.ActorCriticPolicy` arguments
        (``optimizer_class``, ``optimizer_kwargs``, ...); ``net_arch`` and ``ortho_init`` have no effect: there is
        no MLP, and a pretrained LM is never re-initialised
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        lm: str | None = None,
        kl_coef: float = 0.05,
        target_kl: float | None = None,
        kl_horizon: int = 10_000,
        use_lora: bool = True,
        lora_config: dict[str, Any] | None = None,
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
        **kwargs: Any,
    ):
        if not isinstance(action_space, spaces.Discrete):
            raise TypeError(f"TransformerLMPolicy needs a Discrete (vocabulary) action space, got {action_space}")
        if not isinstance(observation_space, spaces.Dict) or {"input_ids", "attention_mask"} - set(observation_space.spaces):
            raise TypeError(
                "TransformerLMPolicy needs Dict observations with 'input_ids' and 'attention_mask' "
                f"(a TextGenerationEnv, see sb3_textrl.register_text_task); got {observation_space}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        if nlpo_top_p is not None and not 0 < nlpo_top_p <= 1:
            raise ValueError(f"nlpo_top_p must be in (0, 1] (e.g. 0.9), or None to turn NLPO masking off; got {nlpo_top_p}")
        if mixed_precision not in MIXED_PRECISION_OPTIONS:
            fp16 = (
                " fp16 autocast needs loss scaling (a GradScaler), which SB3's train loop (optimizer.step()) does not do: "
                "use 'bf16' (GPUs from Ampere on, and CPUs) or 'no'."
                if mixed_precision in ("fp16", "float16", "half")
                else ""
            )
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_OPTIONS}, got {mixed_precision!r}.{fp16}")
        self.mixed_precision = mixed_precision
        self.gradient_checkpointing = gradient_checkpointing
        self.lm_name = lm
        self.kl_coef = kl_coef
        self.target_kl = target_kl
        self.kl_horizon = kl_horizon
        self.use_lora = use_lora
        self.lora_config = dict(lora_config or {})
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.use_kv_cache = use_kv_cache
        self.share_prefixes = share_prefixes
        self.check_tokenizer = check_tokenizer
        self.nlpo_top_p = nlpo_top_p
        if trainable_layers is not None and not use_kv_cache:
            raise ValueError(
                "trainable_layers keeps the lower blocks' output from the rollout's KV cache: it needs use_kv_cache=True "
                "(or pass trainable_layers=None)"
            )
        self.trainable_layers = trainable_layers
        self.critic = critic
        if isinstance(value_warmup_rollouts, bool) or not isinstance(value_warmup_rollouts, int) or value_warmup_rollouts < 0:
            raise ValueError(f"value_warmup_rollouts must be an int >= 0 (0: no warm-up), got {value_warmup_rollouts!r}")
        if value_warmup_rollouts and not critic:
            raise ValueError(
                f"value_warmup_rollouts={value_warmup_rollouts} trains the value head alone, but critic=False has no "
                "trainable value head (advantage='rloo'/'grpo' need none): drop value_warmup_rollouts, or use critic=True"
            )
        self.value_warmup_rollouts = value_warmup_rollouts
        # Set by TextRolloutBuffer when its last step is stored: the next predict_values() is SB3's bootstrap.
        self.bootstrap_after_rollout = False
        self._warned_per_step = False
        # ActorCriticPolicy builds a flatten extractor and calls self._build(); the MLP arguments are unused.
        kwargs["ortho_init"] = False
        kwargs["net_arch"] = []
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    # -- construction -------------------------------------------------------------------------------------
    def _build(self, lr_schedule: Schedule) -> None:
        model = self._load_lm()
        self._check_vocabulary(model)
        self.layer_split = self._make_layer_split(model)
        if self.use_lora:
            model = self._add_lora(model)
        elif self.layer_split is not None:
            self.layer_split.freeze_lower(model)
        self.lm: PreTrainedModel | PeftModel = model
        self.kl_controller = KLController(self.kl_coef, self.target_kl, self.kl_horizon)
        # Without LoRA the reference must be a separate frozen copy of the initial weights.
        self.ref_lm: PreTrainedModel | None = None
        if not self.use_lora and self.kl_controller.enabled:
            self.ref_lm = copy.deepcopy(model).requires_grad_(False).eval()
        self._build_masking_policy()
        if self.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        hidden_size = self._hf_model().get_output_embeddings().weight.shape[1]
        self.value_net = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_net.weight)  # V = 0 at start: the reward scale is unknown
        nn.init.zeros_(self.value_net.bias)
        if not self.critic:  # kept (a zero) so SB3's rollout and loss code run unchanged, but never trained
            self.value_net.requires_grad_(False)
        # Rollouts completed so far (TextRolloutBuffer counts them): a buffer, so model.save/PPO.load keep it.
        self.register_buffer("n_rollouts", th.zeros((), dtype=th.int64))
        self.action_dist = CategoricalDistribution(int(self.action_space.n))
        self._rollout_cache = self._make_rollout_cache()
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]
        self.set_training_mode(False)

    def _load_lm(self) -> PreTrainedModel:
        """The LM to fine-tune (subclasses load other model classes, e.g. encoder-decoders)."""
        return load_causal_lm(self.lm_name)

    def _make_rollout_cache(self) -> RolloutKVCache:
        """The cache that keeps every env's context across rollout steps."""
        return RolloutKVCache(self._cached_trunk)

    def _lora_kwargs(self, model: PreTrainedModel) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        if model.config.model_type == "gpt2":
            kwargs["fan_in_fan_out"] = True  # GPT-2 stores its projections as Conv1D (in, out)
        kwargs.update(self.lora_config)
        return kwargs

    def _make_layer_split(self, model: PreTrainedModel) -> LayerSplit | None:
        """The frozen/trainable split of ``trainable_layers`` (None: every layer trains, nothing to cache)."""
        if self.trainable_layers is None:
            return None
        split = LayerSplit(model, self.trainable_layers)
        return split if split.first_trainable > 0 else None

    def _add_lora(self, model: PreTrainedModel) -> PeftModel:
        """Wrap the LM with LoRA adapters (only in the trainable top blocks with ``trainable_layers``)."""
        kwargs = self._lora_kwargs(model)
        split = self.layer_split
        if split is not None:
            kwargs.update(layers_to_transform=split.trainable_indices, layers_pattern=split.pattern)
        with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            try:
                peft_model = get_peft_model(model, LoraConfig(**kwargs))
            except ValueError as err:
                if split is not None and isinstance(kwargs.get("target_modules"), str):
                    raise ValueError(
                        f"LoRA target_modules {kwargs['target_modules']!r} is a regular expression, which peft cannot "
                        f"restrict to the top {split.n_trainable} blocks of trainable_layers: give target_modules as a "
                        "list of module names (e.g. ['q_proj', 'v_proj'])"
                    ) from err
                if split is None or "not found" not in str(err):
                    raise
                raise ValueError(
                    f"LoRA target_modules {kwargs.get('target_modules')!r} select no module in the top "
                    f"{split.n_trainable} blocks (blocks {split.first_trainable}-{split.n_blocks - 1} of "
                    f"'{split.blocks_name}') of {type(model).__name__}: name modules of those blocks in "
                    "lora_config=dict(target_modules=[...]), e.g. the attention projections"
                ) from err
        if split is not None:
            names = [name for name, p in peft_model.named_parameters() if p.requires_grad]
            lower = sorted({i for i in map(split.lower_block_of, names) if i is not None})
            if lower:  # a regex target_modules ignores layers_to_transform: the frozen blocks would change
                raise ValueError(
                    f"LoRA target_modules {kwargs.get('target_modules')!r} put adapters in the frozen blocks {lower[:5]} "
                    f"(trainable_layers={split.n_trainable} trains blocks {split.first_trainable}-{split.n_blocks - 1}): "
                    "give target_modules as a list of module names, which trainable_layers restricts to the top blocks"
                )
        return peft_model

    def _check_vocabulary(self, model: PreTrainedModel) -> None:
        n_actions = int(self.action_space.n)
        lm_vocab = model.get_output_embeddings().weight.shape[0]
        space = self.observation_space
        env_tokenizer = getattr(space, "tokenizer_name", "?")
        hint = (
            "The env's tokenizer must be the LM's: pass the same name or path to both, e.g. "
            "make_vec_env(task, env_kwargs=dict(tokenizer=LM)) and policy_kwargs=dict(lm=LM)."
        )
        if n_actions > lm_vocab:
            raise ValueError(
                f"The env's tokenizer ({env_tokenizer}) has {n_actions} tokens but the LM ({self.lm_name or 'embedded'}) "
                f"only {lm_vocab} output logits. {hint}"
            )
        if self.check_tokenizer and isinstance(space, TextObservationSpace) and space.tokenizer_hash:
            lm_tokenizer = load_tokenizer(self.lm_name)
            lm_hash = tokenizer_fingerprint(lm_tokenizer)
            if lm_hash != space.tokenizer_hash:
                raise ValueError(
                    f"The env's tokenizer ({env_tokenizer}, {n_actions} tokens) is not the LM's "
                    f"({self.lm_name or 'embedded'}, {len(lm_tokenizer)} tokens): the token ids would mean different "
                    f"things. {hint} (check_tokenizer=False skips this check.)"
                )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                lm=self.lm_name,
                kl_coef=self.kl_coef,
                target_kl=self.target_kl,
                kl_horizon=self.kl_horizon,
                use_lora=self.use_lora,
                lora_config=self.lora_config,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                use_kv_cache=self.use_kv_cache,
                share_prefixes=self.share_prefixes,
                check_tokenizer=self.check_tokenizer,
                mixed_precision=self.mixed_precision,
                gradient_checkpointing=self.gradient_checkpointing,
                nlpo_top_p=self.nlpo_top_p,
                trainable_layers=self.trainable_layers,
                critic=self.critic,
                value_warmup_rollouts=self.value_warmup_rollouts,
            )
        )
        return data

    # -- memory and precision ----------------------------------------------------------------------------
    def _enable_gradient_checkpointing(self) -> None:
        model = self._hf_model()
        if not model.supports_gradient_checkpointing:
            raise ValueError(
                f"{type(model).__name__} does not support gradient checkpointing: pass gradient_checkpointing=False."
            )
        # Non-reentrant checkpointing: LoRA's frozen inputs need no requires_grad, and no-grad rollouts skip it.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # HF checkpoints a layer only while ``layer.training``; the LM stays in eval mode (no dropout), so
        # set_training_mode() flips that flag on the checkpointed modules alone.
        self._checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]

    def autocast_dtype(self) -> th.dtype | None:
        """The dtype LM forwards autocast to on the policy's current device, or None for float32."""
        device = self.device
        if self.mixed_precision == "bf16":
            if device.type == "cuda" and not _cuda_supports_bf16(device.index):
                raise RuntimeError(
                    f"mixed_precision='bf16' but {th.cuda.get_device_name(device)} has no native bfloat16: "
                    "use mixed_precision='no' (or 'auto') on this GPU."
                )
            return th.bfloat16
        if self.mixed_precision == "auto" and device.type == "cuda" and _cuda_supports_bf16(device.index):
            return th.bfloat16
        return None

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return th.autocast(device_type=self.device.type, dtype=dtype)

    # -- the LM and its reference -----------------------------------------------------------------------
    def _hf_model(self) -> PreTrainedModel:
        return self.lm.get_base_model() if isinstance(self.lm, PeftModel) else self.lm

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

    def _trunk(
        self,
        model: PreTrainedModel,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        position_ids: th.Tensor,
        past: DynamicCache | None = None,
        use_cache: bool = False,
    ) -> tuple[th.Tensor, DynamicCache | None]:
        """Run the LM without its head: (B, S) tokens -> (B, S, H) final hidden states."""
        trunk = model.base_model
        with self._autocast():
            out = trunk(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{_cache_kwarg(type(trunk)): past},
            )
        if not use_cache:
            return out.last_hidden_state, None
        return out.last_hidden_state, out["cache"] if "cache" in out else out["past_key_values"]

    def _cached_trunk(
        self, input_ids: th.Tensor, attention_mask: th.Tensor, position_ids: th.Tensor, past: DynamicCache | None
    ) -> tuple[th.Tensor, DynamicCache, th.Tensor | None]:
        """The rollout cache's trunk; with ``trainable_layers`` it also keeps the hidden state entering the top blocks."""
        model = self._hf_model()
        if self.layer_split is None:
            hidden, past = self._trunk(model, input_ids, attention_mask, position_ids, past, use_cache=True)
            assert past is not None
            return hidden, past, None
        with self.layer_split.capture(model) as captured:
            hidden, past = self._trunk(model, input_ids, attention_mask, position_ids, past, use_cache=True)
        assert past is not None
        return hidden, past, captured[-1]

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
        with split.capture(model) as captured:
            self._trunk(model, input_ids[rows], mask, positions_from_mask(mask))
        recomputed = captured[-1] * mask.unsqueeze(-1)
        if kept is None:
            return recomputed
        features = kept[0]
        features[rows] = recomputed.to(features.dtype)
        return features

    def _logits(self, model: PreTrainedModel, hidden: th.Tensor) -> th.Tensor:
        """LM head on selected hidden states, restricted to the env's vocabulary: (N, H) -> (N, V) float32."""
        with self._autocast():  # the (N, H) x (H, V) head is the largest matmul of a small LM
            logits = model.get_output_embeddings()(hidden)[..., : self.action_space.n].float()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:  # Gemma-2 style models squash their logits
            logits = th.tanh(logits / softcap) * softcap
        return logits

    def _process_logits(self, logits: th.Tensor, allowed: th.Tensor | None = None) -> th.Tensor:
        """
        The sampling distribution's logits: temperature, then the NLPO mask, then top-k / top-p truncation (which so
        choose among the allowed tokens). (N, V) logits and (N, V) bool allowed tokens -> (N, V)
        """
        if self.temperature != 1.0:
            logits = logits / self.temperature
        fill = _masked_fill_value(logits.dtype)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, fill)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth_best = th.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth_best, fill)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = th.sort(logits, dim=-1, descending=True)
            probs = th.softmax(sorted_logits, dim=-1)
            # Drop a token when the tokens before it already reach top_p (the most likely one always stays).
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.top_p
            drop = th.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, fill)
        return logits

    def _distribution(self, logits: th.Tensor, allowed: th.Tensor | None = None) -> CategoricalDistribution:
        return self.action_dist.proba_distribution(action_logits=self._process_logits(logits, allowed))

    def _value(self, hidden: th.Tensor) -> th.Tensor:
        with th.autocast(device_type=hidden.device.type, enabled=False):  # values stay float32 under mixed precision
            return self.value_net(hidden.to(self.value_net.weight.dtype))

    # -- rollout: next-token outputs ------------------------------------------------------------------------
    @staticmethod
    def _tokens(obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
        assert isinstance(obs, dict)
        return obs["input_ids"].long(), obs["attention_mask"].long()

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
        attach_rollout_extras(log_prob, policy=self, nlpo_allowed=allowed if self.nlpo_top_p is not None else None)
        return actions, self._value(hidden), log_prob

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        return self._next_token_distribution(obs)

    def _next_token_distribution(self, obs: PyTorchObs, action_masks: Any = None) -> Distribution:
        self._refuse_segments(obs, "get_distribution")
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
        self._refuse_segments(obs, "predict_values")
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

    @staticmethod
    def _refuse_segments(obs: PyTorchObs, method: str) -> None:
        # Some learners (sb3-contrib's TRPO) read training batches through get_distribution()/predict_values(); with
        # TextRolloutBuffer those batches are whole episode segments, which only evaluate_actions() understands.
        if isinstance(obs, dict) and SEGMENT_LENGTHS in obs:
            raise NotImplementedError(
                f"{method}() got a training batch of whole-episode segments (TextRolloutBuffer): this learner (e.g. "
                "sb3_contrib.TRPO) reads training batches through get_distribution()/predict_values() instead of "
                "evaluate_actions(), which the text policies do not support. Train with PPO, A2C or MaskablePPO "
                "(see docs/algorithms.md)."
            )

    # -- training ---------------------------------------------------------------------------------------------
    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """
        Values, log-probs and entropies of the given actions, with gradients.

        With TextRolloutBuffer the observations are whole episode segments (one forward per segment);
        with SB3's default buffer they are single steps (one forward per step, much slower).
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
            if self.nlpo_top_p is not None and allowed is not None and NLPO_ALLOWED not in obs:
                # NLPO sets recomputed by another forward than the rollout's: the taken action was allowed then.
                allowed[th.arange(len(actions), device=allowed.device), actions.long().flatten()] = True
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
        # Normalised exactly as torch's Categorical does for the policy (log_softmax differs by ~1e-5 in float32),
        # so that an untuned policy's KL to the reference is exactly 0.
        log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
        return log_probs.gather(1, actions.long().view(-1, 1)).squeeze(1)

    def _segment_hidden(self, model: PreTrainedModel, obs: dict[str, th.Tensor]) -> th.Tensor:
        """(N, H) hidden states that predict each action, one teacher-forced forward per segment."""
        ids, mask = self._tokens(obs)
        starts, lengths = obs[SEGMENT_STARTS].long(), obs[SEGMENT_LENGTHS].long()
        # Crop the columns no segment uses: left padding shared by all rows, right padding after the last action.
        used = mask.any(dim=0)
        first = int(used.float().argmax().item())
        end = int((starts + lengths).max().item())
        ids, mask = ids[:, first:end], mask[:, first:end]
        if SPLIT_HIDDEN in obs and self.layer_split is not None:  # only the top blocks, from the rollout's hidden states
            with self.layer_split.from_split(model, obs[SPLIT_HIDDEN][:, first:end]):
                hidden, _ = self._trunk(model, ids, mask, positions_from_mask(mask))  # (S, W, H)
        else:
            hidden, _ = self._trunk(model, ids, mask, positions_from_mask(mask))  # (S, W, H)
        rows = th.repeat_interleave(th.arange(len(lengths), device=ids.device), lengths)  # (N,)
        offsets = th.arange(int(lengths.sum().item()), device=ids.device) - th.repeat_interleave(
            lengths.cumsum(0) - lengths, lengths
        )
        columns = th.repeat_interleave(starts - first, lengths) + offsets
        return hidden[rows, columns]

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

    # -- NLPO masking (sb3_textrl.nlpo) -------------------------------------------------------------------------
    def _build_masking_policy(self) -> None:
        """The NLPO masking policy: a frozen second LoRA adapter, or without LoRA a frozen copy of the LM."""
        self.mask_lm: PreTrainedModel | None = None
        self._mask_cache = RolloutKVCache(self._cached_masking_trunk)  # the masking policy's own rollout cache
        if self.nlpo_top_p is None:
            return
        if isinstance(self.lm, PeftModel):
            active = self.lm.active_adapter
            self.lm.add_adapter(NLPO_ADAPTER, copy.deepcopy(self.lm.peft_config[active]))
            self.lm.set_adapter(active)  # the trained adapter stays active and trainable, the new one frozen
            self.refresh_masking_policy()
        else:
            self.mask_lm = copy.deepcopy(self.lm).requires_grad_(False).eval()

    @th.no_grad()
    def refresh_masking_policy(self) -> None:
        """Copy the policy's current weights into the NLPO masking policy (what NLPOMaskRefresh calls)."""
        if self.nlpo_top_p is None:
            raise ValueError("This policy has no NLPO masking policy: build it with policy_kwargs=dict(nlpo_top_p=0.9).")
        if self.mask_lm is not None:
            self.mask_lm.load_state_dict(self.lm.state_dict())
        else:
            assert isinstance(self.lm, PeftModel)
            params = dict(self.lm.named_parameters())
            mask_key, policy_key = f".{NLPO_ADAPTER}.", f".{self.lm.active_adapter}."
            for name, param in params.items():
                if mask_key in name:
                    param.copy_(params[name.replace(mask_key, policy_key)])
        self._mask_cache.reset()

    @contextlib.contextmanager
    def masking_model(self) -> Iterator[PreTrainedModel]:
        """Context in which the returned model is the frozen NLPO masking policy."""
        if self.mask_lm is not None:
            yield self.mask_lm
            return
        if not isinstance(self.lm, PeftModel) or NLPO_ADAPTER not in self.lm.peft_config:
            raise RuntimeError("This policy has no NLPO masking policy (nlpo_top_p=None)")
        active = self.lm.active_adapter
        self.lm.set_adapter(NLPO_ADAPTER, inference_mode=True)
        try:
            yield self._hf_model()
        finally:
            self.lm.set_adapter(active)  # also gives the trained adapter its requires_grad back

    def _cached_masking_trunk(
        self, input_ids: th.Tensor, attention_mask: th.Tensor, position_ids: th.Tensor, past: DynamicCache | None
    ) -> tuple[th.Tensor, DynamicCache, None]:
        model = self.mask_lm if self.mask_lm is not None else self._hf_model()  # called inside masking_model()
        hidden, past = self._trunk(model, input_ids, attention_mask, position_ids, past, use_cache=True)
        assert past is not None
        return hidden, past, None

    @th.no_grad()
    def nlpo_allowed(self, obs: PyTorchObs, action_masks: Any = None, rollout: bool = False) -> th.Tensor | None:
        """
        NLPO: the tokens each step may take, (N, V) bool, or None without NLPO masking.

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
        if self.nlpo_top_p is None:
            return None
        assert isinstance(obs, dict)
        if NLPO_ALLOWED in obs:
            return obs[NLPO_ALLOWED].bool()
        with self.masking_model() as model:
            if SEGMENT_LENGTHS in obs:
                hidden = self._segment_hidden(model, obs)
            elif rollout and self.use_kv_cache:
                hidden = self._mask_cache.step(*self._tokens(obs))
            else:
                hidden = self._last_hidden_per_step(obs, model)
            logits = self._logits(model, hidden)
        env_mask = None
        if action_masks is not None:
            env_mask = th.as_tensor(action_masks, device=logits.device).reshape(logits.shape).bool()
        return top_p_allowed(logits, self.nlpo_top_p, env_mask)

    def _warn_per_step(self) -> None:
        if self._warned_per_step:
            return
        self._warned_per_step = True
        penalty = (
            f" The KL penalty to the reference (kl_coef={self.kl_controller.value:g}) is applied by TextRolloutBuffer "
            "only: with this buffer it is NOT applied."
            if self.kl_controller.enabled
            else ""
        )
        warnings.warn(
            "TransformerLMPolicy is being trained with SB3's default rollout buffer, which re-encodes the whole "
            f"context for every single token. TextRolloutBuffer was {GROUPED_SPEEDUP} faster end to end in "
            "benchmarks/ppo_throughput.py (one forward "
            "per episode): PPO(TransformerLMPolicy, env, rollout_buffer_class=sb3_textrl.TextRolloutBuffer, ...)."
            + penalty,
            stacklevel=3,
        )

    # -- mode and state ---------------------------------------------------------------------------------------
    def set_training_mode(self, mode: bool) -> None:
        """Dropout stays off (PPO's ratio needs the rollout distribution); training invalidates the KV cache."""
        super().set_training_mode(mode)
        self.lm.eval()
        for module in getattr(self, "_checkpointed", []):
            module.training = mode  # only these flags: checkpointing in training, never dropout
        if mode:
            self._rollout_cache.reset()

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._rollout_cache.reset()
        self._mask_cache.reset()
        if "n_rollouts" not in state_dict:  # saved before the rollout count existed: keep the current count
            metadata = getattr(state_dict, "_metadata", None)
            state_dict = collections.OrderedDict(state_dict, n_rollouts=self.n_rollouts.clone())
            if metadata is not None:
                state_dict._metadata = metadata  # type: ignore[attr-defined]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
