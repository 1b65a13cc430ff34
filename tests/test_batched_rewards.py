"""Batched reward scoring (BatchedRewardVecEnv, make_text_vec_env): same steps as per-episode scoring, one call per step."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from helpers import PROMPTS, CountingReward, ragged_stop_ids, shout, toy_ppo
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from sb3_textrl import BatchedRewardVecEnv, TextGenerationEnv, make_text_task_env, make_text_vec_env, register_text_task
from sb3_textrl.rewards import LearnedRewardModel
from sb3_textrl.rewards.human import HumanReward

MAX_NEW = 5
# Forked workers start in a fraction of the time of SB3's default (forkserver: each worker imports torch again).
FORK = {SubprocVecEnv: dict(start_method="fork")}
INFO_KEYS = ("task_reward", "reward_parts", "completion", "prompt_index", "completion_tokens", "ended_by_stop_token")


def toy_factory(tokenizer: str, reward=shout, **kwargs):
    """An env factory (make_vec_env takes callables): picklable for SubprocVecEnv, needs no registration in workers."""
    kwargs = dict(prompts=PROMPTS, reward=reward, tokenizer=tokenizer, max_new_tokens=MAX_NEW, max_prompt_tokens=16,
                  stop_token_ids=ragged_stop_ids(6), task_id="Batched-v0") | kwargs
    return functools.partial(make_text_task_env, **kwargs)


def roll(env: VecEnv, n_steps: int, seed: int = 0) -> list[dict]:
    """Step ``env`` with seeded random tokens; one record per step (rewards, dones, the infos of ended episodes)."""
    rng = np.random.default_rng(seed)
    env.reset()
    records = []
    for _ in range(n_steps):
        _, rewards, dones, infos = env.step(rng.integers(0, 50257, size=env.num_envs))
        ended = {}
        for i in np.flatnonzero(dones):
            info = infos[i]
            ended[int(i)] = {key: info[key] for key in INFO_KEYS} | {
                "episode": (info["episode"]["r"], info["episode"]["l"]),
                "terminal_ids": info["terminal_observation"]["input_ids"].tolist(),
            }
        records.append({"rewards": rewards.tolist(), "dones": dones.tolist(), "ended": ended})
    return records


@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_batched_scoring_changes_nothing_sb3_sees(tiny_lm, tmp_path, vec_env_cls):
    n_envs, n_steps = 4, 30
    runs, monitors = [], []
    for batched in (False, True):
        monitor_dir = tmp_path / f"monitor-{batched}"
        env = make_text_vec_env(toy_factory(tiny_lm), n_envs=n_envs, seed=0, vec_env_cls=vec_env_cls,
                                vec_env_kwargs=FORK.get(vec_env_cls), monitor_dir=str(monitor_dir), batched_rewards=batched)
        assert isinstance(env, BatchedRewardVecEnv) == batched
        runs.append(roll(env, n_steps))
        env.close()
        monitors.append([pd.read_csv(monitor_dir / f"{i}.monitor.csv", skiprows=1)[["r", "l"]] for i in range(n_envs)])
    plain, batched = runs
    assert plain == batched
    for plain_log, batched_log in zip(*monitors):
        pd.testing.assert_frame_equal(plain_log, batched_log)  # Monitor's own records, not just the infos

    # The run is a real test of batching: episodes of several lengths, steps ending one and several episodes,
    # non-zero task rewards that reach Monitor's episode return.
    ended = [e for record in batched for e in record["ended"].values()]
    assert len({e["completion_tokens"] for e in ended}) >= 3
    per_step = [len(record["ended"]) for record in batched]
    assert 1 in per_step and max(per_step) >= 2
    assert any(e["task_reward"] > 0 for e in ended)
    assert all(e["episode"][0] == round(e["task_reward"], 6) and e["reward_parts"] == {"shout": e["task_reward"]}
               for e in ended)


@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_one_reward_call_per_step_that_ends_episodes(tiny_lm, vec_env_cls):
    reward = CountingReward()
    env = make_text_vec_env(toy_factory(tiny_lm, reward=reward), n_envs=5, seed=1, vec_env_cls=vec_env_cls,
                            vec_env_kwargs=FORK.get(vec_env_cls))
    rng = np.random.default_rng(1)
    env.reset()
    n_steps_ending = 0
    for _ in range(25):
        calls_before = len(reward.calls)
        _, rewards, dones, infos = env.step(rng.integers(0, 50257, size=5))
        new_calls = reward.calls[calls_before:]
        if not dones.any():
            assert new_calls == []
            continue
        n_steps_ending += 1
        # One call, holding every episode this step ended, in env order, and the rewards are that call's values.
        assert new_calls == [[infos[i]["completion"] for i in np.flatnonzero(dones)]]
        np.testing.assert_allclose(rewards[dones], shout([], new_calls[0], []), rtol=1e-6)
    assert n_steps_ending >= 5 and max(map(len, reward.calls)) >= 2
    assert env.n_reward_calls == len(reward.calls) == n_steps_ending
    assert env.n_scored == sum(map(len, reward.calls))
    if vec_env_cls is SubprocVecEnv:
        # Scored in this process with the reward given: the workers' copies were never called.
        assert all(worker_reward.calls == [] for worker_reward in env.get_attr("reward_fn"))
    env.close()


def test_plain_envs_still_score_by_themselves(tiny_lm):
    reward = CountingReward()
    env = make_vec_env(toy_factory(tiny_lm, reward=reward), n_envs=3, seed=0)
    assert not isinstance(env, BatchedRewardVecEnv)
    records = roll(env, 20)
    n_ended = sum(len(record["ended"]) for record in records)
    assert n_ended >= 3 and len(reward.calls) == n_ended and all(len(call) == 1 for call in reward.calls)


def test_a_preset_pays_only_the_step_it_was_made_for(gpt2_tokenizer):
    env = TextGenerationEnv(["Hello there"], shout, gpt2_tokenizer, max_new_tokens=2, task_id="Preset-v0")
    stop = gpt2_tokenizer.eos_token_id
    env.reset(seed=0)
    assert env.episode_end_preview(11) is None  # the first of two tokens ends nothing
    env.preset_reward(11, "x", 99.0)
    assert env.step(11)[1] == 0.0  # and a preset for a step that ends nothing pays nothing
    token = gpt2_tokenizer.encode("ABC")[0]
    assert env.episode_end_preview(token) == {"prompt": "Hello there", "completion": gpt2_tokenizer.decode([11, token]),
                                              "reference": None}
    env.preset_reward(stop, "x", 99.0)  # made for another token: the env scores by itself
    _, reward, _, truncated, info = env.step(token)
    assert truncated and reward == info["task_reward"] == shout([], [info["completion"]], [])[0] != 99.0
    env.reset()
    env.preset_reward(stop, "", 7.0)
    env.reset()  # a reset drops the preset
    env.step(11)
    assert env.step(stop)[1] == 0.0  # shout of an empty completion, not 7.0


def test_ppo_trains_identically_with_batched_scoring(tiny_lm):
    def train(batched: bool) -> tuple[np.ndarray, list[float]]:
        env = make_text_vec_env(toy_factory(tiny_lm), n_envs=4, seed=3, batched_rewards=batched)
        model = toy_ppo(env, tiny_lm, seed=3, n_steps=8, batch_size=16, learning_rate=1e-2)
        model.learn(64)
        if batched:
            assert env.n_reward_calls > 0 and env.n_scored > env.n_reward_calls  # some steps scored several episodes
        params = np.concatenate([p.detach().flatten().numpy() for p in model.policy.parameters() if p.requires_grad])
        return params, [info["r"] for info in model.ep_info_buffer]

    plain_params, plain_returns = train(False)
    batched_params, batched_returns = train(True)
    assert len(batched_returns) >= 8 and any(r > 0 for r in batched_returns)
    assert batched_returns == plain_returns
    np.testing.assert_array_equal(batched_params, plain_params)


# -- a real learned reward model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> str:
    """An untrained 2-layer BERT reward model directory (LearnedRewardModel(..., normalize=False) reads it)."""
    from test_reward_model import tiny_bert_backbone

    return tiny_bert_backbone(tmp_path_factory.mktemp("tiny-rm"), [p + " completion text" for p in PROMPTS] * 20)


def count_forwards(reward: LearnedRewardModel) -> list[int]:
    """The batch size of every forward of the reward model, recorded by a forward hook on the real model."""
    sizes: list[int] = []
    reward.model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(len(kwargs["input_ids"])),
                                       with_kwargs=True)
    return sizes


def test_learned_reward_model_runs_one_forward_per_step(tiny_lm, tiny_rm):
    rewards, forwards = {}, {}
    for batched in (False, True):
        reward = LearnedRewardModel(tiny_rm, normalize=False, device="cpu")
        sizes = count_forwards(reward)
        env = make_text_vec_env(toy_factory(tiny_lm, reward=reward), n_envs=6, seed=0, batched_rewards=batched)
        records = roll(env, 20)
        rewards[batched] = [record["rewards"] for record in records]
        forwards[batched] = sizes
        n_steps_ending = sum(bool(record["ended"]) for record in records)
        n_ended = sum(len(record["ended"]) for record in records)
    assert len(forwards[False]) == n_ended and set(forwards[False]) == {1}
    assert len(forwards[True]) == n_steps_ending < n_ended and sum(forwards[True]) == n_ended
    # Same values up to float32 rounding: batched pairs are padded to the longest of their batch.
    np.testing.assert_allclose(rewards[True], rewards[False], rtol=0, atol=1e-5)
    assert np.abs(np.asarray(rewards[True])).max() > 1e-3


def test_human_reward_gets_the_episodes_of_a_step_together(tiny_lm, tmp_path):
    from sb3_textrl.feedback import FeedbackStore

    db = tmp_path / "live.db"
    reward = HumanReward(db, timeout_s=0.0, neutral_reward=0.25)  # nobody rates: every episode gets the neutral 0.25
    env = make_text_vec_env(toy_factory(tiny_lm, reward=reward), n_envs=3, seed=0)
    records = roll(env, 15)
    ended = [e for record in records for e in record["ended"].values()]
    assert len(ended) >= 3 and all(e["task_reward"] == 0.25 for e in ended)
    assert reward.n_unrated == len(ended)
    with FeedbackStore(db) as store:  # every episode waits for a rating, as without batching
        assert store.progress("nobody")[1] == len(ended)
    reward.close()


# -- errors ----------------------------------------------------------------------------------------------------------


def failing_reward(prompts, completions, references):
    raise KeyError("no rater for this prompt")


@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_reward_errors_name_the_task_and_keep_the_message(tiny_lm, vec_env_cls):
    env = make_text_vec_env(toy_factory(tiny_lm, reward=failing_reward, stop_token_ids=[0]), n_envs=2,
                            vec_env_cls=vec_env_cls, vec_env_kwargs=FORK.get(vec_env_cls))
    env.reset()
    for _ in range(MAX_NEW - 1):
        env.step(np.array([11, 12]))
    with pytest.raises(KeyError, match=r"Reward 'failing_reward' for task 'Batched-v0' raised KeyError while scoring "
                                       r"2 completion\(s\): 'no rater for this prompt'") as caught:
        env.step(np.array([11, 12]))
    assert "env(s) [0, 1]" in "".join(getattr(caught.value, "__notes__", []))
    assert isinstance(caught.value.__cause__, KeyError)
    env.close()

    bad = make_text_vec_env(toy_factory(tiny_lm, reward=lambda p, c, r: [math.nan] * len(c), stop_token_ids=[0]),
                            n_envs=2)
    bad.reset()
    for _ in range(MAX_NEW - 1):
        bad.step(np.array([11, 12]))
    with pytest.raises(ValueError, match=r"Reward '<lambda>' for task 'Batched-v0' returned 2 NaN/inf"):
        bad.step(np.array([11, 12]))


def test_per_episode_errors_name_the_task_too(tiny_lm):
    env = gym.make("BatchedErr-v0") if "BatchedErr-v0" in gym.registry else None
    if env is None:
        register_text_task("BatchedErr-v0", prompts=PROMPTS, reward=failing_reward, tokenizer=tiny_lm, max_new_tokens=1,
                           max_prompt_tokens=16)
        env = gym.make("BatchedErr-v0")
    env.reset(seed=0)
    with pytest.raises(KeyError, match=r"for task 'BatchedErr-v0' raised KeyError .*'no rater for this prompt'"):
        env.step(11)


class PerBatchNormalised(CountingReward):
    """A reward that centres its values within each call: batching would change them, so it opts out."""

    batched_scoring = False

    def score(self, prompts, completions, references):
        values = np.asarray(super().score(prompts, completions, references))
        return values - values.mean()


def test_rewards_that_opt_out_stay_per_episode_and_wrong_wrappers_are_refused(tiny_lm):
    env = make_text_vec_env(toy_factory(tiny_lm, reward=PerBatchNormalised()), n_envs=2)
    assert not isinstance(env, BatchedRewardVecEnv)
    with pytest.raises(ValueError, match="declares batched_scoring=False"):
        BatchedRewardVecEnv(env)
    plain = make_vec_env(toy_factory(tiny_lm), n_envs=2)
    with pytest.raises(ValueError, match=r"the reward given to BatchedRewardVecEnv is 'rouge1', but the envs' reward is "
                                         r"'shout'"):
        from sb3_textrl import RougeReward

        BatchedRewardVecEnv(plain, RougeReward())
    mixed = DummyVecEnv([toy_factory(tiny_lm), toy_factory(tiny_lm, task_id="Other-v0")])
    with pytest.raises(ValueError, match="the envs hold different tasks or rewards"):
        BatchedRewardVecEnv(mixed)
    with pytest.raises(TypeError, match="needs a VecEnv of text envs"):
        BatchedRewardVecEnv(DummyVecEnv([lambda: gym.make("CartPole-v1")]))


def test_benchmark_runs_in_quick_mode(capsys):
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reward_batching.py"
    module = runpy.run_path(str(script))
    results = module["main"](["--tiny", "--rounds", "1", "--new-tokens", "4", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "load average" in printed and "per-episode" in printed and "ratio" in printed
    assert [r["n_envs"] for r in results] == [8, 64]
    # The two ways scored the same episodes to the same values, and batching made fewer forwards.
    assert all(r["max_abs_diff"] < 1e-4 and r["batched_forwards"] < r["per_episode_forwards"] for r in results)
