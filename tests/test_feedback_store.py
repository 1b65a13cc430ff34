"""The SQLite feedback store: contents, judging, preference pairs, schema versions, bad input, durability under
SIGKILL and concurrent writers (processes and threads)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sb3_textrl.feedback import (
    SCHEMA_VERSION,
    FeedbackStore,
    FeedbackStoreError,
    PreferencePair,
    empty_preferences_message,
)
from sb3_textrl.feedback.store import BREAK_S, MIGRATIONS, PACE_WINDOW, Progress, random_pair_orders, recent_pace

WRITER = Path(__file__).with_name("feedback_writer.py")


def fill(store: FeedbackStore, n_prompts: int = 3) -> dict[str, list[int]]:
    """Prompts with two candidates each, one pair per prompt and a rating request per candidate."""
    ids: dict[str, list[int]] = {"prompts": [], "candidates": [], "pairs": [], "singles": []}
    for p in range(n_prompts):
        prompt = store.add_prompt(f"Summarise article {p}", task="NewsSummary-v0", reference=f"ref {p}",
                                  article=f"Article {p} text.", metadata={"index": p})
        a = store.add_candidate(prompt, f"summary {p} a", model="tiny-a", settings={"temperature": 0.7, "seed": p})
        b = store.add_candidate(prompt, f"summary {p} b", model="tiny-b", settings={"do_sample": False})
        ids["prompts"].append(prompt)
        ids["candidates"] += [a, b]
        ids["pairs"].append(store.add_pair(prompt, a, b))
        ids["singles"] += [store.request_rating(a), store.request_rating(b)]
    return ids


class Clock:
    """A clock the test moves by hand: the store stamps the rows it writes with its time."""

    def __init__(self, start: datetime = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def raw(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Query the file with a plain sqlite3 connection (what is really on disk, not what the store says)."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def read_acks(ack_file: Path) -> list[tuple[int, int, str]]:
    lines = ack_file.read_text().splitlines() if ack_file.exists() else []
    return [(int(j), int(i), answer) for j, i, answer in (line.split() for line in lines)]


def check_acks_survived(db: Path, acks: list[tuple[int, int, str]], rater: str) -> None:
    """Every acknowledged judgement is on disk, with its item, rater and answer."""
    rows = {j: (i, r, c, s) for j, i, r, c, s in raw(db, "SELECT id, item_id, rater, choice, score FROM judgements")}
    missing = [j for j, _, _ in acks if j not in rows]
    assert not missing, f"{len(missing)} acknowledged judgements lost, e.g. {missing[:5]}"
    for judgement, item, answer in acks:
        item_id, who, choice, score = rows[judgement]
        assert (item_id, who) == (item, rater)
        assert (choice if choice is not None else str(score)) == answer


def start_writer(db: Path, ack: Path, rater: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WRITER), str(db), str(ack), rater, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- what is stored ------------------------------------------------------------------------------------------------
def test_new_store_schema_wal_and_full_sync(tmp_path):
    path = tmp_path / "fb.db"
    with FeedbackStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == FeedbackStore.SCHEMA_VERSION == len(MIGRATIONS)
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]  # stored in the file
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    with FeedbackStore(path) as store:  # reopening a current store changes nothing
        assert store.schema_version == SCHEMA_VERSION


def test_prompts_candidates_raters_and_timestamps(tmp_path):
    path = tmp_path / "fb.db"
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    with FeedbackStore(path) as store:
        ids = fill(store, 1)
        store.record_preference(ids["pairs"][0], "ann", "B")
        store.record_rating(ids["candidates"][0], "bob", 4)
        store.record_rating(ids["candidates"][1], "ann", 2)
    after = datetime.now(timezone.utc) + timedelta(seconds=1)

    prompt = raw(path, "SELECT text, task, reference, article, metadata FROM prompts")
    assert prompt == [("Summarise article 0", "NewsSummary-v0", "ref 0", "Article 0 text.", '{"index": 0}')]
    candidates = raw(path, "SELECT text, model, settings FROM candidates ORDER BY id")
    assert [(t, m, json.loads(s)) for t, m, s in candidates] == [
        ("summary 0 a", "tiny-a", {"temperature": 0.7, "seed": 0}),
        ("summary 0 b", "tiny-b", {"do_sample": False}),
    ]
    raters = dict(raw(path, "SELECT name, first_seen FROM raters"))
    assert set(raters) == {"ann", "bob"}
    stamps = list(raters.values()) + [row[0] for table in ("prompts", "candidates", "items", "judgements")
                                      for row in raw(path, f"SELECT created_at FROM {table}")]
    for stamp in stamps:  # UTC ISO 8601, taken now
        when = datetime.fromisoformat(stamp)
        assert when.utcoffset() == timedelta(0) and before <= when <= after
    # ann's first judgement set first_seen; her later rating did not move it
    first = raw(path, "SELECT MIN(created_at) FROM judgements WHERE rater = 'ann'")[0][0]
    assert raters["ann"] == first


def test_next_item_progress_undo_and_rejudging(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        ids = fill(store, 2)
        total = 2 + 4
        item = store.next_item("ann")
        assert item["kind"] == "pair" and item["id"] == ids["pairs"][0]
        assert item["prompt"] == "Summarise article 0" and item["article"] == "Article 0 text."
        assert [c["text"] for c in item["candidates"]] == ["summary 0 a", "summary 0 b"]
        assert [c["id"] for c in item["candidates"]] == ids["candidates"][:2]
        assert store.progress("ann") == (0, total)

        store.record_preference(ids["pairs"][0], "ann", "A")
        single = store.next_item("ann")
        assert single["kind"] == "single" and [c["id"] for c in single["candidates"]] == [ids["candidates"][0]]
        store.record_rating(ids["candidates"][0], "ann", 5)
        assert store.progress("ann") == (2, total)
        assert store.progress("bob") == (0, total)  # progress is per rater
        assert store.next_item("bob")["id"] == ids["pairs"][0]

        # Undo takes back the most recent judgement (the rating) and its item is pending again
        assert store.undo_last("ann") is True
        assert store.progress("ann") == (1, total)
        assert store.next_item("ann")["id"] == single["id"]
        assert store.ratings(ids["candidates"]) == {}
        assert store.undo_last("ann") is True
        assert store.undo_last("ann") is False  # nothing left
        assert store.undo_last("nobody") is False

        # Judging an item again replaces the earlier judgement (kept on disk, marked undone)
        store.record_preference(ids["pairs"][0], "ann", "A")
        store.record_preference(ids["pairs"][0], "ann", "B")
        assert store.progress("ann") == (1, total)
        assert [j["choice"] for j in store.judgements()] == ["B"]
        assert [p.chosen for p in store.preference_pairs()] == ["summary 0 b"]
        store.undo_last("ann")  # undoing the replacement does not bring the replaced one back
        assert store.preference_pairs() == []

        for pair in ids["pairs"]:
            store.record_preference(pair, "ann", "skip")
        for candidate in ids["candidates"]:
            store.record_rating(candidate, "ann", 3)
        assert store.next_item("ann") is None
        assert store.progress("ann") == (total, total)
        assert store.item(ids["pairs"][1])["prompt"] == "Summarise article 1"


def test_ratings_are_means_over_raters(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        ids = fill(store, 1)
        a, b = ids["candidates"]
        store.record_rating(a, "ann", 5)
        store.record_rating(a, "bob", 2)
        assert store.ratings([a, b]) == {a: 3.5}  # b is unrated, so absent
        assert store.ratings([]) == {}
        assert store.ratings([12345]) == {}


def test_preference_pairs_from_choices_and_ratings(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        ids = fill(store, 4)
        c = ids["candidates"]
        store.record_preference(ids["pairs"][0], "ann", "A")
        store.record_preference(ids["pairs"][1], "ann", "B")
        store.record_preference(ids["pairs"][2], "ann", "tie")
        store.record_preference(ids["pairs"][3], "ann", "skip")
        store.record_preference(ids["pairs"][0], "bob", "B")  # raters may disagree: both pairs are kept
        # Ratings: prompt 0's candidates differ on their means (4.5 vs 2); prompt 1's are equal (3 and 3)
        store.record_rating(c[0], "ann", 4)
        store.record_rating(c[0], "bob", 5)
        store.record_rating(c[1], "ann", 2)
        store.record_rating(c[2], "ann", 3)
        store.record_rating(c[3], "ann", 3)
        store.record_rating(c[4], "ann", 1)  # prompt 2: only one candidate rated, nothing to pair with

        from_choices = [
            PreferencePair("Summarise article 0", "summary 0 a", "summary 0 b", "preference"),
            PreferencePair("Summarise article 1", "summary 1 b", "summary 1 a", "preference"),
            PreferencePair("Summarise article 0", "summary 0 b", "summary 0 a", "preference"),
        ]
        assert store.preference_pairs(include_ratings=False) == from_choices
        assert store.preference_pairs() == from_choices + [
            PreferencePair("Summarise article 0", "summary 0 a", "summary 0 b", "rating")
        ]


def test_ties_and_skips_only_give_no_pairs_and_a_helpful_message(tmp_path):
    path = tmp_path / "fb.db"
    with FeedbackStore(path) as store:
        assert store.preference_pairs() == []  # empty store
        ids = fill(store, 2)
        store.record_preference(ids["pairs"][0], "ann", "tie")
        store.record_preference(ids["pairs"][1], "ann", "skip")
        for candidate in ids["candidates"]:
            store.record_rating(candidate, "ann", 3)  # equal ratings carry no preference either
        assert store.preference_pairs() == []
    message = empty_preferences_message(path)
    assert str(path) in message and "ties and skips" in message and f"sb3-textrl rate --db {path}" in message


# -- schema versions -----------------------------------------------------------------------------------------------
def test_version_1_database_is_migrated_with_its_data(tmp_path):
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)  # a store as the first release wrote it: version-1 tables only, rollback journal
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO prompts (text, created_at) VALUES ('old prompt', '2026-01-01T00:00:00+00:00')")
    for text in ("old a", "old b"):
        db.execute("INSERT INTO candidates (prompt_id, text, model, created_at) VALUES (1, ?, 'm', '2026-01-01')", (text,))
    db.execute("INSERT INTO items (kind, prompt_id, candidate_a, candidate_b, created_at) VALUES ('pair', 1, 1, 2, 'x')")
    db.execute("INSERT INTO raters VALUES ('ann', '2026-01-01')")
    db.execute("INSERT INTO judgements (item_id, rater, choice, created_at) VALUES (1, 'ann', 'B', '2026-01-01')")
    db.commit()
    db.close()
    assert "candidates_by_prompt" not in {name for (name,) in raw(path, "SELECT name FROM sqlite_master")}

    with FeedbackStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.preference_pairs() == [PreferencePair("old prompt", "old b", "old a", "preference")]
        c = store.add_candidate(1, "new", model="m2")  # and it is writable after the upgrade
        store.request_rating(c)
        store.record_rating(c, "bob", 4)
    indexes = {name for (name,) in raw(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"candidates_by_prompt", "items_by_candidate", "judgements_by_rater"} <= indexes
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]


def test_unversioned_empty_file_is_initialised(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()  # a zero-byte file is an empty SQLite database at version 0
    with FeedbackStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        fill(store, 1)


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "future.db"
    with FeedbackStore(path) as store:
        fill(store, 1)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(FeedbackStoreError, match=rf"schema version {SCHEMA_VERSION + 1}, newer .*upgrade sb3_textrl"):
        FeedbackStore(path)
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert raw(path, "SELECT COUNT(*) FROM candidates") == [(2,)]


# -- shown order, position bias, pace ----------------------------------------------------------------------------------
def test_random_pair_orders_are_seeded_and_balanced():
    for n in (2, 5, 16, 101):
        orders = random_pair_orders(n, seed=3)
        assert orders == random_pair_orders(n, seed=3)  # reproducible from the seed
        assert n // 2 <= sum(orders) <= n - n // 2  # half swapped (the odd one by a coin flip): both orders occur
    assert random_pair_orders(16, seed=0) != random_pair_orders(16, seed=1)
    assert random_pair_orders(0, seed=0) == []
    assert {random_pair_orders(1, seed) == [True] for seed in range(20)} == {True, False}


def test_a_judgement_follows_the_shown_order_and_position_bias_counts_it(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        prompt = store.add_prompt("Summarise")
        a = store.add_candidate(prompt, "from source a", model="m", settings={"source": "a"})
        b = store.add_candidate(prompt, "from source b", model="m", settings={"source": "b"})
        swapped = store.add_pair(prompt, b, a)  # source b shown first, as A
        assert [c["text"] for c in store.item(swapped)["candidates"]] == ["from source b", "from source a"]
        assert store.position_bias() == (None, 0)
        store.record_preference(swapped, "ann", "A")  # ann chose what she saw as A: source b
        assert store.preference_pairs() == [PreferencePair("Summarise", "from source b", "from source a")]
        straight = store.add_pair(prompt, a, b)
        store.record_preference(straight, "ann", "B")
        store.record_preference(straight, "bob", "A")
        store.record_preference(swapped, "bob", "tie")  # no preference: not counted
        assert store.position_bias() == (2 / 3, 3)
        assert store.position_bias("ann") == (0.5, 2)
        assert store.position_bias("bob") == (1.0, 1)
        assert store.position_bias("nobody") == (None, 0)


def test_recent_pace_is_the_median_recent_gap_without_breaks():
    start = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)

    def at(*offsets: float) -> list[str]:
        return [(start + timedelta(seconds=t)).isoformat() for t in offsets]

    assert recent_pace([]) is None
    assert recent_pace(at(0)) is None
    assert recent_pace(at(0, 10)) is None  # one gap is no pace yet
    assert recent_pace(at(0, 10, 40)) == 20.0  # gaps 10 and 30
    assert recent_pace(at(40, 0, 10)) == 20.0  # in any order
    assert recent_pace(at(0, 10, 40, 40 + BREAK_S + 1, 60 + BREAK_S + 1)) == 20.0  # the break is left out
    assert recent_pace(at(0, BREAK_S + 1, 2 * BREAK_S + 2)) is None  # nothing but breaks
    # only the last PACE_WINDOW gaps: 5 old slow ones (100 s), then PACE_WINDOW fast ones (5 s)
    slow = [100.0 * k for k in range(6)]
    assert recent_pace(at(*slow, *(500 + 5.0 * k for k in range(1, PACE_WINDOW + 1)))) == 5.0
    assert recent_pace(at(0, 100, 200, 205)) == 100.0  # but the median of a mixed window
    # stamps as old rows hold them: naive (taken as UTC), or not timestamps at all (skipped)
    assert recent_pace(["2026-01-01T10:00:00", "2026-01-01T10:00:30+00:00", "x", "2026-01-01T10:01:30"]) == 45.0
    assert recent_pace([start, start + timedelta(seconds=8), start + timedelta(seconds=16)]) == 8.0


def test_progress_report_times_a_rater_from_their_judgements(tmp_path):
    clock = Clock()
    path = tmp_path / "fb.db"
    with FeedbackStore(path, clock=clock) as store:
        ids = fill(store, 3)  # 3 pairs + 6 singles = 9 items
        pairs, candidates = ids["pairs"], ids["candidates"]
        assert store.progress_report("ann") == Progress(0, 9, None)

        store.record_preference(pairs[0], "ann", "A")
        clock.advance(10)
        store.record_preference(pairs[1], "ann", "B")
        assert store.progress_report("ann") == Progress(2, 9, None)  # one gap: no pace, so no ETA
        assert store.progress_report("ann").eta_s is None
        clock.advance(30)
        store.record_preference(pairs[2], "ann", "tie")
        report = store.progress_report("ann")
        assert report == Progress(3, 9, 20.0)  # the median of 10 s and 30 s
        assert (report.left, report.eta_s) == (6, 120.0)

        # a lunch break does not count; the next gaps do
        clock.advance(3600)
        store.record_rating(candidates[0], "ann", 4)
        assert store.progress_report("ann").pace_s == 20.0
        clock.advance(12)
        store.record_rating(candidates[1], "ann", 2)
        assert store.progress_report("ann").pace_s == 12.0  # gaps 10, 30, 12

        # an undone judgement is no longer timed; its replacement is, from the judgement before it
        clock.advance(50)
        store.record_rating(candidates[2], "ann", 5)
        assert store.progress_report("ann").pace_s == 21.0  # 10, 30, 12, 50
        store.undo_last("ann")
        assert store.progress_report("ann") == Progress(5, 9, 12.0)  # 10, 30, 12
        clock.advance(8)
        store.record_rating(candidates[2], "ann", 4)
        assert store.progress_report("ann") == Progress(6, 9, 21.0)  # 10, 30, 12, 58 (not 50 and 8)

        # another rater has their own pace, and a rater with nothing left has no ETA
        assert store.progress_report("bob") == Progress(0, 9, None)
        for candidate in candidates[3:]:
            clock.advance(5)
            store.record_rating(candidate, "ann", 3)
        done = store.progress_report("ann")
        assert (done.done, done.left, done.eta_s) == (9, 0, None)
    # the clock's times are what is on disk, in UTC ISO 8601
    assert raw(path, "SELECT MIN(created_at) FROM judgements")[0][0] == "2026-03-02T09:00:00.000+00:00"


def test_a_database_of_the_current_schema_keeps_its_judgements(tmp_path):
    """A store written with the current CREATE statements (raw SQL, timestamps as this code writes them) reads back
    with the new readers: judgements, preference pairs, pace and position bias."""
    path = tmp_path / "v2.db"
    db = sqlite3.connect(path)
    for migration in MIGRATIONS:
        db.executescript(migration)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
    db.execute("INSERT INTO prompts (text, created_at) VALUES ('p', '2026-01-01T00:00:00.000+00:00')")
    for k in range(6):
        db.execute("INSERT INTO candidates (prompt_id, text, model, created_at) VALUES (1, ?, 'm', '2026-01-01')",
                   (f"c{k}",))
    for k in range(3):
        db.execute("INSERT INTO items (kind, prompt_id, candidate_a, candidate_b, created_at) VALUES ('pair', 1, ?, ?, 'x')",
                   (2 * k + 1, 2 * k + 2))
    db.execute("INSERT INTO items (kind, prompt_id, candidate_a, created_at) VALUES ('single', 1, 1, 'x')")
    db.execute("INSERT INTO raters VALUES ('ann', '2026-01-01T10:00:00.000+00:00')")
    for item, choice, stamp in ((1, "A", "10:00:00.000"), (2, "B", "10:00:20.500"), (3, "A", "10:00:50.500")):
        db.execute("INSERT INTO judgements (item_id, rater, choice, created_at) VALUES (?, 'ann', ?, ?)",
                   (item, choice, f"2026-01-01T{stamp}+00:00"))
    db.commit()
    db.close()

    with FeedbackStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert [(j["item_id"], j["choice"]) for j in store.judgements()] == [(1, "A"), (2, "B"), (3, "A")]
        assert [(p.chosen, p.rejected) for p in store.preference_pairs()] == [("c0", "c1"), ("c3", "c2"), ("c4", "c5")]
        assert store.progress_report("ann") == Progress(3, 4, 25.25)  # gaps 20.5 and 30
        assert store.position_bias() == (2 / 3, 3)
        store.record_rating(1, "ann", 5)  # and it takes new judgements
        assert store.progress_report("ann").done == 4


# -- bad input -----------------------------------------------------------------------------------------------------
def test_database_of_another_application_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    db.commit()
    db.close()
    with pytest.raises(FeedbackStoreError, match=r"another application \(tables: invoices\).*new path"):
        FeedbackStore(path)
    assert raw(path, "PRAGMA journal_mode") == [("delete",)]  # not switched to WAL behind its owner's back
    assert raw(path, "SELECT name FROM sqlite_master") == [("invoices",)]


def test_damaged_store_is_refused(tmp_path):
    path = tmp_path / "damaged.db"
    with FeedbackStore(path):
        pass
    db = sqlite3.connect(path)
    db.execute("DROP TABLE judgements")
    db.commit()
    db.close()
    with pytest.raises(FeedbackStoreError, match="lacks the tables judgements.*backup or pass a new path"):
        FeedbackStore(path)


def test_files_that_are_not_databases(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("these are my notes, not a database\n" * 50)
    with pytest.raises(FeedbackStoreError, match="not a usable SQLite database.*new path"):
        FeedbackStore(text)
    assert text.read_text().startswith("these are my notes")
    with pytest.raises(FeedbackStoreError, match="is a directory"):
        FeedbackStore(tmp_path)
    with pytest.raises(FeedbackStoreError, match="does not exist; create"):
        FeedbackStore(tmp_path / "no" / "such" / "fb.db")


def test_bad_judgements_and_ids(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        ids = fill(store, 2)
        pair, single = ids["pairs"][0], ids["singles"][0]
        a, b, other = ids["candidates"][0], ids["candidates"][1], ids["candidates"][2]
        for choice in ("a", "left", "", None):
            with pytest.raises(FeedbackStoreError, match="choice must be one of A, B, tie, skip"):
                store.record_preference(pair, "ann", choice)
        for score in (0, 6, -1, 3.5, "4", True):
            with pytest.raises(FeedbackStoreError, match="integer from 1 to 5"):
                store.record_rating(a, "ann", score)
        with pytest.raises(FeedbackStoreError, match="no item with id 999.*add_pair or request_rating"):
            store.record_preference(999, "ann", "A")
        with pytest.raises(FeedbackStoreError, match="candidate 999 has no rating request.*request_rating"):
            store.record_rating(999, "ann", 3)
        with pytest.raises(FeedbackStoreError, match=f"item {single} is a single item; rate its candidate"):
            store.record_preference(single, "ann", "A")
        with pytest.raises(FeedbackStoreError, match="rater name"):
            store.record_preference(pair, "  ", "A")
        with pytest.raises(FeedbackStoreError, match="no prompt with id 999.*add_prompt"):
            store.add_candidate(999, "text", model="m")
        with pytest.raises(FeedbackStoreError, match="no candidate with id 999.*add_candidate"):
            store.add_pair(ids["prompts"][0], a, 999)
        with pytest.raises(FeedbackStoreError, match="no candidate with id 999"):
            store.request_rating(999)
        with pytest.raises(FeedbackStoreError, match="two different candidates"):
            store.add_pair(ids["prompts"][0], a, a)
        with pytest.raises(FeedbackStoreError, match=f"candidate {other} answers prompt {ids['prompts'][1]}"):
            store.add_pair(ids["prompts"][0], a, other)
        with pytest.raises(FeedbackStoreError, match="no item with id 999"):
            store.item(999)
        # None of the refused calls wrote anything, and the store still works
        assert store.judgements() == [] and store.progress("ann") == (0, 6)
        store.add_pair(ids["prompts"][0], b, a)
        store.record_preference(pair, "ann", "A")
        assert len(store.judgements()) == 1


# -- durability and concurrency ------------------------------------------------------------------------------------
def test_acknowledged_judgements_survive_sigkill(tmp_path):
    db = tmp_path / "fb.db"
    with FeedbackStore(db) as store:
        fill(store, 20)  # 20 pairs and 40 single items
    rater_acks: list[int] = []
    for round_ in range(3):  # kill at three different moments of the stream
        ack = tmp_path / f"ack{round_}.txt"
        rater = f"rater{round_}"
        writer = start_writer(db, ack, rater)
        wanted = 40 + 25 * round_
        deadline = time.monotonic() + 60
        while len(read_acks(ack)) < wanted:
            assert writer.poll() is None, f"the writer died: {writer.communicate()[1]}"
            assert time.monotonic() < deadline, "the writer made too few judgements in 60 s"
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)  # mid-stream: most likely inside a transaction or between two
        writer.wait(10)
        assert writer.returncode == -signal.SIGKILL
        writer.stdout.close()
        writer.stderr.close()

        acks = read_acks(ack)
        check_acks_survived(db, acks, rater)
        on_disk = raw(db, "SELECT COUNT(*) FROM judgements WHERE rater = ?", (rater,))[0][0]
        # At most one judgement can be committed but not yet acknowledged (killed between COMMIT and the ack write)
        assert len(acks) <= on_disk <= len(acks) + 1
        rater_acks.append(len(acks))
    assert raw(db, "PRAGMA integrity_check") == [("ok",)]
    with FeedbackStore(db) as store:  # the killed writers' database opens and takes writes
        store.record_preference(1, "after", "A")
        assert store.progress("after") == (1, 60)
    print(f"acknowledged before SIGKILL: {rater_acks}")


def test_two_writer_processes_lose_nothing(tmp_path):
    db = tmp_path / "fb.db"
    with FeedbackStore(db) as store:
        fill(store, 10)  # 30 items
    n = 300  # each writer goes ten times round the 30 items
    go = tmp_path / "go"
    writers = {rater: start_writer(db, tmp_path / f"{rater}.txt", rater, "--limit", str(n), "--start-file", str(go))
               for rater in ("ann", "bob")}
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{rater}.txt").exists() for rater in writers):  # created once its store is open
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers.values()), "a writer did not start"
        time.sleep(0.005)
    go.touch()  # both start writing at the same moment
    started = time.monotonic()
    windows = []
    for writer in writers.values():
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        assert "locked" not in err and "Traceback" not in err, err
        windows.append([float(t) for t in out.split()[1:]])
    elapsed = time.monotonic() - started
    # They were writing at the same time: each began before the other finished
    (start_a, end_a), (start_b, end_b) = windows
    assert start_a < end_b and start_b < end_a, windows
    for rater in writers:
        acks = read_acks(tmp_path / f"{rater}.txt")
        assert len(acks) == n
        check_acks_survived(db, acks, rater)
    rows = raw(db, "SELECT rater FROM judgements ORDER BY id")
    assert len(rows) == 2 * n
    # How often the write lock changed hands (SQLite's busy handler lets a writer keep it for a while: often only a few)
    switches = sum(1 for x, y in zip(rows, rows[1:]) if x != y)
    with FeedbackStore(db) as store:
        assert store.progress("ann") == store.progress("bob") == (30, 30)  # the last round judged every item
        assert len(store.judgements()) == 60
    print(f"2 x {n} judgements in {elapsed:.1f} s, {switches} switches between writers")


def test_threads_sharing_one_store_and_threads_with_their_own(tmp_path):
    path = tmp_path / "fb.db"
    shared = FeedbackStore(path)
    ids = fill(shared, 5)
    errors: list[BaseException] = []

    def rate(store: FeedbackStore, rater: str) -> None:
        try:
            for round_ in range(3):
                for i, pair in enumerate(ids["pairs"]):
                    store.record_preference(pair, rater, "AB"[(i + round_) % 2])
                    store.next_item(rater)
                for candidate in ids["candidates"]:
                    store.record_rating(candidate, rater, 1 + (candidate + round_) % 5)
                    store.progress(rater)
                store.undo_last(rater)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    own = [FeedbackStore(path) for _ in range(2)]
    threads = [threading.Thread(target=rate, args=(shared, f"shared{k}")) for k in range(3)]
    threads += [threading.Thread(target=rate, args=(store, f"own{k}")) for k, store in enumerate(own)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for store in own:
        store.close()
    assert not errors, errors
    for k in range(3):
        assert shared.progress(f"shared{k}") == (14, 15)  # everything judged, the last rating undone
    assert {rater for (rater,) in raw(path, "SELECT name FROM raters")} == {"shared0", "shared1", "shared2", "own0", "own1"}
    # 5 raters x 3 rounds x 15 judgements written, none lost
    assert raw(path, "SELECT COUNT(*) FROM judgements") == [(5 * 3 * 15,)]
    shared.close()


def test_processes_creating_the_same_new_store_at_once(tmp_path):
    path = tmp_path / "new.db"
    go = tmp_path / "go"
    code = (
        "import importlib.util, os, sys, time\n"
        f"sys.path.insert(0, {str(WRITER.parent)!r})\n"
        "from feedback_writer import load_store_module\n"
        "store_module = load_store_module()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.002)\n"
        f"store = store_module.FeedbackStore({str(path)!r})\n"
        "print(store.schema_version)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(0.5)
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == str(SCHEMA_VERSION)
    # migrated exactly once: the tables exist once and the version is current
    assert raw(path, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'judgements'") == [(1,)]
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
