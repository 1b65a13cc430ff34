"""
Reward-model training from pairwise preferences (Bradley-Terry), which ``sb3-textrl train-rm`` runs.

The reward model is a Hugging Face ``AutoModelForSequenceClassification`` with one output: it reads a prompt and a
completion as a text pair and returns a scalar. For each preference the loss is ``-log sigmoid(r_chosen - r_rejected)``,
which makes ``sigmoid(r_a - r_b)`` the modelled probability that a rater prefers ``a`` to ``b``.

The saved directory holds the model and tokenizer (``save_pretrained``) and ``reward_model.json``: the reward's mean
and standard deviation on the training completions (used to normalise it) and the training metrics.
:class:`~sb3_textrl.rewards.LearnedRewardModel` loads it as a reward for any text task.

Training runs on ``transformers.Trainer`` (:class:`BradleyTerryTrainer` overrides only the loss): AdamW with linear
warmup and decay, gradient accumulation and clipping, bf16, checkpoints every ``save_steps`` in the output directory
and ``resume_from_checkpoint``. The logs go through SB3's logger (``progress.csv``, tensorboard) with SB3's keys.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from tokenizers import Encoding
from torch.utils.data import Dataset
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from sb3_textrl.common import metric_keys as keys
from sb3_textrl.common.deprecation import rename_kwargs, renamed_kwargs
from sb3_textrl.common.hf_trainer import (
    ResumeSpec,
    RunRecordCallback,
    SB3LogCallback,
    check_report_to,
    load_run_record,
    preserved_global_rng,
    quiet_trainer,
    resolve_checkpoint,
    save_trained_dir,
    training_arguments,
    warmup_steps,
)
from sb3_textrl.common.names import MINILM_NAME
from sb3_textrl.models.assets import minilm_dir
from sb3_textrl.reward_model.config import RENAMED_FIELDS, RewardModelConfig
from sb3_textrl.reward_model.data import Preference, PreferenceSource, load_preferences, split_preferences
from sb3_textrl.reward_model.encoding import (
    PairEncoder,
    forward_rewards,
    log_truncations,
    max_positions,
    prepare_rm_tokenizer,
    score_encodings,
)

logger = logging.getLogger("sb3_textrl")

DEFAULT_BACKBONE = MINILM_NAME
REWARD_MODEL_FILE = "reward_model.json"
FORMAT_NAME = "sb3_textrl.reward_model"
FORMAT_VERSION = 1
_DEFAULT_ALIASES = ("default", "minilm", MINILM_NAME, f"sentence-transformers/{MINILM_NAME}")
# reward_model.json (format version 1) records the settings under the names they had when it was defined.
_SAVED_NAMES = {"learning_rate": "lr"}
# how a run was shown, logged and checkpointed and where it ran, not what it trained
_NOT_SAVED = ("progress_bar", "device", "save_steps", "logging_steps", "report_to")


@dataclass
class RewardModelResult:
    """
    What :func:`train_reward_model` produced.

    :param output_dir: the saved reward-model directory
    :param metrics: final and per-epoch metrics (also in ``reward_model.json``)
    :param model: the trained model, in eval mode
    :param tokenizer: its tokenizer
    """

    output_dir: Path
    metrics: dict[str, Any]
    model: PreTrainedModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when present, else the CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_backbone(backbone: str | os.PathLike | None) -> str:
    """
    The name or directory to load a reward-model backbone from.

    :param backbone: None (or ``"minilm"``, ``"all-MiniLM-L6-v2"``) for the offline all-MiniLM-L6-v2; a local
        directory; or a Hugging Face hub name (needs the hub)
    :return: what to pass to ``from_pretrained``
    """
    if backbone is None or str(backbone) in _DEFAULT_ALIASES:
        return str(minilm_dir())
    name = os.fspath(backbone)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    # Hub ids are "name" or "namespace/name"; anything else was meant as a directory. Checking here avoids
    # transformers asking an unreachable hub (and retrying) for a path with a typo.
    if path.exists() or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        raise FileNotFoundError(
            f"Reward-model backbone {name!r} is not a directory. Pass a directory holding a Hugging Face model and "
            f"tokenizer (config.json, weights, tokenizer.json, as written by save_pretrained), or leave backbone "
            f"(sb3-textrl train-rm --model) out for the offline default {MINILM_NAME}."
        )
    return name


@contextmanager
@renamed_kwargs(progress="progress_bar")
def quiet_transformers(progress_bar: bool = False) -> Iterator[None]:
    """Silence transformers' warnings (and its progress bars unless ``progress_bar``) while loading a model."""
    # A backbone without a scalar head makes transformers log a "newly initialized" report: expected here.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress_bar:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@renamed_kwargs(progress="progress_bar")
def load_backbone(
    backbone: str | os.PathLike | None, progress_bar: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """
    A sequence-classification model with one output (a new scalar head unless the checkpoint has one) and its tokenizer.

    :param backbone: see :func:`resolve_backbone`
    :param progress_bar: show transformers' loading progress bar (``progress``: its deprecated name)
    :return: (model in float32, tokenizer with a pad token)
    """
    path = resolve_backbone(backbone)
    try:
        with quiet_transformers(progress_bar):
            tokenizer = AutoTokenizer.from_pretrained(path)
            # ignore_mismatched_sizes: a checkpoint with a classifier of another size gets a fresh scalar head.
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=torch.float32, ignore_mismatched_sizes=True
            )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"Could not load the reward-model backbone {str(backbone)!r} ({first_line}). Pass a local directory with a "
            f"Hugging Face model and its tokenizer (save_pretrained), a hub name if the hub is reachable, or leave it out "
            f"for the offline default {MINILM_NAME}."
        ) from error
    prepare_rm_tokenizer(tokenizer, f"backbone {str(backbone)!r}")
    if model.config.pad_token_id is None:
        # Decoder backbones (GPT-2) pool the last non-pad token and must know the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _bt_stats(margin: torch.Tensor) -> tuple[float, float]:
    """Mean Bradley-Terry loss and pairwise accuracy (a tie counts half) of reward margins ``r_chosen - r_rejected``."""
    loss = float(-F.logsigmoid(margin).mean())
    accuracy = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
    return loss, accuracy


def _package_version() -> str:
    try:
        return importlib.metadata.version("sb3-textrl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_output_dir(output_dir: Path, resuming: bool) -> None:
    if resuming:  # the directory holds the run being resumed (resolve_checkpoint found its checkpoint)
        return
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Output {str(output_dir)!r} is a file; pass a new or empty directory for the reward model.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / REWARD_MODEL_FILE).is_file():
        raise FileExistsError(
            f"Output directory {str(output_dir)!r} is not empty and holds no reward model ({REWARD_MODEL_FILE}); pass a new "
            "or empty directory (an earlier reward-model directory is overwritten)."
        )


def train_reward_model(
    data: PreferenceSource,
    output_dir: str | os.PathLike,
    config: RewardModelConfig | None = None,
    resume_from_checkpoint: ResumeSpec = None,
    callbacks: Sequence[TrainerCallback] = (),
    **overrides: Any,
) -> RewardModelResult:
    """
    Train a scalar reward model on pairwise preferences with the Bradley-Terry loss, evaluate it, and save it.

    :param data: a SQLite feedback database, a ``.jsonl`` file with ``prompt``/``chosen``/``rejected`` fields, or a
        sequence of pairs (objects with those attributes, e.g. ``FeedbackStore.preference_pairs()``, or dicts)
    :param output_dir: where the reward model is saved (a new or empty directory, or an earlier reward model's)
    :param config: the settings (default :class:`RewardModelConfig`)
    :param resume_from_checkpoint: continue a run from a checkpoint (written with ``save_steps``): True for the latest
        ``checkpoint-*`` in ``output_dir``, or a checkpoint's path (the data and settings must be the run's)
    :param callbacks: further ``transformers.TrainerCallback`` objects (early stopping, your own logging)
    :param overrides: fields of :class:`RewardModelConfig` to override, e.g. ``epochs=1, learning_rate=1e-4``
        (the deprecated ``lr`` and ``progress`` still work, with a ``DeprecationWarning``)
    :return: the saved directory, the metrics, and the trained model and tokenizer
    """
    overrides = rename_kwargs(overrides, RENAMED_FIELDS, "train_reward_model()")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(RewardModelConfig)}
    if unknown:
        raise TypeError(f"Unknown reward-model settings {sorted(unknown)}; see RewardModelConfig for the valid ones")
    cfg = dataclasses.replace(config or RewardModelConfig(), **overrides)
    cfg.check()
    output_dir = Path(output_dir).expanduser()
    checkpoint = resolve_checkpoint(resume_from_checkpoint, output_dir)
    _check_output_dir(output_dir, resuming=checkpoint is not None)
    formats = check_report_to(cfg.report_to)
    pairs = load_preferences(data)
    train_pairs, eval_pairs, split_by = split_preferences(pairs, cfg.eval_fraction, cfg.seed)
    device = resolve_device(cfg.device)
    start = time.perf_counter()

    # A private RNG stream: the seed fixes the head's initialisation, shuffling and dropout without touching the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_backbone(cfg.backbone, progress_bar=cfg.progress_bar)
        cast(torch.nn.Module, model).to(device)  # the stub of PreTrainedModel.to (functools.wraps) keeps an unbound self
        positions = max_positions(model)
        max_length = min(cfg.max_length, positions) if positions else cfg.max_length
        encoder = PairEncoder(tokenizer, max_length)
        # Log lines (epochs, truncations) go through tqdm.write, so they do not break the progress bar's line.
        with logging_redirect_tqdm():
            log = SB3LogCallback(output_dir, formats)
            run = _Run(output_dir, checkpoint, log, callbacks)
            metrics = _fit(model, tokenizer, encoder, train_pairs, eval_pairs, cfg, device, run)

    _add_accuracy_interval(metrics, len(eval_pairs))
    model.eval()
    norm = _normalisation_stats(model, encoder, train_pairs, cfg.batch_size * 2, device)
    metrics.update(
        n_pairs=len(pairs), n_train_pairs=len(train_pairs), n_eval_pairs=len(eval_pairs), split_by=split_by,
        max_length=max_length, seconds=round(time.perf_counter() - start, 2),
    )
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "backbone": str(cfg.backbone or DEFAULT_BACKBONE),
        "max_length": max_length,
        "normalization": norm,
        "metrics": metrics,
        "config": {_SAVED_NAMES.get(k, k): v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_SAVED},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sb3_textrl_version": _package_version(),
    }
    with quiet_transformers(cfg.progress_bar):  # whole or not at all: an earlier model stays until the new one is in
        save_trained_dir(output_dir, model, tokenizer, REWARD_MODEL_FILE, info)
    return RewardModelResult(output_dir, metrics, model, tokenizer)


@dataclass(frozen=True)
class _Run:
    """Where a run writes while it trains, what it resumes from, and its logger."""

    output_dir: Path
    checkpoint: str | None
    log: SB3LogCallback
    callbacks: Sequence[TrainerCallback]


class _PairIndices(Dataset):
    """The indices of the training pairs (the collator encodes the chosen and rejected texts of a batch)."""

    def __init__(self, n_pairs: int) -> None:
        self.n_pairs = n_pairs

    def __len__(self) -> int:
        return self.n_pairs

    def __getitem__(self, index: int) -> int:
        return index


class BradleyTerryTrainer(Trainer):
    """
    ``transformers.Trainer`` with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``: each batch holds
    the chosen texts then the rejected ones (one forward, ``(2B, T) -> (2B,)`` rewards).

    :param margins: receives the reward margin of each training pair, for the epoch's accuracy
    :param args: the Trainer's positional arguments
    :param kwargs: the Trainer's keyword arguments
    """

    def __init__(self, *args: Any, margins: list[float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.margins = margins

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        rewards = forward_rewards(model, inputs)  # type: ignore[arg-type]  # the sequence-classification model given
        n_pairs = rewards.shape[0] // 2
        margin = rewards[:n_pairs] - rewards[n_pairs:]  # (B,)
        if model.training:
            self.margins.extend(margin.detach().cpu().tolist())
        loss = -F.logsigmoid(margin).mean()
        return (loss, None) if return_outputs else loss


class _EpochMetrics(TrainerCallback):
    """At each epoch's end: the epoch's training loss and accuracy, the held-out ones, logged and kept in ``record``."""

    def __init__(
        self, record: dict[str, Any], encoder: PairEncoder, held_out: tuple[list[Encoding], list[Encoding]],
        cfg: RewardModelConfig, device: torch.device, log: SB3LogCallback,
    ) -> None:
        self.record, self.encoder, self.held_out, self.cfg, self.device, self.log = record, encoder, held_out, cfg, device, log

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        epoch = len(self.record["history"]) + 1
        train_loss, train_accuracy = _bt_stats(torch.tensor(self.record["margins"]))
        row: dict[str, Any] = {"epoch": epoch, "train_loss": round(train_loss, 5), "train_accuracy": round(train_accuracy, 5)}
        logged = {keys.TRAIN + keys.ACCURACY: train_accuracy}
        chosen, rejected = self.held_out
        if chosen:
            model.eval()
            batch = self.cfg.batch_size * 2
            margin = score_encodings(model, self.encoder, chosen, batch, self.device) - score_encodings(
                model, self.encoder, rejected, batch, self.device
            )
            model.train()
            eval_loss, eval_accuracy = _bt_stats(margin)
            row.update(eval_loss=round(eval_loss, 5), eval_accuracy=round(eval_accuracy, 5))
            logged.update({keys.EVAL + keys.LOSS: eval_loss, keys.EVAL + keys.ACCURACY: eval_accuracy})
        self.record["history"].append(row)
        self.record["margins"].clear()
        self.log.write(logged, state.global_step)
        logger.info(f"reward model epoch {epoch}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "epoch"))


def _fit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoder: PairEncoder,
    train_pairs: Sequence[Preference],
    eval_pairs: Sequence[Preference],
    cfg: RewardModelConfig,
    device: torch.device,
    run: _Run,
) -> dict[str, Any]:
    """Training on :class:`BradleyTerryTrainer`; returns the metrics (final and per epoch)."""
    prompts = [p.prompt for p in train_pairs]
    chosen, counts_c = encoder.encode(prompts, [p.chosen for p in train_pairs])
    rejected, counts_r = encoder.encode(prompts, [p.rejected for p in train_pairs])
    eval_chosen, counts_ec = encoder.encode([p.prompt for p in eval_pairs], [p.chosen for p in eval_pairs])
    eval_rejected, counts_er = encoder.encode([p.prompt for p in eval_pairs], [p.rejected for p in eval_pairs])
    truncations = counts_c + counts_r + counts_ec + counts_er
    log_truncations(truncations, 2 * (len(train_pairs) + len(eval_pairs)), encoder.max_length, "texts (prompt + completion)")

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        # Chosen and rejected texts go through one forward: the chosen first.
        return encoder.collate([chosen[i] for i in indices] + [rejected[i] for i in indices])

    steps_per_epoch = math.ceil(math.ceil(len(train_pairs) / cfg.batch_size) / cfg.gradient_accumulation_steps)
    args = training_arguments(
        run.output_dir,
        epochs=cfg.epochs,
        max_steps=None,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup=warmup_steps(cfg.warmup_fraction, cfg.epochs * steps_per_epoch),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        use_cpu=device.type == "cpu",
        seed=cfg.seed,
        save_steps=cfg.save_steps,
        logging_steps=cfg.logging_steps,
        progress_bar=cfg.progress_bar,
    )
    record = load_run_record(run.checkpoint, {"history": [], "margins": []})
    resumed_step = None if run.checkpoint is None else TrainerState.load_from_json(
        str(Path(run.checkpoint) / "trainer_state.json")).global_step
    run.log.open(resumed_step)
    try:
        with preserved_global_rng():
            trainer = quiet_trainer(BradleyTerryTrainer(
                model=model,
                args=args,
                train_dataset=_PairIndices(len(train_pairs)),
                data_collator=collate,
                processing_class=tokenizer,
                callbacks=[
                    run.log,
                    RunRecordCallback(record),
                    _EpochMetrics(record, encoder, (eval_chosen, eval_rejected), cfg, device, run.log),
                    *run.callbacks,
                ],
                margins=record["margins"],
            ))
            trainer.train(resume_from_checkpoint=run.checkpoint)
    finally:
        run.log.close()
    history = record["history"]
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    counts = {"truncated_prompts": truncations.prompts, "truncated_completions": truncations.completions}
    return final | {"history": history} | counts


# Held-out accuracy whose 95% interval is wider than ±this is reported as too uncertain to judge the model.
MAX_ACCURACY_HALF_WIDTH = 0.1


def _add_accuracy_interval(metrics: dict[str, Any], n_eval: int) -> None:
    """Add the held-out accuracy's 95% interval (Wilson) to ``metrics``; warn when it is too wide to mean anything."""
    from sb3_textrl.metrics.bootstrap import proportion_interval

    if not n_eval:
        return
    low, high = proportion_interval(metrics["eval_accuracy"] * n_eval, n_eval)
    metrics["eval_accuracy_ci95"] = [round(low, 5), round(high, 5)]
    if (high - low) / 2 > MAX_ACCURACY_HALF_WIDTH:
        logger.warning(
            f"reward model: held-out accuracy {metrics['eval_accuracy']:.3f} on {n_eval} pair(s) has a 95% interval of "
            f"[{low:.3f}, {high:.3f}]: too few pairs to judge the model (about 100 held-out pairs give ±0.1); "
            "rate more pairs or raise eval_fraction"
        )


def _normalisation_stats(
    model: PreTrainedModel, encoder: PairEncoder, pairs: Sequence[Preference], batch_size: int, device: torch.device
) -> dict[str, float | int]:
    """Mean and standard deviation of the reward over the distinct training (prompt, completion) texts."""
    texts = list(dict.fromkeys((p.prompt, c) for p in pairs for c in (p.chosen, p.rejected)))
    encodings, _ = encoder.encode([t[0] for t in texts], [t[1] for t in texts])
    rewards = score_encodings(model, encoder, encodings, batch_size, device).double()
    std = float(rewards.std()) if len(rewards) > 1 else 0.0
    # A constant reward (or one text) has no spread to divide by: normalising then only centres it.
    return {"mean": float(rewards.mean()), "std": std if std > 1e-6 else 1.0, "n": len(rewards)}
