"""The KL of completions to the policy's reference model: whether there is one, whether it equals the policy, the KL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from sb3_textrl.evaluation.samples import Sample

if TYPE_CHECKING:
    from sb3_textrl.policies import TransformerLMPolicy


def has_reference(policy: TransformerLMPolicy) -> bool:
    """Whether the policy has a reference model π_ref (LoRA adapters to disable, or a frozen copy)."""
    from peft import PeftModel

    return policy.ref_lm is not None or isinstance(policy.lm, PeftModel)


def reference_identity(policy: TransformerLMPolicy) -> str | None:
    """
    Why the policy's weights are exactly its reference's (so every KL to it is 0), or None when they may differ.

    Read off the weights, not from how the model was made: with LoRA, every ``lora_B`` matrix of the active adapter is
    zero (fresh or untrained adapters add B·A = 0) and the adapter has no other trainable part (``modules_to_save``,
    DoRA magnitudes, trainable tokens); with a frozen reference copy, every tensor of the LM equals the copy's.

    :param policy: the policy
    :return: the reason, or None
    """
    import torch as th
    from peft import LoraConfig, PeftModel

    if policy.ref_lm is not None:
        ours, theirs = policy.lm.state_dict(), policy.ref_lm.state_dict()
        if ours.keys() == theirs.keys() and all(th.equal(ours[key], theirs[key]) for key in ours):
            return "the LM's weights equal its frozen reference copy's"
        return None
    if not isinstance(policy.lm, PeftModel):
        return None
    active = policy.lm.active_adapter
    config = policy.lm.peft_config[active]
    if not isinstance(config, LoraConfig) or config.modules_to_save or config.use_dora:
        return None
    if getattr(config, "trainable_token_indices", None):
        return None
    lora_b = [
        parameter
        for name, parameter in policy.lm.named_parameters()
        if (".lora_B." in name or ".lora_embedding_B." in name) and f".{active}" in name
    ]
    if lora_b and not any(bool(parameter.any()) for parameter in lora_b):
        return "every LoRA B matrix is zero (fresh or untrained adapters)"
    return None


def sampling_truncated(policy: TransformerLMPolicy) -> bool:
    """Whether the sampling distribution is truncated (top-k, top-p, NLPO): it then differs from π_ref on equal weights."""
    top_k = policy.top_k is not None and policy.top_k < int(policy.action_space.n)
    top_p = policy.top_p is not None and policy.top_p < 1.0
    return top_k or top_p or policy.nlpo_top_p is not None


def kl_to_reference(
    policy: TransformerLMPolicy, samples: Sequence[Sample], batch_size: int = 8, progress_bar: bool = False
) -> np.ndarray:
    """
    KL to the reference of each completion: the sum over its generated tokens (a final stop token included) of
    log π(a|s) − log π_ref(a|s), the quantity TextRolloutBuffer penalises and logs as ``rollout/kl_to_ref`` (both
    compute it with :func:`sb3_textrl.common.kl.token_kl` and :func:`~sb3_textrl.common.kl.episode_kl`).

    π is the policy's sampling distribution (its temperature, top-k and top-p: wrap the call in
    :func:`sb3_textrl.sampling.decoding` to score under other settings) and π_ref the reference at the same
    temperature. Each completion costs one teacher-forced forward of the policy and one of the reference
    (:meth:`TransformerLMPolicy.evaluate_actions` and :meth:`TransformerLMPolicy.reference_log_probs`), ``batch_size``
    completions at a time; with ``trainable_layers`` the frozen lower blocks, which the two share, run once, and both
    run only their top blocks from there (as in training). For sampled completions the mean is an unbiased estimate
    of KL(π‖π_ref) per completion; for greedy ones it is the log-ratio of the greedy completion.

    :param policy: the policy that generated the samples
    :param samples: samples from :func:`generate_samples` (they carry their last observation)
    :param batch_size: completions per forward
    :param progress_bar: show a progress bar
    :return: float64 array, one sum per sample
    """
    import torch as th

    from sb3_textrl.common.kl import episode_kl, token_kl
    from sb3_textrl.common.segments import SPLIT_HIDDEN, completion_batch

    if not has_reference(policy):
        raise RuntimeError("this policy has no reference model (kl_coef=0 without LoRA), so it has no KL to a reference")
    missing = [s.prompt_index for s in samples if s.observation is None]
    if missing:
        raise ValueError(
            f"samples of prompts {missing[:5]} carry no last observation; generate them with generate_samples() on an "
            "SB3 VecEnv (it keeps the 'terminal_observation' of each episode)"
        )
    kl = np.zeros(len(samples), dtype=np.float64)
    bar = tqdm(total=len(samples), desc="KL to reference", disable=not progress_bar)
    for first in range(0, len(samples), batch_size):
        chunk = samples[first : first + batch_size]
        ids = np.stack([s.observation["input_ids"] for s in chunk])  # type: ignore[index]
        mask = np.stack([s.observation["attention_mask"] for s in chunk])  # type: ignore[index]
        lengths = np.array([s.completion_tokens for s in chunk], dtype=np.int64)
        # The generated tokens are the last `length` valid tokens of a row: TextRolloutBuffer's segment layout.
        obs, actions_t = completion_batch(ids, mask, lengths, policy.device)
        with th.no_grad():
            if getattr(policy, "layer_split", None) is not None:
                obs[SPLIT_HIDDEN] = policy.split_hidden(obs["input_ids"], obs["attention_mask"])  # (S, W, H)
            _, log_prob, _ = policy.evaluate_actions(obs, actions_t)  # (N,) under the sampling distribution
            ref_log_prob = policy.reference_log_probs(obs, actions_t)  # (N,)
        kl[first : first + len(chunk)] = episode_kl(token_kl(log_prob.cpu().numpy(), ref_log_prob.cpu().numpy()), lengths)
        bar.update(len(chunk))
    bar.close()
    return kl
