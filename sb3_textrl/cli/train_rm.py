"""``sb3-textrl train-rm``: a reward model trained on pairwise preferences (feedback DB or JSONL)."""

from __future__ import annotations

import argparse
import logging
import sys

from sb3_textrl.cli.sft import add_trainer_flags
from sb3_textrl.common.names import MINILM_NAME
from sb3_textrl.reward_model.config import RewardModelConfig


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``train-rm`` to the ``sb3-textrl`` subcommands."""
    defaults = RewardModelConfig()
    parser = commands.add_parser(
        "train-rm",
        help="train a reward model on pairwise preferences (feedback DB or JSONL)",
        description="Train a scalar reward model with the Bradley-Terry loss on pairwise preferences and save it for "
        "LearnedRewardModel. Prints held-out pairwise accuracy and loss.",
    )
    parser.add_argument("--data", required=True, help="feedback database (SQLite) or .jsonl with prompt/chosen/rejected")
    parser.add_argument("--output", required=True, help="directory to save the reward model in (new or empty)")
    parser.add_argument("--backbone", help=f"HF model directory or hub name (default: offline {MINILM_NAME})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    # The flags keep their names (--lr, --no-progress); they set learning_rate and progress_bar.
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help=f"default {defaults.learning_rate}")
    parser.add_argument(
        "--eval-fraction", type=float, default=defaults.eval_fraction, help=f"default {defaults.eval_fraction}"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"default {defaults.batch_size}")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help=f"default {defaults.max_length}")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    parser.add_argument("--device", default=defaults.device, help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trainer_flags(parser, "--output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl train-rm`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.models import MissingAssetError
    from sb3_textrl.reward_model.train import MAX_ACCURACY_HALF_WIDTH, train_reward_model

    logging.basicConfig(format="%(message)s")
    # our epoch lines and truncation counts; other libraries stay at warnings
    logging.getLogger("sb3_textrl").setLevel(logging.INFO)
    config = RewardModelConfig(
        backbone=args.backbone,
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
        max_length=args.max_length,
        seed=args.seed,
        device=args.device,
        progress_bar=not args.no_progress,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
    )
    try:
        result = train_reward_model(args.data, args.output, config, resume_from_checkpoint=args.resume)
    except (ValueError, OSError, MissingAssetError, ImportError) as error:  # bad input: the message says what to do
        print(f"sb3-textrl train-rm: error: {error}", file=sys.stderr)
        return 2
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
