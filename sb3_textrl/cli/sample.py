"""``sb3-textrl sample``: two candidate completions per prompt, stored in a feedback database for rating."""

from __future__ import annotations

import argparse

from sb3_textrl.cli.common import (
    DECODING_HELP,
    add_command,
    add_run_flags,
    add_task_flags,
    env_kwargs,
    positive_int,
    show_progress_logs,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``sb3-textrl sample`` to the CLI's subcommands.

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    parser = add_command(
        commands,
        "sample",
        help="generate two candidate completions per prompt and store them for rating",
        description="Draw --n-prompts prompts of a task (seeded), complete each with two sources (model and decoding "
        "A, model and decoding B) and store them as pairs to judge in a feedback database; sb3-textrl rate shows them, "
        "in a random order per pair. The env uses model A's tokenizer unless --tokenizer says otherwise. Each pair is stored "
        "whole or not at all, and a rerun with the same settings adds only the prompts not yet stored.",
    )
    parser.add_argument("--db", required=True, help="feedback database (SQLite; created if missing)")
    add_task_flags(parser, "JSONL/CSV/JSON of article/summary pairs for news tasks (default: the task's data)")
    parser.add_argument("--n-prompts", type=positive_int, default=16, help="prompts to draw (default 16)")
    parser.add_argument("--model-a", help="LM name/dir or saved model .zip for candidate A (default: the embedded LM)")
    parser.add_argument("--model-b", help="the same for candidate B (default: model A)")
    parser.add_argument("--decoding-a", default="greedy", help=f"{DECODING_HELP} (default greedy)")
    parser.add_argument("--decoding-b", default="sample", help="as --decoding-a (default: sample)")
    parser.add_argument("--n-envs", type=positive_int, default=4, help="prompts completed at once (default 4)")
    add_run_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl sample`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.sampling import CandidateSource, DecodingSettings, sample_for_rating

    show_progress_logs()  # which prompts a rerun skips

    kwargs = env_kwargs(args, args.task)
    source_a = CandidateSource(args.model_a, DecodingSettings.parse(args.decoding_a))
    source_b = CandidateSource(args.model_b or args.model_a, DecodingSettings.parse(args.decoding_b))
    pair_ids = sample_for_rating(
        args.db,
        task=args.task,
        n_prompts=args.n_prompts,
        source_a=source_a,
        source_b=source_b,
        env_kwargs=kwargs,
        n_envs=args.n_envs,
        seed=args.seed,
        device=args.device,
        progress_bar=not args.quiet,
    )
    print(f"stored {len(pair_ids)} new pairs to judge in {args.db}; rate them with: sb3-textrl rate --db {args.db}")
    return 0
