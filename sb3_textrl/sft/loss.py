"""The SFT loss: the negative log-likelihood of the target tokens only (the LM head runs on those positions alone)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch as th
import torch.nn.functional as F
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from sb3_textrl.common.deprecation import renamed_kwargs
from sb3_textrl.common.kv_cache import positions_from_mask
from sb3_textrl.sft.data import IGNORE_INDEX, SFTExample, collate_sft


def _hf_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    # peft types the base model as an nn.Module; under a causal LM's adapters it is the PreTrainedModel
    return cast(PreTrainedModel, model.get_base_model()) if isinstance(model, PeftModel) else model


def target_nll(model: PreTrainedModel | PeftModel, batch: dict[str, Any]) -> tuple[th.Tensor, int]:
    """
    Summed negative log-likelihood of the target tokens of a batch, and their number.

    The trunk runs on the whole sequence with the policy's position ids; the LM head only on the hidden states
    that predict a target token (the prompt's logits are never needed).

    :param model: the LM (a peft model with LoRA adapters, or a plain one)
    :param batch: from :func:`collate_sft`, on the model's device
    :return: (summed NLL in nats, number of target tokens)
    """
    hf = _hf_model(model)
    ids, mask, labels, width_p = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_width"]
    out = hf.base_model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    targets = labels[:, width_p:]  # (B, T)
    keep = targets != IGNORE_INDEX
    hidden = out.last_hidden_state[:, width_p - 1 : -1][keep]  # (N, H): column c predicts the token in column c + 1
    logits = hf.get_output_embeddings()(hidden).float()  # (N, V)
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    if softcap:  # Gemma-2 style models squash their logits
        logits = th.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def _to_device(batch: dict[str, Any], device: th.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, th.Tensor) else v for k, v in batch.items()}


@renamed_kwargs(progress="progress_bar")
@th.no_grad()
def evaluate_sft_loss(
    model: PreTrainedModel | PeftModel,
    examples: Sequence[SFTExample],
    pad_token_id: int,
    batch_size: int = 8,
    device: th.device | str = "cpu",
    bf16: bool = False,
    progress_bar: bool = False,
) -> float:
    """
    Mean loss per target token (nats) of ``examples``, in eval mode.

    :param model: the LM
    :param examples: the held-out examples
    :param pad_token_id: the tokenizer's pad id
    :param batch_size: examples per forward pass
    :param device: the model's device
    :param bf16: run under bfloat16 autocast (CUDA)
    :param progress_bar: show a progress bar (``progress``: its deprecated name)
    :return: the mean NLL per target token
    """
    was_training = model.training
    model.eval()
    device = th.device(device)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].target_ids))
    total, count = 0.0, 0
    for start in tqdm(range(0, len(order), batch_size), desc="SFT eval", leave=False, disable=not progress_bar):
        batch = _to_device(collate_sft([examples[i] for i in order[start : start + batch_size]], pad_token_id), device)
        with th.autocast(device.type, dtype=th.bfloat16, enabled=bf16):
            nll, n = target_nll(model, batch)
        total, count = total + float(nll), count + n
    model.train(was_training)
    return total / max(count, 1)
