"""The examples run end to end with tiny models (what CI can afford); the full-size runs are in docs/."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_rlhf_news_loop_runs_end_to_end(tmp_path):
    example = load_example("rlhf_news")
    options = example.Options(
        output_dir=str(tmp_path / "run"), tiny=True, sft_examples=16, n_prompts=8, ppo_updates=1, n_eval=4, n_envs=4,
        device="cpu",
    )
    summary = example.main(options)
    run = tmp_path / "run"
    # Every stage left its output: SFT model, judged pairs, reward model, PPO model, before/after table.
    assert (run / "sft" / "config.json").is_file()
    assert (run / "reward_model").is_dir()
    assert (run / "ppo_model.zip").is_file()
    assert sum(summary["judgements"].values()) == 8
    assert set(summary["comparison"]) == {"base", "sft", "sft+ppo"}
    for row in summary["comparison"].values():
        assert set(row) == {"learned_reward", "rouge1", "completion_tokens"}
    assert json.loads((run / "summary.json").read_text())["comparison"] == summary["comparison"]


def test_news_summary_example_runs_end_to_end(tmp_path, shared_news):
    example = load_example("news_summary")
    # CNN/DM and XSum rows: the recipe keeps the CNN/DM ones (--source cnndm, the default).
    rows = [json.loads(line) for line in shared_news.read_text().splitlines()]
    subset = [r for r in rows if r["source"] == "cnndm"][:16] + [r for r in rows if r["source"] == "xsum"][:8]
    dataset = tmp_path / "news.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in subset))
    options = example.Options(output_dir=str(tmp_path / "run"), dataset=str(dataset), tiny=True, n_eval=4, n_val=2,
                              sft_examples=8, sft_epochs=1, ppo_updates=2, n_envs=4, samples_per_prompt=2, n_epochs=1,
                              eval_every=1, device="cpu")
    summary = example.main(options)
    run = tmp_path / "run"
    assert {"zero-shot", "lead3", "sft", "sft+ppo"} <= set(summary["metrics"])
    assert (summary["n_eval_articles"], summary["n_val_articles"], summary["n_train_articles"]) == (4, 2, 10)
    # The three parts are disjoint and CNN/DM only.
    parts = {name: [json.loads(line)["article"] for line in (run / f"{name}.jsonl").read_text().splitlines()]
             for name in ("train", "val", "eval")}
    cnndm = {r["article"] for r in subset[:16]}
    assert all(set(articles) <= cnndm for articles in parts.values())
    assert not set(parts["eval"]) & (set(parts["train"]) | set(parts["val"])) and not set(parts["val"]) & set(parts["train"])
    # Every reported difference is paired over the 4 held-out articles, with its interval.
    comparisons = summary["comparisons"]
    expected = {"sft+ppo - sft rougeL", "sft - zero-shot rouge1", "sft+ppo - zero-shot rougeL", "sft+ppo - lead3 rouge2"}
    assert expected <= set(comparisons)
    assert all(c["n"] == 4 and c["low"] <= c["difference"] <= c["high"] for c in comparisons.values())
    report = (run / "results.md").read_text()
    assert report.startswith("| system |") and "| sft+ppo - sft |" in report
    assert summary["ppo"]["validation_curve"] and (run / "ppo_best" / "best_model.zip").is_file()
    assert summary["figures"] and all(Path(f).stat().st_size > 0 for f in summary["figures"])
    assert (run / "ppo_logs" / "progress.csv").is_file()


def test_news_summary_split_refuses_a_missing_source(tmp_path, shared_news):
    example = load_example("news_summary")
    options = example.Options(output_dir=str(tmp_path), dataset=str(shared_news), source="cnn")
    with pytest.raises(ValueError, match="has source 'cnn'.*cnndm, xsum"):
        example.split_articles(options, tmp_path)
    options.source = None  # every row: 351 articles
    _, _, _, n_train = example.split_articles(options, tmp_path)
    assert n_train == 351 - options.n_eval - options.n_val


def test_custom_task_example_runs_end_to_end(tmp_path):
    example = load_example("custom_task")
    options = example.Options(output_dir=str(tmp_path / "run"), tiny=True, ppo_updates=2, n_envs=2, n_epochs=1, device="cpu")
    summary = example.main(options)
    run = tmp_path / "run"
    assert (run / "ppo_model.zip").is_file()
    assert json.loads((run / "before_after.json").read_text())["after"] == summary["after"]
    # The held-out openings were not PPO's prompts.
    assert not set(summary["held_out_openings"]) & set(example.OPENINGS[options.n_held_out:])
    for row in (summary["before"], summary["after"]):
        assert -1.0 <= row["task_reward"] <= 1.0


def test_custom_task_reward_is_the_lexicon_balance():
    example = load_example("custom_task")
    assert example.positivity([""] * 4, ["great and friendly!", "rude, slow", "a table", ""], [None] * 4) == [
        2 / 3, -1.0, 0.0, 0.0
    ]


def test_demo_validation_scores_validation_sets_before_and_after(tmp_path, tiny_lm):
    example = load_example("demo_validation")
    results = tmp_path / "runs.jsonl"
    line = example.main([
        "--set", f"lm={tiny_lm}", "--set", "n_envs=4", "--set", "samples_per_prompt=2", "--set", "n_steps=4",
        "--set", "updates=2", "--set", "n_epochs=1", "--set", "trainable_layers=1", "--set", "max_prompt_tokens=64",
        "--set", "device=cpu", "--ppo-kwarg", "normalize_advantage=false", "--policy-kwarg", "kl_coef=0.1",
        "--n-articles", "4", "--n-sampled", "2", "--eval-envs", "4", "--output-dir", str(tmp_path / "run"),
        "--results", str(results),
    ])
    assert line["ppo_kwargs"] == {"normalize_advantage": False} and line["policy_kwargs"] == {"kl_coef": 0.1}
    for key in ("seed2000_greedy", "seed2000_sampled", "seed3000_greedy", "seed3000_sampled"):
        assert "95% CI" in line[key]
    assert json.loads(results.read_text()) == line
    fewer = example.main([
        "--set", f"lm={tiny_lm}", "--set", "n_envs=4", "--set", "samples_per_prompt=2", "--set", "n_steps=4",
        "--set", "updates=1", "--set", "n_epochs=1", "--set", "trainable_layers=1", "--set", "max_prompt_tokens=64",
        "--set", "device=cpu", "--validation-seeds", "2000", "--n-articles", "4", "--n-sampled", "2",
        "--draw-counts", "1,2", "--eval-envs", "4", "--output-dir", str(tmp_path / "run2"),
    ])
    assert "seed2000_sampled" not in fewer and "width" in fewer["seed2000_sampled_1draws"]
    assert "95% CI" in fewer["seed2000_sampled_2draws"]
    with pytest.raises(SystemExit, match="between 1 and --n-sampled 2"):
        example.main(["--n-sampled", "2", "--draw-counts", "3"])
    # The PPO ran with the overrides, and the demo's held-out seed is refused as a validation set.
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "progress.csv").open()))
    assert rows and all(float(row["rollout/kl_coef"]) == pytest.approx(0.1) for row in rows)
    with pytest.raises(SystemExit, match="held-out"):
        example.main(["--validation-seeds", "1000,2000"])
