"""Text metrics used by the evaluation: ROUGE, distinct-n, word counts, lead-n."""

from sb3_textrl.metrics.text import ABBREVIATIONS, distinct_n, lead_n, rouge_scores, split_sentences, words

__all__ = ["ABBREVIATIONS", "distinct_n", "lead_n", "rouge_scores", "split_sentences", "words"]
