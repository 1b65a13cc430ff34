"""
What SFT and reward-model training share on ``transformers.Trainer``: the checks of the run options, the
``TrainingArguments`` of our settings, the bridge from the Trainer's logs to SB3's logger (``progress.csv`` and
tensorboard files where SB3 writes them, so ``sb3-textrl plot`` reads SFT and reward-model runs), and what a
checkpoint holds besides the Trainer's own state (the run's per-step records, for an exact resume).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.logger import CSVOutputFormat, Logger, configure
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from sb3_textrl.common import metric_keys as keys
from sb3_textrl.common.atomic import atomic_dir

LOG_FORMATS = ("csv", "tensorboard", "json", "log", "stdout")
"""SB3's logger formats (``stable_baselines3.common.logger.configure``) that ``report_to`` accepts."""
RUN_RECORD_FILE = "sb3_textrl_run.json"  # in each checkpoint: the per-step records the Trainer's state does not keep
_LOG_FILES = ("progress.csv", "progress.json", "log.txt", "events.out.tfevents*")  # what SB3's formats write
ResumeSpec = bool | str | os.PathLike | None


def check_report_to(report_to: str | Sequence[str] | None) -> list[str]:
    """
    The SB3 logger formats of a run, checked before any work.

    :param report_to: ``"csv,tensorboard"``, a list of formats, or None / ``"none"`` / ``[]`` for no log files
    :return: the formats
    """
    if report_to is None:
        return []
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    formats = [str(name).strip() for name in names if str(name).strip() and str(name).strip() != "none"]
    unknown = [name for name in formats if name not in LOG_FORMATS]
    if unknown:
        raise ValueError(
            f"report_to: unknown log format(s) {unknown}; use some of {list(LOG_FORMATS)} (SB3's logger formats), "
            "e.g. report_to='csv,tensorboard', or 'none'."
        )
    if "tensorboard" in formats and importlib.util.find_spec("tensorboard") is None:
        raise ImportError(
            "report_to includes 'tensorboard' but the tensorboard package is not installed: "
            "pip install 'sb3-textrl[tensorboard]', or drop 'tensorboard' from report_to."
        )
    return formats


def check_steps(**steps: int | None) -> None:
    """Refuse a ``save_steps``/``logging_steps``/``max_steps`` that is not a positive whole number (None: unset)."""
    for name, value in steps.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive number of optimizer steps or None, got {value!r}.")


def resolve_checkpoint(resume_from_checkpoint: ResumeSpec, output_dir: Path) -> str | None:
    """
    The checkpoint directory to resume from, checked before any work.

    :param resume_from_checkpoint: None or False (a new run), True (the latest ``checkpoint-*`` in ``output_dir``),
        or the path of a checkpoint directory
    :param output_dir: the run's output directory
    :return: the checkpoint's path, or None
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        latest = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if latest is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True: {output_dir} holds no {PREFIX_CHECKPOINT_DIR}-* directory to resume from. "
                "Checkpoints are written by a run with save_steps=N (CLI: --save-steps N); pass the path of one, or "
                "start a new run without resume_from_checkpoint."
            )
        return latest
    path = Path(resume_from_checkpoint).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not a checkpoint directory (no trainer_state.json "
            f"in it); pass a {PREFIX_CHECKPOINT_DIR}-<step> directory written with save_steps=N, or True for the latest."
        )
    return str(path)


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """The optimizer steps of the linear warmup: ``warmup_ratio`` of ``total_steps``, rounded."""
    if not (math.isfinite(warmup_ratio) and 0.0 <= warmup_ratio < 1.0):
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}; 0.1 warms up over a tenth of the steps.")
    return round(warmup_ratio * total_steps)


def training_arguments(
    output_dir: Path,
    *,
    epochs: int,
    max_steps: int | None,
    learning_rate: float,
    batch_size: int,
    gradient_accumulation_steps: int,
    warmup: int,
    weight_decay: float,
    max_grad_norm: float,
    bf16: bool,
    use_cpu: bool,
    seed: int,
    save_steps: int | None,
    logging_steps: int,
    progress_bar: bool,
) -> TrainingArguments:
    """
    The ``TrainingArguments`` of a run: AdamW with linear warmup and decay, checkpoints every ``save_steps``
    optimizer steps in ``output_dir``, and no reporting integration of transformers' own (the logs go through
    :class:`SB3LogCallback`).
    """
    if not (math.isfinite(max_grad_norm) and math.isfinite(weight_decay)):
        raise ValueError(
            f"max_grad_norm and weight_decay must be finite numbers, got {max_grad_norm} and {weight_decay}; "
            "max_grad_norm=0 turns clipping off."
        )
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        max_steps=-1 if max_steps is None else max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        max_grad_norm=max(max_grad_norm, 0.0),
        warmup_steps=warmup,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        bf16=bf16,
        use_cpu=use_cpu,
        seed=seed,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_strategy="steps",
        logging_steps=logging_steps,
        report_to="none",
        disable_tqdm=not progress_bar,
        remove_unused_columns=False,  # the collators build exactly what compute_loss reads
        dataloader_num_workers=0,
    )


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Keep the caller's Python, NumPy and torch (CPU) random states: the Trainer seeds them all with ``args.seed``."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with th.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def quiet_trainer(trainer: Trainer) -> Trainer:
    """Without its progress bar the Trainer prints every log as a dict; the logs go to SB3's logger instead."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def trainer_log_key(name: str) -> str:
    """The SB3 logger key of a name the Trainer logs: ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    return keys.EVAL + name.removeprefix("eval_") if name.startswith("eval_") else keys.TRAIN + name


class SB3LogCallback(TrainerCallback):
    """
    Writes what the Trainer logs through SB3's logger (``configure(folder, formats)``): ``progress.csv``, tensorboard
    event files, ... with SB3's keys (``train/loss``, ``eval/loss``) and ``time/total_timesteps`` = the optimizer step.

    On a resume, the rows of the earlier ``progress.csv`` up to the checkpoint's step are written again first (SB3's
    csv format starts a new file).

    :param folder: where the log files go
    :param formats: SB3 logger formats (:func:`check_report_to`)
    """

    def __init__(self, folder: Path, formats: Sequence[str]) -> None:
        self.folder = folder
        self.formats = list(formats)
        self.logger: Logger | None = None

    def open(self, resumed_step: int | None) -> None:
        """Start the log files (keeping the rows up to ``resumed_step`` of an earlier run's csv)."""
        if not self.formats:
            return
        earlier = _csv_rows(self.folder / "progress.csv", resumed_step) if resumed_step is not None else []
        self.logger = configure(str(self.folder), self.formats)
        for output in self.logger.output_formats:
            if isinstance(output, CSVOutputFormat):
                for step, row in earlier:
                    output.write(row, {key: () for key in row}, step)

    def write(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` (SB3 keys) at optimizer step ``step`` and dump them."""
        if self.logger is None:
            return
        for key, value in metrics.items():
            self.logger.record(key, value)
        self.logger.record(keys.TOTAL_TIMESTEPS, step)
        self.logger.dump(step)

    def close(self) -> None:
        """Close the log files."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not logs or "train_runtime" in logs:  # the summary of a whole train() call, not a training step
            return
        numbers = {trainer_log_key(k): float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        self.write(numbers, state.global_step)


def _csv_rows(path: Path, up_to_step: int) -> list[tuple[int, dict[str, float]]]:
    """The numeric cells of an SB3 ``progress.csv``'s rows whose step is at most ``up_to_step``."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            cells = {k: float(v) for k, v in row.items() if k and v not in (None, "")}
            step = int(cells.get(keys.TOTAL_TIMESTEPS, -1))
            if 0 <= step <= up_to_step:
                rows.append((step, cells))
    return rows


class RunRecordCallback(TrainerCallback):
    """
    Saves ``record`` (JSON data the run keeps per step, e.g. each optimizer step's loss) in every checkpoint, so
    that a resumed run continues it; :func:`load_run_record` reads it back.

    :param record: the run's record, changed in place as training goes
    """

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        checkpoint = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir():
            (checkpoint / RUN_RECORD_FILE).write_text(json.dumps(self.record) + "\n")


def load_run_record(checkpoint: str | None, empty: dict[str, Any]) -> dict[str, Any]:
    """The run record saved in ``checkpoint`` (``empty`` for a new run or a checkpoint without one)."""
    if checkpoint is None or not (Path(checkpoint) / RUN_RECORD_FILE).is_file():
        return empty
    return dict(empty, **json.loads((Path(checkpoint) / RUN_RECORD_FILE).read_text()))


def run_files(directory: Path) -> list[Path]:
    """What a run wrote into its output directory while training: checkpoints and SB3 log files."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    return found + [p for pattern in _LOG_FILES for p in directory.glob(pattern) if p.is_file()]


def move_run_files(source: Path, destination: Path) -> None:
    """Move the checkpoints and log files of ``source`` into ``destination`` (the final directory being written)."""
    for path in run_files(source):
        if not (destination / path.name).exists():
            os.replace(path, destination / path.name)


def save_trained_dir(output_dir: Path, model: Any, tokenizer: Any, result_file: str, result: dict[str, Any]) -> None:
    """
    The output directory of a Trainer run, written whole (:func:`~sb3_textrl.common.atomic.atomic_dir`): the model
    and tokenizer (``save_pretrained``) and the result file in a temporary sibling, into which the run's checkpoints
    and log files (in ``output_dir`` while it trained) move last; then it replaces ``output_dir``. A kill leaves the
    earlier directory (its checkpoints included, to resume from) or the new one, never a half-written model.

    :param output_dir: the run's output directory
    :param model: what to ``save_pretrained`` (a model without LoRA adapters to merge)
    :param tokenizer: its tokenizer
    :param result_file: the JSON file's name, written last in the new directory
    :param result: its content (``repr`` of what JSON cannot write: task objects such as a reward)
    """
    with atomic_dir(output_dir) as directory:
        model.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
        (directory / result_file).write_text(json.dumps(result, indent=2, default=repr) + "\n")
        move_run_files(output_dir, directory)
