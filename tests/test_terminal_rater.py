"""The terminal rater: driven through text streams and as ``sb3-textrl rate --terminal`` in a subprocess, checked in
the real SQLite store."""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sb3_textrl.feedback import FeedbackStore
from sb3_textrl.feedback.terminal import printable, run_terminal_rater

REPO = Path(__file__).resolve().parents[1]
ANSI = "\x1b[2J\x1b]0;pwned\x07Clean summary.\u202egnp.exe"
LONG = " ".join(["word"] * 60)


@pytest.fixture()
def rating_db(tmp_path) -> tuple[Path, dict[str, int]]:
    """Two pairs (a terminal-escape payload in candidate A of the first) and one single candidate to rate."""
    path = tmp_path / "feedback.db"
    with FeedbackStore(path) as store:
        first = store.add_prompt("Summarize: storm", article=f"A storm hit the coast. {LONG}")
        a1 = store.add_candidate(first, ANSI, model="tiny")
        b1 = store.add_candidate(first, "A storm hit the coast.", model="tiny")
        second = store.add_prompt("Summarize: vote")  # no article: the prompt is shown
        a2 = store.add_candidate(second, "The council voted.", model="tiny")
        b2 = store.add_candidate(second, "Nothing happened.", model="tiny")
        ids = dict(pair1=store.add_pair(first, a1, b1), pair2=store.add_pair(second, a2, b2))
        single = store.add_candidate(second, "Council votes.", model="tiny")
        ids |= dict(single=single, single_item=store.request_rating(single))
    return path, ids


class Clock:
    """A clock the test moves by hand: the store stamps the rows it writes with its time."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def stored(db: Path) -> list[tuple]:
    with FeedbackStore(db) as store:
        return [(j["item_id"], j["rater"], j["choice"], j["score"]) for j in store.judgements()]


def rate(db: Path, answers: str, rater: str = "ann", width: int = 60) -> tuple[int, str]:
    out = io.StringIO()
    recorded = run_terminal_rater(db, rater, stdin=io.StringIO(answers), stdout=out, width=width)
    return recorded, out.getvalue()


def test_answers_are_stored_with_undo_and_retries(rating_db):
    db, ids = rating_db
    # ?: help, x: unknown, a: A better, u: undo it, B (upper case works), 7: not an answer for a pair, t: tie,
    # a: not a rating, 4: rate the single item, then end of input while nothing is left
    recorded, out = rate(db, "?\nx\na\nu\nB\n7\nt\na\n4\n")
    assert recorded == 4  # a, B, t, 4 (the undo is not subtracted)
    assert stored(db) == [(ids["pair1"], "ann", "B", None), (ids["pair2"], "ann", "tie", None),
                          (ids["single_item"], "ann", None, 4)]
    assert "? = help] > a = A is better, b = B is better, t = tie, s = skip, u = undo, q = quit" in out
    assert "Unknown answer 'x'" in out
    assert "'7' is not an answer for a pair: digits score single summaries only" in out
    assert "Unknown answer 'a': type one of 1 (bad)" in out
    assert "Undone: your last judgement." in out
    assert "Item 1 of 3" in out and "Item 3 of 3" in out
    assert "Nothing left to judge (3 of 3 judged)" in out
    assert "SUMMARY A" in out and "SUMMARY B" in out and "Summarize: vote" in out


def test_quit_keeps_what_was_given_and_the_next_session_resumes(rating_db):
    db, ids = rating_db
    recorded, out = rate(db, "s\nq\n")
    assert recorded == 1
    assert "Stopped. 1 judgement(s)" in out
    assert stored(db) == [(ids["pair1"], "ann", "skip", None)]
    # another rater starts at the first pair; ann resumes at the second
    _, out_bob = rate(db, "q\n", rater="bob")
    assert "Item 1 of 3  (0 judged)" in out_bob
    _, out_ann = rate(db, "q\n")
    assert "Item 2 of 3  (1 judged)" in out_ann
    assert "The council voted." in out_ann


def test_model_text_cannot_drive_the_terminal_and_is_wrapped(rating_db):
    db, _ = rating_db
    _, out = rate(db, "q\n", width=60)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2J\\x1b]0;pwned\\x07Clean summary.\\u202egnp.exe" in out
    assert max(len(line) for line in out.splitlines() if "word" in line) <= 60
    assert printable("tab\tand\nnewline stay") == "tab\tand\nnewline stay"


def test_an_empty_store_and_undo_when_nothing_is_left(tmp_path):
    recorded, out = rate(tmp_path / "new.db", "u\n\nq\n")
    assert recorded == 0
    assert "Nothing left to judge (0 of 0 judged)" in out
    assert "Nothing to undo." in out


def test_digits_on_a_pair_are_refused_with_a_hint(rating_db):
    """"1" and "2" once meant A and B on a pair, so a rater who thought they were scoring stated a preference."""
    db, ids = rating_db
    recorded, out = rate(db, "1\n2\nq\n")
    assert recorded == 0
    assert stored(db) == []  # neither digit was read as A or B
    assert "'1' is not an answer for a pair: digits score single summaries only; on a pair type a (A is better)" in out
    assert "'2' is not an answer for a pair" in out
    # the same item is asked again, and a letter then judges it
    recorded, out = rate(db, "1\na\nq\n")
    assert recorded == 1 and stored(db) == [(ids["pair1"], "ann", "A", None)]
    # digits still score single items: past both pairs, "2" is a rating
    rate(db, "s\n2\nq\n")
    assert stored(db)[-1] == (ids["single_item"], "ann", None, 2)


def test_header_shows_the_time_left_once_there_is_a_pace(rating_db):
    db, ids = rating_db
    _, out = rate(db, "q\n")
    assert "Item 1 of 3  (0 judged)" in out  # no pace yet, so no estimate
    with FeedbackStore(db) as store:
        for k in range(3):
            prompt = store.add_prompt(f"Summarize: extra {k}")
            store.add_pair(prompt, store.add_candidate(prompt, "x", model="m"), store.add_candidate(prompt, "y", model="m"))
    clock = Clock(datetime.now(timezone.utc) - timedelta(minutes=10))
    with FeedbackStore(db, clock=clock) as store:  # ann judged three items, 40 s apart, ten minutes ago
        for pair in (ids["pair1"], ids["pair2"]):
            store.record_preference(pair, "ann", "A")
            clock.advance(40)
        store.record_rating(ids["single"], "ann", 3)
    # 3 items left at 40 s each: 2 min; bob, who has no pace, sees none
    _, out = rate(db, "q\n")
    assert "Item 4 of 6  (3 judged, about 2 min left)" in out
    _, out = rate(db, "q\n", rater="bob")
    assert "Item 1 of 6  (0 judged)" in out


class CtrlCAfter(io.StringIO):
    """Answers from a string, then Ctrl+C (as a terminal delivers it: KeyboardInterrupt while reading)."""

    def readline(self, *args) -> str:
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


def test_ctrl_c_stops_cleanly_and_keeps_the_judgements(rating_db):
    db, ids = rating_db
    out = io.StringIO()
    assert run_terminal_rater(db, "ann", stdin=CtrlCAfter("a\n"), stdout=out) == 1
    assert "Interrupted. 1 judgement(s) recorded" in out.getvalue()
    assert stored(db) == [(ids["pair1"], "ann", "A", None)]


def test_bad_rater_name_is_refused(rating_db):
    with pytest.raises(ValueError, match="rater name is required"):
        rate(rating_db[0], "q\n", rater=" ")


def test_cli_terminal_subprocess(rating_db):
    db, ids = rating_db
    result = subprocess.run(
        [sys.executable, "-m", "sb3_textrl.cli", "rate", "--db", str(db), "--terminal", "--rater", "carol"],
        input="b\nq\n", capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Rating as carol" in result.stdout
    assert "Stopped. 1 judgement(s)" in result.stdout
    assert "\x1b" not in result.stdout
    assert stored(db) == [(ids["pair1"], "carol", "B", None)]
