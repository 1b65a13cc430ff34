"""``sb3-textrl eval``: a saved model or an LM evaluated on a task (ROUGE, reward, KL to the reference, length)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sb3_textrl.common.names import DEFAULT_TASK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``sb3-textrl eval`` to the CLI's subcommands."""
    parser = commands.add_parser(
        "eval", help="evaluate a saved model or an LM on a task: ROUGE, reward, KL to reference, length, samples"
    )
    parser.add_argument(
        "--model", help="saved model .zip (e.g. runs/news_demo/model.zip), or an LM name/dir (default: the embedded LM)"
    )
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"registered text task (default {DEFAULT_TASK})")
    parser.add_argument("--dataset", help="JSONL/CSV/JSON of article/summary pairs for a news task (default: the task's data)")
    parser.add_argument("--n", type=int, default=32, help="evaluate the first N prompts (default 32)")
    parser.add_argument(
        "--decoding",
        action="append",
        help="greedy | sample[:temperature=T,top_k=K,top_p=P]; repeat to evaluate several (default greedy)",
    )
    parser.add_argument(
        "--baselines",
        default="auto",
        help="comma-separated from lead3,reference; 'none'; or 'auto' (default: every baseline the task supports)",
    )
    parser.add_argument("--output", help="directory for eval.json and eval.md (default: next to the model)")
    parser.add_argument("--n-envs", type=int, default=8, help="prompts completed at once (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="length limit of a completion (default: the model's or the task's)")
    parser.add_argument(
        "--env-kwarg",
        action="append",
        metavar="KEY=VALUE",
        help="further env argument, repeatable (e.g. data_seed=1000 for held-out generated news)",
    )
    parser.add_argument("--report-samples", type=int, default=8, help="prompts shown in eval.md's samples table (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def _parse_value(text: str) -> Any:
    """``--env-kwarg`` values: JSON when it parses (numbers, true/false/null, lists), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl eval`` with the parsed arguments (the implementation is imported here)."""
    env_kwargs: dict[str, Any] = {}
    for item in args.env_kwarg or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env-kwarg {item!r}: expected KEY=VALUE, e.g. --env-kwarg data_seed=1000")
        env_kwargs[key] = _parse_value(value)
    if args.max_new_tokens is not None:
        env_kwargs["max_new_tokens"] = args.max_new_tokens
    baselines: list[str] | None
    if args.baselines == "auto":
        baselines = None
    elif args.baselines == "none":
        baselines = []
    else:
        baselines = [name.strip() for name in args.baselines.split(",") if name.strip()]
    from sb3_textrl.evaluation import JSON_NAME, MARKDOWN_NAME, default_output_dir, evaluate

    output = Path(args.output) if args.output else default_output_dir(args.model)
    result = evaluate(
        args.model,
        task=args.task,
        dataset=args.dataset,
        n=args.n,
        decoding=args.decoding or ["greedy"],
        baselines=baselines,
        n_envs=args.n_envs,
        seed=args.seed,
        device=args.device,
        env_kwargs=env_kwargs,
        output_dir=output,
        report_samples=args.report_samples,
        progress_bar=not args.quiet,
    )
    print(result.metrics_table())
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {output / JSON_NAME} and {output / MARKDOWN_NAME}")
    return 0
