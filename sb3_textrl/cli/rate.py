"""``sb3-textrl rate``: the rating page (or ``--terminal``) over a feedback database."""

from __future__ import annotations

import argparse

from sb3_textrl.cli.common import add_command, port_number, positive_int
from sb3_textrl.feedback.webapp import DEFAULT_PORT


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``sb3-textrl rate``: the rating page (or ``--terminal``) over a feedback database.

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    parser = add_command(
        commands,
        "rate",
        help="judge generated summaries (A/B or 1-5) in a local web page or the terminal; stored in a feedback DB",
        description="Serve the rating page on 127.0.0.1 with a random access token (printed in the URL), or rate in the "
        "terminal with --terminal. Keys on a pair: a = A is better, b = B is better, t = tie, s = skip; on a single "
        "candidate: 1 (bad) .. 5 (excellent); u = undo. Every judgement is stored (SQLite) as soon as it is made.",
    )
    parser.add_argument("--db", required=True, help="the feedback database (SQLite; created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it)")
    parser.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)"
    )
    parser.add_argument("--rater", help="your name, stored with every judgement (terminal default: your login name)")
    parser.add_argument("--terminal", action="store_true", help="rate in this terminal instead of a web page")
    parser.add_argument("--threads", type=positive_int, default=8, help="web server threads (default 8)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl rate`` with the parsed arguments (the implementation is imported here)."""
    if args.terminal:
        import getpass

        from sb3_textrl.feedback.terminal import run_terminal_rater

        run_terminal_rater(args.db, args.rater or getpass.getuser())
    else:
        from sb3_textrl.feedback.webapp import serve

        serve(args.db, host=args.host, port=args.port, rater=args.rater, threads=args.threads)
    return 0
