"""Training curves from SB3's logs: one PNG per metric group (reward, KL, β, ROUGE, losses, length), runs overlaid.

Reads ``progress.csv`` (SB3's csv format) or, when a folder has none, tensorboard event files. The x axis is
``time/total_timesteps`` (csv) or the event step (SB3 writes its tensorboard scalars at the same timestep count).
Figures are drawn with matplotlib's object API on the Agg canvas: no display and no global pyplot state.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sb3_textrl.common import metric_keys as keys

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_NAME = "progress.csv"
EVENTS_GLOB = "events.out.tfevents*"
X_KEY = keys.TOTAL_TIMESTEPS

# Group name (the PNG's name) -> the metrics it plots, one panel each. A key ending in "*" is a prefix.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "reward": (keys.ROLLOUT + keys.TASK_REWARD, keys.EVAL + keys.TASK_REWARD, keys.SB3_EPISODE_REWARD),
    "kl": (keys.ROLLOUT + keys.KL_TO_REF, keys.EVAL + keys.KL_TO_REF, keys.SB3_APPROX_KL),
    "kl_coef": (keys.ROLLOUT + keys.KL_COEF,),
    "rouge": (keys.EVAL + "rouge*", keys.ROLLOUT + "rouge*"),
    "losses": keys.SB3_LOSSES,
    "completion_len": (keys.ROLLOUT + keys.COMPLETION_LEN, keys.EVAL + keys.COMPLETION_LEN),
}
GROUP_TITLES = {
    "reward": "Task reward",
    "kl": "KL to the reference (nats per completion)",
    "kl_coef": "KL coefficient β",
    "rouge": "ROUGE",
    "losses": "PPO losses",
    "completion_len": "Completion length (tokens)",
}


@dataclass
class RunLog:
    """
    The scalar series of one run.

    :param name: label in the legends
    :param source: the file (or folder of event files) the series were read from
    :param series: metric -> (timesteps, values), sorted by timestep
    """

    name: str
    source: Path
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


def _no_logs_error(directory: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{directory} holds no SB3 training logs: expected a {CSV_NAME} (SB3's csv format) or tensorboard "
        f"{EVENTS_GLOB} files in it or in a folder below it. Produce them by giving the model a logger with those "
        "formats before learn(): model.set_logger(stable_baselines3.common.logger.configure(run_dir, ['csv', "
        "'tensorboard'])), or PPO(..., tensorboard_log=run_dir)."
    )


def read_csv_log(path: str | os.PathLike, name: str | None = None) -> RunLog:
    """
    Read SB3's ``progress.csv``: every numeric column against ``time/total_timesteps`` (empty cells skipped).

    :param path: the csv file
    :param name: the run's label (default: the name of the file's folder)
    :return: the run's series
    """
    path = Path(path)
    run = RunLog(name or path.parent.name, path)
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    if rows and X_KEY not in rows[0]:
        raise ValueError(
            f"{path} has no {X_KEY} column, so its rows cannot be placed on a timestep axis; it is not an SB3 progress.csv "
            "(SB3's on-policy algorithms write that column with every dump)"
        )
    for row in rows:
        x = _number(row.get(X_KEY))
        if x is None:
            continue
        for key, cell in row.items():
            value = _number(cell)
            if key is None or key == X_KEY or value is None:
                continue
            xs, ys = run.series.setdefault(key, ([], []))
            xs.append(x)
            ys.append(value)
    return run


def _number(cell: str | None) -> float | None:
    if cell is None or cell == "":
        return None
    try:
        value = float(cell)
    except ValueError:  # text columns
        return None
    return value if math.isfinite(value) else None


def read_tensorboard_log(directory: str | os.PathLike, name: str | None = None) -> RunLog:
    """
    Read the scalars of the tensorboard event files in a folder (SB3's ``TensorBoardOutputFormat``).

    :param directory: folder of ``events.out.tfevents*`` files
    :param name: the run's label (default: the folder's name)
    :return: the run's series
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except ImportError as error:
        raise ImportError(
            f"{directory} has tensorboard logs only; reading them needs tensorboard: pip install tensorboard "
            f"(or log the csv format too: configure(run_dir, ['csv', 'tensorboard']))"
        ) from error
    directory = Path(directory)
    accumulator = EventAccumulator(str(directory), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    run = RunLog(name or directory.name, directory)
    for tag in accumulator.Tags()[SCALARS]:
        events = sorted(accumulator.Scalars(tag), key=lambda event: event.step)
        run.series[tag] = ([float(e.step) for e in events], [float(e.value) for e in events])
    return run


def find_runs(run_dir: str | os.PathLike) -> list[RunLog]:
    """
    The runs under a folder: every folder at or below it that holds a ``progress.csv`` (preferred) or tensorboard
    event files is one run, labelled by the folder's name (with its path below ``run_dir`` when there are several).

    :param run_dir: a run's log folder, a run's output folder (logs in a subfolder) or a folder of several runs
    :return: the runs, sorted by path
    :raises FileNotFoundError: when there are no logs (the message says how to write them)
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the folder a run wrote its logs to")
    folders = sorted({p.parent for p in root.rglob(CSV_NAME)} | {p.parent for p in root.rglob(EVENTS_GLOB)})
    if not folders:
        raise _no_logs_error(root)
    runs = []
    for folder in folders:
        relative = folder.relative_to(root)
        name = root.resolve().name if len(folders) == 1 or relative == Path(".") else f"{root.resolve().name}/{relative}"
        if (folder / CSV_NAME).is_file():
            runs.append(read_csv_log(folder / CSV_NAME, name))
        else:
            runs.append(read_tensorboard_log(folder, name))
    return runs


def _matching_keys(pattern: str, available: set[str]) -> list[str]:
    if pattern.endswith("*"):
        return sorted(key for key in available if key.startswith(pattern[:-1]))
    return [pattern] if pattern in available else []


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "metric"


def metric_figure(runs: Sequence[RunLog], metrics: Sequence[str], title: str) -> Figure:
    """
    One figure with a panel per metric, every run that logged the metric drawn as a line in it.

    :param runs: the runs to overlay
    :param metrics: the metrics, one panel each (two panels a row)
    :param title: the figure's title
    :return: a matplotlib figure on the Agg canvas (``figure.savefig(path)`` writes it)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(len(metrics), 2)
    rows = math.ceil(len(metrics) / columns)
    width, height = 6.0 * columns, 3.4 * rows + 0.5
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    # Fixed margins in inches: constrained layout doubled the drawing time for these simple grids.
    figure.subplots_adjust(
        left=0.8 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.75 / height, wspace=0.25, hspace=0.55
    )
    for panel, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, columns, panel + 1)
        for run in runs:
            if metric in run.series:
                xs, ys = run.series[metric]
                # markers: short runs have a handful of points, a bare line would hide them
                axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=run.name)
        axes.set_title(metric, fontsize=10)
        axes.set_xlabel("timesteps (tokens)")
        axes.ticklabel_format(axis="y", useOffset=False)  # "1e-5 − 10.81" offsets are hard to read
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    keys: Sequence[str] | None = None,
    dpi: int = 100,
) -> list[Path]:
    """
    Plot the training curves of one or more runs, overlaid, as PNG files.

    :param run_dirs: run folders (see :func:`find_runs`); every run found is one line per panel
    :param output_dir: folder for the PNGs (created)
    :param keys: metrics to plot, one PNG each (a trailing ``*`` matches a prefix, e.g. ``"eval/*"``); None: the
        default groups of :data:`METRIC_GROUPS` (reward, KL, β, ROUGE, losses, completion length), those with data
    :param dpi: resolution of the PNGs
    :return: the written PNG files
    :raises FileNotFoundError: a folder without logs
    :raises ValueError: none of the asked-for metrics is in the logs (the message lists those that are)
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    runs = [run for run_dir in run_dirs for run in find_runs(run_dir)]
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:  # e.g. a/seed0 and b/seed0: the legend needs the whole path
            run.name = str(run.source.parent if run.source.is_file() else run.source)
    available = {key for run in runs for key in run.series}
    groups = dict(METRIC_GROUPS) if keys is None else {_file_name(key): (key,) for key in keys}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for group, patterns in groups.items():
        metrics = [key for pattern in patterns for key in _matching_keys(pattern, available)]
        if not metrics:
            continue
        figure = metric_figure(runs, metrics, GROUP_TITLES.get(group, group))
        path = out / f"{group}.png"
        figure.savefig(path, dpi=dpi)
        written.append(path)
    if not written:
        wanted = ", ".join(p for patterns in groups.values() for p in patterns)
        raise ValueError(
            f"none of the metrics {wanted} is in the logs of {', '.join(str(d) for d in run_dirs)}; they have: "
            f"{', '.join(sorted(available)) or 'no numeric columns'}. Pass keys=[...] (--keys) with some of those."
        )
    return written
