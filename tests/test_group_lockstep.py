"""EOS lock-step of make_group_vec_env: members that finish early wait for their group, with real envs and PPO."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from helpers import ragged_stop_ids, register_toy_task, toy_ppo
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_textrl import make_group_vec_env, register_text_task
from sb3_textrl.common.segments import flat_steps
from sb3_textrl.envs.groups import GroupLockstepVecEnv
from sb3_textrl.envs.text_env import TextObservationSpace

STOP, WORD = 0, 1000  # token ids: "!" ends a completion in the scripted tests, " Ce" does not


def characters(prompts, completions, references):
    """One point per character of the completion, plus one: every episode's return is known and positive."""
    return [1.0 + len(c) for c in completions]


@pytest.fixture(scope="module")
def scripted_task(tiny_lm):
    register_text_task("LockstepScript-v0", prompts=["Alpha beta", "Gamma", "Delta epsilon zeta"], reward=characters,
                       tokenizer=tiny_lm, max_new_tokens=4, max_prompt_tokens=8, stop_token_ids=[STOP])
    return "LockstepScript-v0"


@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_a_member_that_stops_early_waits_and_monitor_counts_only_real_episodes(scripted_task, vec_env_cls):
    kwargs = dict(start_method="fork") if vec_env_cls is SubprocVecEnv else None
    envs = make_group_vec_env(scripted_task, n_envs=2, samples_per_prompt=2, seed=0, vec_env_cls=vec_env_cls,
                              vec_env_kwargs=kwargs)
    assert isinstance(envs, GroupLockstepVecEnv)
    obs = envs.reset()
    # Per step: both envs' actions. A waiting env is given STOP: ignored (it would otherwise end an episode).
    script = [(STOP, WORD), (STOP, WORD), (STOP, STOP),  # env 0: 1 token, waits 2 steps; env 1: 3 tokens
              (WORD, STOP), (WORD, STOP), (WORD, STOP), (WORD, STOP)]  # env 1: 1 token, waits 3; env 0: 4 (truncated)
    waits, dones, episodes, observations = [], [], [], [obs]
    for actions in script:
        obs, rewards, done, infos = envs.step(np.array(actions))
        observations.append(obs)
        waits.append([bool(info.get("group_wait")) for info in infos])
        dones.append(list(done))
        episodes += [(env, info["episode"]["l"], info["episode"]["r"], info["completion_tokens"], info["task_reward"])
                     for env, info in enumerate(infos) if "episode" in info]
        assert all(r == 0 for r, w in zip(rewards, waits[-1]) if w)
    assert waits == [[False, False], [True, False], [True, False], [False, False], [False, True], [False, True],
                     [False, True]]
    assert dones == [[True, False], [False, False], [False, True], [False, True], [False, False], [False, False],
                     [True, False]]
    # Monitor saw the real episodes only: lengths are the generated tokens, returns the task rewards.
    assert [(env, length) for env, length, *_ in episodes] == [(0, 1), (1, 3), (1, 1), (0, 4)]
    assert all(length == tokens and reward == task for _, length, reward, tokens, task in episodes)
    assert envs.env_method("get_episode_lengths") == [[1, 4], [3, 1]]
    # While env 0 waits it shows its next prompt alone, the one env 1 gets when it finishes: they start together.
    ids = [o["input_ids"] for o in observations]
    masks = [o["attention_mask"] for o in observations]
    assert not masks[1][0, 8:].any() and all(np.array_equal(ids[t][0], ids[1][0]) for t in (2, 3))
    assert np.array_equal(ids[3][0], ids[3][1]) and np.array_equal(masks[3][0], masks[3][1])
    envs.close()


def test_without_lockstep_a_member_goes_on_alone(scripted_task):
    envs = make_group_vec_env(scripted_task, n_envs=2, samples_per_prompt=2, seed=0, lockstep=False)
    envs.reset()
    _, _, dones, infos = envs.step(np.array([STOP, WORD]))
    _, _, dones, infos = envs.step(np.array([STOP, WORD]))
    assert list(dones) == [True, False] and not any("group_wait" in info for info in infos)
    envs.close()


def test_lockstep_needs_the_wait_wrapper(scripted_task):
    with pytest.raises(TypeError, match="make_group_vec_env"):
        GroupLockstepVecEnv(DummyVecEnv([lambda: __import__("gymnasium").make(scripted_task)] * 2), 2)


class RecordSteps(BaseCallback):
    """Each rollout step's dones and ``group_wait`` flags, as the envs report them."""

    def __init__(self):
        super().__init__()
        self.dones, self.waits = [], []

    def _on_step(self) -> bool:
        self.dones.append(np.array(self.locals["dones"], dtype=bool))
        self.waits.append(np.array([bool(info.get("group_wait")) for info in self.locals["infos"]]))
        return True


def complete_group_steps(dones: np.ndarray, waits: np.ndarray, k: int) -> tuple[int, int]:
    """(groups, steps) of the group episodes whose every member started and ended inside the rollout."""
    n_steps, n_envs = dones.shape
    ends = [np.flatnonzero(dones[:, env]) for env in range(n_envs)]  # every env starts at step 0 (PPO's reset)
    groups = steps = 0
    for first in range(0, n_envs, k):
        members = range(first, first + k)
        for episode in range(min(len(ends[env]) for env in members)):
            groups += 1
            for env in members:
                start = 0 if episode == 0 else ends[env][episode - 1] + 1
                steps += int(ends[env][episode] - start + 1 - waits[start : ends[env][episode] + 1, env].sum())
    return groups, steps


def ppo_rollout(task: str, tiny_lm: str, lockstep: bool, train: bool = True, n_envs: int = 6, k: int = 3,
                n_steps: int = 19, **policy_kwargs):
    """One rollout of PPO's own collect_rollouts (then one train()), recording what the envs report."""
    envs = make_group_vec_env(task, n_envs=n_envs, samples_per_prompt=k, seed=0, lockstep=lockstep)
    model = toy_ppo(envs, tiny_lm, n_steps=n_steps, batch_size=32, rollout_buffer_kwargs=dict(advantage="rloo"),
                    policy_kwargs=dict(critic=False, use_lora=False, kl_coef=0.5) | policy_kwargs)
    with th.no_grad():  # move the policy off its frozen reference, so that every sampled token has a KL
        model.policy.lm.lm_head.weight.add_(0.05 * th.randn_like(model.policy.lm.lm_head.weight))
    record = RecordSteps()
    _, callback = model._setup_learn(n_steps * n_envs, callback=record)
    callback.on_training_start(locals(), globals())
    model.policy.set_training_mode(False)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=n_steps)
    prefilled = model.policy._rollout_cache.prefilled_rows  # train() resets the cache
    if train:
        model.train()
    envs.close()
    return model, np.array(record.dones), np.array(record.waits), prefilled


def test_ppo_with_stop_tokens_trains_every_completed_group(tiny_lm):
    # Every third token id stops a completion: the tiny LM's near-uniform sampling ends members at different steps.
    task = register_toy_task("LockstepPpo-v0", tiny_lm, max_new_tokens=4, stop_token_ids=ragged_stop_ids(3))
    model, dones, waits, prefilled = ppo_rollout(task, tiny_lm, lockstep=True)
    buffer, metrics = model.rollout_buffer, model.rollout_buffer.metrics
    np.testing.assert_array_equal(buffer.waits, waits)  # recognised from the observations alone, every step
    groups, steps = complete_group_steps(dones, waits, k=3)
    # Measured with these seeds: 9 complete groups, 42 waiting steps, 4 envs still waiting at the last step (read
    # from the observation after it) and one group unfinished, whose 5 steps are dropped.
    assert groups >= 4 and waits[-1].any() and not waits[-1].all()
    assert metrics["groups"] == groups and len(buffer.trained_segments) == 3 * groups  # every group whole
    assert sum(buffer.segments[i].length for i in buffer.trained_segments) == steps
    assert metrics["group_wait_steps"] == waits.sum()
    assert 0 < metrics["group_dropped_steps"] == waits.size - waits.sum() - steps  # only the groups unfinished at the end
    assert model._n_updates == 1  # PPO trained on them (one epoch)
    # Waiting steps pay no KL penalty (their sampled token is discarded) and have no advantage; real steps do.
    kl = buffer.log_probs - buffer.ref_log_probs
    assert np.abs(kl[~buffer.waits]).min() > 0 and not buffer.rewards[buffer.waits].any()
    assert not buffer.advantages[buffer.waits].any()
    # The policy's KV cache encoded each prompt once per group: never again for a waiting row or a late sibling.
    first_finishes = sum(
        int(np.any(dones[t, g : g + 3]) and not np.any(waits[t, g : g + 3])) for t in range(len(dones)) for g in (0, 3)
    )
    assert 0 < prefilled <= 2 + first_finishes < dones.sum()

    plain, _, plain_waits, plain_prefilled = ppo_rollout(task, tiny_lm, lockstep=False)
    assert not plain_waits.any()
    # Without the lock-step the members drift apart after their first episode and meet only by chance (measured: 65
    # steps dropped against 5, 20 episodes trained against 27, 23 prefill rows against 10).
    plain_buffer = plain.rollout_buffer
    assert plain_buffer.metrics["group_dropped_steps"] > metrics["group_dropped_steps"] + 40
    assert len(plain_buffer.trained_segments) < len(buffer.trained_segments) and plain_prefilled > prefilled


def test_observation_space_without_a_prompt_region_recognises_no_waits():
    from gymnasium import spaces

    from sb3_textrl import TextRolloutBuffer

    plain = spaces.Dict({key: TextObservationSpace(10, 2, 4)[key] for key in ("input_ids", "attention_mask")})
    assert TextRolloutBuffer(4, plain, spaces.Discrete(10), "cpu").prompt_width is None


@pytest.mark.parametrize("trainable_layers", [None, 1])
def test_episodes_after_waits_replay_the_rollout_log_probs(tiny_lm, trainable_layers):
    # The segments start where the waiting ended; with trainable_layers their kept hidden states come from the
    # rollout's KV cache, whose waiting rows were realigned: training must see exactly the rollout's distribution.
    task = register_toy_task(f"LockstepReplay{trainable_layers}-v0", tiny_lm, max_new_tokens=4,
                             stop_token_ids=ragged_stop_ids(3))
    model, _, waits, _ = ppo_rollout(task, tiny_lm, lockstep=True, train=False, trainable_layers=trainable_layers)
    buffer = model.rollout_buffer
    assert waits.sum() > 0 and (buffer.step_split is not None) == (trainable_layers is not None)
    chunk = buffer.segments
    with th.no_grad():
        actions = th.as_tensor(flat_steps(buffer.actions, chunk))
        _, log_prob, _ = model.policy.evaluate_actions(buffer.segment_batch(chunk), actions)
    np.testing.assert_allclose(log_prob.numpy(), flat_steps(buffer.log_probs, chunk), atol=1e-4)
