"""The terminal rater (``sb3-textrl rate --terminal``): the same judgements as the rating page, typed at a prompt.

It shows the article and the two candidate summaries (or one, to rate 1-5), reads one answer per line and stores it
in the feedback database: ``a``/``1`` A is better, ``b``/``2`` B is better, ``t`` tie, ``s`` skip, ``1``-``5`` for a
single summary, ``u`` undo, ``q`` quit.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import unicodedata
from typing import Any, TextIO

from sb3_textrl.feedback.store import FeedbackStore
from sb3_textrl.feedback.webapp import check_rater, item_view

PAIR_ANSWERS = {"a": "A", "1": "A", "b": "B", "2": "B", "t": "tie", "s": "skip"}
PAIR_HELP = "a/1 = A is better, b/2 = B is better, t = tie, s = skip, u = undo, q = quit"
SINGLE_HELP = "1 (bad) .. 5 (excellent), u = undo, q = quit"
PAIR_PROMPT = "Which is better? [a/b/t/s, u = undo, q = quit, ? = help] > "
SINGLE_PROMPT = "Rating? [1-5, u = undo, q = quit, ? = help] > "
MAX_WIDTH = 100
# Bidirectional-text overrides can make text read differently from what it is; show them like control characters.
_BIDI_CONTROLS = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def printable(text: str) -> str:
    """
    Model text made safe for a terminal: control characters (escape sequences could move the cursor, recolour or
    retitle the terminal) and bidi overrides are shown as ``\\x1b``-style escapes; newlines and tabs stay.

    :param text: text written by a model
    """
    return "".join(
        c if c in "\n\t" or (unicodedata.category(c) != "Cc" and c not in _BIDI_CONTROLS) else repr(c)[1:-1] for c in text
    )


def _wrap(text: str, width: int, indent: str = "  ") -> str:
    paragraphs = printable(text).expandtabs(4).split("\n")
    return "\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent) if p.strip() else ""
                     for p in paragraphs)


def format_item(item: dict[str, Any], done: int, total: int, width: int = 80) -> str:
    """
    The text shown for one item of ``FeedbackStore.next_item``.

    :param item: the store's item
    :param done: items this rater has judged
    :param total: items in the store
    :param width: line width to wrap to
    """
    view = item_view(item)
    rule = "─" * width
    lines = [rule, f"Item {done + 1} of {total}  ({done} judged)", rule, "ARTICLE", _wrap(view["article"], width), ""]
    if view["kind"] == "pair":
        lines += ["SUMMARY A", _wrap(view["text_a"], width), "", "SUMMARY B", _wrap(view["text_b"], width), ""]
    else:
        lines += ["SUMMARY", _wrap(view["text"], width), ""]
    return "\n".join(lines)


def run_terminal_rater(
    store: FeedbackStore | str | os.PathLike,
    rater: str,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    width: int | None = None,
) -> int:
    """
    Ask for judgements until nothing is left (or ``q``, or end of input), storing each as it is given.

    :param store: the feedback store, or the path of its database
    :param rater: the name stored with every judgement
    :param stdin: where answers are read from, one per line (default ``sys.stdin``)
    :param stdout: where items and messages go (default ``sys.stdout``)
    :param width: line width (default: the terminal's, at most 100)
    :return: the number of judgements recorded (undos not subtracted)
    """
    rater = check_rater(rater)
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    width = width or min(shutil.get_terminal_size().columns, MAX_WIDTH)
    owned = not isinstance(store, FeedbackStore)
    feedback = FeedbackStore(store) if owned else store

    def say(text: str = "") -> None:
        print(text, file=stdout, flush=True)

    def ask(question: str) -> str | None:
        print(question, end="", file=stdout, flush=True)
        line = stdin.readline()
        if line == "":  # end of input
            print(file=stdout, flush=True)
            return None
        return line.strip().lower()

    def undo() -> None:
        say("Undone: your last judgement." if feedback.undo_last(rater) else "Nothing to undo.")

    recorded = 0
    try:
        say(f"Rating as {rater}. Answers: {PAIR_HELP}; single summaries: {SINGLE_HELP}.")
        while True:
            item = feedback.next_item(rater)
            done, total = feedback.progress(rater)
            if item is None:
                answer = ask(f"Nothing left to judge ({done} of {total} judged). Enter = look again, u = undo, q = quit: ")
                if answer is None or answer == "q":
                    break
                if answer == "u":
                    undo()
                continue
            say(format_item(item, done, total, width))
            is_pair = item["kind"] == "pair"
            while True:
                answer = ask(PAIR_PROMPT if is_pair else SINGLE_PROMPT)
                if answer is None or answer == "q":
                    say(f"Stopped. {recorded} judgement(s) recorded this session.")
                    return recorded
                if answer == "u":
                    undo()
                    break
                if is_pair and answer in PAIR_ANSWERS:
                    feedback.record_preference(item["id"], rater, PAIR_ANSWERS[answer])
                elif not is_pair and answer in ("1", "2", "3", "4", "5"):
                    feedback.record_rating(item["candidates"][0]["id"], rater, int(answer))
                else:
                    help_text = PAIR_HELP if is_pair else SINGLE_HELP
                    wants_help = answer in ("", "?", "h", "help")
                    say(help_text if wants_help else f"Unknown answer {answer!r}: type one of {help_text}.")
                    continue
                recorded += 1
                say("Saved.")
                break
        say(f"Done. {recorded} judgement(s) recorded this session.")
        return recorded
    except KeyboardInterrupt:  # Ctrl+C is a normal way out: every judgement given so far is already committed
        say(f"\nInterrupted. {recorded} judgement(s) recorded this session.")
        return recorded
    finally:
        if owned:
            feedback.close()
