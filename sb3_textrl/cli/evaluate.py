"""``sb3-textrl eval``: a saved model or an LM evaluated on a task (ROUGE, reward, KL to the reference, length)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sb3_textrl.cli.common import (
    DECODING_HELP,
    add_command,
    add_flag,
    add_model,
    add_output_dir,
    add_run_flags,
    add_task_flags,
    env_kwargs,
    non_negative_int,
    positive_int,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``sb3-textrl eval`` to the CLI's subcommands.

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    parser = add_command(
        commands,
        "eval",
        help="evaluate a saved model or an LM on a task: ROUGE, reward, KL to reference, length, samples",
        description="Complete the first --n-prompts prompts of a task with a saved model (.zip) or an LM and score the "
        "completions: ROUGE-1/2/L, the task reward, KL to the reference LM, length, distinct-n, and the baselines "
        "(lead-3, the references). Writes eval.json and eval.md (with sample completions). The env is made to match the "
        "model (its tokenizer, a saved model's prompt and completion widths) unless flags say otherwise.",
    )
    add_model(parser, "saved model .zip (e.g. runs/news_demo/model.zip), or an LM name/dir (default: the embedded LM)")
    add_task_flags(parser, "JSONL/CSV/JSON of article/summary pairs for a news task (default: the task's data)")
    add_flag(
        parser, "--n-prompts", old=("--n",), type=positive_int, default=32, help="evaluate the first N prompts (default 32)"
    )
    parser.add_argument(
        "--decoding", action="append", help=f"{DECODING_HELP}; repeat to evaluate several (default greedy)"
    )
    parser.add_argument(
        "--baselines",
        default="auto",
        help="comma-separated from lead3,reference; 'none'; or 'auto' (default: every baseline the task supports)",
    )
    add_output_dir(parser, "directory for eval.json and eval.md (default: next to the model)")
    parser.add_argument("--n-envs", type=positive_int, default=8, help="prompts completed at once (default 8)")
    parser.add_argument(
        "--report-samples", type=non_negative_int, default=8, help="prompts shown in eval.md's samples table (default 8)"
    )
    add_run_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl eval`` with the parsed arguments (the implementation is imported here)."""
    if args.baselines == "auto":
        baselines = None
    elif args.baselines == "none":
        baselines = []
    else:
        baselines = [name.strip() for name in args.baselines.split(",") if name.strip()]
    from sb3_textrl.evaluation import JSON_NAME, MARKDOWN_NAME, default_output_dir, evaluate

    kwargs = env_kwargs(args, args.task)
    output = Path(args.output_dir) if args.output_dir else default_output_dir(args.model)
    result = evaluate(
        args.model,
        task=args.task,
        dataset=kwargs.pop("dataset", None),
        n=args.n_prompts,
        decoding=args.decoding or ["greedy"],
        baselines=baselines,
        n_envs=args.n_envs,
        seed=args.seed,
        device=args.device,
        env_kwargs=kwargs,
        output_dir=output,
        report_samples=args.report_samples,
        progress_bar=not args.quiet,
    )
    print(result.metrics_table())
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {output / JSON_NAME} and {output / MARKDOWN_NAME}")
    return 0
