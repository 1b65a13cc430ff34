"""Text metrics used by the evaluation: ROUGE, distinct-n, word counts, lead-n, paired bootstrap intervals.

Each is imported from its module when first used (ROUGE loads nltk).
"""

from typing import TYPE_CHECKING

from sb3_textrl.common.lazy import lazy_exports

if TYPE_CHECKING:
    from sb3_textrl.metrics.bootstrap import PairedDifference, mean_interval, paired_bootstrap
    from sb3_textrl.metrics.text import ABBREVIATIONS, distinct_n, lead_n, rouge_scores, split_sentences, words

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "sb3_textrl.metrics.bootstrap": ("PairedDifference", "mean_interval", "paired_bootstrap"),
        "sb3_textrl.metrics.text": ("ABBREVIATIONS", "distinct_n", "lead_n", "rouge_scores", "split_sentences", "words"),
    },
)

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
