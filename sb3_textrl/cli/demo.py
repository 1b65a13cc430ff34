"""``sb3-textrl demo``: PPO on NewsSummary-v0 with the embedded LM, summaries before and after."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from sb3_textrl.cli.common import (
    add_command,
    add_flag,
    add_model,
    add_output_dir,
    add_run_flags,
    add_task_flags,
    env_kwargs,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from sb3_textrl.demo_config import DemoConfig

# DemoConfig's whole-number settings: what they may be, and what they mean
_COUNTS: dict[str, tuple[Callable[[str], int], str]] = dict(
    n_envs=(positive_int, "parallel episodes per rollout"),
    samples_per_prompt=(positive_int, "summaries of each article per rollout, each judged against the others (RLOO)"),
    n_steps=(positive_int, "tokens per env per rollout (= max_new_tokens: one summary per env per rollout)"),
    updates=(positive_int, "PPO iterations (rollout + training)"),
    n_eval=(positive_int, "held-out articles scored before and after (greedy and sampled)"),
    n_samples=(non_negative_int, "of those, summaries printed before and after"),
    n_sampled_eval=(
        non_negative_int,
        "sampled summaries per held-out article scored before and after: the policy's own mean reward, the headline "
        "(0: greedy only)",
    ),
    eval_every=(positive_int, "rollouts between evaluations on the held-out articles"),
    eval_data_seed=(int, "seed of the held-out generated articles (training uses data_seed 0)"),
    max_prompt_tokens=(positive_int, "prompt budget in tokens (longer articles are cut to fit, and counted)"),
)


def _layers(text: str) -> int | str:
    """``--trainable-layers``: a count >= 1, or ``none`` (every layer)."""
    return "none" if text.strip().lower() == "none" else positive_int(text)


def _boolean(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``sb3-textrl demo`` to the CLI's subcommands (the help shows :class:`DemoConfig`'s defaults).

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    parser = add_command(
        commands,
        "demo",
        help="PPO on NewsSummary-v0 with the embedded LM: summaries before and after",
        description="Fine-tune the embedded SmolLM2-135M-Instruct (or --model) with stock SB3 PPO on NewsSummary-v0: "
        "LoRA in the top blocks, k summaries per article judged against each other (RLOO), a KL penalty to the untuned "
        "LM. Held-out articles are scored before and after (greedy and sampled) with bootstrap intervals; the model, logs, "
        "plots and summary.json go to --output-dir.",
    )
    defaults = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    add_model(parser, "LM name or local path (default: the embedded SmolLM2-135M-Instruct)")
    add_task_flags(
        parser, "JSONL/CSV of article/summary pairs (default: built-in generated news)", task=False, max_new_tokens=False
    )
    parser.add_argument("--reward-model", help="directory written by train-rm: PPO on that learned reward (default: ROUGE-1)")
    for name, (kind, meaning) in _COUNTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{meaning} (default {defaults[name]})")
    add_flag(
        parser,
        "--epochs",
        old=("--n-epochs",),
        dest="n_epochs",
        type=positive_int,
        help=f"passes over each rollout (default {defaults['n_epochs']})",
    )
    parser.add_argument(
        "--trainable-layers",
        type=_layers,
        help=f"train the top N blocks only, 'none' for all (default {defaults['trainable_layers']})",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=("auto", "bf16", "no"),
        help=f"bf16 autocast; auto: where the CPU/GPU computes it fast (default {defaults['mixed_precision']})",
    )
    parser.add_argument(
        "--learning-rate", type=positive_float, help=f"of the LoRA adapters (default {defaults['learning_rate']})"
    )
    parser.add_argument(
        "--normalize-advantage",
        type=_boolean,
        help=f"PPO's per-minibatch advantage normalisation, true/false (default {defaults['normalize_advantage']})",
    )
    parser.add_argument("--kl-coef", type=non_negative_float, help=f"β of the KL penalty (default {defaults['kl_coef']})")
    parser.add_argument("--temperature", type=positive_float, help=f"of the rollouts (default {defaults['temperature']})")
    add_output_dir(parser, f"model, logs, plots and summary.json (default {defaults['output_dir']})")
    parser.add_argument("--seed", type=int, help=f"random seed (default {defaults['seed']})")
    add_run_flags(parser, seed=None, quiet=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl demo`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.demo import run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    named: dict[str, Any] = dict(vars(args), lm=args.model, output_dir=args.output_dir)
    settings = {k: v for k, v in named.items() if k in fields and v is not None and k != "env_kwargs"}
    if settings.get("trainable_layers") == "none":  # --trainable-layers none: every layer
        settings["trainable_layers"] = None
    extra = env_kwargs(args, "NewsSummary-v0")
    settings.update({key: extra.pop(key) for key in ("dataset", "tokenizer") if key in extra})
    run_demo(DemoConfig(**settings, env_kwargs=extra))
    return 0
