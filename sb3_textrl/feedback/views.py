"""What the two raters (the rating page and ``rate --terminal``) share: the rater-name check, the scores a single
candidate takes, and the view of an item they show."""

from __future__ import annotations

import unicodedata
from typing import Any

MAX_RATER_LENGTH = 64
SCORES = (1, 2, 3, 4, 5)


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
