"""The ``sb3-textrl`` command: one subcommand a module of this package, each with its flags and a ``run(args)``.

Building the parser imports none of the libraries (torch, transformers, Stable-Baselines3): a subcommand's ``run``
imports its implementation when the command runs, so ``sb3-textrl --help`` and every ``--help`` answer at once. The
flags every command shares, and the one-line errors, are in :mod:`sb3_textrl.cli.common`; docs/cli.md documents each
subcommand.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sb3_textrl.cli import common, demo, evaluate, export, install_assets, plot, rate, sample, sft, tasks, train_rm

# The subcommands, in the order --help lists them.
COMMANDS = (install_assets, demo, tasks, sample, sft, rate, train_rm, evaluate, export, plot)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (one console script with subcommands)."""
    parser = argparse.ArgumentParser(
        prog="sb3-textrl",
        description="RLHF for language models with Stable-Baselines3 PPO. Each command's --help lists its flags; "
        "docs/cli.md has them all, with examples. Errors are one line; SB3_TEXTRL_TRACEBACK=1 shows the traceback.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sb3-textrl`` console script."""
    return common.run(build_parser().parse_args(argv))
