"""The examples run end to end with tiny models (what CI can afford); the full-size runs are in docs/."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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
    # A small mix of the real CNN/DM and XSum articles, so the per-source breakdown is exercised too.
    rows = [json.loads(line) for line in shared_news.read_text().splitlines()]
    subset = [r for r in rows if r["source"] == "cnndm"][:8] + [r for r in rows if r["source"] == "xsum"][:8]
    dataset = tmp_path / "news.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in subset))
    options = example.Options(output_dir=str(tmp_path / "run"), dataset=str(dataset), tiny=True, n_eval=4, sft_examples=8,
                              ppo_updates=2, n_envs=2, n_epochs=1, device="cpu")
    summary = example.main(options)
    run = tmp_path / "run"
    assert {"zero-shot", "lead3", "sft", "sft+ppo"} <= set(summary["metrics"])
    assert summary["n_eval_articles"] == 4
    # Held-out articles are not in the training split.
    train = (run / "train.jsonl").read_text()
    for line in (run / "eval.jsonl").read_text().splitlines():
        assert json.loads(line)["article"] not in train
    assert (run / "results.md").read_text().startswith("| system |")
    assert summary["figures"] and all(Path(f).stat().st_size > 0 for f in summary["figures"])
    assert (run / "ppo_logs" / "progress.csv").is_file()
    # Every system's held-out articles are counted once, under their source.
    by_source = summary["metrics_by_source"]
    assert set(by_source) == {"zero-shot", "lead3", "sft", "sft+ppo"}
    for per_source in by_source.values():
        assert set(per_source) <= {"cnndm", "xsum"}
        assert sum(row["n"] for row in per_source.values()) == 4
    assert "| source |" in (run / "results.md").read_text()


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
