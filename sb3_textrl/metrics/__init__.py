"""Text metrics used by the evaluation: ROUGE, distinct-n, word counts, lead-n, paired bootstrap intervals."""

from sb3_textrl.metrics.bootstrap import PairedDifference, mean_interval, paired_bootstrap
from sb3_textrl.metrics.text import ABBREVIATIONS, distinct_n, lead_n, rouge_scores, split_sentences, words

__all__ = [
    "ABBREVIATIONS",
    "PairedDifference",
    "distinct_n",
    "lead_n",
    "mean_interval",
    "paired_bootstrap",
    "rouge_scores",
    "split_sentences",
    "words",
]
