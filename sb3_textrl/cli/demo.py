"""``sb3-textrl demo``: PPO on NewsSummary-v0 with the embedded LM, summaries before and after."""

from __future__ import annotations

import argparse
import dataclasses

from sb3_textrl.demo_config import DemoConfig


def _int_or_none(text: str) -> int | str:
    return "none" if text.strip().lower() == "none" else int(text)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``sb3-textrl demo`` to the CLI's subcommands (the help shows :class:`DemoConfig`'s defaults)."""
    demo = commands.add_parser("demo", help="PPO on NewsSummary-v0 with the embedded LM: summaries before and after")
    defaults = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    demo.add_argument("--lm", help="LM name or local path (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--dataset", help="JSONL/CSV of article/summary pairs (default: built-in generated news)")
    demo.add_argument("--reward-model", help="directory written by train-rm: PPO on that learned reward (default: ROUGE-1)")
    for name in (
        "n_envs",
        "samples_per_prompt",
        "n_steps",
        "updates",
        "n_epochs",
        "n_eval",
        "n_samples",
        "eval_every",
        "eval_data_seed",
        "seed",
        "max_prompt_tokens",
    ):
        demo.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {defaults[name]}")
    demo.add_argument(
        "--trainable-layers",
        type=_int_or_none,
        help=f"train the top N blocks only, 'none' for all (default {defaults['trainable_layers']})",
    )
    demo.add_argument("--mixed-precision", choices=("auto", "bf16", "no"), help=f"default {defaults['mixed_precision']}")
    for name in ("learning_rate", "kl_coef", "temperature"):
        demo.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"default {defaults[name]}")
    demo.add_argument("--output-dir", help=f"default {defaults['output_dir']}")
    demo.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl demo`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.demo import run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if settings.get("trainable_layers") == "none":  # --trainable-layers none: every layer
        settings["trainable_layers"] = None
    run_demo(DemoConfig(**settings))
    return 0
