"""
A rater process for the feedback-store durability and concurrency tests: judges items in a stream and acknowledges each
judgement only after ``record_*`` has returned.

Usage: ``python tests/feedback_writer.py DB ACK_FILE RATER [--limit N] [--start-file PATH]``

It judges the database's items in id order (pairs with A / B / tie / skip in turn, single items with scores 1..5 in
turn), going round again when it reaches the end (a repeat replaces the rater's earlier judgement of that item), until
``--limit`` judgements are made (0: until killed). After each ``record_*`` call returns, one line
``judgement_id item_id choice_or_score`` is appended to ACK_FILE with a single unbuffered ``os.write``, so a line
there means the store acknowledged that judgement. ``--start-file`` makes it wait for that file to appear, so that two
writers start together; a writer that reaches its limit prints ``window START END`` (epoch seconds).
"""

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

# The store is plain standard library; it is loaded from its file rather than through ``import sb3_textrl`` because
# the package imports torch and transformers, which takes tens of seconds per process on a small CI machine.
_STORE_FILE = Path(__file__).resolve().parents[1] / "sb3_textrl" / "feedback" / "store.py"


def load_store_module():
    spec = importlib.util.spec_from_file_location("sb3_textrl_feedback_store", _STORE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("db")
    parser.add_argument("ack_file")
    parser.add_argument("rater")
    parser.add_argument("--limit", type=int, default=0, help="judgements to make (0: until killed)")
    parser.add_argument("--start-file", help="wait until this file exists before the first judgement")
    args = parser.parse_args()

    store_module = load_store_module()
    store = store_module.FeedbackStore(args.db)
    items = [(row["id"], row["kind"], row["candidate_a"]) for row in store._read("SELECT * FROM items ORDER BY id")]
    if not items:
        sys.exit(f"{args.db} has no items to judge")
    ack = os.open(args.ack_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    if args.start_file:
        while not os.path.exists(args.start_file):
            time.sleep(0.005)
    started = time.time()
    made = 0
    while args.limit == 0 or made < args.limit:
        item_id, kind, candidate = items[made % len(items)]
        if kind == "pair":
            answer = store_module.CHOICES[made % len(store_module.CHOICES)]
            judgement = store.record_preference(item_id, args.rater, answer)
        else:
            answer = str(1 + made % 5)
            judgement = store.record_rating(candidate, args.rater, int(answer))
        # Acknowledged: record_* returned after COMMIT. One write(2) per line, so a kill never leaves half a line.
        os.write(ack, f"{judgement} {item_id} {answer}\n".encode())
        made += 1
    os.close(ack)
    store.close()
    print(f"window {started} {time.time()}")  # when this writer was trying to write, for the overlap check


if __name__ == "__main__":
    main()
