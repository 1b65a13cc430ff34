"""
Supervised fine-tuning (SFT): the warm start of the RLHF loop, on (article, summary) pairs.

The model learns to continue each prompt with its reference summary. Only the summary tokens and the EOS token
after them are trained on (the prompt's labels are -100), so the model learns to write summaries and to stop,
not to reproduce articles. The prompts are built exactly as the env builds them (:func:`build_news_prompts`
for news data, or the registered task's own prompt ids), so that PPO starts from a policy trained on the very
token sequences it will see.

A short torch loop rather than ``transformers.Trainer``: the loss needs only the summary positions (the LM
head runs on those alone, which saves most of the ``(B, S, V)`` logits on long prompts), the batches use the
env's layout (prompt left-padded, completion after it, the policy's position ids), and the whole procedure
stays readable top to bottom.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch as th
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from sb3_textrl.common.kv_cache import positions_from_mask
from sb3_textrl.common.names import DEFAULT_TASK
from sb3_textrl.models import _quiet_progress, load_causal_lm, load_tokenizer

logger = logging.getLogger("sb3_textrl")

_NEWS_ENTRY_POINT = "sb3_textrl.envs.news:make_news_summary_env"
IGNORE_INDEX = -100  # label of a position that is not trained on (cross_entropy's ignore_index)
RESULT_FILE = "sft_result.json"
SftData = str | os.PathLike | Sequence[dict[str, str]] | None


@dataclass
class SFTExample:
    """
    One training sequence.

    :param prompt_ids: the prompt's token ids, exactly as the env feeds them to the policy
    :param target_ids: the completion's token ids: the reference, then EOS (no EOS when the reference was cut)
    """

    prompt_ids: list[int]
    target_ids: list[int]


@dataclass
class SFTResult:
    """
    What :func:`train_sft` did.

    :param output_dir: the directory holding the fine-tuned model and tokenizer
    :param eval_loss_before: mean held-out loss per summary token (nats) before training; None without a held-out set
    :param eval_loss_after: the same after training
    :param train_time_s: seconds spent in the training loop (evaluation and saving excluded)
    :param n_examples: number of training examples
    :param n_eval_examples: number of held-out examples
    :param n_train_tokens: summary tokens (EOS included) per epoch
    :param optimizer_steps: optimizer updates made
    :param n_prompts_truncated: articles cut to fit ``max_prompt_tokens`` (train and held-out)
    :param n_targets_truncated: summaries cut to ``max_target_tokens`` (trained without EOS)
    :param train_losses: mean loss per summary token of each optimizer step
    :param config: the settings used
    """

    output_dir: Path
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_time_s: float
    n_examples: int
    n_eval_examples: int
    n_train_tokens: int
    optimizer_steps: int
    n_prompts_truncated: int = 0
    n_targets_truncated: int = 0
    train_losses: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-serializable data."""
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        return data


# -- building examples ---------------------------------------------------------------------------------------


def _news_defaults() -> tuple[int, int]:
    # The news env's own defaults, read from its signature so SFT and PPO cannot drift apart.
    from sb3_textrl.envs.news import make_news_summary_env

    params = inspect.signature(make_news_summary_env).parameters
    return int(params["max_prompt_tokens"].default), int(params["max_new_tokens"].default)


def _separator(prompt: str, reference: str) -> str:
    # "TL;DR:" + " The mayor..." for base LMs; a chat template's prompt already ends with a newline.
    return "" if not prompt or prompt[-1].isspace() or reference[:1].isspace() else " "


def make_sft_examples(
    prompt_texts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    references: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_target_tokens: int,
) -> tuple[list[SFTExample], int]:
    """
    Pair tokenized prompts with their tokenized references, EOS appended.

    A reference longer than ``max_target_tokens`` is cut and gets no EOS: the model should not learn to stop
    mid-sentence.

    :param prompt_texts: the prompts as text (to choose the separator before the reference)
    :param prompt_ids: the prompts' token ids, as the env tokenizes them
    :param references: one reference completion per prompt
    :param tokenizer: the LM's tokenizer (its EOS ends every target)
    :param max_target_tokens: the longest target, EOS included
    :return: the examples, and how many references were cut
    """
    if max_target_tokens < 1:
        raise ValueError(f"max_target_tokens must be >= 1, got {max_target_tokens}; it is the longest summary in tokens.")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"The tokenizer {tokenizer.name_or_path!r} has no EOS token, so the model cannot learn to stop. "
            "Set tokenizer.eos_token before fine-tuning."
        )
    texts = [_separator(p, r) + r for p, r in zip(prompt_texts, references)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    examples, cut = [], 0
    for ids, target in zip(prompt_ids, encoded):
        if len(target) + 1 > max_target_tokens:
            target, cut = target[:max_target_tokens], cut + 1
        else:
            target = [*target, tokenizer.eos_token_id]
        examples.append(SFTExample([int(i) for i in ids], [int(i) for i in target]))
    if cut:
        logger.warning(
            f"SFT: {cut} of {len(examples)} reference summaries are longer than max_target_tokens={max_target_tokens} "
            "and were cut (those are trained without EOS); raise max_target_tokens to keep them whole."
        )
    return examples, cut


def _check_rows(rows: Sequence[Any], where: str) -> list[dict[str, str]]:
    if len(rows) == 0:
        raise ValueError(f"{where}: the data is empty; give at least one (article, summary) pair.")
    for i, row in enumerate(rows):
        valid = isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip() for k in ("article", "summary"))
        if not valid:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{where}, row {i}: needs non-empty 'article' and 'summary' text fields, got {found}. Fix the row, or "
                "load a file with load_summary_dataset(path, article_field=..., summary_field=...) first."
            )
    return [{"article": row["article"].strip(), "summary": row["summary"].strip()} for row in rows]


def news_sft_examples(
    rows: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    max_target_tokens: int,
) -> tuple[list[SFTExample], int, int]:
    """
    SFT examples from (article, summary) rows, with NewsSummary-v0's prompt template and truncation.

    :param rows: dicts with ``article`` and ``summary``
    :param tokenizer: the LM's tokenizer
    :param max_prompt_tokens: the prompt budget (articles are cut to fit it, as in the env; logged)
    :param max_target_tokens: the longest target, EOS included
    :return: the examples, how many articles were cut, how many summaries were cut
    """
    from sb3_textrl.envs.news import build_news_prompts, prompt_template

    rows = _check_rows(rows, "SFT data")
    prompts, templated = build_news_prompts(rows, tokenizer, max_prompt_tokens)
    prefix, suffix, _ = prompt_template(tokenizer)
    prompts_cut = sum(p.text != prefix + row["article"] + suffix for p, row in zip(prompts, rows))
    # What TextGenerationEnv does with these prompts: the template's own special tokens, else the tokenizer's,
    # and the last max_prompt_tokens tokens.
    encoded = tokenizer([p.text for p in prompts], add_special_tokens=not templated)["input_ids"]
    prompt_ids = [ids[-max_prompt_tokens:] for ids in encoded]
    examples, targets_cut = make_sft_examples(
        [p.text for p in prompts], prompt_ids, [row["summary"] for row in rows], tokenizer, max_target_tokens
    )
    return examples, prompts_cut, targets_cut


def task_sft_examples(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int | None = None,
    max_target_tokens: int | None = None,
    task_kwargs: dict[str, Any] | None = None,
) -> tuple[list[SFTExample], int]:
    """
    SFT examples from a registered text task: its prompts (tokenized by the env itself) and their references.

    :param task: a registered text task id, e.g. ``"NewsSummary-v0"``
    :param tokenizer: the LM's tokenizer (it replaces the task's, so the ids are the LM's)
    :param max_prompt_tokens: the prompt budget (default: the task's)
    :param max_target_tokens: the longest target, EOS included (default: the task's ``max_new_tokens``)
    :param task_kwargs: further ``gym.make`` arguments (e.g. ``data_seed`` or ``n_articles`` of NewsSummary-v0)
    :return: the examples, and how many references were cut
    """
    import gymnasium as gym

    from sb3_textrl.envs.text_env import TextGenerationEnv

    if task not in gym.registry:
        raise ValueError(f"Task {task!r} is not registered. Use a registered text task (`sb3-textrl tasks` lists them).")
    kwargs = dict(task_kwargs or {}, tokenizer=tokenizer)
    if max_prompt_tokens is not None:
        kwargs["max_prompt_tokens"] = max_prompt_tokens
    env = gym.make(task, **kwargs).unwrapped
    if not isinstance(env, TextGenerationEnv):
        raise ValueError(
            f"Task {task!r} is not a text task (its env is {type(env).__name__}); SFT needs prompts with references."
        )
    pairs = [(p.text, ids, p.reference) for p, ids in zip(env.prompts, env.prompt_ids) if p.reference]
    if not pairs:
        raise ValueError(
            f"Task {task!r} has no references to learn from: register it with references=... (or prompt records with "
            "a 'reference' field), or pass --data with (article, summary) pairs."
        )
    if len(pairs) < len(env.prompts):
        skipped = len(env.prompts) - len(pairs)
        logger.warning(f"SFT: {skipped} of {len(env.prompts)} prompts of {task} have no reference; skipped.")
    texts, ids, references = zip(*pairs)
    limit = env.max_new_tokens if max_target_tokens is None else max_target_tokens
    return make_sft_examples(texts, ids, references, tokenizer, limit)


def load_sft_examples(
    data: SftData,
    tokenizer: PreTrainedTokenizerBase,
    task: str | None = None,
    max_prompt_tokens: int | None = None,
    max_target_tokens: int | None = None,
    limit: int | None = None,
    article_field: str | None = None,
    summary_field: str | None = None,
    task_kwargs: dict[str, Any] | None = None,
) -> tuple[list[SFTExample], dict[str, int]]:
    """
    SFT examples from a data file, a list of rows, or a registered task.

    ``data`` (a ``.jsonl``/``.json``/``.csv`` path or ``{"article", "summary"}`` rows) is formatted with
    NewsSummary-v0's prompt template; ``data=None`` takes the prompts and references of ``task`` (default:
    NewsSummary-v0's built-in generated news).

    :param data: a file path, a list of rows, or None for the task's own data
    :param tokenizer: the LM's tokenizer
    :param task: a registered text task; with ``data`` only NewsSummary-v0 (the template the data is put in)
    :param max_prompt_tokens: the prompt budget (default: the task's; 320 for NewsSummary-v0)
    :param max_target_tokens: the longest target, EOS included (default: the task's ``max_new_tokens``)
    :param limit: keep the first ``limit`` examples
    :param article_field: the article's field in a data file (default: detected)
    :param summary_field: the summary's field in a data file (default: detected)
    :param task_kwargs: further ``gym.make`` arguments when the data comes from the task
    :return: the examples, and counts (``prompts_truncated``, ``targets_truncated``)
    """
    import gymnasium as gym

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}.")
    if data is None:
        examples, targets_cut = task_sft_examples(
            task or DEFAULT_TASK, tokenizer, max_prompt_tokens, max_target_tokens, task_kwargs
        )
        return examples[:limit], {"prompts_truncated": 0, "targets_truncated": targets_cut}
    if task is not None and (task not in gym.registry or gym.spec(task).entry_point != _NEWS_ENTRY_POINT):
        raise ValueError(
            f"Data files hold (article, summary) pairs and are formatted with {DEFAULT_TASK}'s prompt template, but the "
            f"task is {task!r}. Drop the data to train on {task}'s own prompts and references, or drop the task."
        )
    if isinstance(data, (str, os.PathLike)):
        from sb3_textrl.envs.news_data import load_summary_dataset

        rows = load_summary_dataset(data, article_field=article_field, summary_field=summary_field, limit=limit)
    else:
        rows = list(data)[:limit]
    default_prompt, default_target = _news_defaults()
    examples, prompts_cut, targets_cut = news_sft_examples(
        rows,
        tokenizer,
        default_prompt if max_prompt_tokens is None else max_prompt_tokens,
        default_target if max_target_tokens is None else max_target_tokens,
    )
    return examples, {"prompts_truncated": prompts_cut, "targets_truncated": targets_cut}


# -- batches and the loss --------------------------------------------------------------------------------------


def collate_sft(examples: Sequence[SFTExample], pad_token_id: int) -> dict[str, Any]:
    """
    A batch in the env's layout: prompts left-padded into the first ``P`` columns, targets right-padded after them.

    :param examples: the batch's examples
    :param pad_token_id: id written in padding (masked out anyway)
    :return: ``input_ids``, ``attention_mask``, ``labels`` (all ``(B, P + T)``; labels are the target ids in
        the target columns and -100 everywhere else) and ``prompt_width`` (``P``)
    """
    width_p = max(len(e.prompt_ids) for e in examples)
    width_t = max(len(e.target_ids) for e in examples)
    shape = (len(examples), width_p + width_t)
    input_ids = th.full(shape, pad_token_id, dtype=th.long)
    attention_mask = th.zeros(shape, dtype=th.long)
    labels = th.full(shape, IGNORE_INDEX, dtype=th.long)
    for row, example in enumerate(examples):
        prompt, target = th.tensor(example.prompt_ids), th.tensor(example.target_ids)
        start, end = width_p - len(prompt), width_p + len(target)
        input_ids[row, start:width_p], input_ids[row, width_p:end] = prompt, target
        attention_mask[row, start:end] = 1
        labels[row, width_p:end] = target
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_width": width_p}


def _hf_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    return model.get_base_model() if isinstance(model, PeftModel) else model


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


@th.no_grad()
def evaluate_sft_loss(
    model: PreTrainedModel | PeftModel,
    examples: Sequence[SFTExample],
    pad_token_id: int,
    batch_size: int = 8,
    device: th.device | str = "cpu",
    bf16: bool = False,
    progress: bool = False,
) -> float:
    """
    Mean loss per target token (nats) of ``examples``, in eval mode.

    :param model: the LM
    :param examples: the held-out examples
    :param pad_token_id: the tokenizer's pad id
    :param batch_size: examples per forward pass
    :param device: the model's device
    :param bf16: run under bfloat16 autocast (CUDA)
    :param progress: show a progress bar
    :return: the mean NLL per target token
    """
    was_training = model.training
    model.eval()
    device = th.device(device)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].target_ids))
    total, count = 0.0, 0
    for start in tqdm(range(0, len(order), batch_size), desc="SFT eval", leave=False, disable=not progress):
        batch = _to_device(collate_sft([examples[i] for i in order[start : start + batch_size]], pad_token_id), device)
        with th.autocast(device.type, dtype=th.bfloat16, enabled=bf16):
            nll, n = target_nll(model, batch)
        total, count = total + float(nll), count + n
    model.train(was_training)
    return total / max(count, 1)


def _batches(examples: Sequence[SFTExample], batch_size: int, rng: random.Random, group_by_length: bool) -> list[list[int]]:
    """Shuffled batches of indices; with ``group_by_length``, similar lengths share a batch (less padding)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    if group_by_length:
        # Sort inside shuffled windows of 16 batches, then shuffle the batches: little padding, still random.
        window = 16 * batch_size
        length = [len(e.prompt_ids) + len(e.target_ids) for e in examples]
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda i: length[i])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


# -- the model -------------------------------------------------------------------------------------------------


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


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} exists and is a file; choose a directory path for the model.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"Output directory {output_dir} exists and is not empty. Choose a new directory, or pass overwrite=True "
                "(CLI: --overwrite) to replace it."
            )
        # Replacing deletes the directory: never a folder that holds the working directory or the home directory.
        resolved = output_dir.resolve()
        protected = {Path.cwd().resolve(), *Path.cwd().resolve().parents, Path.home().resolve()}
        if resolved in protected:
            raise ValueError(f"Refusing to replace {resolved}: it holds the working or home directory. Choose a subdirectory.")


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path, result: SFTResult) -> None:
    """Write model, tokenizer and result to a temporary sibling, then swap it in: no half-written model dir."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (mkdtemp would make it private to this user): the model dir gets the umask's permissions.
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        # default=repr: task_kwargs may hold objects (a reward) that JSON cannot write
        (tmp / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=repr) + "\n")
        file_mode = (tmp / RESULT_FILE).stat().st_mode & 0o777
        for path in tmp.iterdir():  # safetensors writes private (0600) files
            if path.is_file():
                path.chmod(file_mode)
        if output_dir.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, stale / output_dir.name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _split(examples: list[SFTExample], eval_fraction: float, rng: random.Random) -> tuple[list[SFTExample], list[SFTExample]]:
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}; 0.1 holds out a tenth of the data.")
    n_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * len(examples)))
    if len(examples) - n_eval < 1:
        raise ValueError(
            f"{len(examples)} example(s) leave none to train on after holding out {n_eval} for evaluation; give more data, "
            "lower eval_fraction, or pass separate eval_data."
        )
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _describe(value: Any) -> Any:
    # JSON-friendly: paths and devices as text, lists of rows by their size.
    if isinstance(value, (os.PathLike, th.device)):
        return str(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"<{len(value)} rows>"
    return value


def _device(device: str | th.device) -> th.device:
    if str(device) == "auto":
        return th.device("cuda" if th.cuda.is_available() else "cpu")
    return th.device(device)


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
    progress: bool = True,
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
    :param progress: show progress bars
    :return: the held-out loss before and after, timings and counts
    """
    config = {k: _describe(v) for k, v in locals().items()}  # the arguments, recorded in sft_result.json
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)  # before any work: a run must not fail at the end
    sizes = dict(epochs=epochs, batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps)
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    learning_rate = (2e-4 if use_lora else 5e-5) if learning_rate is None else learning_rate
    config["learning_rate"] = learning_rate
    torch_device = _device(device)
    use_bf16 = (torch_device.type == "cuda" and th.cuda.is_bf16_supported()) if bf16 is None else bf16
    rng = random.Random(seed)

    tokenizer = load_tokenizer(lm)
    load = dict(task=task, max_prompt_tokens=max_prompt_tokens, max_target_tokens=max_target_tokens,
                article_field=article_field, summary_field=summary_field, task_kwargs=task_kwargs)
    examples, counts = load_sft_examples(data, tokenizer, limit=limit, **load)
    if eval_data is not None:
        train, held_out = examples, []
        held_out, eval_counts = load_sft_examples(eval_data, tokenizer, **load)
        counts = {k: counts[k] + eval_counts[k] for k in counts}
    else:
        train, held_out = _split(examples, eval_fraction, rng)

    with th.random.fork_rng(devices=[]):  # seeded LoRA init without touching the caller's RNG
        th.manual_seed(seed)
        with _quiet_progress(progress):
            model = load_causal_lm(lm)
        if use_lora:
            with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecates
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, LoraConfig(**lora_kwargs(model, lora_config)))
    model.to(torch_device)
    if gradient_checkpointing:
        _hf_model(model).gradient_checkpointing_enable()
        if use_lora:
            _hf_model(model).enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    pad_id = int(tokenizer.pad_token_id)
    evaluate = dict(pad_token_id=pad_id, batch_size=batch_size, device=torch_device, bf16=use_bf16, progress=progress)
    loss_before = evaluate_sft_loss(model, held_out, **evaluate) if held_out else None

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = th.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train) / batch_size) / gradient_accumulation_steps)
    total_steps = steps_per_epoch * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * total_steps), total_steps)
    n_tokens_epoch = sum(len(e.target_ids) for e in train)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total_steps, desc="SFT", unit="step", disable=not progress)
    for _ in range(epochs):
        batches = _batches(train, batch_size, rng, group_by_length)
        for group in _groups(batches, gradient_accumulation_steps):
            collated = [collate_sft([train[i] for i in b], pad_id) for b in group]
            # Normalize by the group's target tokens: every summary token weighs the same, however it was batched.
            n_group = sum(int((c["labels"] != IGNORE_INDEX).sum()) for c in collated)
            group_loss = 0.0
            for batch in collated:
                with th.autocast(torch_device.type, dtype=th.bfloat16, enabled=use_bf16):
                    nll, _n = target_nll(model, _to_device(batch, torch_device))
                (nll / n_group).backward()
                group_loss += float(nll.detach()) / n_group
            if max_grad_norm > 0:
                th.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(group_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{group_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    model.eval()
    train_time = time.perf_counter() - start
    loss_after = evaluate_sft_loss(model, held_out, **evaluate) if held_out else None

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()  # a plain model dir: from_pretrained needs no peft
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
    result = SFTResult(
        output_dir=output_dir,
        eval_loss_before=loss_before,
        eval_loss_after=loss_after,
        train_time_s=train_time,
        n_examples=len(train),
        n_eval_examples=len(held_out),
        n_train_tokens=n_tokens_epoch,
        optimizer_steps=len(losses),
        n_prompts_truncated=counts["prompts_truncated"],
        n_targets_truncated=counts["targets_truncated"],
        train_losses=losses,
        config=config,
    )
    with _quiet_progress(progress):
        _save(model.to("cpu"), tokenizer, output_dir, result)
    return result


def _groups(batches: list[list[int]], size: int) -> Iterator[list[list[int]]]:
    for start in range(0, len(batches), size):
        yield batches[start : start + size]


__all__ = [
    "SFTExample",
    "SFTResult",
    "collate_sft",
    "evaluate_sft_loss",
    "load_sft_examples",
    "lora_kwargs",
    "make_sft_examples",
    "news_sft_examples",
    "target_nll",
    "task_sft_examples",
    "train_sft",
]
