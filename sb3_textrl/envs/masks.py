"""Env-side action masks (sb3-contrib's ``action_masks()`` convention): which tokens a text env allows next.

A task chooses its mask with ``action_mask=`` (in :func:`~sb3_textrl.register_text_task` or ``gym.make``):

- a callable ``(prompt_ids, generated_ids) -> bool array over the vocabulary``, called at every step;
- ``"article"``: only tokens that occur in the prompt's article (``TextPrompt.meta["article"]``, else the whole
  prompt), plus the stop tokens, punctuation and a few function words (an extractive-leaning constraint);
- ``{"banned": [...]}`` or :class:`BannedTokens`: every token but the banned ones;
- an :class:`ActionMask` object, or a list of any of these (a token must be allowed by all of them).

Masks are vectorised over the vocabulary: a table of token classes is built once per tokenizer (decoding every
token once), after which a mask is a few numpy operations over that table.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:  # text_env imports this module
    from sb3_textrl.envs.text_env import TextPrompt

MaskFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# None | "article" | {"banned": [...]} | callable | ActionMask | a list of these (intersection)
MaskSpec = Union[None, str, Mapping[str, Any], MaskFn, "ActionMask", Sequence[Any]]  # noqa: UP007

# Function words an extractive summary needs even when the article happens not to use them.
FUNCTION_WORDS = (
    "a", "an", "the", "of", "in", "on", "at", "to", "for", "from", "by", "with", "as", "and", "or", "but", "not",
    "is", "are", "was", "were", "be", "been", "has", "have", "had", "will", "would", "it", "its", "this", "that",
    "these", "those", "he", "she", "they", "his", "her", "their", "who", "which", "after", "over", "said", "'s",
)  # fmt: skip
# Sentence punctuation (not every ASCII symbol: "{", "|", "~" have no place in a news summary).
PUNCTUATION = frozenset(".,;:!?'\"()-–—“”‘’…%$ ")


@dataclass(frozen=True)
class TokenTable:
    """
    Token classes of one tokenizer, one entry per token id.

    :param forms: (V,) id of each token's *form*: its decoded text without surrounding whitespace, lower-cased, so
        BPE variants of a word ("the", "Ġthe", "The", "ĠThe") share a form
    :param form_ids: form text -> form id
    :param punctuation: (V,) tokens made of punctuation (and spaces) only
    :param space: (V,) tokens that are a single space (tokenizers that split " 10" into " " and "10" need them)
    :param special: (V,) the tokenizer's special tokens (``<|endoftext|>``, ``<|im_start|>``, ...)
    """

    forms: np.ndarray
    form_ids: dict[str, int]
    punctuation: np.ndarray
    space: np.ndarray
    special: np.ndarray

    def tokens_of_forms(self, forms: Iterable[str]) -> np.ndarray:
        """(V,) bool: the tokens whose form is one of ``forms`` (unknown forms are ignored)."""
        wanted = [self.form_ids[f] for f in forms if f in self.form_ids]
        return np.isin(self.forms, np.asarray(wanted, dtype=self.forms.dtype))


_TABLES: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, TokenTable] = weakref.WeakKeyDictionary()


def token_table(tokenizer: PreTrainedTokenizerBase) -> TokenTable:
    """
    The :class:`TokenTable` of a tokenizer, built once per tokenizer object (the envs of a VecEnv share it).

    :param tokenizer: a Hugging Face tokenizer
    """
    table = _TABLES.get(tokenizer)
    if table is None:
        vocab = len(tokenizer)
        # One batched (Rust) decode of every token on its own: the text each token adds.
        texts = tokenizer.batch_decode(
            [[i] for i in range(vocab)], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        forms_text = np.asarray([t.strip().lower() for t in texts])
        unique, forms = np.unique(forms_text, return_inverse=True)
        punctuation = np.asarray([bool(t.strip()) and set(t) <= PUNCTUATION for t in texts])
        special = np.zeros(vocab, dtype=bool)
        special[[i for i in tokenizer.all_special_ids if 0 <= i < vocab]] = True
        space = np.asarray([t == " " for t in texts])
        form_ids = {str(f): i for i, f in enumerate(unique)}
        table = TokenTable(forms.astype(np.int32), form_ids, punctuation & ~special, space & ~special, special)
        _TABLES[tokenizer] = table
    return table


class ActionMask:
    """
    Base class of the env-side masks. A mask is bound to the env's tokenizer once (:meth:`bind`), then called with
    the episode's prompt and the tokens generated so far; it returns a (V,) bool array, True = allowed.

    ``per_episode = True`` declares that the mask depends on the prompt only: the env then computes it once per
    prompt (at ``reset()``) and reuses it for every step.
    """

    per_episode: bool = True
    # Set by bind() on the bound copy (annotations only: an unbound mask has none of them).
    vocab_size: int
    tokenizer: PreTrainedTokenizerBase
    stop_token_ids: set[int]

    def bind(self, tokenizer: PreTrainedTokenizerBase, stop_token_ids: set[int]) -> ActionMask:
        """
        A copy of this mask ready for one tokenizer.

        :param tokenizer: the env's tokenizer
        :param stop_token_ids: the env's stop tokens
        """
        bound = copy.copy(self)
        bound.vocab_size = len(tokenizer)
        bound.tokenizer = tokenizer
        bound.stop_token_ids = set(stop_token_ids)
        bound._setup()
        return bound

    def _setup(self) -> None:
        """Precompute what the mask needs for the bound tokenizer."""

    def __call__(self, prompt: TextPrompt, prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
        """
        :param prompt: the episode's prompt (its ``meta`` may hold the article)
        :param prompt_ids: (P,) the prompt's token ids
        :param generated_ids: (G,) the tokens generated so far
        :return: (V,) bool, True where the token is allowed next
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FunctionMask(ActionMask):
    """
    A user callable ``(prompt_ids, generated_ids) -> bool array of length len(tokenizer)``, called at every step.

    :param fn: the callable
    :param per_episode: declare True when ``fn`` ignores ``generated_ids`` (computed once per prompt then)
    """

    def __init__(self, fn: MaskFn, per_episode: bool = False):
        self.fn = fn
        self.per_episode = per_episode

    def __call__(self, prompt: TextPrompt, prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
        return self.fn(prompt_ids, generated_ids)

    def __repr__(self) -> str:
        return f"FunctionMask({getattr(self.fn, '__name__', self.fn)!r})"


class ArticleMask(ActionMask):
    """
    Extractive-leaning mask for summaries: the tokens whose form (text without spaces, lower-cased) occurs in the
    article, plus the stop tokens, punctuation, a single space and a small set of function words.

    :param field: key of ``TextPrompt.meta`` that holds the article (NewsSummary-v0 keeps it there); a prompt
        without it uses its own tokens (the whole prompt is then the "article")
    :param function_words: words always allowed (any case, with or without a leading space)
    :param allow_punctuation: always allow punctuation tokens
    """

    def __init__(self, field: str = "article", function_words: Sequence[str] = FUNCTION_WORDS, allow_punctuation: bool = True):
        self.field = field
        self.function_words = tuple(function_words)
        self.allow_punctuation = allow_punctuation

    def _setup(self) -> None:
        self.table = token_table(self.tokenizer)
        always = self.table.tokens_of_forms(w.lower() for w in self.function_words)
        if self.allow_punctuation:
            always |= self.table.punctuation
        always |= self.table.space
        always[sorted(self.stop_token_ids)] = True
        # Whitespace-only tokens (form "") are no words of the article: "\n\n" or "\t" must not come in through it.
        self.empty_form = self.table.form_ids.get("", -1)
        self.always = always

    def __call__(self, prompt: TextPrompt, prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
        article = prompt.meta.get(self.field)
        ids = prompt_ids if article is None else self.tokenizer(str(article), add_special_tokens=False)["input_ids"]
        ids = np.asarray(ids, dtype=np.int64)
        article_forms = np.unique(self.table.forms[ids[~self.table.special[ids]]])
        article_forms = article_forms[article_forms != self.empty_form]
        return self.always | np.isin(self.table.forms, article_forms)

    def __repr__(self) -> str:
        return f"ArticleMask(field={self.field!r})"


class BannedTokens(ActionMask):
    """
    Every token but the banned ones.

    :param tokens: token ids, or words: a word bans every token of the same form (any case, with or without a
        leading space: "the" bans "the", " the", "The", " The"); a word must be a single token of the tokenizer
    """

    def __init__(self, tokens: Iterable[int | str]):
        self.tokens = list(tokens)

    def _setup(self) -> None:
        table = token_table(self.tokenizer)
        words = [t for t in self.tokens if isinstance(t, str)]
        ids = [int(t) for t in self.tokens if not isinstance(t, str)]
        out_of_range = [i for i in ids if not 0 <= i < self.vocab_size]
        if out_of_range:
            raise ValueError(
                f"banned token ids {out_of_range[:5]} are not in [0, {self.vocab_size}); ban ids of this tokenizer"
            )
        unknown = [w for w in words if w.strip().lower() not in table.form_ids]
        if unknown:
            raise ValueError(
                f"banned words {unknown[:5]} are not single tokens of this tokenizer; ban their token ids instead "
                f"(tokenizer(word)['input_ids'])"
            )
        banned = table.tokens_of_forms(w.strip().lower() for w in words)
        banned[ids] = True
        self.allowed = ~banned

    def __call__(self, prompt: TextPrompt, prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
        return self.allowed

    def __repr__(self) -> str:
        return f"BannedTokens({self.tokens!r})"


class AllOf(ActionMask):
    """
    Intersection of masks: a token is allowed when every mask allows it.

    :param masks: the masks (any :data:`MaskSpec` but None)
    """

    def __init__(self, masks: Sequence[ActionMask]):
        self.masks = list(masks)
        self.per_episode = all(m.per_episode for m in self.masks)

    def bind(self, tokenizer: PreTrainedTokenizerBase, stop_token_ids: set[int]) -> ActionMask:
        return AllOf([m.bind(tokenizer, stop_token_ids) for m in self.masks])

    def __call__(self, prompt: TextPrompt, prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
        allowed = np.asarray(self.masks[0](prompt, prompt_ids, generated_ids), dtype=bool)
        for mask in self.masks[1:]:
            allowed = allowed & np.asarray(mask(prompt, prompt_ids, generated_ids), dtype=bool)
        return allowed

    def __repr__(self) -> str:
        return f"AllOf({self.masks!r})"


BUILTIN_MASKS: dict[str, Callable[[], ActionMask]] = {"article": ArticleMask}


def _as_mask(spec: Any, task_id: str) -> ActionMask:
    if isinstance(spec, ActionMask):
        return spec
    if isinstance(spec, str):
        if spec not in BUILTIN_MASKS:
            raise ValueError(
                f"{task_id}: unknown action_mask {spec!r}; use one of {sorted(BUILTIN_MASKS)}, {{'banned': [...]}}, "
                "a callable (prompt_ids, generated_ids) -> bool array, or an ActionMask"
            )
        return BUILTIN_MASKS[spec]()
    if isinstance(spec, Mapping):
        if set(spec) != {"banned"}:
            raise ValueError(
                f"{task_id}: a dict action_mask takes the one key 'banned' (token ids or words), got {sorted(spec)}"
            )
        return BannedTokens(spec["banned"])
    if callable(spec):
        return FunctionMask(spec)
    if isinstance(spec, Sequence) and spec:
        return AllOf([_as_mask(s, task_id) for s in spec])
    raise TypeError(
        f"{task_id}: action_mask must be None, 'article', {{'banned': [...]}}, a callable (prompt_ids, generated_ids) "
        f"-> bool array, an ActionMask or a non-empty list of these; got {type(spec).__name__}"
    )


def resolve_action_mask(
    spec: MaskSpec, tokenizer: PreTrainedTokenizerBase, stop_token_ids: set[int], task_id: str = "TextTask"
) -> ActionMask | None:
    """
    Turn an ``action_mask=`` argument into a mask bound to the env's tokenizer.

    :param spec: see :data:`MaskSpec`
    :param tokenizer: the env's tokenizer
    :param stop_token_ids: the env's stop tokens (built-in masks always allow them)
    :param task_id: used in error messages
    :return: the bound mask, or None for no mask
    """
    if spec is None:
        return None
    try:
        return _as_mask(spec, task_id).bind(tokenizer, stop_token_ids)
    except ValueError as error:
        message = str(error)
        raise ValueError(message if message.startswith(task_id) else f"{task_id}: {message}") from error
