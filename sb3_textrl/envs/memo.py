"""
What the envs of one VecEnv would each recompute from the same tokenizer: computed once per process.

``make_vec_env("NewsSummary-v0", n_envs=64)`` builds 64 envs from one cached tokenizer and one cached dataset, and
each used to tokenize every article twice and hash the whole vocabulary: about half a second per env on a CPU core,
minutes for a GPU run's 64 envs times a few models. Results are kept per tokenizer object (weakly: they go with it)
and keyed by the tokenizer's length as well, so adding tokens to it computes them afresh.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

T = TypeVar("T")
# Entries kept per tokenizer: a process rarely builds envs over more than a few prompt sets at once.
MAX_ENTRIES_PER_TOKENIZER = 8

_memo: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, OrderedDict[Hashable, Any]] = weakref.WeakKeyDictionary()


def tokenizer_memo(tokenizer: PreTrainedTokenizerBase, key: Hashable, compute: Callable[[], T]) -> T:
    """
    ``compute()``, or what it returned before for this tokenizer object, its current length and ``key``.

    The value is shared by every caller: treat it as read-only (copy what you will change).

    :param tokenizer: the tokenizer the value is computed from
    :param key: everything else the value depends on (hashable)
    :param compute: makes the value
    :return: the value
    """
    try:
        table = _memo.setdefault(tokenizer, OrderedDict())
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: nothing is kept
        return compute()
    full_key = (len(tokenizer), key)
    if full_key in table:
        table.move_to_end(full_key)
        return table[full_key]
    value = compute()
    table[full_key] = value
    if len(table) > MAX_ENTRIES_PER_TOKENIZER:
        table.popitem(last=False)
    return value
