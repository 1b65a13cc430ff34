"""The settings of a reward-model training run, in a module without torch (``sb3-textrl train-rm --help`` shows
their defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from sb3_textrl.common.deprecation import renamed_fields

RENAMED_FIELDS = {"lr": "learning_rate", "progress": "progress_bar"}
"""Deprecated field names of :class:`RewardModelConfig` -> their new names (the old ones warn)."""


@renamed_fields(**RENAMED_FIELDS)
@dataclass
class RewardModelConfig:
    """
    Settings of a reward-model training run (``train-rm`` flags map onto these fields).

    ``lr`` and ``progress`` are the deprecated names of ``learning_rate`` and ``progress_bar`` (they still work, with a
    ``DeprecationWarning``).
    """

    backbone: str | None = None  # HF model dir or hub name; None: the offline all-MiniLM-L6-v2
    epochs: int = 3  # passes over the training pairs
    learning_rate: float = 5e-5  # AdamW peak rate (fine-tuning a pretrained encoder); ~1e-3 for tiny models from scratch
    batch_size: int = 16  # preference pairs per step (2x sequences per forward: chosen and rejected)
    eval_fraction: float = 0.1  # share of pairs held out (whole prompts where possible) for accuracy and loss
    max_length: int = 256  # tokens per (prompt, completion) pair; MiniLM was trained on at most 256
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_fraction: float = 0.1  # share of steps with a linearly rising learning rate; it then decays to 0
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # split, head initialisation, shuffling and dropout
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", ...
    progress_bar: bool = True  # tqdm progress bars
    gradient_accumulation_steps: int = 1  # batches per optimizer step (effective batch = batch_size * this)
    bf16: bool = False  # bfloat16 autocast (a GPU that supports it)
    save_steps: int | None = None  # a checkpoint (weights, optimizer, scheduler, RNG states) every N optimizer steps
    logging_steps: int = 10  # log the training loss every N optimizer steps
    report_to: str = "csv"  # SB3 logger formats of the logs in the output directory: "csv,tensorboard", "none", ...

    def check(self) -> None:
        """Fail early, with the fix, on settings that cannot work."""
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs={self.epochs} (use 1 or more)")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} (use a positive learning rate, e.g. 5e-5)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} (use 1 or more)")
        if self.gradient_accumulation_steps < 1:
            problems.append(f"gradient_accumulation_steps={self.gradient_accumulation_steps} (use 1 or more)")
        if self.logging_steps < 1 or (self.save_steps is not None and self.save_steps < 1):
            problems.append(f"logging_steps={self.logging_steps}, save_steps={self.save_steps} (use 1 or more; save_steps "
                            "None: no checkpoints)")
        if not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction={self.warmup_fraction} (use a value in [0, 1))")
        if problems:
            raise ValueError("Invalid reward-model settings: " + "; ".join(problems))
