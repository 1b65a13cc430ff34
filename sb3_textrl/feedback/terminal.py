"""The terminal rater (``sb3-textrl rate --terminal``): the same judgements as the rating page, typed at a prompt.

It shows the article and the two candidate summaries (or one, to rate 1-5), reads one answer per line and stores it
in the feedback database: on a pair ``a`` A is better, ``b`` B is better, ``t`` tie, ``s`` skip; on a single summary
``1``-``5``; ``u`` undo, ``q`` quit. A digit on a pair is refused with a hint rather than read as A or B. Each item's
header shows the rater's progress and, once they have a pace, the time left (the same estimate as the rating page).
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import unicodedata
from dataclasses import dataclass
from typing import Any, TextIO

from sb3_textrl.feedback.store import FeedbackStore
from sb3_textrl.feedback.views import (
    PAIR_KEY_HINT,
    PAIR_KEYS,
    SCORES,
    UNDO_KEY,
    check_rater,
    eta_text,
    item_view,
)

PAIR_ANSWERS = {key: choice for key, (choice, _) in PAIR_KEYS.items()}  # letters only: digits are scores
PAIR_HELP = ", ".join(f"{key} = {label}" for key, (_, label) in PAIR_KEYS.items()) + f", {UNDO_KEY} = undo, q = quit"
SINGLE_HELP = "1 (bad) .. 5 (excellent), u = undo, q = quit"
PAIR_PROMPT = "Which is better? [a/b/t/s, u = undo, q = quit, ? = help] > "
SINGLE_PROMPT = "Rating? [1-5, u = undo, q = quit, ? = help] > "
SCORE_ANSWERS = tuple(str(score) for score in SCORES)  # "1" .. "5"
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
    return "\n".join(
        textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent) if p.strip() else "" for p in paragraphs
    )


def format_item(item: dict[str, Any], done: int, total: int, width: int = 80, eta: str | None = None) -> str:
    """
    The text shown for one item of ``FeedbackStore.next_item``.

    :param item: the store's item
    :param done: items this rater has judged
    :param total: items in the store
    :param width: line width to wrap to
    :param eta: the estimated time left (:func:`~sb3_textrl.feedback.views.eta_text`), None before there is one
    """
    view = item_view(item)
    assert view is not None  # item_view returns None only for no item
    rule = "─" * width
    header = f"Item {done + 1} of {total}  ({done} judged{', ' + eta if eta else ''})"
    lines = [rule, header, rule, "ARTICLE", _wrap(view["article"], width), ""]
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
    width = width or min(shutil.get_terminal_size().columns, MAX_WIDTH)
    owned = not isinstance(store, FeedbackStore)
    feedback = store if isinstance(store, FeedbackStore) else FeedbackStore(store)
    session = _Session(feedback, rater, stdin or sys.stdin, stdout or sys.stdout, width)
    try:
        session.say(f"Rating as {rater}. Answers: {PAIR_HELP}; single summaries: {SINGLE_HELP}.")
        while True:
            item = feedback.next_item(rater)
            progress = feedback.progress_report(rater)
            if item is None:
                if not session.wait_for_items(progress.done, progress.total):
                    break
            elif not session.judge(item, progress.done, progress.total, eta_text(progress.eta_s)):
                session.say(f"Stopped. {session.recorded} judgement(s) recorded this session.")
                return session.recorded
        session.say(f"Done. {session.recorded} judgement(s) recorded this session.")
        return session.recorded
    except KeyboardInterrupt:  # Ctrl+C is a normal way out: every judgement given so far is already committed
        session.say(f"\nInterrupted. {session.recorded} judgement(s) recorded this session.")
        return session.recorded
    finally:
        if owned:
            feedback.close()


@dataclass
class _Session:
    """One rater at the terminal: the questions, the answers and the judgements recorded so far."""

    feedback: FeedbackStore
    rater: str
    stdin: TextIO
    stdout: TextIO
    width: int
    recorded: int = 0

    def say(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)

    def ask(self, question: str) -> str | None:
        """The answer, stripped and lower-cased; ``None`` at the end of input."""
        print(question, end="", file=self.stdout, flush=True)
        line = self.stdin.readline()
        if line == "":  # end of input
            print(file=self.stdout, flush=True)
            return None
        return line.strip().lower()

    def undo(self) -> None:
        self.say("Undone: your last judgement." if self.feedback.undo_last(self.rater) else "Nothing to undo.")

    def wait_for_items(self, done: int, total: int) -> bool:
        """Nothing is left to judge: ``False`` when the rater quits, ``True`` to look again."""
        answer = self.ask(f"Nothing left to judge ({done} of {total} judged). Enter = look again, u = undo, q = quit: ")
        if answer is None or answer == "q":
            return False
        if answer == "u":
            self.undo()
        return True

    def judge(self, item: dict[str, Any], done: int, total: int, eta: str | None = None) -> bool:
        """Show an item and ask until it is judged (or the last judgement undone): ``False`` when the rater quits."""
        self.say(format_item(item, done, total, self.width, eta))
        is_pair = item["kind"] == "pair"
        while True:
            answer = self.ask(PAIR_PROMPT if is_pair else SINGLE_PROMPT)
            if answer is None or answer == "q":
                return False
            if answer == UNDO_KEY:
                self.undo()
                return True
            if self._record(item, is_pair, answer):
                self.recorded += 1
                self.say("Saved.")
                return True
            self.say(self._refusal(is_pair, answer))

    @staticmethod
    def _refusal(is_pair: bool, answer: str) -> str:
        """What to tell a rater whose answer is no judgement of the item."""
        help_text = PAIR_HELP if is_pair else SINGLE_HELP
        if answer in ("", "?", "h", "help"):
            return help_text
        if is_pair and answer.isdigit():  # a score typed on a pair: say why it is refused, not just that it is
            return f"{answer!r} is not an answer for a pair: {PAIR_KEY_HINT}."
        return f"Unknown answer {answer!r}: type one of {help_text}."

    def _record(self, item: dict[str, Any], is_pair: bool, answer: str) -> bool:
        """Store the answer if it is a judgement of the item; ``False`` when it is not one."""
        if is_pair and answer in PAIR_ANSWERS:
            self.feedback.record_preference(item["id"], self.rater, PAIR_ANSWERS[answer])
        elif not is_pair and answer in SCORE_ANSWERS:
            self.feedback.record_rating(item["candidates"][0]["id"], self.rater, int(answer))
        else:
            return False
        return True
