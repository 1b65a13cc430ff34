"""``sb3-textrl tasks``: the registered text tasks, one id a line."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``sb3-textrl tasks`` to the CLI's subcommands."""
    tasks = commands.add_parser("tasks", help="list the registered text tasks")
    tasks.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl tasks``: print the ids :func:`sb3_textrl.list_text_tasks` returns."""
    import sb3_textrl

    for task_id in sb3_textrl.list_text_tasks():
        print(task_id)
    return 0
