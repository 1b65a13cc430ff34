"""``sb3-textrl rate``: the rating page (or ``--terminal``) over a feedback database."""

from __future__ import annotations

import argparse
import sys

from sb3_textrl.feedback.webapp import DEFAULT_PORT


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``sb3-textrl rate``: the rating page (or ``--terminal``) over a feedback database.

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    rate = commands.add_parser(
        "rate",
        help="judge generated summaries (A/B or 1-5) in a local web page or the terminal; stored in a feedback DB",
        description="Serve the rating page on 127.0.0.1 with a random access token (printed in the URL), or rate in the "
        "terminal with --terminal. Keys: a/1 A better, b/2 B better, t tie, s skip, 1-5 rate, u undo.",
    )
    rate.add_argument("--db", required=True, help="the feedback database (SQLite; created if missing)")
    rate.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it)")
    rate.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    rate.add_argument("--rater", help="your name, stored with every judgement (terminal default: your login name)")
    rate.add_argument("--terminal", action="store_true", help="rate in this terminal instead of a web page")
    rate.add_argument("--threads", type=int, default=8, help="web server threads (default 8)")
    rate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl rate`` with the parsed arguments (the implementation is imported here)."""
    try:
        if args.terminal:
            import getpass

            from sb3_textrl.feedback.terminal import run_terminal_rater

            run_terminal_rater(args.db, args.rater or getpass.getuser())
        else:
            from sb3_textrl.feedback.webapp import serve

            serve(args.db, host=args.host, port=args.port, rater=args.rater, threads=args.threads)
    except (OSError, ValueError) as error:  # FeedbackStoreError is a ValueError; the messages say what to do
        print(f"sb3-textrl rate: error: {error}", file=sys.stderr)
        return 2
    return 0
