"""``sb3-textrl train-rm``: a reward model trained on pairwise preferences (feedback DB or JSONL)."""

from __future__ import annotations

import argparse

from sb3_textrl.cli.common import (
    add_command,
    add_flag,
    add_model,
    add_output_dir,
    add_run_flags,
    add_trainer_flags,
    float_in,
    positive_float,
    positive_int,
    show_progress_logs,
)
from sb3_textrl.common.names import MINILM_NAME
from sb3_textrl.reward_model.config import RewardModelConfig


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``train-rm`` to the ``sb3-textrl`` subcommands.

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    defaults = RewardModelConfig()
    parser = add_command(
        commands,
        "train-rm",
        help="train a reward model on pairwise preferences (feedback DB or JSONL)",
        description="Train a scalar reward model with the Bradley-Terry loss on pairwise preferences and save it for "
        "LearnedRewardModel (or demo --reward-model). Prints held-out pairwise accuracy with a 95% interval, and loss.",
    )
    add_flag(
        parser,
        "--dataset",
        old=("--data",),
        required=True,
        help="feedback database (SQLite, from sb3-textrl rate) or .jsonl with prompt/chosen/rejected on each line",
    )
    add_output_dir(parser, "directory to save the reward model in (new or empty)", required=True)
    add_model(
        parser, f"encoder to fine-tune: HF model directory or hub name (default: offline {MINILM_NAME})", old=("--backbone",)
    )
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help=f"default {defaults.epochs}")
    add_flag(
        parser,
        "--learning-rate",
        old=("--lr",),
        type=positive_float,
        default=defaults.learning_rate,
        help=f"default {defaults.learning_rate}",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float_in(0.0, 1.0, high_open=True),
        default=defaults.eval_fraction,
        help=f"share of the prompts held out (default {defaults.eval_fraction})",
    )
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    parser.add_argument(
        "--max-length", type=positive_int, default=defaults.max_length, help=f"tokens per text (default {defaults.max_length})"
    )
    add_run_flags(parser, seed=defaults.seed, device=defaults.device)
    add_trainer_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl train-rm`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.reward_model.train import MAX_ACCURACY_HALF_WIDTH, train_reward_model

    show_progress_logs()  # our epoch lines and truncation counts
    config = RewardModelConfig(
        backbone=args.model,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
        max_length=args.max_length,
        seed=args.seed,
        device=args.device,
        progress_bar=not args.quiet,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
    )
    result = train_reward_model(args.dataset, args.output_dir, config, resume_from_checkpoint=args.resume)
    m = result.metrics
    print(
        f"trained on {m['n_train_pairs']} pairs in {m['seconds']:.0f} s: train loss {m['train_loss']:.4f}, "
        f"train accuracy {m['train_accuracy']:.3f}"
    )
    if m["n_eval_pairs"]:
        low, high = m["eval_accuracy_ci95"]
        print(
            f"held-out ({m['n_eval_pairs']} pairs, split by {m['split_by']}): pairwise accuracy {m['eval_accuracy']:.3f} "
            f"(95% interval [{low:.3f}, {high:.3f}]), loss {m['eval_loss']:.4f}"
        )
        if (high - low) / 2 > MAX_ACCURACY_HALF_WIDTH:
            print(f"  {m['n_eval_pairs']} held-out pair(s) are too few to judge the model: rate more pairs")
    if m["truncated_prompts"]:
        print(f"{m['truncated_prompts']} texts were longer than {m['max_length']} tokens (prompts cut from the start)")
    print(f"saved to {result.output_dir}")
    return 0
