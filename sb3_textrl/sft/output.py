"""What an SFT run writes: :class:`SFTResult` and the model directory, swapped in whole (never half-written)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch as th
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sb3_textrl.common.hf_trainer import save_trained_dir

RESULT_FILE = "sft_result.json"
SAVED_NAMES = {"progress_bar": "progress"}
"""Arguments that sft_result.json records under their earlier names (the file's keys stay as they were)."""


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


def _describe(value: Any) -> Any:
    # JSON-friendly: paths and devices as text, lists of rows by their size.
    if isinstance(value, (os.PathLike, th.device)):
        return str(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"<{len(value)} rows>"
    return value


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path, result: SFTResult) -> None:
    """
    Write model, tokenizer and result to a temporary sibling, then swap it in: no half-written model dir. The run's
    checkpoints and log files, in ``output_dir`` while it trained, move into the new directory last.
    """

    save_trained_dir(output_dir, model, tokenizer, RESULT_FILE, result.to_dict())
