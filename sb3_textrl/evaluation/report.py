"""The Markdown report of an evaluation: settings, a metrics table (one row per system) and a samples table."""

from __future__ import annotations

import html
import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sb3_textrl.evaluation.results import EvalResult

# Column headers of the metrics table; a metric no system has is left out.
METRIC_LABELS = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "task_reward": "task reward",
    "kl_to_ref": "KL to ref",
    "completion_len": "completion (tokens)",
    "length_tokens": "length (tokens, stop excluded)",  # what eval.json files written before completion_len hold
    "length_words": "length (words)",
    "distinct1": "distinct-1",
    "distinct2": "distinct-2",
    "stop_rate": "ended by stop",
}
ARTICLE_CHARS = 300  # article snippet in the samples table
COMPLETION_CHARS = 600  # long baselines (lead-3) are shortened in the table; the JSON keeps them whole


def escape_cell(text: str, width: int | None = None) -> str:
    """
    Text made safe for one Markdown table cell: HTML special characters escaped, ``|`` escaped, line breaks as
    ``<br>``, optionally shortened to ``width`` characters.

    :param text: the text
    :param width: shorten longer text to about this many characters (at a word boundary, with " ...")
    :return: the cell text
    """
    lines = [line.strip() for line in text.strip().splitlines()]
    if width is not None:
        lines = [textwrap.shorten(" ".join(lines), width, placeholder=" ...")] if lines else []
    cell = "<br>".join(html.escape(line, quote=False).replace("|", "\\|") for line in lines)
    return cell or "*(empty)*"


def _number(value: float | None) -> str:
    # round first: a KL of -1e-7 (float noise around an exact 0) would print as "-0.000"
    return "–" if value is None else f"{round(value, 3) + 0.0:.3f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def metrics_table(result: EvalResult) -> str:
    """
    The metrics as a Markdown table: one row per system, one column per metric that some system has.

    :param result: the evaluation result
    :return: the table
    """
    columns = [m for m in METRIC_LABELS if any(values.get(m) is not None for values in result.metrics.values())]
    reward = result.config.get("reward")
    headers = [f"{METRIC_LABELS[m]} ({reward})" if m == "task_reward" and reward else METRIC_LABELS[m] for m in columns]
    lines = [_row(["system", *headers]), _row(["---"] + ["---:"] * len(columns))]
    for system, values in result.metrics.items():
        lines.append(_row([f"`{system}`", *[_number(values.get(m)) for m in columns]]))
    return "\n".join(lines)


def samples_table(result: EvalResult, max_samples: int = 8) -> str:
    """
    The first ``max_samples`` prompts as a Markdown table: the article (or prompt) snippet, the reference and each
    system's completion with its task reward. The ``reference`` baseline is the reference column itself.

    :param result: the evaluation result
    :param max_samples: rows to show
    :return: the table
    """
    systems = [s for s in result.systems if s != "reference"]
    has_article = any(sample.article for sample in result.samples)
    lines = [
        _row(["#", "article" if has_article else "prompt", "reference", *[f"`{s}`" for s in systems]]),
        _row(["---"] * (3 + len(systems))),
    ]
    for sample in result.samples[:max_samples]:
        cells = [
            str(sample.prompt_index),
            escape_cell(sample.article or sample.prompt, ARTICLE_CHARS),
            "–" if sample.reference is None else escape_cell(sample.reference, COMPLETION_CHARS),
        ]
        for system in systems:
            output = sample.outputs[system]
            cells.append(f"{escape_cell(output['completion'], COMPLETION_CHARS)}<br>*reward {output['task_reward']:.3f}*")
        lines.append(_row(cells))
    return "\n".join(lines)


def render_markdown(result: EvalResult, max_samples: int = 8) -> str:
    """
    The whole report: title, settings, notes, the metrics table and the samples table.

    :param result: the evaluation result
    :param max_samples: prompts shown in the samples table
    :return: Markdown text
    """
    config = result.config
    settings = [
        ("model", config.get("model")),
        ("task", config.get("task")),
        ("dataset", config.get("dataset") or "the task's own data"),
        ("prompts", f"{config.get('n_prompts')} (the task's prompts {_index_range(config.get('prompt_indices', []))})"),
        ("decoding", ", ".join(config.get("decoding", []))),
        ("task reward", config.get("reward")),
        ("seed", config.get("seed")),
        ("env settings", ", ".join(f"{k}={v}" for k, v in config.get("env_kwargs", {}).items()) or "the task's defaults"),
        ("device", config.get("device")),
        ("created", config.get("created")),
    ]
    total = config.get("timings_s", {}).get("total_s")
    if total is not None:
        settings.append(("time", f"{total:.1f} s"))
    parts = [
        f"# Evaluation of {escape_cell(str(config.get('model')))} on {config.get('task')}",
        "\n".join(f"- **{name}**: {escape_cell(str(value))}" for name, value in settings),
        "## Metrics",
        "Means over the prompts. ROUGE: F-measure with Porter stemming (`rouge-score`). KL to ref: per completion, "
        "summed over its tokens. distinct-n: unique / total n-grams over all completions. lead3: the article's first "
        "three sentences; reference: the reference itself, scored like a completion.",
        metrics_table(result),
    ]
    if result.notes:
        parts.append("\n".join(f"> {escape_cell(note)}" for note in result.notes))
    shown = min(max_samples, len(result.samples))
    if shown:
        parts += [f"## Samples (first {shown} of {len(result.samples)})", samples_table(result, max_samples)]
    return "\n\n".join(parts) + "\n"


def _index_range(indices: list[int]) -> str:
    if indices and indices == list(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}–{indices[-1]}"
    shown = ", ".join(str(i) for i in indices[:10])
    return shown + (", ..." if len(indices) > 10 else "")
