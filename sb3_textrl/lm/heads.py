"""The heads of the LM policies: next-token logits and their truncation (temperature, allowed tokens, top-k, top-p),
log-probs normalised as the policy's distribution normalises them, and the scalar value head."""

from __future__ import annotations

import contextlib

import torch as th
from torch import nn
from transformers import PreTrainedModel


def masked_fill_value(dtype: th.dtype) -> float:
    """The logit that removes a token from the distribution (the dtype's lowest finite value)."""
    return th.finfo(dtype).min


def lm_logits(
    model: PreTrainedModel, hidden: th.Tensor, n_actions: int, autocast: contextlib.AbstractContextManager
) -> th.Tensor:
    """
    The LM's own head on selected hidden states, restricted to the env's vocabulary: (N, H) -> (N, V) float32.

    :param autocast: the policy's autocast (the (N, H) x (H, V) head is the largest matmul of a small LM)
    """
    with autocast:
        logits = model.get_output_embeddings()(hidden)[..., :n_actions].float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:  # Gemma-2 style models squash their logits
        logits = th.tanh(logits / softcap) * softcap
    return logits


def process_logits(
    logits: th.Tensor, temperature: float, top_k: int | None, top_p: float | None, allowed: th.Tensor | None = None
) -> th.Tensor:
    """
    The sampling distribution's logits: temperature, then the allowed tokens (env masks, NLPO), then top-k / top-p
    truncation (which so choose among the allowed tokens). (N, V) logits and (N, V) bool allowed tokens -> (N, V)
    """
    if temperature != 1.0:
        logits = logits / temperature
    fill = masked_fill_value(logits.dtype)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, fill)
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = th.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, fill)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = th.sort(logits, dim=-1, descending=True)
        probs = th.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the most likely one always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = th.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, fill)
    return logits


def make_value_head(hidden_size: int, trainable: bool = True) -> nn.Linear:
    """
    The scalar value head on the LM's last hidden state, zero at start (V = 0: the reward scale is unknown).

    :param trainable: False (``critic=False``): kept as a frozen zero, so SB3's rollout and loss code run unchanged
    """
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if not trainable:
        head.requires_grad_(False)
    return head


def head_values(value_net: nn.Linear, hidden: th.Tensor) -> th.Tensor:
    """(N, H) hidden states -> (N, 1) float32 values, also under mixed precision."""
    with th.autocast(device_type=hidden.device.type, enabled=False):
        return value_net(hidden.to(value_net.weight.dtype))
