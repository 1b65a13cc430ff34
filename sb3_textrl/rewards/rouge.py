"""ROUGE against the task's reference text as a reward (``rouge-score``, works offline)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from nltk.stem import porter  # a dependency of rouge-score
from rouge_score import rouge_scorer, tokenize, tokenizers

from sb3_textrl.rewards.base import TextReward

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_MEASURES = ("precision", "recall", "fmeasure")

# Sentence end: ., ! or ? (optionally followed by a closing quote/bracket) then whitespace
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def split_sentences(text: str) -> list[str]:
    """
    Split text into sentences with a simple punctuation rule (no model or NLTK data needed).

    :param text: Text to split. Existing line breaks are treated as sentence boundaries too.
    :return: The non-empty sentences, stripped.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        sentences.extend(part.strip() for part in _SENTENCE_END.split(line))
    return [s for s in sentences if s]


class _CachedStemmer:
    """Porter stemmer with a per-word cache: stemming is ~90% of ROUGE's time and news text repeats words a lot."""

    _MAX_CACHE = 200_000  # words; cleared when full so that long runs on generated text stay bounded

    def __init__(self) -> None:
        self._stemmer = porter.PorterStemmer()
        self._cache: dict[str, str] = {}

    def stem(self, word: str) -> str:
        stemmed = self._cache.get(word)
        if stemmed is None:
            if len(self._cache) >= self._MAX_CACHE:
                self._cache.clear()
            stemmed = self._cache[word] = self._stemmer.stem(word)
        return stemmed


class _RougeTokenizer(tokenizers.Tokenizer):
    """``rouge-score``'s default tokenization (lower-case, alphanumeric tokens, optional Porter stemming), cached."""

    def __init__(self, use_stemmer: bool) -> None:
        self._stemmer = _CachedStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        return tokenize.tokenize(text, self._stemmer)


class RougeReward(TextReward):
    """
    ROUGE score of each completion against its reference.

    :param metric: One of ``"rouge1"``, ``"rouge2"``, ``"rougeL"``, ``"rougeLsum"``. For ``rougeLsum`` texts
        without line breaks are split into sentences first (``rouge-score`` expects one sentence per line).
    :param use_stemmer: Apply the Porter stemmer before matching ("rains" matches "rain").
    :param measure: Which part of the score to return: ``"fmeasure"``, ``"precision"`` or ``"recall"``.
    :param name: Key under which the reward is reported; defaults to the metric (``"rouge1"``), with the measure
        appended when it is not the F-measure (``"rouge1_recall"``).
    """

    def __init__(
        self,
        metric: str = "rouge1",
        use_stemmer: bool = True,
        measure: str = "fmeasure",
        name: str | None = None,
    ) -> None:
        if metric not in ROUGE_METRICS:
            raise ValueError(f"Unknown ROUGE metric {metric!r}; valid metrics are {', '.join(ROUGE_METRICS)}.")
        if measure not in ROUGE_MEASURES:
            raise ValueError(f"Unknown ROUGE measure {measure!r}; valid measures are {', '.join(ROUGE_MEASURES)}.")
        if name is None:
            name = metric if measure == "fmeasure" else f"{metric}_{measure}"
        super().__init__(name=name)
        self.metric = metric
        self.use_stemmer = use_stemmer
        self.measure = measure
        self._scorer = rouge_scorer.RougeScorer([metric], tokenizer=_RougeTokenizer(use_stemmer))

    def _prepare(self, text: str) -> str:
        if self.metric == "rougeLsum" and "\n" not in text:
            return "\n".join(split_sentences(text))
        return text

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
    ) -> np.ndarray:
        """
        :param prompts: Unused (ROUGE compares completion and reference only).
        :param completions: Generated texts.
        :param references: Reference texts, one per completion.
        :return: float64 array of scores in [0, 1]; an empty completion scores 0.
        :raises ValueError: If a reference is ``None`` or the lengths differ.
        """
        if len(completions) != len(references):
            raise ValueError(
                f"RougeReward got {len(completions)} completions and {len(references)} references; pass one reference per "
                f"completion."
            )
        scores = np.zeros(len(completions), dtype=np.float64)
        for i, (completion, reference) in enumerate(zip(completions, references)):
            if reference is None:
                raise ValueError(
                    f"RougeReward needs a reference text, but episode {i} has none (reference is None): this task has "
                    f"no references, so ROUGE cannot be used as its reward. Give the task a reference text for every prompt, "
                    f"or use a reward that needs none (a reward model, a human rater, or your own callable)."
                )
            if not completion.strip():
                continue
            result = self._scorer.score(self._prepare(reference), self._prepare(completion))[self.metric]
            scores[i] = getattr(result, self.measure)
        return scores

    def __repr__(self) -> str:
        return f"RougeReward(metric={self.metric!r}, use_stemmer={self.use_stemmer}, measure={self.measure!r})"
