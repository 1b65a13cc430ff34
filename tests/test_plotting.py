"""Plots from the logs of real tiny PPO runs: csv and tensorboard readers, overlays, errors, the plot command."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import register_toy_task, toy_ppo, toy_vec_env
from matplotlib.image import imread
from stable_baselines3.common.logger import configure

from sb3_textrl import TextEvalCallback, cli
from sb3_textrl.plotting import find_runs, metric_figure, plot_runs, read_csv_log, read_tensorboard_log

DEFAULT_PNGS = {"reward.png", "kl.png", "kl_coef.png", "losses.png", "completion_len.png"}


def _run(task: str, lm: str, log_dir, formats: list[str], seed: int, learning_rate: float) -> None:
    model = toy_ppo(toy_vec_env(task, n_envs=2, seed=seed), lm, n_steps=10, batch_size=10, seed=seed,
                    learning_rate=learning_rate, policy_kwargs=dict(kl_target=1.0))  # adaptive β: a curve to plot
    model.set_logger(configure(str(log_dir), formats))
    model.learn(80, callback=TextEvalCallback(toy_vec_env(task, n_envs=2), prompt_indices=[0, 1], verbose=0))
    model.logger.close()


@pytest.fixture(scope="module")
def runs(tiny_lm, tmp_path_factory):
    """Two real tiny runs under one folder (csv + tensorboard, and csv only) and a tensorboard-only run."""
    task = register_toy_task("PlotToy-v0", tiny_lm, max_new_tokens=5)
    root = tmp_path_factory.mktemp("runs")
    _run(task, tiny_lm, root / "all" / "lr_high", ["csv", "tensorboard"], seed=0, learning_rate=1e-2)
    _run(task, tiny_lm, root / "all" / "lr_low", ["csv"], seed=1, learning_rate=1e-4)
    _run(task, tiny_lm, root / "tb_only", ["tensorboard"], seed=2, learning_rate=1e-3)
    return root


def _assert_drawn_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    image = imread(path)  # fails on a broken file
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_csv_reader_matches_the_csv(runs):
    path = runs / "all" / "lr_high" / "progress.csv"
    run = read_csv_log(path)
    frame = pd.read_csv(path)
    assert run.name == "lr_high"
    for key in ("rollout/task_reward", "rollout/kl_to_ref", "rollout/kl_coef", "train/loss", "eval/task_reward"):
        rows = frame[key].notna()
        xs, ys = run.series[key]
        assert xs == frame.loc[rows, "time/total_timesteps"].tolist()
        assert ys == pytest.approx(frame.loc[rows, key].tolist())
    assert "time/total_timesteps" not in run.series


def test_tensorboard_reader_matches_the_csv_of_the_same_run(runs):
    folder = runs / "all" / "lr_high"
    from_csv, from_tb = read_csv_log(folder / "progress.csv"), read_tensorboard_log(folder)
    for key in ("rollout/task_reward", "rollout/kl_coef", "eval/completion_len"):
        assert from_tb.series[key][0] == from_csv.series[key][0]
        assert from_tb.series[key][1] == pytest.approx(from_csv.series[key][1], rel=1e-6)


def test_plots_of_one_run(runs, tmp_path):
    paths = plot_runs([runs / "all" / "lr_high"], tmp_path)
    assert {p.name for p in paths} == DEFAULT_PNGS  # no ROUGE: the toy task has no references
    for path in paths:
        _assert_drawn_png(path)


def test_folder_of_runs_is_overlaid(runs, tmp_path):
    found = find_runs(runs / "all")
    assert [run.name for run in found] == ["all/lr_high", "all/lr_low"]
    figure = metric_figure(found, ["rollout/task_reward", "train/loss"], "test")
    for axes in figure.axes:
        assert [line.get_label() for line in axes.get_lines()] == ["all/lr_high", "all/lr_low"]
        assert all(len(line.get_xdata()) >= 4 for line in axes.get_lines())
    paths = plot_runs([runs / "all"], tmp_path)
    assert {p.name for p in paths} == DEFAULT_PNGS


def test_tensorboard_only_run_and_mixed_sources(runs, tmp_path):
    (run,) = find_runs(runs / "tb_only")
    assert run.source == runs / "tb_only" and "rollout/task_reward" in run.series
    paths = plot_runs([runs / "tb_only", runs / "all" / "lr_low"], tmp_path, keys=["rollout/kl_coef", "eval/*"])
    assert [p.name for p in paths] == ["rollout_kl_coef.png", "eval.png"]
    for path in paths:
        _assert_drawn_png(path)


def test_errors_name_the_expected_files_and_the_fix(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"progress\.csv.*events\.out\.tfevents.*configure\(run_dir, \['csv'"):
        plot_runs([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        plot_runs([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(ValueError, match=r"none of the metrics rollout/nothing .* they have: .*rollout/task_reward"):
        plot_runs([runs / "all" / "lr_low"], tmp_path / "out", keys=["rollout/nothing"])
    (tmp_path / "notsb3").mkdir()
    (tmp_path / "notsb3" / "progress.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no time/total_timesteps column"):
        plot_runs([tmp_path / "notsb3"], tmp_path / "out")


def test_plot_command(runs, tmp_path, capsys):
    assert cli.main(["plot", str(runs / "all" / "lr_high"), str(runs / "tb_only"), "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert {p.rsplit("/", 1)[-1] for p in printed} == DEFAULT_PNGS
    for name in DEFAULT_PNGS:
        _assert_drawn_png(tmp_path / name)
    assert cli.main(["plot", str(tmp_path)]) == 2  # only PNGs there: one line, no traceback
    error = capsys.readouterr().err
    assert error.startswith("sb3-textrl plot: error: ") and "holds no SB3 training logs" in error
    assert len(error.strip().splitlines()) == 1
