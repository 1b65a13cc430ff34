"""What an evaluation measured: :class:`EvalResult` (one :class:`EvalSample` per prompt), its files and its summary."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sb3_textrl.common.metric_keys import COMPLETION_LEN
from sb3_textrl.evaluation import report

JSON_NAME = "eval.json"
MARKDOWN_NAME = "eval.md"
# Metrics of a system, in report order (a system lacks those that do not apply to it: None).
METRICS = (
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "task_reward",
    "kl_to_ref",
    COMPLETION_LEN,
    "length_words",
    "distinct1",
    "distinct2",
    "stop_rate",
)


@dataclass
class EvalSample:
    """
    One prompt of an evaluation with every system's completion.

    :param prompt_index: index of the prompt in the task
    :param prompt: the prompt text
    :param article: the raw article (news tasks), else None
    :param reference: the task's reference, if any
    :param outputs: system name -> ``{"completion", "task_reward", "rouge1", ..., "kl_to_ref", "completion_len",
        "length_words"}`` (values that do not apply are None or absent: a baseline has no ``kl_to_ref`` and no
        ``completion_len``, :func:`~sb3_textrl.common.metric_keys.mean_completion_length`)
    """

    prompt_index: int
    prompt: str
    article: str | None
    reference: str | None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvalResult:
    """
    What :func:`evaluate` measured.

    :param metrics: system name -> metric name (:data:`METRICS`) -> mean over the prompts (None where it does not
        apply: no ROUGE without references, no KL for baselines or a policy without reference)
    :param samples: one :class:`EvalSample` per prompt
    :param config: how the evaluation ran (model, task, data, prompts, decoding, seed, reward, timings)
    :param notes: remarks a reader of the numbers needs (e.g. why KL is 0)
    """

    metrics: dict[str, dict[str, float | None]]
    samples: list[EvalSample]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def systems(self) -> list[str]:
        """The evaluated systems: the model under each decoding, then the baselines."""
        return list(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``config``, ``notes``, ``metrics``, ``samples``."""
        samples = [asdict(s) for s in self.samples]
        return {"config": self.config, "notes": self.notes, "metrics": self.metrics, "samples": samples}

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_markdown(self, max_samples: int = 8) -> str:
        """
        A Markdown report: settings, a metrics table (one row per system) and a table of samples.

        :param max_samples: prompts shown in the samples table
        """
        return report.render_markdown(self, max_samples=max_samples)

    def metrics_table(self) -> str:
        """The metrics table alone, in Markdown (what ``sb3-textrl eval`` prints)."""
        return report.metrics_table(self)

    def save(self, output_dir: str | os.PathLike, max_samples: int = 8) -> tuple[Path, Path]:
        """
        Write :data:`JSON_NAME` and :data:`MARKDOWN_NAME` into ``output_dir`` (created if missing).

        :param output_dir: the directory
        :param max_samples: prompts shown in the Markdown samples table (the JSON keeps all)
        :return: the paths of the JSON file and of the Markdown report
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = out / JSON_NAME, out / MARKDOWN_NAME
        json_path.write_text(self.to_json() + "\n", encoding="utf-8")
        markdown_path.write_text(self.to_markdown(max_samples), encoding="utf-8")
        return json_path, markdown_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        """
        Read a result written by :meth:`save` (``eval.json``, or the directory holding it).

        :param path: the JSON file or its directory
        """
        path = Path(path)
        if path.is_dir():
            path = path / JSON_NAME
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["metrics"], [EvalSample(**s) for s in data["samples"]], data["config"], data.get("notes", []))


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present and len(present) == len(values) else None


def summarize(outputs: list[dict[str, Any]], completions: list[str]) -> dict[str, float | None]:
    from sb3_textrl.metrics import distinct_n

    metrics: dict[str, float | None] = {}
    for name in METRICS:
        if name in ("distinct1", "distinct2"):
            metrics[name] = distinct_n(completions, int(name[-1]))
        else:
            metrics[name] = _mean([o.get(name) for o in outputs])
    return metrics


def default_output_dir(model: str | None) -> Path:
    """
    Where ``sb3-textrl eval`` writes its report without ``--output``: next to a saved ``.zip`` (its directory), inside
    a local LM directory, else ``runs/eval``.
    """
    if model is not None:
        path = Path(model)
        if path.suffix == ".zip":
            return path.parent
        if path.is_dir():
            return path
    return Path("runs") / "eval"
