"""What the two raters (the rating page and ``rate --terminal``) share: the rater-name check, the keys and scores they
accept, the view of an item they show, and the progress line with its time estimate."""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from sb3_textrl.feedback.store import Progress

MAX_RATER_LENGTH = 64
SCORES = (1, 2, 3, 4, 5)
SCORE_LABELS = {1: "bad", 2: "poor", 3: "fair", 4: "good", 5: "excellent"}
# Letters judge a pair, digits score a single item, never the other way round: with "1"/"2" also meaning A/B, a
# rater who thinks they are scoring would silently state a preference.
PAIR_KEYS = {"a": ("A", "A is better"), "b": ("B", "B is better"), "t": ("tie", "tie"), "s": ("skip", "skip")}
"""Key -> (the store's choice, what it means), for a pair."""
UNDO_KEY = "u"
PAIR_KEY_HINT = "digits score single summaries only; on a pair type a (A is better), b (B is better), t (tie) or s (skip)"


def check_rater(name: Any) -> str:
    """
    Validate a rater name and return it without surrounding spaces.

    :param name: the name as typed (query parameter, JSON field or ``--rater``)
    :return: the cleaned name
    :raises ValueError: when the name is missing, too long or holds control characters
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a rater name is required: type it in the 'Rater' field, or add ?rater=NAME (--rater NAME)")
    name = name.strip()
    if len(name) > MAX_RATER_LENGTH:
        raise ValueError(f"rater name is {len(name)} characters long: use at most {MAX_RATER_LENGTH}")
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        raise ValueError("rater name holds control characters: use letters, digits, spaces or punctuation")
    return name


def item_view(item: dict[str, Any] | None) -> dict[str, Any] | None:
    """
    The fields the page and the terminal show for an item of ``FeedbackStore.next_item``.

    :param item: the store's item (``None`` when nothing is pending)
    :return: ``kind``, ``item_id``, ``prompt``, ``article`` (the article when known, else the prompt) and the candidate
        ids/texts: ``candidate_a``/``text_a``/``candidate_b``/``text_b`` for a pair, ``candidate_id``/``text`` for a single
    """
    if item is None:
        return None
    candidates = item["candidates"]
    view = {
        "kind": item["kind"],
        "item_id": item["id"],
        "prompt": item["prompt"],
        "article": item.get("article") or item["prompt"],
    }
    if item["kind"] == "pair":
        view.update(
            candidate_a=candidates[0]["id"],
            text_a=candidates[0]["text"],
            candidate_b=candidates[1]["id"],
            text_b=candidates[1]["text"],
        )
    else:
        view.update(candidate_id=candidates[0]["id"], text=candidates[0]["text"])
    return view


def eta_text(seconds: float | None) -> str | None:
    """
    An estimate of the time left as raters read it: ``"under a minute left"``, ``"about 7 min left"``,
    ``"about 1 h 05 min left"``.

    :param seconds: the estimate (None: no estimate yet)
    :return: the text, or None without an estimate
    """
    if seconds is None:
        return None
    if seconds < 60:
        return "under a minute left"
    minutes = max(math.floor(seconds / 60 + 0.5), 1)  # half up: 4.5 min reads as 5, not round()'s 4
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left"


def progress_view(progress: Progress) -> dict[str, Any]:
    """
    The progress both raters show: done/total and, once this rater has a pace, the time left.

    :param progress: the store's :meth:`~sb3_textrl.feedback.store.FeedbackStore.progress_report`
    :return: ``done``, ``total``, ``eta_s`` (whole seconds, or None) and ``eta`` (:func:`eta_text`, or None)
    """
    eta_s = progress.eta_s
    return {
        "done": progress.done,
        "total": progress.total,
        "eta_s": None if eta_s is None else math.ceil(eta_s),
        "eta": eta_text(eta_s),
    }
