"""The feedback store: prompts, candidate completions, and the judgements human raters give them, in SQLite.

Durability: every write is its own ``BEGIN IMMEDIATE ... COMMIT`` transaction and a ``record_*`` call returns only
after its COMMIT, so a judgement the caller has seen acknowledged survives the writer process being killed. The
database runs in WAL mode with ``synchronous=FULL``: NORMAL would already survive a killed process (the WAL is in the
OS page cache), FULL also survives a power cut for the price of one fsync per judgement, which is nothing at human
rating speed. Concurrent writers (several rater processes, the web app's threads) serialise on SQLite's write lock,
waiting up to ``timeout_s`` (``busy_timeout``) rather than failing with "database is locked".

Schema versions live in ``PRAGMA user_version``; :data:`MIGRATIONS` upgrades an older database in place, and a
database written by a newer version of sb3_textrl, or one that is not a feedback store, is refused with a clear
message.

Shown order: a pair's ``candidate_a`` is the candidate both raters show first, as "A", so a judgement's ``A``/``B``
is always what the rater saw, and :meth:`FeedbackStore.preference_pairs` reads chosen/rejected from it whatever the
order. Which *source* went first is up to whoever queues the pair, and is recorded with the candidates:
:func:`~sb3_textrl.sampling.sample_for_rating` stores each candidate with ``settings["source"]`` = ``"a"`` or ``"b"``
(its ``source_a``/``source_b``) and draws each pair's order with :func:`random_pair_orders`, so a pair whose
``candidate_a`` has source ``"b"`` was shown swapped. Pairs written before that (no ``"source"``) always showed source
a (greedy, by default) first. :meth:`FeedbackStore.position_bias` is the share of A/B judgements that chose the
candidate shown first.

Pace: :meth:`FeedbackStore.progress_report` estimates the time a rater has left from the ``created_at`` of their
recent judgements (see :func:`recent_pace`); no column is needed for it.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from statistics import median
from typing import Any

CHOICES = ("A", "B", "tie", "skip")
MIN_SCORE, MAX_SCORE = 1, 5
PACE_WINDOW = 10
"""The pace is read from the gaps between a rater's last ``PACE_WINDOW + 1`` judgements."""
BREAK_S = 300.0
"""A gap longer than this (seconds) is a break, not the time an item took, and does not count towards the pace."""
MIN_PACE_GAPS = 2
"""Gaps (after dropping breaks) needed before there is a pace, hence an ETA: one gap alone is too noisy."""

_V1 = """
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    task TEXT,
    reference TEXT,
    article TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE TABLE raters (
    name TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL
);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('pair', 'single')),
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    candidate_a INTEGER NOT NULL REFERENCES candidates(id),
    candidate_b INTEGER REFERENCES candidates(id),
    created_at TEXT NOT NULL
);
CREATE TABLE judgements (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    rater TEXT NOT NULL REFERENCES raters(name),
    choice TEXT CHECK (choice IN ('A', 'B', 'tie', 'skip')),
    score INTEGER CHECK (score BETWEEN 1 AND 5),
    created_at TEXT NOT NULL,
    undone_at TEXT,
    CHECK ((choice IS NULL) != (score IS NULL))
);
CREATE INDEX judgements_by_rater ON judgements(rater, undone_at);
CREATE INDEX judgements_by_item ON judgements(item_id, undone_at);
"""

# Version 2: candidates are looked up by prompt (pairs from ratings), items by candidate (ratings of a candidate).
_V2 = """
CREATE INDEX candidates_by_prompt ON candidates(prompt_id);
CREATE INDEX items_by_candidate ON items(candidate_a);
"""

MIGRATIONS: list[str] = [_V1, _V2]
"""``MIGRATIONS[i]`` turns a version-``i`` database into version ``i + 1`` (version 0 is an empty file)."""

SCHEMA_VERSION = len(MIGRATIONS)
_TABLES = {"prompts", "candidates", "raters", "items", "judgements"}


class FeedbackStoreError(ValueError):
    """A database that is not (or not yet) a feedback store this code can use, or a bad judgement."""


class FeedbackStorageError(FeedbackStoreError):
    """
    The storage under a good store failed: the disk is full, another process holds the lock, the file is read-only.
    Nothing was stored by the write that failed; ``http_status`` is what the rating page answers (507 or 503).
    """

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


def _processes_with_open(path: Path) -> list[str]:
    """``"PID (command)"`` of the other processes that have ``path`` open (Linux /proc; empty elsewhere)."""
    found = []
    target = str(path.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = fd_dir.parent.name
        if pid == str(os.getpid()):
            continue
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                command = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid} ({command.strip()[:60]})")
        except OSError:  # gone, or another user's process
            continue
    return found


def storage_error(path: Path, error: sqlite3.Error, timeout_s: float) -> FeedbackStorageError | None:
    """
    What really happened when SQLite failed on a good store, with what to do; None when the error is not a
    storage fault.

    :param path: the database
    :param error: SQLite's error
    :param timeout_s: how long a write waited for the lock
    :return: the error to raise instead, or None
    """
    text = str(error).lower()
    if "disk is full" in text or "disk i/o error" in text:
        return FeedbackStorageError(
            f"{path}: the disk is full ({error}); nothing of this write was stored. Free space on the disk that "
            f"holds {path.parent}, then retry: what was stored before is intact.",
            507,
        )
    if "locked" in text or "busy" in text:
        holders = _processes_with_open(path)
        who = f" (open in process {', '.join(holders)})" if holders else ""
        return FeedbackStorageError(
            f"{path} is locked by another writer{who} that held it for more than {timeout_s:g} s; nothing of this "
            "write was stored. Let that process finish (or stop it), then retry.",
            503,
        )
    unwritable = path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))
    if "readonly" in text or "read-only" in text or ("unable to open" in text and unwritable):
        return FeedbackStorageError(
            f"{path} cannot be written ({error}): the file or its folder is read-only. To read it (train-rm does), "
            "open it with FeedbackStore(path, read_only=True); to rate or sample into it, copy it to a writable folder.",
            503,
        )
    return None


@dataclass(frozen=True)
class PreferencePair:
    """
    One preference for reward-model training, as the store returns it (with where it came from); the trainer reads
    it into a :class:`~sb3_textrl.reward_model.Preference`, the three texts alone.

    :param prompt: the prompt both completions answer
    :param chosen: the preferred completion
    :param rejected: the other completion
    :param source: ``"preference"`` (an A/B judgement) or ``"rating"`` (two rated completions of one prompt)
    """

    prompt: str
    chosen: str
    rejected: str
    source: str = "preference"


@dataclass(frozen=True)
class Progress:
    """
    Where one rater stands, as both raters show it.

    :param done: items this rater has judged
    :param total: all items in the store
    :param pace_s: this rater's recent seconds per judgement (:func:`recent_pace`), None until there is one
    """

    done: int
    total: int
    pace_s: float | None = None

    @property
    def left(self) -> int:
        """Items still to judge."""
        return max(self.total - self.done, 0)

    @property
    def eta_s(self) -> float | None:
        """Estimated seconds until this rater is done: items left times the pace (None without a pace, or when done)."""
        if self.pace_s is None or self.left == 0:
            return None
        return self.left * self.pace_s


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(when: datetime) -> str:
    """A row's timestamp: UTC ISO 8601 with milliseconds (a naive datetime is taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _parse_stamp(stamp: str | datetime) -> datetime | None:
    """A timestamp as an aware datetime (naive ones are UTC); None for text that is not ISO 8601 (hand-made rows)."""
    if isinstance(stamp, datetime):
        when = stamp
    else:
        try:
            when = datetime.fromisoformat(stamp)
        except (TypeError, ValueError):
            return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def recent_pace(stamps: Sequence[str | datetime], window: int = PACE_WINDOW, break_s: float = BREAK_S) -> float | None:
    """
    A rater's recent seconds per judgement: the median of the gaps between their last ``window + 1`` judgements,
    leaving out breaks (gaps longer than ``break_s``). The median, not the mean, so one slow item does not swing it.

    :param stamps: the times of the rater's judgements (ISO 8601 text as stored, or datetimes), in any order
    :param window: how many of the most recent gaps to look at
    :param break_s: gaps longer than this are breaks
    :return: the pace, or None with fewer than :data:`MIN_PACE_GAPS` gaps to go on
    """
    times = [when for when in map(_parse_stamp, stamps) if when is not None]
    recent = sorted(times)[-(window + 1):]
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(recent, recent[1:])]
    gaps = [gap for gap in gaps if gap <= break_s]
    return float(median(gaps)) if len(gaps) >= MIN_PACE_GAPS else None


def random_pair_orders(n_pairs: int, seed: int) -> list[bool]:
    """
    Which pairs to show swapped (the second source as "A"), drawn once when the pairs are queued: a seeded, balanced
    draw, half of the pairs swapped (the odd one out by a coin flip), so the first-shown position carries no source
    and a reward model learns no position bias from it.

    :param n_pairs: how many pairs
    :param seed: the draw's seed (the same seed gives the same orders)
    :return: one flag per pair, True for "show swapped"
    """
    rng = random.Random(f"pair-order-{seed}")  # its own stream: independent of any other draw seeded with ``seed``
    swapped = [i < n_pairs // 2 for i in range(n_pairs)]
    if n_pairs % 2:
        swapped[-1] = rng.random() < 0.5
    rng.shuffle(swapped)
    return swapped


def _inserted_id(cursor: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just added (``lastrowid`` is typed optional, but an INSERT always sets it)."""
    assert cursor.lastrowid is not None
    return int(cursor.lastrowid)


class FeedbackStore:
    """
    Prompts, candidates and human judgements (1-5 ratings, A/B/tie/skip preferences) in one SQLite file.

    :param path: database file; created with the current schema when missing
    :param timeout_s: how long a write waits for another writer's transaction before failing
    :param clock: what time it is, for the rows' timestamps (default: now, UTC); tests pass their own to place
        judgements at chosen times
    """

    SCHEMA_VERSION = SCHEMA_VERSION

    def __init__(
        self,
        path: str | os.PathLike,
        timeout_s: float = 30.0,
        *,
        clock: Callable[[], datetime] | None = None,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self._clock = clock or _utc_now
        self._timeout_s = timeout_s
        self.read_only = read_only
        # One connection may be shared by threads (check_same_thread=False); the lock keeps their transactions apart.
        self._lock = threading.RLock()
        self._in_transaction = False  # inside transaction(): the writes join it instead of committing one by one
        if read_only:
            self._open_read_only()
            return
        if self.path.is_dir():
            raise FeedbackStoreError(f"{self.path} is a directory; pass the path of a database file, e.g. feedback.db")
        if not self.path.parent.is_dir():
            raise FeedbackStoreError(
                f"the folder of {self.path} does not exist; create {self.path.parent} first or pass another path"
            )
        # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE) so writers queue up front.
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            # Check before switching to WAL: the journal mode is stored in the file, and a foreign database is left as is.
            self._check_schema()
            self._enable_wal(timeout_s)
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as err:
            self._db.close()
            fault = storage_error(self.path, err, timeout_s)
            if fault is not None:
                raise fault from err
            raise FeedbackStoreError(
                f"{self.path} is not a usable SQLite database ({err}); pass a feedback database created by "
                "sb3_textrl (or a new path, which is created)"
            ) from err
        except FeedbackStoreError:
            self._db.close()
            raise

    def _open_read_only(self) -> None:
        """Open an existing store for reading only: nothing is written (no journal switch, no migration), so a store
        on a read-only disk or in a folder this user cannot write opens too."""
        if not self.path.is_file():
            raise FeedbackStoreError(f"{self.path} does not exist; pass the path of a feedback database")
        uri = self.path.resolve().as_uri()
        # mode=ro reads a WAL database only where its -shm file can be made; immutable=1 reads it from a read-only
        # disk (it takes no locks: right for a store nobody writes meanwhile).
        for options in ("mode=ro", "mode=ro&immutable=1"):
            self._db = sqlite3.connect(f"{uri}?{options}", uri=True, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            try:
                version = self._check_schema()
                break
            except sqlite3.OperationalError:
                self._db.close()  # a connection left open keeps the file (and its disk) busy
                if options.endswith("immutable=1"):
                    raise
            except sqlite3.DatabaseError as err:
                self._db.close()
                raise FeedbackStoreError(f"{self.path} is not a usable SQLite database ({err})") from err
        if version != SCHEMA_VERSION:
            self._db.close()
            raise FeedbackStoreError(
                f"{self.path} has feedback schema version {version}; opened read-only it cannot be upgraded to "
                f"{SCHEMA_VERSION}: open it once without read_only (from a writable copy) to upgrade it"
            )

    # -- connection and schema ----------------------------------------------------------------------------------
    def _enable_wal(self, timeout_s: float) -> None:
        """Switch to WAL, retrying while another process creating the same file holds its lock: SQLite answers
        this pragma with SQLITE_BUSY at once instead of waiting in the busy handler."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _now(self) -> str:
        return _stamp(self._clock())

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: taken with the write lock up front, committed before the caller goes on."""
        if self.read_only:
            raise FeedbackStoreError(f"{self.path} is open read-only (read_only=True); open it without it to write")
        with self._lock:
            if self._in_transaction:  # inside transaction(): it commits (or rolls back) all its writes together
                yield self._db
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._in_transaction = True
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                finally:
                    self._in_transaction = False
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as err:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                fault = storage_error(self.path, err, self._timeout_s)
                if fault is None:
                    raise
                raise fault from err

    @contextmanager
    def transaction(self) -> Iterator[FeedbackStore]:
        """
        Several writes as one: the ``add_*`` calls inside are all stored when the block ends, or none of them (an
        exception, a killed process). ``sb3-textrl sample`` stores each prompt, its two candidates and their pair so.

        :return: this store
        """
        with self._write():
            yield self

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of one query, fetched under the lock (so never inside another thread's open transaction)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _check_schema(self, db: sqlite3.Connection | None = None) -> int:
        """The database's schema version, after refusing a newer, foreign or damaged database."""
        db = db or self._db
        # One statement, so one read snapshot: read separately, another process creating the store could commit its
        # tables and version in between, and a new store would look like another application's database.
        version, names = db.execute(
            "SELECT user_version, (SELECT group_concat(name, char(31)) FROM sqlite_master WHERE type = 'table') "
            "FROM pragma_user_version"
        ).fetchone()
        tables = set(names.split("\x1f")) if names else set()
        if version > SCHEMA_VERSION:
            raise FeedbackStoreError(
                f"{self.path} has feedback schema version {version}, newer than this sb3_textrl's "
                f"{SCHEMA_VERSION}; upgrade sb3_textrl (pip install -U sb3_textrl) to open it"
            )
        if version == 0 and tables:
            raise FeedbackStoreError(
                f"{self.path} is a SQLite database of another application (tables: {', '.join(sorted(tables))}); "
                "pass a new path for the feedback store"
            )
        if version > 0 and not tables >= _TABLES:
            raise FeedbackStoreError(
                f"{self.path} claims feedback schema version {version} but lacks the tables "
                f"{', '.join(sorted(_TABLES - tables))}; it is damaged or not a feedback store: restore it from a "
                "backup or pass a new path"
            )
        return int(version)

    def _migrate(self) -> None:
        # Already current (the usual case): no write transaction, so opening a store costs no disk flush.
        if self._check_schema() == SCHEMA_VERSION:
            return
        with self._write() as db:
            # Checked again inside the write lock: another process may have created or upgraded the file meanwhile.
            version = self._check_schema(db)
            for step in range(version, SCHEMA_VERSION):
                for statement in filter(str.strip, MIGRATIONS[step].split(";")):
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return int(self._read("PRAGMA user_version")[0][0])

    # -- what is judged ------------------------------------------------------------------------------------------
    def add_prompt(
        self,
        text: str,
        *,
        task: str | None = None,
        reference: str | None = None,
        article: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        """
        Store a prompt.

        :param text: the prompt as the LM saw it
        :param task: the task it comes from
        :param reference: a reference completion, if any
        :param article: the raw article (news tasks), shown to raters instead of the templated prompt
        :param metadata: anything else (JSON-serialisable)
        :return: the prompt's id
        """
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO prompts (text, task, reference, article, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (str(text), task, reference, article, json.dumps(metadata or {}), self._now()),
            )
        return _inserted_id(cursor)

    def add_candidate(self, prompt_id: int, text: str, *, model: str, settings: dict[str, Any] | None = None) -> int:
        """
        Store a completion of a prompt.

        :param prompt_id: the prompt it completes
        :param text: the completion
        :param model: the model that wrote it
        :param settings: how it was generated (decoding, seed, ...; JSON-serialisable)
        :return: the candidate's id
        """
        with self._write() as db:
            self._require(db, "prompts", prompt_id)
            cursor = db.execute(
                "INSERT INTO candidates (prompt_id, text, model, settings, created_at) VALUES (?, ?, ?, ?, ?)",
                (prompt_id, str(text), model, json.dumps(settings or {}), self._now()),
            )
        return _inserted_id(cursor)

    def add_pair(self, prompt_id: int, candidate_a: int, candidate_b: int) -> int:
        """
        Queue a comparison of two candidates of one prompt.

        :return: the pair's item id
        """
        if candidate_a == candidate_b:
            raise FeedbackStoreError(f"a pair needs two different candidates, got {candidate_a} twice")
        with self._write() as db:
            for candidate in (candidate_a, candidate_b):
                self._require_candidate_of(db, candidate, prompt_id)
            cursor = db.execute(
                "INSERT INTO items (kind, prompt_id, candidate_a, candidate_b, created_at) VALUES ('pair', ?, ?, ?, ?)",
                (prompt_id, candidate_a, candidate_b, self._now()),
            )
        return _inserted_id(cursor)

    def request_rating(self, candidate_id: int) -> int:
        """
        Queue one candidate for a 1-5 rating.

        :return: the item id
        """
        with self._write() as db:
            row = self._require(db, "candidates", candidate_id)
            cursor = db.execute(
                "INSERT INTO items (kind, prompt_id, candidate_a, created_at) VALUES ('single', ?, ?, ?)",
                (row["prompt_id"], candidate_id, self._now()),
            )
        return _inserted_id(cursor)

    @staticmethod
    def _require(db: sqlite3.Connection, table: str, row_id: int) -> sqlite3.Row:
        row = db.execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,)).fetchone()
        if row is None:
            made_by = {"prompts": "add_prompt", "candidates": "add_candidate", "items": "add_pair or request_rating"}
            raise FeedbackStoreError(
                f"no {table[:-1]} with id {row_id} in this feedback store; pass an id returned by {made_by[table]}"
            )
        return row

    def _require_candidate_of(self, db: sqlite3.Connection, candidate_id: int, prompt_id: int) -> None:
        row = self._require(db, "candidates", candidate_id)
        if row["prompt_id"] != prompt_id:
            raise FeedbackStoreError(
                f"candidate {candidate_id} answers prompt {row['prompt_id']}, not prompt {prompt_id}; "
                "a pair compares two candidates of the same prompt"
            )

    # -- judging -------------------------------------------------------------------------------------------------
    def next_item(self, rater: str) -> dict[str, Any] | None:
        """
        The oldest item this rater has not judged (an undone judgement makes its item pending again).

        :param rater: the rater's name
        :return: ``{"id", "kind" ("pair" | "single"), "prompt", "article", "reference", "candidates": [{"id",
            "text"}, ...]}``, or None when the rater is done
        """
        with self._lock:  # the item and its texts from one consistent view
            row = self._db.execute(
                "SELECT * FROM items WHERE id NOT IN "
                "(SELECT item_id FROM judgements WHERE rater = ? AND undone_at IS NULL) ORDER BY id LIMIT 1",
                (rater,),
            ).fetchone()
            return None if row is None else self._item(row)

    def item(self, item_id: int) -> dict[str, Any]:
        """The item with this id, in :meth:`next_item`'s form."""
        with self._lock:
            row = self._db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise FeedbackStoreError(
                    f"no item with id {item_id} in this feedback store; pass an id returned by add_pair, "
                    "request_rating or next_item"
                )
            return self._item(row)

    def _item(self, row: sqlite3.Row) -> dict[str, Any]:
        prompt = self._db.execute("SELECT * FROM prompts WHERE id = ?", (row["prompt_id"],)).fetchone()
        ids = [row["candidate_a"]] + ([row["candidate_b"]] if row["kind"] == "pair" else [])
        texts = {c["id"]: c for c in self._db.execute(
            f"SELECT id, text, model FROM candidates WHERE id IN ({','.join('?' * len(ids))})", ids
        )}
        return {
            "id": row["id"],
            "kind": row["kind"],
            "prompt": prompt["text"],
            "article": prompt["article"],
            "reference": prompt["reference"],
            "task": prompt["task"],
            "candidates": [{"id": i, "text": texts[i]["text"], "model": texts[i]["model"]} for i in ids],
        }

    def _judge(self, item_id: int, rater: str, kind: str, choice: str | None, score: int | None) -> int:
        if not isinstance(rater, str) or not rater.strip():
            raise FeedbackStoreError("a judgement needs a rater name (a non-empty string)")
        with self._write() as db:
            item = self._require(db, "items", item_id)
            if item["kind"] != kind:
                how = "rate its candidate with record_rating" if item["kind"] == "single" else "use record_preference"
                raise FeedbackStoreError(f"item {item_id} is a {item['kind']} item; {how}")
            now = self._now()
            db.execute("INSERT OR IGNORE INTO raters (name, first_seen) VALUES (?, ?)", (rater, now))
            # A new judgement of the same item by the same rater replaces the old one (kept, marked undone).
            db.execute(
                "UPDATE judgements SET undone_at = ? WHERE item_id = ? AND rater = ? AND undone_at IS NULL",
                (now, item_id, rater),
            )
            cursor = db.execute(
                "INSERT INTO judgements (item_id, rater, choice, score, created_at) VALUES (?, ?, ?, ?, ?)",
                (item_id, rater, choice, score, now),
            )
        return _inserted_id(cursor)

    def record_preference(self, pair_id: int, rater: str, choice: str) -> int:
        """
        Record which candidate of a pair the rater prefers. Returns only once the judgement is committed.

        :param pair_id: the pair's item id
        :param rater: the rater's name
        :param choice: ``"A"``, ``"B"``, ``"tie"`` or ``"skip"``
        :return: the judgement's id
        """
        if choice not in CHOICES:
            raise FeedbackStoreError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        return self._judge(pair_id, rater, "pair", choice, None)

    def record_rating(self, candidate_id: int, rater: str, score: int) -> int:
        """
        Record a 1-5 rating of a candidate queued with :meth:`request_rating`. Returns only once committed.

        :param candidate_id: the candidate
        :param rater: the rater's name
        :param score: 1 (bad) to 5 (good)
        :return: the judgement's id
        """
        if isinstance(score, bool) or not isinstance(score, int) or not MIN_SCORE <= score <= MAX_SCORE:
            raise FeedbackStoreError(f"a rating is an integer from {MIN_SCORE} to {MAX_SCORE}, got {score!r}")
        rows = self._read(
            "SELECT id FROM items WHERE kind = 'single' AND candidate_a = ? ORDER BY id LIMIT 1", (candidate_id,)
        )
        row = rows[0] if rows else None
        if row is None:
            raise FeedbackStoreError(
                f"candidate {candidate_id} has no rating request; queue it with request_rating({candidate_id}) first"
            )
        return self._judge(int(row["id"]), rater, "single", None, score)

    def undo_last(self, rater: str) -> bool:
        """
        Undo this rater's most recent judgement still in force (kept in the table, marked undone).

        :return: whether there was one to undo
        """
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM judgements WHERE rater = ? AND undone_at IS NULL ORDER BY id DESC LIMIT 1", (rater,)
            ).fetchone()
            if row is None:
                return False
            db.execute("UPDATE judgements SET undone_at = ? WHERE id = ?", (self._now(), row["id"]))
        return True

    def progress(self, rater: str) -> tuple[int, int]:
        """``(items this rater has judged, all items)``."""
        done = self._read(
            "SELECT COUNT(DISTINCT item_id) FROM judgements WHERE rater = ? AND undone_at IS NULL", (rater,)
        )[0][0]
        total = self._read("SELECT COUNT(*) FROM items")[0][0]
        return int(done), int(total)

    def progress_report(self, rater: str) -> Progress:
        """
        :meth:`progress` with this rater's recent pace, hence an estimate of the time they have left.

        The pace comes from the rater's judgements in force (an undone one took time but judged nothing; its
        replacement's gap counts it), see :func:`recent_pace`.

        :param rater: the rater's name
        :return: done, total and pace
        """
        with self._lock:  # no judgement of another thread on this connection between the counts and the times
            done, total = self.progress(rater)
            rows = self._read(
                "SELECT created_at FROM judgements WHERE rater = ? AND undone_at IS NULL ORDER BY id DESC LIMIT ?",
                (rater, PACE_WINDOW + 1),
            )
        return Progress(done, total, recent_pace([row[0] for row in rows]))

    def position_bias(self, rater: str | None = None) -> tuple[float | None, int]:
        """
        How often A/B judgements chose the candidate shown first (A): about 0.5 for raters who judge the texts alone,
        when the order is random (see the module's "Shown order"). Ties and skips are left out.

        :param rater: one rater's judgements only (default: everyone's)
        :return: ``(share of A/B judgements choosing A, number of A/B judgements)``; the share is None without any
        """
        where = "undone_at IS NULL AND choice IN ('A', 'B')" + (" AND rater = ?" if rater is not None else "")
        chose_first, n = self._read(
            f"SELECT COALESCE(SUM(choice = 'A'), 0), COUNT(*) FROM judgements WHERE {where}",
            () if rater is None else (rater,),
        )[0]
        return (chose_first / n if n else None), int(n)

    # -- reading judgements back ---------------------------------------------------------------------------------
    def ratings(self, candidate_ids: Sequence[int]) -> dict[int, float]:
        """Mean 1-5 rating (over raters) of each rated candidate among ``candidate_ids``; unrated ones are absent."""
        ids = [int(i) for i in candidate_ids]
        if not ids:
            return {}
        rows = self._read(
            "SELECT items.candidate_a AS candidate, AVG(judgements.score) AS mean FROM judgements "
            "JOIN items ON items.id = judgements.item_id WHERE judgements.undone_at IS NULL "
            f"AND judgements.score IS NOT NULL AND items.candidate_a IN ({','.join('?' * len(ids))}) GROUP BY candidate",
            ids,
        )
        return {int(row["candidate"]): float(row["mean"]) for row in rows}

    def judgements(self) -> list[dict[str, Any]]:
        """Every judgement in force, oldest first (item, rater, choice or score, timestamp)."""
        rows = self._read(
            "SELECT id, item_id, rater, choice, score, created_at FROM judgements WHERE undone_at IS NULL ORDER BY id"
        )
        return [dict(row) for row in rows]

    def prompt_metadata(self, task: str | None = None) -> list[dict[str, Any]]:
        """
        The ``metadata`` of every stored prompt (of ``task`` only, when given), in the order they were stored.

        :param task: the task whose prompts to read, or None for all
        :return: one dict per prompt
        """
        if task is None:
            rows = self._read("SELECT metadata FROM prompts ORDER BY id")
        else:
            rows = self._read("SELECT metadata FROM prompts WHERE task = ? ORDER BY id", (task,))
        return [json.loads(row["metadata"] or "{}") for row in rows]

    def preference_pairs(self, include_ratings: bool = True) -> list[PreferencePair]:
        """
        The judgements as (prompt, chosen, rejected) pairs for reward-model training.

        A/B choices give one pair each (ties and skips carry no preference and are left out). With
        ``include_ratings``, the rated candidates of each prompt are compared two by two on their mean rating
        (the better one is chosen; equal means are left out).

        :param include_ratings: also turn 1-5 ratings into pairs
        :return: the pairs (possibly empty)
        """
        pairs = [
            PreferencePair(row["prompt"], row["chosen"], row["rejected"], "preference")
            for row in self._read(
                "SELECT p.text AS prompt, "
                "CASE j.choice WHEN 'A' THEN a.text ELSE b.text END AS chosen, "
                "CASE j.choice WHEN 'A' THEN b.text ELSE a.text END AS rejected "
                "FROM judgements j JOIN items i ON i.id = j.item_id JOIN prompts p ON p.id = i.prompt_id "
                "JOIN candidates a ON a.id = i.candidate_a JOIN candidates b ON b.id = i.candidate_b "
                "WHERE j.undone_at IS NULL AND j.choice IN ('A', 'B') ORDER BY j.id"
            )
        ]
        if include_ratings:
            pairs.extend(self._pairs_from_ratings())
        return pairs

    def _pairs_from_ratings(self) -> list[PreferencePair]:
        rows = self._read(
            "SELECT p.id AS prompt_id, p.text AS prompt, c.id AS candidate, c.text AS text, AVG(j.score) AS mean "
            "FROM judgements j JOIN items i ON i.id = j.item_id JOIN candidates c ON c.id = i.candidate_a "
            "JOIN prompts p ON p.id = c.prompt_id WHERE j.undone_at IS NULL AND j.score IS NOT NULL "
            "GROUP BY c.id ORDER BY p.id, c.id"
        )
        by_prompt: dict[int, list[sqlite3.Row]] = {}
        for row in rows:
            by_prompt.setdefault(row["prompt_id"], []).append(row)
        pairs = []
        for rated in by_prompt.values():
            for first, second in combinations(rated, 2):
                if first["mean"] == second["mean"]:
                    continue
                chosen, rejected = (first, second) if first["mean"] > second["mean"] else (second, first)
                pairs.append(PreferencePair(first["prompt"], chosen["text"], rejected["text"], "rating"))
        return pairs


def empty_preferences_message(path: str | os.PathLike) -> str:
    """What to tell a user whose store holds no usable preference (for trainers that need some)."""
    return (
        f"{path} holds no usable preference: ties and skips carry none, and ratings pair up only between "
        "differently rated completions of the same prompt. Collect judgements first: sb3-textrl sample --db "
        f"{path} ..., then sb3-textrl rate --db {path}"
    )
