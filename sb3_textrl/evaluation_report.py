"""The old home of the evaluation's Markdown report, kept importable: it is :mod:`sb3_textrl.evaluation.report`."""

from sb3_textrl.evaluation.report import (
    ARTICLE_CHARS,
    COMPLETION_CHARS,
    METRIC_LABELS,
    escape_cell,
    metrics_table,
    render_markdown,
    samples_table,
)

__all__ = [
    "ARTICLE_CHARS",
    "COMPLETION_CHARS",
    "METRIC_LABELS",
    "escape_cell",
    "metrics_table",
    "render_markdown",
    "samples_table",
]
