"""PPO end to end: save/load, logging, the per-step-buffer fallback, and an honest learning test."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch as th
from helpers import register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.logger import configure

from sb3_textrl import TextRolloutBuffer
from sb3_textrl.envs.news_data import generate_news_examples
from sb3_textrl.evaluation import generate_samples
from sb3_textrl.models import tiny_gpt2, train_small_tokenizer


@pytest.fixture
def toy_task(tiny_lm):
    return register_toy_task("PpoToy-v0", tiny_lm, max_new_tokens=5)


def test_save_load_keeps_weights_arguments_and_generations(toy_task, tiny_lm, tmp_path):
    env = toy_vec_env(toy_task, n_envs=2)
    policy_kwargs = dict(kl_coef=0.1, kl_target=4.0, top_k=40, temperature=0.9, lora_config=dict(r=4, lora_alpha=8))
    model = toy_ppo(env, tiny_lm, learning_rate=1e-2, policy_kwargs=policy_kwargs)
    model.learn(20)
    model.save(tmp_path / "run")
    loaded = PPO.load(tmp_path / "run", env=toy_vec_env(toy_task, n_envs=2), device="cpu")

    original, restored = model.policy.state_dict(), loaded.policy.state_dict()
    assert original.keys() == restored.keys()
    assert all(th.equal(original[k], restored[k]) for k in original)
    assert any("lora_A" in k for k in original)  # LoRA adapters were saved, with their r
    assert loaded.policy.lm.peft_config["default"].r == 4
    params = loaded.policy._get_constructor_parameters()
    for key, value in policy_kwargs.items():
        assert params[key] == value
    assert params["lm"] == tiny_lm
    # beta of the adaptive controller is state: it comes back with the weights
    assert loaded.policy.kl_controller.value == model.policy.kl_controller.value != 0.1

    prompts = [0, 1, 2, 3]
    first = [s.completion for s in generate_samples(model, toy_vec_env(toy_task, n_envs=2), prompts)]
    second = [s.completion for s in generate_samples(loaded, toy_vec_env(toy_task, n_envs=2), prompts)]
    assert first == second
    assert any(text.strip() for text in first)


def test_policy_save_and_load_alone(toy_task, tiny_lm, tmp_path):
    model = toy_ppo(toy_vec_env(toy_task, n_envs=1), tiny_lm, policy_kwargs=dict(kl_coef=0.2, use_kv_cache=False))
    model.policy.save(tmp_path / "policy.pt")
    policy = type(model.policy).load(tmp_path / "policy.pt", device="cpu")
    assert policy.kl_coef == 0.2 and policy.use_kv_cache is False
    assert all(th.equal(a, b) for a, b in zip(model.policy.state_dict().values(), policy.state_dict().values()))


def test_metrics_reach_sb3_loggers(toy_task, tiny_lm, tmp_path):
    model = toy_ppo(toy_vec_env(toy_task, n_envs=2), tiny_lm, n_steps=10, batch_size=10)
    model.set_logger(configure(str(tmp_path), ["stdout", "csv", "tensorboard"]))
    model.learn(40, callback=CheckpointCallback(save_freq=10, save_path=str(tmp_path / "ckpt")))
    log = pd.read_csv(tmp_path / "progress.csv")
    for key in ("rollout/task_reward", "rollout/kl_to_ref", "rollout/kl_coef", "rollout/completion_len", "train/loss"):
        assert key in log.columns, key
    assert log["rollout/completion_len"].between(1, 5).all()
    assert (log["rollout/kl_coef"] == 0.05).all()
    assert list(tmp_path.glob("events.out.tfevents*")), "tensorboard format wrote nothing"
    assert len(list((tmp_path / "ckpt").glob("*.zip"))) == 2


def test_per_step_buffer_works_and_warns_once(toy_task, tiny_lm):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # SB3's DictRolloutBuffer passed explicitly (without rollout_buffer_class PPO gets TextRolloutBuffer).
        model = toy_ppo(toy_vec_env(toy_task, n_envs=2), tiny_lm, grouped=False, n_steps=5, batch_size=5, n_epochs=2)
        model.learn(20)
    messages = [str(w.message) for w in caught if "TextRolloutBuffer" in str(w.message)]
    assert len(messages) == 1  # at construction, not again in training
    assert "faster" in messages[0] and "rollout_buffer_class=" in messages[0] and "NOT applied" in messages[0]


def test_buffer_memory_grows_with_tokens_not_context(toy_task, tiny_lm):
    model = toy_ppo(toy_vec_env(toy_task, n_envs=2), tiny_lm, n_steps=20, batch_size=20)
    model.learn(40)
    buffer: TextRolloutBuffer = model.rollout_buffer
    sizes = buffer.size_in_bytes()
    width = buffer.width
    # Contexts: one row per segment (about steps / episode length), not one per step.
    assert buffer.contexts.shape[0] == len(buffer.segments) < 20 * 2
    assert sizes["contexts"] == len(buffer.segments) * width * 4


def test_seeded_runs_repeat_exactly(toy_task, tiny_lm):
    def run() -> np.ndarray:
        model = toy_ppo(toy_vec_env(toy_task, n_envs=2, seed=3), tiny_lm, seed=3, learning_rate=1e-2)
        model.learn(20)
        return np.concatenate([p.detach().flatten().numpy() for p in model.policy.parameters() if p.requires_grad])

    np.testing.assert_array_equal(run(), run())


def test_ppo_raises_the_reward_of_a_toy_task(tmp_path):
    """Honest learning test: seeded PPO on a toy task (share of upper-case letters) must clearly raise the reward."""
    tokenizer = train_small_tokenizer([r["article"] for r in generate_news_examples(200)], vocab_size=400)
    lm = tmp_path / "lm"
    tiny_gpt2(len(tokenizer), eos_token_id=0).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    task = register_toy_task("ShoutLearn-v0", str(lm), max_new_tokens=4)
    env = toy_vec_env(task, n_envs=16, seed=0)
    # Full fine-tuning: a 2-layer model's attention-only LoRA adapters learn this too, but far more slowly.
    model = toy_ppo(env, str(lm), n_steps=8, batch_size=64, n_epochs=4, learning_rate=1e-3, gamma=1.0, ent_coef=0.0,
                    policy_kwargs=dict(use_lora=False, kl_coef=0.0))
    eval_env = toy_vec_env(task, n_envs=5, seed=100)

    def mean_sampled_reward() -> float:
        samples = generate_samples(model, eval_env, list(range(5)) * 8, deterministic=False)
        return float(np.mean([s.reward for s in samples]))

    before = mean_sampled_reward()
    model.learn(16 * 8 * 40)
    after = mean_sampled_reward()
    assert before < 0.3 and after > before + 0.4, (before, after)
