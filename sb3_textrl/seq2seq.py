"""Seq2SeqLMPolicy: TransformerLMPolicy for encoder-decoder LMs (T5 family): the prompt goes through the encoder.

A text env's observation holds the prompt, left-padded into its first ``max_prompt_tokens`` columns, and the
tokens generated so far after it. Here the prompt columns are the encoder's input and the decoder reads
``decoder_start_token_id`` followed by the generated tokens; an action is the decoder's next token. Everything
else (the value head on the last hidden state, LoRA with the reference = adapters disabled, TextRolloutBuffer
and its KL penalty, save/load) is TransformerLMPolicy's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from sb3_textrl.common.kv_cache import last_valid_index, right_align
from sb3_textrl.common.segments import SEGMENT_LENGTHS, SEGMENT_STARTS, action_hidden
from sb3_textrl.lm.forward import run_with_cache
from sb3_textrl.models import load_seq2seq_lm
from sb3_textrl.policies import TransformerLMPolicy

if TYPE_CHECKING:
    from transformers.cache_utils import CacheLayerMixin

# Decoders whose self-attention bias depends only on the distance between tokens: left padding a decoder row (as
# the rollout cache does to batch envs at different steps) leaves their outputs unchanged. Absolute position
# embeddings (BART, Pegasus, ...) would shift.
RELATIVE_POSITION_DECODERS = frozenset({"t5", "mt5", "umt5"})

# (decoder ids (B, S), decoder mask (B, past + S), encoder hidden (B, E, H), encoder mask (B, E), past)
#   -> (decoder hidden (B, S, H), new past)
DecodeFn = Callable[
    [th.Tensor, th.Tensor, th.Tensor, th.Tensor, EncoderDecoderCache], tuple[th.Tensor, EncoderDecoderCache]
]
EncodeFn = Callable[[th.Tensor, th.Tensor], th.Tensor]  # (ids (B, E), mask (B, E)) -> hidden (B, E, H)


def decoder_inputs(input_ids: th.Tensor, attention_mask: th.Tensor, prompt_width: int, start_token_id: int, width: int):
    """
    The decoder's input of text observations: ``decoder_start_token_id`` then the generated tokens (left-aligned).

    :param input_ids: (B, L) observation token ids
    :param attention_mask: (B, L) observation mask
    :param prompt_width: columns of the prompt region (``max_prompt_tokens``)
    :param start_token_id: the model's ``decoder_start_token_id``
    :param width: decoder columns to return (1 + generated columns kept)
    :return: decoder ids (B, width) and mask (B, width)
    """
    generated = slice(prompt_width, prompt_width + width - 1)
    start = th.full_like(input_ids[:, :1], start_token_id)
    ids = th.cat([start, input_ids[:, generated] * attention_mask[:, generated]], dim=1)
    mask = th.cat([th.ones_like(start), attention_mask[:, generated]], dim=1)
    return ids, mask


def _crop_left(ids: th.Tensor, mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Drop the leading columns that are padding in every row (left-padded prompts)."""
    first = int(mask.any(dim=0).float().argmax().item())
    return ids[:, first:], mask[:, first:]


def _left_pad(tensor: th.Tensor, width: int, dim: int) -> th.Tensor:
    """Zeros in front of ``tensor`` along ``dim`` up to ``width``."""
    shape = list(tensor.shape)
    shape[dim] = width - tensor.shape[dim]
    return th.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _splice(old: th.Tensor, new: th.Tensor, rows: th.Tensor, dim: int) -> th.Tensor:
    """Right-aligned tensors: ``old`` with its ``rows`` replaced by ``new``, both left-padded to the wider on ``dim``."""
    width = max(old.shape[dim], new.shape[dim])
    merged = _left_pad(old, width, dim)
    merged[rows] = _left_pad(new, width, dim)
    return merged


def _attention_layers(cache: DynamicCache) -> list[CacheLayerMixin]:
    """The layers of a T5 decoder's self- or cross-attention cache (transformers types them as any kind of layer)."""
    return cast("list[CacheLayerMixin]", cache.layers)


def _key_values(layer: CacheLayerMixin) -> tuple[th.Tensor, th.Tensor]:
    """A cache layer's keys and values, (B, heads, T, head dim), as a decoder forward filled them."""
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _splice_layers(old: list[CacheLayerMixin], new: list[CacheLayerMixin], rows: th.Tensor) -> None:
    """:func:`_splice` on the keys and values of every layer: ``old``'s ``rows`` replaced by ``new``."""
    for old_layer, new_layer in zip(old, new):
        (old_keys, old_values), (new_keys, new_values) = _key_values(old_layer), _key_values(new_layer)
        old_layer.keys, old_layer.values = _splice(old_keys, new_keys, rows, 2), _splice(old_values, new_values, rows, 2)


class Seq2SeqRolloutCache:
    """
    Per-env cache of an encoder-decoder LM across rollout steps: each env's prompt is encoded once per episode,
    and the decoder's self-attention and cross-attention keys are kept, so a step is one batched one-token
    decoder forward for all envs.

    Rows are right-aligned as in :class:`~sb3_textrl.common.kv_cache.RolloutKVCache` (envs are at different
    steps of their episodes); that is exact for decoders with relative position bias (T5). Like RolloutKVCache
    it compares each observation with the one a row holds, so stale keys are never served.

    :param encode: runs the encoder
    :param decode: runs the decoder with a past cache
    :param prompt_width: columns of the prompt region of an observation
    :param start_token_id: the decoder's start token
    """

    def __init__(self, encode: EncodeFn, decode: DecodeFn, prompt_width: int, start_token_id: int):
        self.encode = encode
        self.decode = decode
        self.prompt_width = prompt_width
        self.start_token_id = start_token_id
        self.reset()

    def reset(self) -> None:
        """Forget everything (after a parameter update, a device move or a change in the number of envs)."""
        self.self_attention: DynamicCache | None = None  # decoder keys of every row's tokens but the last
        self.cross_attention: DynamicCache | None = None  # cross-attention keys of every row's prompt
        self.mask: th.Tensor | None = None  # (B, C) valid columns of the self-attention cache, right-aligned
        self.encoder_hidden: th.Tensor | None = None  # (B, E, H) encoder output, right-aligned like the prompts
        self.encoder_mask: th.Tensor | None = None  # (B, E)
        self.tokens: th.Tensor | None = None  # (B, L) the observation each row holds
        self.token_mask: th.Tensor | None = None  # (B, L) its attention mask
        self.last_hidden: th.Tensor | None = None  # (B, H) decoder hidden state of each row's last token

    @th.no_grad()
    def step(self, input_ids: th.Tensor, attention_mask: th.Tensor) -> th.Tensor:
        """
        Decoder hidden state that predicts the next token of every observation.

        :param input_ids: (B, L) observation token ids
        :param attention_mask: (B, L) 0/1 mask
        :return: (B, H) final decoder hidden state at each row's last decoder token
        """
        ids = input_ids * attention_mask
        if self.tokens is not None and (self.tokens.shape != ids.shape or self.tokens.device != ids.device):
            self.reset()
        if self.tokens is None:
            rebuild = th.ones(ids.shape[0], dtype=th.bool, device=ids.device)
        else:
            assert self.token_mask is not None  # held with self.tokens
            if th.equal(ids, self.tokens) and th.equal(attention_mask, self.token_mask):
                assert self.last_hidden is not None
                return self.last_hidden
            rebuild = ~self._extends_by_one(ids, attention_mask)
        if bool(rebuild.any()):
            self._prefill(ids[rebuild], attention_mask[rebuild], rebuild)
        # Every row now holds all of its decoder input but the last token: feed that token to all rows at once.
        decoder_ids, decoder_mask = self._decoder_rows(ids, attention_mask)
        last_token = th.gather(decoder_ids, 1, last_valid_index(decoder_mask).unsqueeze(1))  # (B, 1)
        assert self.mask is not None and self.encoder_hidden is not None and self.encoder_mask is not None
        step_mask = th.cat([self.mask, th.ones_like(last_token)], dim=1)
        assert self.self_attention is not None and self.cross_attention is not None
        past = EncoderDecoderCache(self.self_attention, self.cross_attention)
        hidden, past = self.decode(last_token, step_mask, self.encoder_hidden, self.encoder_mask, past)
        self.self_attention = past.self_attention_cache
        self.mask = step_mask
        self.tokens, self.token_mask = ids.clone(), attention_mask.clone()
        self.last_hidden = hidden[:, -1]
        return self.last_hidden

    def _decoder_rows(self, ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        width = ids.shape[1] - self.prompt_width + 1
        return decoder_inputs(ids, attention_mask, self.prompt_width, self.start_token_id, width)

    def _extends_by_one(self, ids: th.Tensor, attention_mask: th.Tensor) -> th.Tensor:
        """Rows whose observation is the held one plus exactly one new (generated) token."""
        assert self.tokens is not None and self.token_mask is not None
        last = last_valid_index(attention_mask).unsqueeze(1)
        previous_ids = ids.scatter(1, last, 0)
        previous_mask = attention_mask.scatter(1, last, 0)
        generated = last.squeeze(1) >= self.prompt_width  # a prompt token is never the step's new token
        same = (previous_ids == self.tokens).all(dim=1) & (previous_mask == self.token_mask).all(dim=1)
        return same & generated

    def _prefill(self, ids: th.Tensor, attention_mask: th.Tensor, rows: th.Tensor) -> None:
        """Encode the given rows' prompts and run their decoder inputs; splice the keys into the batch caches."""
        prompt_ids, prompt_mask = _crop_left(ids[:, : self.prompt_width], attention_mask[:, : self.prompt_width])
        encoder_hidden = self.encode(prompt_ids, prompt_mask)  # (R, E, H)
        decoder_ids, decoder_mask = right_align(*self._decoder_rows(ids, attention_mask))  # (R, W)
        fresh = EncoderDecoderCache(DynamicCache(), DynamicCache())
        _, fresh = self.decode(decoder_ids, decoder_mask, encoder_hidden, prompt_mask, fresh)
        # The step feeds each row's last decoder token again: keep the self-attention keys of the others only.
        keep = decoder_mask[:, :-1]
        valid = keep.bool()[:, None, :, None]
        self_layers = _attention_layers(fresh.self_attention_cache)
        cross_layers = _attention_layers(fresh.cross_attention_cache)
        for layer in self_layers:
            keys, values = _key_values(layer)
            # A row that is all padding so far may hold NaN keys; masked keys must be finite.
            layer.keys, layer.values = th.where(valid, keys[:, :, :-1], 0.0), th.where(valid, values[:, :, :-1], 0.0)
        if self.mask is None or bool(rows.all()):
            self.self_attention, self.cross_attention = fresh.self_attention_cache, fresh.cross_attention_cache
            self.mask, self.encoder_hidden, self.encoder_mask = keep, encoder_hidden, prompt_mask
            return
        assert self.self_attention is not None and self.cross_attention is not None
        assert self.encoder_hidden is not None and self.encoder_mask is not None
        _splice_layers(_attention_layers(self.self_attention), self_layers, rows)
        _splice_layers(_attention_layers(self.cross_attention), cross_layers, rows)
        self.mask = _splice(self.mask, keep, rows, 1)
        self.encoder_hidden = _splice(self.encoder_hidden, encoder_hidden, rows, 1)
        self.encoder_mask = _splice(self.encoder_mask, prompt_mask, rows, 1)
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns no row uses any more (an env with a long prompt or context started a new episode)."""
        assert self.mask is not None and self.encoder_mask is not None
        assert self.self_attention is not None and self.cross_attention is not None and self.encoder_hidden is not None
        first = int(self.mask.any(dim=0).float().argmax().item()) if self.mask.shape[1] else 0
        if first:
            self.mask = self.mask[:, first:]
            for layer in _attention_layers(self.self_attention):
                keys, values = _key_values(layer)
                layer.keys, layer.values = keys[:, :, first:], values[:, :, first:]
        first = int(self.encoder_mask.any(dim=0).float().argmax().item())
        if first:
            self.encoder_mask, self.encoder_hidden = self.encoder_mask[:, first:], self.encoder_hidden[:, first:]
            for layer in _attention_layers(self.cross_attention):
                keys, values = _key_values(layer)
                layer.keys, layer.values = keys[:, :, first:], values[:, :, first:]


class Seq2SeqLMPolicy(TransformerLMPolicy):
    """
    Actor-critic policy for text envs whose LM is an encoder-decoder (T5 family, ``AutoModelForSeq2SeqLM``).

    The prompt columns of an observation are the encoder's input; the decoder reads ``decoder_start_token_id``
    and the generated tokens, and its next-token distribution is the actor. During rollouts each env's prompt is
    encoded once per episode and the decoder's self- and cross-attention keys are cached (one batched one-token
    decoder forward per SB3 step). With :class:`~sb3_textrl.buffers.TextRolloutBuffer`, training runs one
    encoder and one teacher-forced decoder forward per episode segment; a segment that starts mid-episode (at a
    rollout boundary) has its earlier tokens as the decoder's prefix. The value head reads the decoder's last
    hidden state; the reference of the KL penalty is the same model with the LoRA adapters disabled (default
    target modules of the family, ``q`` and ``v`` for T5, in encoder and decoder).

    It takes :class:`~sb3_textrl.policies.TransformerLMPolicy`'s arguments, with ``lm`` a sequence-to-sequence
    LM's local path or hub name (required: there is no embedded default). The env must use the LM's tokenizer.
    ``share_prefixes`` has no effect: with SB3's default buffer every step is its own forward.

    :param observation_space: a :class:`~sb3_textrl.envs.TextObservationSpace` (its ``max_prompt_tokens`` tells
        where the prompt ends)
    :param action_space: ``Discrete(len(tokenizer))``
    :param lr_schedule: learning-rate schedule (from the algorithm)
    :param lm: encoder-decoder LM name or local path (e.g. a T5 checkpoint)
    :param kwargs: further :class:`~sb3_textrl.policies.TransformerLMPolicy` arguments (``kl_coef``, ``use_lora``,
        ``lora_config``, ``temperature``, ``top_k``, ``top_p``, ``use_kv_cache``, ...)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        lm: str | None = None,
        **kwargs: Any,
    ):
        if lm is None:
            raise ValueError(
                "Seq2SeqLMPolicy needs an encoder-decoder LM: pass policy_kwargs=dict(lm=PATH_OR_NAME) with a T5-family "
                "model (the embedded default LM is a causal LM: use TransformerLMPolicy for it)."
            )
        prompt_width = getattr(observation_space, "max_prompt_tokens", None)
        if prompt_width is None:
            raise TypeError(
                "Seq2SeqLMPolicy needs a TextObservationSpace (from a TextGenerationEnv, see "
                f"sb3_textrl.register_text_task) to know which columns hold the prompt; got {observation_space}"
            )
        if kwargs.get("trainable_layers") is not None:
            raise ValueError(
                "Seq2SeqLMPolicy does not support trainable_layers yet (the cached lower-block activations are built "
                "for causal LMs' decoder blocks): pass trainable_layers=None, or use_lora=True to keep updates small"
            )
        if kwargs.get("nlpo_top_p") is not None:
            raise ValueError(
                "Seq2SeqLMPolicy does not support nlpo_top_p yet: NLPO's masking policy scores observations with the "
                "causal-LM forwards (one decoder-only pass over prompt and completion, and a decoder-only KV cache), "
                "which an encoder-decoder LM cannot run. Pass nlpo_top_p=None, or use TransformerLMPolicy with a "
                "causal LM for NLPO masking."
            )
        self.prompt_width = int(prompt_width)
        super().__init__(observation_space, action_space, lr_schedule, lm=lm, **kwargs)

    # -- construction -------------------------------------------------------------------------------------
    def _load_lm(self) -> PreTrainedModel:
        assert self.lm_name is not None  # __init__ refuses None
        model = load_seq2seq_lm(self.lm_name)
        model_type = model.config.model_type
        if self.use_kv_cache and model_type not in RELATIVE_POSITION_DECODERS:
            raise ValueError(
                f"The rollout cache of Seq2SeqLMPolicy left-pads decoder rows, which is exact only for decoders with "
                f"relative position bias ({', '.join(sorted(RELATIVE_POSITION_DECODERS))}); {self.lm_name!r} is "
                f"{model_type!r}. Pass policy_kwargs=dict(use_kv_cache=False) (one full forward per step)."
            )
        start = model.config.decoder_start_token_id
        if start is None:
            raise ValueError(
                f"{self.lm_name!r} has no decoder_start_token_id in its config: set model.config.decoder_start_token_id "
                "(T5 uses its pad id) and save the model again."
            )
        self.decoder_start_token_id = int(start)
        return model

    def _make_rollout_cache(self) -> Seq2SeqRolloutCache:  # type: ignore[override]
        def encode(ids: th.Tensor, mask: th.Tensor) -> th.Tensor:
            return self._encode(self._hf_model(), ids, mask)

        def decode(
            ids: th.Tensor, mask: th.Tensor, encoder_hidden: th.Tensor, encoder_mask: th.Tensor, past: EncoderDecoderCache
        ) -> tuple[th.Tensor, EncoderDecoderCache]:
            hidden, new_past = self._decode(self._hf_model(), ids, mask, encoder_hidden, encoder_mask, past)
            assert new_past is not None  # given a past, the decoder returns the updated one
            return hidden, new_past

        return Seq2SeqRolloutCache(encode, decode, self.prompt_width, self.decoder_start_token_id)

    def _lora_kwargs(self, model: PreTrainedModel) -> dict[str, Any]:
        return super()._lora_kwargs(model) | dict(task_type="SEQ_2_SEQ_LM") | self.lora_config

    def called_modules(self) -> list[nn.Module]:
        """The encoder, the decoder, the output head and the value head (see ``TransformerLMPolicy.called_modules``)."""
        model = self._hf_model()
        return [model.get_encoder(), model.get_decoder(), model.get_output_embeddings(), self.value_net]

    # -- encoder, decoder, head ---------------------------------------------------------------------------------
    def _encode(self, model: PreTrainedModel, ids: th.Tensor, mask: th.Tensor) -> th.Tensor:
        """Encoder: (B, E) prompt tokens -> (B, E, H) hidden states."""
        with self._autocast(model.get_encoder()):
            return model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    def _decode(
        self,
        model: PreTrainedModel,
        ids: th.Tensor,
        mask: th.Tensor,
        encoder_hidden: th.Tensor,
        encoder_mask: th.Tensor,
        past: EncoderDecoderCache | None = None,
    ) -> tuple[th.Tensor, EncoderDecoderCache | None]:
        """Decoder: (B, S) tokens (mask (B, past + S)) -> (B, S, H) final hidden states, and the updated cache."""
        inputs = dict(input_ids=ids, attention_mask=mask)
        inputs |= dict(encoder_hidden_states=encoder_hidden, encoder_attention_mask=encoder_mask)
        with self._autocast(model.get_decoder()):
            return run_with_cache(model.get_decoder(), past, past is not None, **inputs)

    def _logits(self, model: PreTrainedModel, hidden: th.Tensor) -> th.Tensor:
        """The model's own head on decoder hidden states: (N, H) -> (N, V) float32 over the env's vocabulary."""
        config = model.config
        # T5 with tied embeddings rescales the decoder output before its head (scale_decoder_outputs in transformers 5).
        if getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False)):
            hidden = hidden * config.d_model**-0.5
        logits = super()._logits(model, hidden)
        bias = getattr(model, "final_logits_bias", None)  # BART-style heads add a bias
        if isinstance(bias, th.Tensor):
            logits = logits + bias[..., : logits.shape[-1]].float()
        return logits

    # -- hidden states that predict actions ------------------------------------------------------------------
    def _segment_hidden(self, model: PreTrainedModel, obs: dict[str, th.Tensor]) -> th.Tensor:
        """(N, H) decoder hidden states that predict each action: one encoder and one decoder forward per segment."""
        ids, mask = self._tokens(obs)
        starts, lengths = obs[SEGMENT_STARTS].long(), obs[SEGMENT_LENGTHS].long()
        # A segment's first action is predicted by the decoder input before it: the start token (column 0) for a
        # segment that starts its episode, the last generated token of the context otherwise.
        first_columns = starts - self.prompt_width + 1  # (S,)
        width = int((first_columns + lengths).max().item())
        decoder_ids, decoder_mask = decoder_inputs(ids, mask, self.prompt_width, self.decoder_start_token_id, width)
        prompt_ids, prompt_mask = _crop_left(ids[:, : self.prompt_width], mask[:, : self.prompt_width])
        encoder_hidden = self._encode(model, prompt_ids, prompt_mask)
        hidden, _ = self._decode(model, decoder_ids, decoder_mask, encoder_hidden, prompt_mask)  # (S, W, H)
        return action_hidden(hidden, first_columns, lengths)  # (N, H)

    def _last_hidden_per_step(self, obs: PyTorchObs, model: PreTrainedModel | None = None) -> th.Tensor:
        """(B, H) decoder hidden state that predicts each observation's next token, one full forward per row."""
        ids, mask = self._tokens(obs)
        generated = mask[:, self.prompt_width :].sum(dim=1)  # (B,) tokens generated so far
        width = int(generated.max().item()) + 1
        decoder_ids, decoder_mask = decoder_inputs(ids, mask, self.prompt_width, self.decoder_start_token_id, width)
        prompt_ids, prompt_mask = _crop_left(ids[:, : self.prompt_width], mask[:, : self.prompt_width])
        model = self._hf_model() if model is None else model
        hidden, _ = self._decode(model, decoder_ids, decoder_mask, self._encode(model, prompt_ids, prompt_mask), prompt_mask)
        return hidden[th.arange(len(ids), device=ids.device), generated]
