"""``sb3-textrl plot``: PNG training curves from the SB3 logs of one or more runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from sb3_textrl.cli.common import add_command, add_output_dir


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``sb3-textrl plot RUN_DIR [RUN_DIR ...]`` to the CLI's subcommands.

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    parser = add_command(
        commands,
        "plot",
        help="PNG training curves (reward, KL, β, ROUGE, losses, length) from SB3 csv/tensorboard logs; runs overlaid",
        description="Plot training curves from the progress.csv (or tensorboard event files) of one or more runs. "
        "Every run folder found is drawn as one line per panel, so several runs are compared in the same figures.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folder(s) holding progress.csv or tensorboard logs")
    add_output_dir(parser, "folder for the PNGs (default: RUN_DIR/plots of the first run)")
    parser.add_argument("--keys", nargs="+", help="metrics to plot, one PNG each, e.g. rollout/task_reward 'eval/*'")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl plot`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.plotting import plot_runs

    output = args.output_dir or str(Path(args.run_dirs[0]) / "plots")
    for path in plot_runs(args.run_dirs, output, keys=args.keys):
        print(path)
    return 0
