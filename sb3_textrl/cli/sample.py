"""``sb3-textrl sample``: two candidate completions per prompt, stored in a feedback database for rating."""

from __future__ import annotations

import argparse
from typing import Any

from sb3_textrl.common.names import DEFAULT_TASK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``sb3-textrl sample`` to the CLI's subcommands."""
    parser = commands.add_parser("sample", help="generate two candidate completions per prompt and store them for rating")
    parser.add_argument("--db", required=True, help="feedback database (SQLite; created if missing)")
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"registered text task (default {DEFAULT_TASK})")
    parser.add_argument("--dataset", help="JSONL/CSV of article/summary pairs for news tasks (default: the task's data)")
    parser.add_argument("--n-prompts", type=int, default=16, help="prompts to draw (default 16)")
    parser.add_argument("--model-a", help="LM name/dir or saved model .zip for candidate A (default: the embedded LM)")
    parser.add_argument("--model-b", help="the same for candidate B (default: model A)")
    parser.add_argument("--decoding-a", default="greedy", help="greedy | sample[:temperature=T,top_k=K,top_p=P]")
    parser.add_argument("--decoding-b", default="sample", help="as --decoding-a (default: sample)")
    parser.add_argument("--max-new-tokens", type=int, help="length limit of a completion (default: the task's)")
    parser.add_argument("--n-envs", type=int, default=4, help="prompts completed at once (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl sample`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.sampling import CandidateSource, DecodingSettings, sample_for_rating

    env_kwargs: dict[str, Any] = {}
    if args.dataset:
        env_kwargs["dataset"] = args.dataset
    if args.max_new_tokens:
        env_kwargs["max_new_tokens"] = args.max_new_tokens
    source_a = CandidateSource(args.model_a, DecodingSettings.parse(args.decoding_a))
    source_b = CandidateSource(args.model_b or args.model_a, DecodingSettings.parse(args.decoding_b))
    pair_ids = sample_for_rating(
        args.db,
        task=args.task,
        n_prompts=args.n_prompts,
        source_a=source_a,
        source_b=source_b,
        env_kwargs=env_kwargs,
        n_envs=args.n_envs,
        seed=args.seed,
        device=args.device,
    )
    print(f"stored {len(pair_ids)} pairs to judge in {args.db}; rate them with: sb3-textrl rate --db {args.db}")
    return 0
