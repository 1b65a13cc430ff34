"""Text metrics of an evaluation: ROUGE, distinct-n, word counts, and the lead-n baseline's sentence splitter.

They are plain functions of strings (no model, no data files), so they can be checked on known strings and reused
by callbacks and scripts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from sb3_textrl.rewards.rouge import ROUGE_METRICS, RougeReward

# Words for distinct-n and length: runs of letters/digits, with inner apostrophes kept ("don't", "Pama’s").
_WORD = re.compile(r"\w+(?:['’]\w+)*")

# A candidate sentence end: ., ! or ?, then closing quotes/brackets, then whitespace, then something that can start a
# sentence (an upper-case letter or a digit, possibly after an opening quote or bracket).
_CANDIDATE_END = re.compile(r"[.!?][\"'’”)\]]*\s+(?=[\"'‘“(\[]*[A-Z0-9])")

# Words that end with a period without ending the sentence ("Mr. Smith", "Gen. Lee", "Jan. 5").
ABBREVIATIONS = frozenset(
    (
        *("mr", "mrs", "ms", "dr", "prof", "rev", "st", "mt", "ft", "jr", "sr"),  # titles, places
        *("gen", "col", "lt", "capt", "cpt", "sgt", "maj", "adm", "gov", "sen", "rep", "pres", "supt", "insp", "det"),
        *("vol", "fig", "pp", "inc", "ltd", "co", "corp", "bros", "dept", "approx", "vs"),
        *("jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"),
    )
)
# "No." abbreviates "number" only before a number ("No. 10"); "He said no. Then ..." ends a sentence.
_NUMBER_ABBREVIATIONS = frozenset(("no", "nos"))


def split_sentences(text: str) -> list[str]:
    """
    Split text into sentences with a simple, documented rule (no model, no NLTK data).

    A sentence ends at ``.``, ``!`` or ``?`` (and any closing quotes or brackets after it) followed by whitespace and
    an upper-case letter or a digit (optionally after an opening quote or bracket), and at every line break. A period
    does not end a sentence after a known abbreviation (:data:`ABBREVIATIONS`: "Mr.", "Dr.", "Gen." ...), a
    single capital letter (an initial, "J. K. Rowling"), a dotted acronym ("U.S.", "U.N.") or "No." before a number
    ("No. 10"). Decimal numbers ("3.5") never split, as no whitespace follows their period.

    :param text: the text
    :return: the non-empty sentences, stripped, in order
    """
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _CANDIDATE_END.finditer(line):
            if line[match.start()] == "." and _is_abbreviation(line[start : match.start()], line[match.end() :]):
                continue
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def _is_abbreviation(before_period: str, after: str) -> bool:
    """Whether the word just before a period is an abbreviation, an initial or a dotted acronym."""
    words = before_period.split()
    if not words:
        return False
    word = words[-1].lstrip("\"'‘“([")
    if word.lower() in _NUMBER_ABBREVIATIONS:
        return after[:1].isdigit()
    return word.lower() in ABBREVIATIONS or re.fullmatch(r"[A-Z]|(?:[A-Za-z]\.)+[A-Za-z]", word) is not None


def lead_n(article: str, n: int = 3) -> str:
    """
    The lead-n baseline of news summarisation: the article's first ``n`` sentences (:func:`split_sentences`).

    :param article: the article text
    :param n: how many sentences to keep
    :return: those sentences, joined by single spaces (the whole article when it has fewer)
    """
    if n < 1:
        raise ValueError(f"lead_n needs n >= 1 sentences, got {n}")
    return " ".join(split_sentences(article)[:n])


def words(text: str) -> list[str]:
    """
    The lower-cased words of a text, as distinct-n and the word length count them.

    :param text: the text
    :return: runs of letters and digits (inner apostrophes kept), lower-cased; punctuation is dropped
    """
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """
    Diversity of a set of completions: unique n-grams / total n-grams, over all texts together (n-grams do not cross
    from one text into the next). Words come from :func:`words`.

    :param texts: the completions
    :param n: the n-gram order (1: distinct-1, 2: distinct-2)
    :return: a share in [0, 1]; 0.0 when the texts hold no n-gram at all
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = words(text)
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def rouge_scores(
    completions: Sequence[str], references: Sequence[str], metrics: Sequence[str] = ROUGE_METRICS, use_stemmer: bool = True
) -> dict[str, np.ndarray]:
    """
    ROUGE F-measures of each completion against its reference, with ``rouge-score`` (Porter stemming on by default).

    The scorer is :class:`~sb3_textrl.rewards.RougeReward`, so these numbers equal a ROUGE task reward: an empty
    completion scores 0, and ``rougeLsum`` splits texts without line breaks into sentences first.

    :param completions: the generated texts
    :param references: one reference per completion
    :param metrics: which of ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``
    :param use_stemmer: apply the Porter stemmer before matching
    :return: metric name -> float64 array of per-completion scores in [0, 1]
    """
    if len(completions) != len(references):
        raise ValueError(f"rouge_scores got {len(completions)} completions and {len(references)} references; give one each")
    prompts = [""] * len(completions)  # ROUGE does not read the prompt
    return {
        metric: RougeReward(metric, use_stemmer=use_stemmer).score(prompts, completions, references) for metric in metrics
    }
