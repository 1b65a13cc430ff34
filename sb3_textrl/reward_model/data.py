"""
Preference pairs for reward-model training, from a feedback database, a JSONL file or Python objects.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sb3_textrl.common.text_files import jsonl_lines, read_text_file

logger = logging.getLogger("sb3_textrl")

PAIR_FIELDS = ("prompt", "chosen", "rejected")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_NO_PREFERENCE = (
    "Ties, skips and equal ratings carry no preference, so the feedback store leaves them out (and a pair whose chosen "
    "and rejected texts are identical is dropped). Collect A/B choices that pick a side, or ratings that differ between "
    "candidates of the same prompt, then train again."
)

PreferenceSource = str | os.PathLike | Sequence[Any]
"""A SQLite feedback database, a JSONL file of ``prompt``/``chosen``/``rejected`` records, or a sequence of such
records (objects with those attributes, like :class:`~sb3_textrl.feedback.PreferencePair`, or dicts)."""


class Preference(NamedTuple):
    """
    One preference: for ``prompt``, the completion ``chosen`` is better than ``rejected``.

    The trainer's form of a pair, whatever it was read from: the three texts, as a tuple.
    :class:`~sb3_textrl.feedback.PreferencePair` (what the feedback store returns) also records where a pair came from
    (an A/B choice or two ratings); :func:`load_preferences` reads those, like any record with the three fields.
    """

    prompt: str
    chosen: str
    rejected: str


def _field(record: Any, name: str) -> Any:
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


def _to_preference(record: Any, where: str) -> Preference:
    values = {name: _field(record, name) for name in PAIR_FIELDS}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        present = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: missing field(s) {missing} (the record has {present}); every preference needs the text fields "
            f"{list(PAIR_FIELDS)}: the prompt, the preferred completion and the other one."
        )
    wrong = [name for name, value in values.items() if not isinstance(value, str)]
    if wrong:
        raise ValueError(
            f"{where}: field(s) {wrong} must be text, got {[type(values[n]).__name__ for n in wrong]}; "
            "write prompt, chosen and rejected as strings."
        )
    return Preference(values["prompt"], values["chosen"], values["rejected"])


def _read_jsonl(path: Path) -> list[Preference]:
    pairs = []
    for number, line in enumerate(jsonl_lines(read_text_file(path, "the preference file")), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); write one JSON object a line.") from error
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{number}: expected a JSON object with {list(PAIR_FIELDS)}, got {type(record).__name__}"
            )
        pairs.append(_to_preference(record, f"{path}:{number}"))
    return pairs


def _read_feedback_db(path: Path) -> list[Preference]:
    # lazy: only database input needs them
    from sb3_textrl.feedback import FeedbackStorageError, FeedbackStore, empty_preferences_message

    try:
        store = FeedbackStore(path)
    except FeedbackStorageError:  # a read-only disk or folder: reading needs no write
        store = FeedbackStore(path, read_only=True)
    with store:
        pairs = [_to_preference(pair, f"{path}, pair {i}") for i, pair in enumerate(store.preference_pairs())]
    if not pairs:
        raise ValueError(f"{empty_preferences_message(path)}. A reward model needs at least one pair with a preferred side.")
    return pairs


def _read_path(path: Path) -> list[Preference]:
    if not path.is_file():
        raise FileNotFoundError(
            f"Preference data {str(path)!r} does not exist; pass a feedback database (written by the rating tools) "
            f"or a .jsonl file with {list(PAIR_FIELDS)} on each line."
        )
    with path.open("rb") as handle:
        is_sqlite = handle.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    if is_sqlite:
        return _read_feedback_db(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    raise ValueError(
        f"Preference data {str(path)!r} is neither a SQLite feedback database nor a .jsonl file; pass one of those "
        f"(JSONL: one object a line with {list(PAIR_FIELDS)})."
    )


def load_preferences(data: PreferenceSource) -> list[Preference]:
    """
    Read preference pairs, dropping those without a preference, and fail clearly when none is left.

    :param data: a SQLite feedback database (its :meth:`~sb3_textrl.feedback.FeedbackStore.preference_pairs`,
        ratings included), a ``.jsonl`` file with ``prompt``, ``chosen`` and ``rejected`` fields, or a sequence of
        records with those fields (objects or dicts)
    :return: the preferences, in their original order
    """
    if isinstance(data, (str, os.PathLike)):
        where = repr(os.fspath(data))
        pairs = _read_path(Path(data))
    elif isinstance(data, Iterable) and not isinstance(data, (bytes, dict)):
        where = "the given preference pairs"
        pairs = [_to_preference(record, f"preference pair {i}") for i, record in enumerate(data)]
    else:
        raise TypeError(
            f"Preference data must be a path (feedback database or .jsonl) or a sequence of pairs, got {type(data).__name__}"
        )
    # Identical texts cannot be told apart: Bradley-Terry would push their (equal) rewards nowhere.
    kept = [p for p in pairs if p.chosen != p.rejected]
    if len(kept) < len(pairs):
        dropped = len(pairs) - len(kept)
        logger.warning(f"reward model: {dropped} pair(s) of {where} have identical chosen and rejected texts; dropped.")
    if not kept:
        found = f"{len(pairs)} pair(s), none with a preference" if pairs else "no preference pair"
        raise ValueError(
            f"{where} holds {found}: a reward model needs at least one pair with a preferred side. {_NO_PREFERENCE}"
        )
    return kept


def split_preferences(
    pairs: Sequence[Preference], eval_fraction: float, seed: int = 0
) -> tuple[list[Preference], list[Preference], str]:
    """
    Hold out a share of the pairs for evaluation, by prompt where possible.

    Whole prompts go to one side, so the held-out accuracy measures how the reward model judges prompts it has not
    seen. When that cannot come near the share (a single prompt, or prompts with many pairs each), the pairs
    themselves are split.

    :param pairs: the preferences
    :param eval_fraction: the share of pairs to hold out (0 holds out none)
    :param seed: seed of the random split
    :return: (training pairs, held-out pairs, ``"prompt"`` or ``"pair"``: what was split)
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}; e.g. 0.1 holds out a tenth of the pairs")
    n_eval = round(len(pairs) * eval_fraction)
    if n_eval == 0:
        if eval_fraction > 0:
            logger.warning(
                f"reward model: {len(pairs)} pair(s) are too few to hold out {eval_fraction:.0%}; no held-out evaluation."
            )
        return list(pairs), [], "pair"
    if n_eval == len(pairs):
        n_eval = len(pairs) - 1  # keep something to train on
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.prompt, []).append(i)
    if len(groups) >= 2:
        prompts = list(groups)
        rng.shuffle(prompts)
        held: list[int] = []
        for prompt in prompts:
            # Take a prompt when it brings the held-out share closer to the target (prompts differ in pair counts).
            if abs(len(held) + len(groups[prompt]) - n_eval) < abs(len(held) - n_eval):
                held.extend(groups[prompt])
        if held and len(held) < len(pairs):
            held_set = set(held)
            return [p for i, p in enumerate(pairs) if i not in held_set], [pairs[i] for i in sorted(held)], "prompt"
    order = list(range(len(pairs)))
    rng.shuffle(order)
    held_set = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held_set], [p for i, p in enumerate(pairs) if i in held_set], "pair"
