"""The demo's code path with tiny models: ROUGE reward, and PPO on a learned reward model (`demo --reward-model`)."""

from __future__ import annotations

import json

import pytest

from sb3_textrl.demo import DemoConfig, run_demo
from sb3_textrl.reward_model import train_reward_model


def tiny_config(tmp_path, lm: str, **overrides) -> DemoConfig:
    settings = dict(lm=lm, n_envs=4, samples_per_prompt=2, n_steps=4, updates=2, n_epochs=1, n_eval=3, n_samples=2,
                    eval_every=1, trainable_layers=1, max_prompt_tokens=64, output_dir=str(tmp_path / "demo"),
                    device="cpu")
    return DemoConfig(**(settings | overrides))


def test_demo_runs_and_saves_model_and_logs(tmp_path, tiny_lm, capsys):
    result = run_demo(tiny_config(tmp_path, tiny_lm))
    assert 0.0 <= result["reward_before"] <= 1.0 and 0.0 <= result["reward_after"] <= 1.0
    assert result["reward"] == "rouge1" and result["n_eval"] == 3
    # Before and after are paired over the same held-out articles, each with its interval.
    gain = result["gain"]
    assert gain["n"] == 3 and gain["low"] <= gain["difference"] <= gain["high"]
    assert gain["difference"] == pytest.approx(result["reward_after"] - result["reward_before"])
    # And by sampling from the policy (the default 2 summaries per article), paired over the same articles.
    sampled = result["sampled"]
    assert sampled["n_per_article"] == 2 and sampled["gain"]["n"] == 3
    assert sampled["gain"]["low"] <= sampled["gain"]["difference"] <= sampled["gain"]["high"]
    for (low, high), mean in zip((sampled["reward_before_ci"], sampled["reward_after_ci"]),
                                 (sampled["gain"]["mean_a"], sampled["gain"]["mean_b"]), strict=True):
        assert low <= mean <= high
    # The last words lead with the policy's sampled mean reward and say what its interval shows.
    printed = capsys.readouterr().out
    assert "Mean reward of the policy on 3 held-out articles (sampled at temperature 0.7, 2 summaries" in printed
    gain = sampled["gain"]
    verdict = "excludes 0" if gain["low"] > 0 else "lies below 0" if gain["high"] < 0 else "includes 0"
    assert f"The sampled gain's interval {verdict}" in printed
    low, high = result["reward_before_ci"]
    assert low <= result["reward_before"] <= high
    assert (tmp_path / "demo" / "model.zip").is_file()
    # The numbers and the settings that gave them, and the training curves, as the help says.
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["sampled"]["gain"] == sampled["gain"] and summary["settings"]["n_eval"] == 3
    assert (tmp_path / "demo" / "plots" / "reward.png").is_file()
    header = (tmp_path / "demo" / "logs" / "progress.csv").read_text().splitlines()[0]
    assert "eval/task_reward" in header and "rollout/kl_to_ref" in header and "rollout/groups" in header


def test_demo_refuses_showing_more_articles_than_it_evaluates(tmp_path, tiny_lm):
    with pytest.raises(ValueError, match="n_samples=5 shows more articles than n_eval=3"):
        run_demo(tiny_config(tmp_path, tiny_lm, n_samples=5))


def test_demo_with_a_learned_reward_model(tmp_path, tiny_lm):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"article {i}", "chosen": "the council approved the budget", "rejected": "zzz qqq"} for i in range(16)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_reward_model(
        pairs, tmp_path / "rm", backbone=tiny_lm, epochs=1, learning_rate=1e-3, device="cpu", progress_bar=False
    )
    result = run_demo(tiny_config(tmp_path, tiny_lm, reward_model=str(tmp_path / "rm")))
    assert result["reward"] == "learned_rm"  # the env scored episodes with the reward model, not ROUGE
    assert (tmp_path / "demo" / "model.zip").is_file()


def test_the_sampled_evaluation_does_not_change_training(tmp_path, tiny_lm):
    # It draws from torch's random state before training; the state is restored, so the run is the same without it.
    with_sampling = run_demo(tiny_config(tmp_path / "a", tiny_lm, n_sampled_eval=2))
    without = run_demo(tiny_config(tmp_path / "b", tiny_lm, n_sampled_eval=0))
    assert "sampled" in with_sampling and "sampled" not in without
    assert with_sampling["gain"] == without["gain"]
    # The rollouts sampled the same tokens: the same per-update KL and ratios in both logs.
    logs = [(tmp_path / run / "demo" / "logs" / "progress.csv").read_text().splitlines() for run in ("a", "b")]
    columns = [dict(zip(log[0].split(","), zip(*(line.split(",") for line in log[1:])), strict=False)) for log in logs]
    for key in ("rollout/kl_to_ref", "rollout/task_reward", "train/approx_kl"):
        assert columns[0][key] == columns[1][key]
