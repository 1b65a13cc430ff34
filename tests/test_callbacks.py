"""TextSampleCallback and TextEvalCallback inside real SB3 PPO on the tiny toy task, with csv and tensorboard logs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch as th
from helpers import PROMPTS, register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.logger import configure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sb3_textrl import TextEvalCallback, TextSampleCallback

N_ENVS, N_STEPS = 2, 10  # one rollout = 20 tokens, 4 episodes of at most 5 tokens


@pytest.fixture(scope="module")
def toy_task(tiny_lm):
    return register_toy_task("CallbackToy-v0", tiny_lm, max_new_tokens=5)


def _model(task, lm, **kwargs):
    return toy_ppo(toy_vec_env(task, n_envs=N_ENVS), lm, n_steps=N_STEPS, batch_size=10, **kwargs)


def _text_events(log_dir, tag_start: str) -> dict[int, str]:
    """Tensorboard text summaries whose tag starts with ``tag_start``: step -> text."""
    events = list(log_dir.glob("events.out.tfevents*"))
    assert events, "the tensorboard format wrote no event file"
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    tags = [tag for tag in acc.Tags()["tensors"] if tag.startswith(tag_start)]
    assert tags, f"no {tag_start} text in {acc.Tags()['tensors']}"
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tags[0])}


def test_sample_callback_prints_and_writes_tensorboard_text_and_markdown(toy_task, tiny_lm, tmp_path, capsys):
    model = _model(toy_task, tiny_lm)
    model.set_logger(configure(str(tmp_path), ["csv", "tensorboard"]))
    callback = TextSampleCallback(every_n_rollouts=2, n_samples=2)
    model.learn(4 * N_STEPS * N_ENVS, callback=callback)
    model.logger.close()

    out = capsys.readouterr().out
    # rollouts 2 and 4 of 4 are logged
    assert out.count("Text samples at") == 2
    assert "Text samples at 40 timesteps (rollout 2)" in out and "(rollout 4)" in out
    assert out.count("completion:") == 4
    assert any(prompt[-10:] in out for prompt in PROMPTS)

    texts = _text_events(tmp_path, "samples/text")
    assert sorted(texts) == [40, 80]
    assert texts[80].startswith("| prompt (end) | completion | task reward |")
    assert len(texts[80].splitlines()) == 2 + 2  # header, rule, 2 samples
    # the text row is tensorboard-only: it stays out of the csv
    assert not any("samples" in column for column in pd.read_csv(tmp_path / "progress.csv").columns)
    markdown = (tmp_path / "samples.md").read_text()
    assert markdown.count("## Text samples at") == 2
    assert markdown.count("| prompt (end) |") == 2


def test_sample_callback_samples_are_the_rollouts_episodes(toy_task, tiny_lm, tmp_path):
    class Recorder(BaseCallback):
        def _on_rollout_start(self) -> None:
            self.finished = []

        def _on_step(self) -> bool:
            self.finished += [info for done, info in zip(self.locals["dones"], self.locals["infos"]) if done]
            return True

    model = _model(toy_task, tiny_lm)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    samples, recorder = TextSampleCallback(n_samples=3, verbose=0), Recorder()
    model.learn(N_STEPS * N_ENVS, callback=[recorder, samples])
    assert len(samples.samples) == 3
    for sample, info in zip(samples.samples, recorder.finished):
        assert sample["completion"] == info["completion"] and sample["task_reward"] == info["task_reward"]
        assert sample["prompt"] in PROMPTS


def test_eval_callback_logs_eval_metrics_saves_best_and_composes(toy_task, tiny_lm, tmp_path, capsys):
    model = _model(toy_task, tiny_lm, learning_rate=1e-2)
    model.set_logger(configure(str(tmp_path), ["stdout", "csv", "tensorboard"]))
    eval_env = toy_vec_env(toy_task, n_envs=2, seed=5)
    evaluation = TextEvalCallback(
        eval_env, prompt_indices=[0, 2, 4], best_model_save_path=tmp_path / "best", log_path=tmp_path / "eval"
    )
    checkpoints = CheckpointCallback(save_freq=N_STEPS, save_path=str(tmp_path / "ckpt"))
    model.learn(3 * N_STEPS * N_ENVS, callback=CallbackList([TextSampleCallback(verbose=0), evaluation, checkpoints]))
    model.logger.close()

    log = pd.read_csv(tmp_path / "progress.csv")
    # rollout-end evaluations dumped with rollouts 1 and 2; after rollout 3 only the final one, after the last update
    assert len(log) == 4
    assert log["eval/task_reward"].notna().tolist() == [True, True, False, True]
    assert log["eval/task_reward"].dropna().between(0, 1).all()
    assert log["eval/completion_len"].dropna().between(1, 5).all()
    # One definition of completion length: the generated tokens, a stop token included (metric_keys).
    final_tokens = [s.completion_tokens for s in evaluation.last_samples]
    assert log["eval/completion_len"].iloc[-1] == pytest.approx(np.mean(final_tokens))
    assert log["time/total_timesteps"].tolist() == [20, 40, 60, 60]
    assert "rouge1" not in " ".join(log.columns)  # the toy prompts have no references
    # LoRA starts as the identity (B = 0): no KL before the first update, some after updates at lr 1e-2
    assert log["eval/kl_to_ref"].iloc[0] == pytest.approx(0.0, abs=1e-5)
    assert log["eval/kl_to_ref"].iloc[-1] > 1e-3
    assert "Eval at 60 timesteps on 3 prompts" in capsys.readouterr().out

    lines = [json.loads(line) for line in (tmp_path / "eval" / "evaluations.jsonl").read_text().splitlines()]
    assert [line["timesteps"] for line in lines] == [20, 40, 60]
    assert [s["prompt_index"] for s in lines[0]["samples"]] == [0, 2, 4]
    best = max(line["metrics"]["task_reward"] for line in lines)
    assert evaluation.best_mean_reward == pytest.approx(best)
    assert evaluation.last_metrics == pytest.approx(lines[-1]["metrics"])

    # the saved best model loads and scores what was logged when it was saved
    best_eval = next(i for i, line in enumerate(lines) if line["metrics"]["task_reward"] == best)
    loaded = PPO.load(tmp_path / "best" / "best_model", device="cpu")
    loaded.set_logger(configure(None, []))
    rerun = TextEvalCallback(toy_vec_env(toy_task, n_envs=2), prompt_indices=[0, 2, 4], verbose=0)
    rerun.init_callback(loaded)
    assert rerun.evaluate()["task_reward"] == pytest.approx(lines[best_eval]["metrics"]["task_reward"])
    assert len(list((tmp_path / "ckpt").glob("*.zip"))) == 3
    assert set(_text_events(tmp_path, "eval/samples")) == {20, 40, 60}  # the last from the final evaluation


def _train_params(task, lm, callback=None, rollouts: int = 3):
    model = _model(task, lm, learning_rate=1e-2)
    model.set_logger(configure(None, []))
    model.learn(rollouts * N_STEPS * N_ENVS, callback=callback)
    return model, [p.detach().clone() for p in model.policy.parameters()]


def test_sampled_evaluation_does_not_change_the_training_run(toy_task, tiny_lm):
    plain_model, plain = _train_params(toy_task, tiny_lm)
    evaluation = TextEvalCallback(toy_vec_env(toy_task, n_envs=3, seed=1), deterministic=False, verbose=0)
    model, evaluated = _train_params(toy_task, tiny_lm, evaluation)
    assert evaluation.n_rollouts == 3 and evaluation.last_samples
    # sampling in the eval used the torch RNG, yet PPO drew the same tokens and made the same updates
    assert all(th.equal(a, b) for a, b in zip(plain, evaluated))
    assert model.policy.training == plain_model.policy.training  # the final evaluation restored the mode


def test_greedy_and_sampled_evaluation_share_the_prefill_and_the_seeded_draws(toy_task, tiny_lm):
    """n_sampled adds eval/sampled_task_reward from seeded draws: the same draws at every evaluation of one policy,
    so two evaluations of an unchanged policy agree exactly, and the training run is the one without evaluations."""
    plain_model, plain = _train_params(toy_task, tiny_lm)
    evaluation = TextEvalCallback(
        toy_vec_env(toy_task, n_envs=3, seed=1), n_sampled=2, sampling_seed=4, metric="sampled_task_reward", verbose=0
    )
    model, evaluated = _train_params(toy_task, tiny_lm, evaluation)
    assert all(th.equal(a, b) for a, b in zip(plain, evaluated))
    sets = evaluation.last_sample_sets
    assert sets is not None and len(sets.sampled) == 2 and len(sets.greedy) == len(evaluation.last_samples) == 5
    assert evaluation.last_metrics["sampled_task_reward"] == pytest.approx(np.mean(sets.sampled_rewards()))
    assert evaluation.last_mean_reward == evaluation.last_metrics["sampled_task_reward"]
    first = [[s.completion for s in draw] for draw in sets.sampled]
    again = evaluation.evaluate()  # the same policy: the same draws
    assert [[s.completion for s in draw] for draw in evaluation.last_sample_sets.sampled] == first
    assert again["sampled_task_reward"] == evaluation.last_metrics["sampled_task_reward"]
    with pytest.raises(ValueError, match="use it with deterministic=True"):
        TextEvalCallback(toy_vec_env(toy_task, n_envs=1), n_sampled=2, deterministic=False)
    with pytest.raises(ValueError, match="metric must be one of"):  # no draws, no sampled metric
        TextEvalCallback(toy_vec_env(toy_task, n_envs=1), metric="sampled_task_reward")


class _LogProbCheck(BaseCallback):
    """After each rollout: the log-probs PPO stored must equal those evaluate_actions computes from scratch."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        gaps = []
        with th.no_grad():
            for batch in buffer.get(None):
                _, log_prob, _ = self.model.policy.evaluate_actions(batch.observations, batch.actions.flatten())
                gaps.append(float((log_prob - batch.old_log_prob).abs().max()))
        self.max_gap = max(gaps + [getattr(self, "max_gap", 0.0)])


def test_rollouts_after_an_evaluation_match_evaluate_actions(toy_task, tiny_lm):
    # An evaluation in the middle of every rollout (on_step) as well as at its end: the next steps' KV cache must
    # not serve the eval env's keys.
    class MidRolloutEval(TextEvalCallback):
        def _on_step(self) -> bool:
            if self.n_calls % 4 == 0:
                self.evaluate()
            return True

    model = _model(toy_task, tiny_lm, learning_rate=1e-2)
    model.set_logger(configure(None, []))
    check = _LogProbCheck()
    evaluation = MidRolloutEval(toy_vec_env(toy_task, n_envs=3, seed=1), prompt_indices=[1, 3], verbose=0)
    model.learn(3 * N_STEPS * N_ENVS, callback=[evaluation, check])
    assert check.max_gap < 1e-4


def test_stop_training_on_reward_threshold_after_an_evaluation(toy_task, tiny_lm):
    model = _model(toy_task, tiny_lm)
    model.set_logger(configure(None, []))
    stop = StopTrainingOnRewardThreshold(reward_threshold=-1.0)  # any reward reaches it
    evaluation = TextEvalCallback(toy_vec_env(toy_task, n_envs=2), callback_on_new_best=stop, verbose=0)
    model.learn(10 * N_STEPS * N_ENVS, callback=evaluation)
    # stopped at the first step of the second rollout, before its update
    assert model.num_timesteps == N_STEPS * N_ENVS + N_ENVS
    assert evaluation.n_rollouts == 1


def test_eval_callback_builds_env_from_task_id(toy_task, tiny_lm, tmp_path):
    model = _model(toy_task, tiny_lm)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    evaluation = TextEvalCallback(toy_task, n_eval_envs=2, eval_freq_rollouts=2, eval_at_end=False, verbose=0)
    model.learn(2 * N_STEPS * N_ENVS, callback=evaluation)
    log = pd.read_csv(tmp_path / "progress.csv")
    assert log["eval/task_reward"].isna().tolist() == [True, False]
    assert len(evaluation.last_samples) == len(PROMPTS)


def test_eval_callback_rouge_on_references(tiny_lm, tmp_path):
    from sb3_textrl import register_text_task

    references = ["the fox", "a village", "the council", "a recipe", "people"]
    from sb3_textrl.envs.text_env import TextPrompt

    register_text_task(
        "CallbackRefToy-v0",
        prompts=[TextPrompt(p, r) for p, r in zip(PROMPTS, references)],
        reward=lambda prompts, completions, refs: [float(len(c)) for c in completions],
        tokenizer=tiny_lm,
        max_new_tokens=5,
        max_prompt_tokens=16,
    )
    model = _model("CallbackRefToy-v0", tiny_lm)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    evaluation = TextEvalCallback(toy_vec_env("CallbackRefToy-v0", n_envs=2), metric="rouge1", verbose=0)
    model.learn(N_STEPS * N_ENVS, callback=evaluation)
    log = pd.read_csv(tmp_path / "progress.csv")
    for key in ("eval/rouge1", "eval/rouge2", "eval/rougeL"):
        assert log[key].notna().tolist() == [False, True], key  # one rollout: only the evaluation at the end
        assert log[key].dropna().between(0, 1).all(), key
    assert evaluation.best_mean_reward == pytest.approx(log["eval/rouge1"].max())


def test_bad_arguments_name_the_fix(toy_task, tiny_lm):
    with pytest.raises(ValueError, match="not a registered env id"):
        TextEvalCallback("NoSuchTask-v0")
    with pytest.raises(ValueError, match=r"prompt_indices .* \[0, 5\)"):
        TextEvalCallback(toy_vec_env(toy_task, n_envs=1), prompt_indices=[7])
    with pytest.raises(ValueError, match="metric must be one of"):
        TextEvalCallback(toy_vec_env(toy_task, n_envs=1), metric="loss")
    with pytest.raises(ValueError, match="every_n_rollouts"):
        TextSampleCallback(every_n_rollouts=0)
    wider = toy_vec_env(register_toy_task("CallbackWideToy-v0", tiny_lm, max_new_tokens=8), n_envs=1)
    model = _model(toy_task, tiny_lm)
    with pytest.raises(ValueError, match="width 24 .* training env's 21. Build the eval env like the training env"):
        model.learn(N_STEPS * N_ENVS, callback=TextEvalCallback(wider))
    no_refs = TextEvalCallback(toy_vec_env(toy_task, n_envs=1), metric="rouge1", verbose=0)
    with pytest.raises(ValueError, match="needs a reference for every eval prompt"):
        model.learn(N_STEPS * N_ENVS, callback=no_refs)
    assert np.isinf(no_refs.best_mean_reward)
