"""``sb3-textrl tasks``: the registered text tasks, one id a line."""

from __future__ import annotations

import argparse

from sb3_textrl.cli.common import add_command


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``sb3-textrl tasks`` to the CLI's subcommands.

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    parser = add_command(
        commands,
        "tasks",
        help="list the registered text tasks",
        description="Print the id of every registered text task, one a line: the built-in ones and those that the "
        "--import modules register (e.g. sb3-textrl tasks --import my_tasks).",
    )
    parser.add_argument(
        "--import", dest="imports", action="append", metavar="MODULE", help="import MODULE first (it may register tasks)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl tasks``: print the ids :func:`sb3_textrl.list_text_tasks` returns."""
    import sb3_textrl

    for task_id in sb3_textrl.list_text_tasks():
        print(task_id)
    return 0
