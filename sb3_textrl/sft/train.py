"""
The SFT training loop, in named steps: load the data, load the model, train (one optimizer step, one epoch), measure
the held-out loss before and after, save.

A short torch loop rather than ``transformers.Trainer``: the loss needs only the summary positions (the LM head runs
on those alone, which saves most of the ``(B, S, V)`` logits on long prompts), the batches use the env's layout
(prompt left-padded, completion after it, the policy's position ids), and the whole procedure stays readable top to
bottom.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch as th
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from sb3_textrl.common.deprecation import renamed_kwargs
from sb3_textrl.common.output_dir import check_output_dir
from sb3_textrl.models import _quiet_progress, load_causal_lm, load_tokenizer
from sb3_textrl.sft.data import IGNORE_INDEX, SftData, SFTExample, _batches, _groups, _split, collate_sft, load_sft_examples
from sb3_textrl.sft.loss import _hf_model, _to_device, evaluate_sft_loss, target_nll
from sb3_textrl.sft.output import SAVED_NAMES, SFTResult, _describe, _save


def lora_kwargs(model: PreTrainedModel, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """
    ``peft.LoraConfig`` arguments, the same defaults as :class:`~sb3_textrl.TransformerLMPolicy` uses.

    :param model: the LM the adapters go into
    :param overrides: arguments that replace the defaults (``r``, ``lora_alpha``, ``target_modules``...)
    :return: the arguments
    """
    kwargs: dict[str, Any] = dict(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    if model.config.model_type == "gpt2":
        kwargs["fan_in_fan_out"] = True  # GPT-2 stores its projections as Conv1D (in, out)
    kwargs.update(overrides or {})
    return kwargs


def _device_and_bf16(device: str | th.device, bf16: bool | None) -> tuple[th.device, bool]:
    """The torch device (``"auto"``: CUDA when present), and whether to autocast to bfloat16 (None: where supported)."""
    torch_device = th.device(("cuda" if th.cuda.is_available() else "cpu") if str(device) == "auto" else device)
    use_bf16 = (torch_device.type == "cuda" and th.cuda.is_bf16_supported()) if bf16 is None else bf16
    return torch_device, use_bf16


@dataclass(frozen=True)
class _Optim:
    """The optimization settings of a run (:func:`train_sft`'s arguments of the same names)."""

    epochs: int
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    group_by_length: bool

    def __post_init__(self) -> None:
        sizes = dict(
            epochs=self.epochs, batch_size=self.batch_size, gradient_accumulation_steps=self.gradient_accumulation_steps
        )
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps over all epochs of ``n_examples`` examples."""
        return math.ceil(math.ceil(n_examples / self.batch_size) / self.gradient_accumulation_steps) * self.epochs


def _load_data(
    lm: str | os.PathLike | None,
    data: SftData,
    task: str | None,
    task_kwargs: dict[str, Any] | None,
    eval_data: SftData,
    eval_fraction: float,
    rng: random.Random,
    limit: int | None,
    load: dict[str, Any],
) -> tuple[PreTrainedTokenizerBase, list[SFTExample], list[SFTExample], dict[str, int]]:
    """
    Step 1: the tokenizer, the training and held-out examples, and the truncation counts of both.

    ``data`` comes from ``task`` (made with ``task_kwargs``) when None; ``load`` holds the other arguments of
    :func:`load_sft_examples` (the token budgets and the data's fields).
    """
    tokenizer = load_tokenizer(lm)
    load = dict(task=task, task_kwargs=task_kwargs, **load)
    examples, counts = load_sft_examples(data, tokenizer, limit=limit, **load)
    if eval_data is None:
        train, held_out = _split(examples, eval_fraction, rng)
        return tokenizer, train, held_out, counts
    held_out, eval_counts = load_sft_examples(eval_data, tokenizer, **load)
    return tokenizer, examples, held_out, {k: counts[k] + eval_counts[k] for k in counts}


def _load_model(
    lm: str | os.PathLike | None,
    device: th.device,
    seed: int,
    use_lora: bool,
    lora_config: dict[str, Any] | None,
    gradient_checkpointing: bool,
    progress_bar: bool,
) -> PreTrainedModel | PeftModel:
    """Step 2: the LM on ``device``, with LoRA adapters (seeded) and gradient checkpointing when asked."""
    with th.random.fork_rng(devices=[]):  # seeded LoRA init without touching the caller's RNG
        th.manual_seed(seed)
        with _quiet_progress(progress_bar):
            base = load_causal_lm(lm)
        model: PreTrainedModel | PeftModel = base
        if use_lora:
            with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecates
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(base, LoraConfig(**lora_kwargs(base, lora_config)))
    # mypy reads transformers' @wraps(nn.Module.to) on PreTrainedModel.to as a function without its bound self
    model.to(device)  # type: ignore[arg-type]
    if gradient_checkpointing:
        _hf_model(model).gradient_checkpointing_enable()
        if use_lora:
            _hf_model(model).enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    return model


@dataclass(frozen=True)
class _Training:
    """What steps 3 and 4 measured (:meth:`_Trainer.run`)."""

    loss_before: float | None  # mean held-out loss per summary token, None without a held-out set
    losses: list[float]  # the loss of each optimizer step
    seconds: float  # spent training (evaluation excluded)
    loss_after: float | None


@dataclass
class _Trainer:
    """What the optimizer steps share: the model, AdamW with linear warmup and decay, and how a batch runs."""

    model: PreTrainedModel | PeftModel
    optim: _Optim
    total_steps: int
    pad_id: int
    device: th.device
    bf16: bool

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = th.optim.AdamW(self.params, lr=self.optim.learning_rate, weight_decay=self.optim.weight_decay)
        warmup = round(self.optim.warmup_ratio * self.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)

    def step(self, batches: list[dict[str, Any]]) -> float:
        """One optimizer step over collated ``batches`` (gradient accumulation); returns its loss per target token."""
        # Normalize by the group's target tokens: every summary token weighs the same, however it was batched.
        n_group = sum(int((c["labels"] != IGNORE_INDEX).sum()) for c in batches)
        group_loss = 0.0
        for batch in batches:
            with th.autocast(self.device.type, dtype=th.bfloat16, enabled=self.bf16):
                nll, _n = target_nll(self.model, _to_device(batch, self.device))
            (nll / n_group).backward()
            group_loss += float(nll.detach()) / n_group
        if self.optim.max_grad_norm > 0:
            th.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return group_loss

    def held_out_loss(self, held_out: list[SFTExample], progress_bar: bool) -> float | None:
        """Step 4: the mean held-out loss per summary token, or None without a held-out set."""
        if not held_out:
            return None
        return evaluate_sft_loss(
            self.model,
            held_out,
            pad_token_id=self.pad_id,
            batch_size=self.optim.batch_size,
            device=self.device,
            bf16=self.bf16,
            progress_bar=progress_bar,
        )

    def run(self, train: list[SFTExample], held_out: list[SFTExample], rng: random.Random, progress_bar: bool) -> _Training:
        """Steps 3 and 4: the held-out loss, every epoch, the held-out loss again."""
        loss_before = self.held_out_loss(held_out, progress_bar)
        losses, seconds = self.fit(train, rng, progress_bar)
        return _Training(loss_before, losses, seconds, self.held_out_loss(held_out, progress_bar))

    def epoch(self, train: Sequence[SFTExample], rng: random.Random, bar: tqdm) -> list[float]:
        """Step 3: one pass over ``train`` in shuffled batches; returns the loss of each optimizer step."""
        losses = []
        batches = _batches(train, self.optim.batch_size, rng, self.optim.group_by_length)
        for group in _groups(batches, self.optim.gradient_accumulation_steps):
            losses.append(self.step([collate_sft([train[i] for i in b], self.pad_id) for b in group]))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        return losses

    def fit(self, train: Sequence[SFTExample], rng: random.Random, progress_bar: bool) -> tuple[list[float], float]:
        """Every epoch; returns the loss of each optimizer step and the seconds spent (evaluation excluded)."""
        losses: list[float] = []
        start = time.perf_counter()
        self.model.train()
        bar = tqdm(total=self.total_steps, desc="SFT", unit="step", disable=not progress_bar)
        for _ in range(self.optim.epochs):
            losses += self.epoch(train, rng, bar)
        bar.close()
        self.model.eval()
        return losses, time.perf_counter() - start


def _result(
    output_dir: Path,
    config: dict[str, Any],
    train: list[SFTExample],
    held_out: list[SFTExample],
    counts: dict[str, int],
    training: _Training,
) -> SFTResult:
    """What the run did: the examples, their truncation counts, and what training measured."""
    return SFTResult(
        output_dir=output_dir,
        eval_loss_before=training.loss_before,
        eval_loss_after=training.loss_after,
        train_time_s=training.seconds,
        n_examples=len(train),
        n_eval_examples=len(held_out),
        n_train_tokens=sum(len(e.target_ids) for e in train),
        optimizer_steps=len(training.losses),
        n_prompts_truncated=counts["prompts_truncated"],
        n_targets_truncated=counts["targets_truncated"],
        train_losses=training.losses,
        config=config,
    )


def _plain_model(model: PreTrainedModel | PeftModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """Before saving: LoRA merged into the weights (from_pretrained needs no peft), checkpointing off."""
    plain = model.merge_and_unload() if isinstance(model, PeftModel) else model
    if gradient_checkpointing:
        plain.gradient_checkpointing_disable()
    return plain


def _save_model(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    result: SFTResult,
    gradient_checkpointing: bool,
    progress_bar: bool,
) -> None:
    """Step 5: the plain model (:func:`_plain_model`), its tokenizer and ``result``, saved in ``result.output_dir``."""
    plain = _plain_model(model, gradient_checkpointing)
    with _quiet_progress(progress_bar):
        _save(plain.to("cpu"), tokenizer, result.output_dir, result)  # type: ignore[arg-type]  # as in _load_model


@renamed_kwargs(progress="progress_bar")
def train_sft(
    lm: str | os.PathLike | None,
    data: SftData,
    output_dir: str | os.PathLike,
    *,
    task: str | None = None,
    use_lora: bool = False,
    lora_config: dict[str, Any] | None = None,
    epochs: int = 1,
    learning_rate: float | None = None,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    max_prompt_tokens: int | None = None,
    max_target_tokens: int | None = None,
    limit: int | None = None,
    eval_fraction: float = 0.1,
    eval_data: SftData = None,
    article_field: str | None = None,
    summary_field: str | None = None,
    task_kwargs: dict[str, Any] | None = None,
    group_by_length: bool = True,
    gradient_checkpointing: bool = False,
    bf16: bool | None = None,
    seed: int = 0,
    device: str | th.device = "auto",
    overwrite: bool = False,
    progress_bar: bool = True,
) -> SFTResult:
    """
    Fine-tune a causal LM on (prompt, summary) pairs and save it as a plain Hugging Face model directory.

    The loss is the mean NLL of the summary tokens and the EOS after them; prompt tokens are masked. With LoRA,
    the adapters are merged into the weights before saving, so ``load_causal_lm(output_dir)``,
    ``from_pretrained(output_dir)`` and ``PPO(TransformerLMPolicy, env, policy_kwargs=dict(lm=output_dir))`` all
    read it. Training uses AdamW with linear warmup and decay, gradient accumulation and gradient clipping.

    :param lm: the LM to start from: a hub name, a local directory, or None for the embedded SmolLM2-135M-Instruct
    :param data: a ``.jsonl``/``.json``/``.csv`` file or a list of ``{"article", "summary"}`` rows (formatted
        with NewsSummary-v0's template), or None for ``task``'s own prompts and references
    :param output_dir: where the model, tokenizer and ``sft_result.json`` are written
    :param task: a registered text task whose data to use when ``data`` is None (default: NewsSummary-v0 with
        its built-in generated news)
    :param use_lora: train LoRA adapters (peft) instead of all weights; they are merged when saving
    :param lora_config: ``peft.LoraConfig`` arguments replacing the defaults (r=16, alpha=32, no dropout)
    :param epochs: passes over the training examples
    :param learning_rate: peak learning rate (default: 5e-5 for full fine-tuning, 2e-4 for LoRA)
    :param batch_size: examples per forward pass
    :param gradient_accumulation_steps: forward passes per optimizer step (effective batch =
        ``batch_size * gradient_accumulation_steps``)
    :param warmup_ratio: share of the optimizer steps spent warming the learning rate up from 0
    :param weight_decay: AdamW weight decay
    :param max_grad_norm: gradient norm clip (0 or less: no clipping)
    :param max_prompt_tokens: prompt budget in tokens, as the env's (default: the task's; 320 for NewsSummary-v0)
    :param max_target_tokens: longest summary in tokens, EOS included (default: the task's ``max_new_tokens``;
        48 for NewsSummary-v0)
    :param limit: use the first ``limit`` examples (before the held-out split)
    :param eval_fraction: share of the examples held out to measure the loss before and after (ignored with
        ``eval_data``; 0: no held-out loss)
    :param eval_data: a separate held-out set, in the same form as ``data``
    :param article_field: the article's field in data files (default: detected)
    :param summary_field: the summary's field in data files (default: detected)
    :param task_kwargs: further ``gym.make`` arguments when the data comes from the task
    :param group_by_length: batch examples of similar length together (less padding)
    :param gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower)
    :param bf16: bfloat16 autocast (default: on for CUDA devices that support it)
    :param seed: seed of the split, the batch order and the LoRA initialization
    :param device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``...
    :param overwrite: replace ``output_dir`` if it exists and is not empty
    :param progress_bar: show progress bars (``progress``: its deprecated name)
    :return: the held-out loss before and after, timings and counts
    """
    learning_rate = (2e-4 if use_lora else 5e-5) if learning_rate is None else learning_rate
    config = {SAVED_NAMES.get(k, k): _describe(v) for k, v in locals().items()}  # the arguments, for sft_result.json
    output_dir = check_output_dir(output_dir, overwrite)  # before any work: a run must not fail at the end
    optim = _Optim(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        group_by_length=group_by_length,
    )
    torch_device, use_bf16 = _device_and_bf16(device, bf16)
    rng = random.Random(seed)
    load = dict(
        max_prompt_tokens=max_prompt_tokens,
        max_target_tokens=max_target_tokens,
        article_field=article_field,
        summary_field=summary_field,
    )
    tokenizer, train, held_out, counts = _load_data(lm, data, task, task_kwargs, eval_data, eval_fraction, rng, limit, load)
    model = _load_model(lm, torch_device, seed, use_lora, lora_config, gradient_checkpointing, progress_bar)
    trainer = _Trainer(model, optim, optim.total_steps(len(train)), int(tokenizer.pad_token_id), torch_device, use_bf16)
    training = trainer.run(train, held_out, rng, progress_bar)
    result = _result(output_dir, config, train, held_out, counts, training)
    _save_model(model, tokenizer, result, gradient_checkpointing, progress_bar)
    return result
