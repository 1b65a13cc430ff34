"""
The SFT run, in named steps: load the data, load the model, train on ``transformers.Trainer``, measure the held-out
loss before and after, save.

Training is :class:`~sb3_textrl.sft.trainer.CompletionOnlyTrainer`, a ``transformers.Trainer`` that overrides only
the loss (the LM head runs on the summary positions alone, which saves most of the ``(B, S, V)`` logits on long
prompts) and the batches (the env's layout: prompt left-padded, completion after it, the policy's position ids). The
Trainer gives the rest: AdamW with linear warmup and decay, gradient accumulation and clipping, bf16, checkpoints
every ``save_steps`` and their exact resume. Its logs go through SB3's logger (``progress.csv``, tensorboard) into
the output directory, with SB3's keys, so ``sb3-textrl plot`` reads an SFT run as it reads a PPO run.
"""

from __future__ import annotations

import functools
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch as th
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainerState

from sb3_textrl.common import metric_keys as keys
from sb3_textrl.common.deprecation import renamed_kwargs
from sb3_textrl.common.hf_trainer import (
    ResumeSpec,
    RunRecordCallback,
    SB3LogCallback,
    check_report_to,
    check_steps,
    load_run_record,
    preserved_global_rng,
    quiet_trainer,
    resolve_checkpoint,
    training_arguments,
    warmup_steps,
)
from sb3_textrl.common.output_dir import check_output_dir
from sb3_textrl.models import _quiet_progress, load_causal_lm, load_tokenizer
from sb3_textrl.sft.data import SftData, SFTExample, _split, collate_sft, load_sft_examples
from sb3_textrl.sft.loss import _hf_model, evaluate_sft_loss
from sb3_textrl.sft.output import SAVED_NAMES, SFTResult, _describe, _save
from sb3_textrl.sft.trainer import CompletionOnlyTrainer, SFTBatchSampler, SFTDataset


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
        warmup_steps(self.warmup_ratio, 0)  # refuses a ratio outside [0, 1)

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps over all epochs of ``n_examples`` examples."""
        return math.ceil(math.ceil(n_examples / self.batch_size) / self.gradient_accumulation_steps) * self.epochs


def _load_data(
    tokenizer_name: str | os.PathLike | None,
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
    tokenizer = load_tokenizer(tokenizer_name)
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
    """What training measured (:func:`_fit`)."""

    loss_before: float | None  # mean held-out loss per summary token, None without a held-out set
    losses: list[float]  # the loss of each optimizer step (a resumed run's earlier steps included)
    optimizer_steps: int  # the model's optimizer steps, a resumed run's earlier ones included
    seconds: float  # spent training in this call (evaluation excluded)
    loss_after: float | None


@dataclass(frozen=True)
class _Run:
    """Where a run writes while it trains and what it resumes from (:func:`train_sft`'s arguments)."""

    output_dir: Path
    checkpoint: str | None  # the checkpoint to resume from
    log: SB3LogCallback
    save_steps: int | None
    logging_steps: int
    max_steps: int | None
    callbacks: Sequence[TrainerCallback]


def _held_out_loss(
    model: PreTrainedModel | PeftModel, held_out: list[SFTExample], pad_id: int, optim: _Optim, device: th.device,
    bf16: bool, progress_bar: bool,
) -> float | None:
    """The mean held-out loss per summary token, or None without a held-out set."""
    if not held_out:
        return None
    return evaluate_sft_loss(
        model, held_out, pad_token_id=pad_id, batch_size=optim.batch_size, device=device, bf16=bf16, progress_bar=progress_bar
    )


def _fit(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[SFTExample],
    held_out: list[SFTExample],
    optim: _Optim,
    run: _Run,
    device: th.device,
    bf16: bool,
    seed: int,
    progress_bar: bool,
) -> _Training:
    """Steps 3 and 4: the held-out loss, training on :class:`CompletionOnlyTrainer`, the held-out loss again."""
    pad_id = int(tokenizer.pad_token_id)
    total_steps = optim.total_steps(len(train)) if run.max_steps is None else run.max_steps
    args = training_arguments(
        run.output_dir,
        epochs=optim.epochs,
        max_steps=run.max_steps,
        learning_rate=optim.learning_rate,
        batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        warmup=warmup_steps(optim.warmup_ratio, total_steps),
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        seed=seed,
        save_steps=run.save_steps,
        logging_steps=run.logging_steps,
        progress_bar=progress_bar,
    )
    record = load_run_record(run.checkpoint, {"step_losses": []})
    resumed_step = _checkpoint_step(run.checkpoint)
    loss_before = _held_out_loss(model, held_out, pad_id, optim, device, bf16, progress_bar)
    run.log.open(resumed_step)
    try:
        if loss_before is not None:
            run.log.write({keys.EVAL + keys.LOSS: loss_before}, resumed_step or 0)
        with preserved_global_rng():
            trainer = quiet_trainer(CompletionOnlyTrainer(
                model=model,
                args=args,
                train_dataset=SFTDataset(train),
                data_collator=functools.partial(collate_sft, pad_token_id=pad_id),
                processing_class=tokenizer,
                callbacks=[run.log, RunRecordCallback(record), *run.callbacks],
                batch_sampler=SFTBatchSampler(train, optim.batch_size, seed, optim.group_by_length),
                step_losses=record["step_losses"],
            ))
            start = time.perf_counter()
            trainer.train(resume_from_checkpoint=run.checkpoint)
            seconds = time.perf_counter() - start
        model.eval()
        loss_after = _held_out_loss(model, held_out, pad_id, optim, device, bf16, progress_bar)
        if loss_after is not None:
            run.log.write({keys.EVAL + keys.LOSS: loss_after}, trainer.state.global_step)
    finally:
        run.log.close()
    return _Training(loss_before, list(record["step_losses"]), trainer.state.global_step, seconds, loss_after)


def _checkpoint_step(checkpoint: str | None) -> int | None:
    """The optimizer step a checkpoint was saved at (None: no checkpoint)."""
    if checkpoint is None:
        return None
    return int(TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")).global_step)


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
        optimizer_steps=training.optimizer_steps,
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
    tokenizer: str | os.PathLike | None = None,
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
    resume_from_checkpoint: ResumeSpec = None,
    save_steps: int | None = None,
    logging_steps: int = 10,
    report_to: str | Sequence[str] | None = ("csv",),
    logging_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> SFTResult:
    """
    Fine-tune a causal LM on (prompt, completion) pairs and save it as a plain Hugging Face model directory.

    The loss is the mean NLL of the completion tokens and the EOS after them; prompt tokens are masked. With LoRA,
    the adapters are merged into the weights before saving, so ``load_causal_lm(output_dir)``,
    ``from_pretrained(output_dir)`` and ``PPO(TransformerLMPolicy, env, policy_kwargs=dict(lm=output_dir))`` all
    read it. Training runs on ``transformers.Trainer`` (AdamW with linear warmup and decay, gradient accumulation
    and clipping, bf16, checkpoints and resume); its logs go through SB3's logger (``train/loss``,
    ``train/learning_rate``, ``train/grad_norm``, ``eval/loss`` against ``time/total_timesteps`` = the optimizer
    step). While it trains, ``output_dir`` holds the checkpoints and log files; the model is swapped in at the end,
    the checkpoints and logs moved along with it.

    :param lm: the LM to start from: a hub name, a local directory, or None for the embedded SmolLM2-135M-Instruct
    :param data: a ``.jsonl``/``.json``/``.csv`` file or a list of rows: ``{"article", "summary"}`` (formatted with
        NewsSummary-v0's template) or TRL's ``{"prompt", "completion"}`` (strings or conversations, formatted as
        ``task`` shows its prompts); or None for ``task``'s own prompts and references
    :param output_dir: where the model, tokenizer and ``sft_result.json`` are written (and, while training, the
        checkpoints and logs)
    :param task: a registered text task: its prompts and references when ``data`` is None (default:
        NewsSummary-v0 with its built-in generated news), its prompt template and chat template for prompt/completion
        data (default for those: a task registered with :func:`~sb3_textrl.register_text_task`'s defaults)
    :param tokenizer: the tokenizer to train with and save beside the model, a name or directory (default: ``lm``'s)
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
    :param overwrite: replace ``output_dir`` if it exists and is not empty (its contents are removed when training
        starts)
    :param progress_bar: show progress bars (``progress``: its deprecated name)
    :param resume_from_checkpoint: continue a run from a checkpoint: True for the latest ``checkpoint-*`` in
        ``output_dir``, or a checkpoint's path (the other arguments must be the run's)
    :param save_steps: save a checkpoint (weights, optimizer, scheduler, RNG states) every this many optimizer
        steps in ``output_dir`` (None: no checkpoints)
    :param logging_steps: log the training loss every this many optimizer steps
    :param report_to: SB3 logger formats of the logs: ``"csv"`` (``progress.csv``), ``"tensorboard"``, ``"json"``,
        ``"log"``, ``"stdout"`` (a comma-separated string or a list; None or ``"none"``: no log files)
    :param logging_dir: where the logs are written (default: ``output_dir``)
    :param max_steps: stop after this many optimizer steps (default: ``epochs`` over the data)
    :param callbacks: further ``transformers.TrainerCallback`` objects (early stopping, your own logging)
    :return: the held-out loss before and after, timings and counts
    """
    learning_rate = (2e-4 if use_lora else 5e-5) if learning_rate is None else learning_rate
    config = {SAVED_NAMES.get(k, k): _describe(v) for k, v in locals().items()}  # the arguments, for sft_result.json
    # Before any work: a run must not fail at the end.
    checkpoint = resolve_checkpoint(resume_from_checkpoint, Path(output_dir).expanduser())
    output_dir = Path(output_dir).expanduser() if checkpoint else check_output_dir(output_dir, overwrite)
    formats = check_report_to(report_to)
    config.update(report_to=formats, callbacks=[type(c).__name__ for c in callbacks])
    check_steps(save_steps=save_steps, logging_steps=logging_steps, max_steps=max_steps)
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
    load = dict(
        max_prompt_tokens=max_prompt_tokens,
        max_target_tokens=max_target_tokens,
        article_field=article_field,
        summary_field=summary_field,
    )
    rng = random.Random(seed)
    tokenizer_name = lm if tokenizer is None else tokenizer
    loaded = _load_data(tokenizer_name, data, task, task_kwargs, eval_data, eval_fraction, rng, limit, load)
    tokenizer_object, train, held_out, counts = loaded
    model = _load_model(lm, torch_device, seed, use_lora, lora_config, gradient_checkpointing, progress_bar)
    n_embeddings = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
    if tokenizer is not None and len(tokenizer_object) > n_embeddings:
        raise ValueError(
            f"tokenizer {tokenizer} has {len(tokenizer_object)} tokens, more than the LM's {n_embeddings} embeddings: "
            "its ids would index past them; pass the LM's own tokenizer (or none: the default is the LM's)"
        )
    if checkpoint is None:
        _start_output_dir(output_dir)
    log_dir = output_dir if logging_dir is None else Path(logging_dir).expanduser()
    run = _Run(output_dir, checkpoint, SB3LogCallback(log_dir, formats), save_steps, logging_steps, max_steps, callbacks)
    training = _fit(model, tokenizer_object, train, held_out, optim, run, torch_device, use_bf16, seed, progress_bar)
    result = _result(output_dir, config, train, held_out, counts, training)
    _save_model(model, tokenizer_object, result, gradient_checkpointing, progress_bar)
    return result


def _start_output_dir(output_dir: Path) -> None:
    """A new run's output directory, empty (an old one's contents go: :func:`check_output_dir` allowed it)."""
    if output_dir.is_dir():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
