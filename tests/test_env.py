"""TextGenerationEnv built directly: Gymnasium/SB3 API conformance, observation layout, episodes, prompt order, errors."""

from __future__ import annotations

import copy
import logging
import math
import warnings

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from sb3_textrl import TextGenerationEnv, TextObservationSpace, TextPrompt
from sb3_textrl.envs import text_env as text_env_module
from sb3_textrl.envs.text_env import tokenizer_fingerprint

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a small village,",
    "Breaking news: the city council",
    "My favourite recipe starts with",
    "In the year 2050 people will",
    "Dear diary, today",
    "The weather in spring is",
    "A list of prime numbers:",
]
MAX_PROMPT = 12
MAX_NEW = 4


def char_count(prompts, completions, references):
    """Reward: number of characters in the completion, plus 0.5 (so an empty completion still pays a non-zero value)."""
    return [len(c) + 0.5 for c in completions]


def make_env(tokenizer, prompts=PROMPTS, reward=char_count, **kwargs) -> TextGenerationEnv:
    kwargs = dict(max_new_tokens=MAX_NEW, max_prompt_tokens=MAX_PROMPT, task_id="EnvTest-v0") | kwargs
    return TextGenerationEnv(prompts, reward, tokenizer, **kwargs)


def token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text)
    assert len(ids) == 1, f"{text!r} is not a single GPT-2 token: {ids}"
    return ids[0]


def run_episode(env: TextGenerationEnv, actions: list[int]):
    """Step through ``actions``; return the list of (reward, terminated, truncated, info) and the last observation."""
    steps, obs = [], None
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        steps.append((reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return steps, obs


@pytest.fixture
def fresh_log_once(monkeypatch):
    """Forget the messages log_once already logged in this process, so each test sees its own."""
    monkeypatch.setattr(text_env_module, "_already_logged", set())


# -- API conformance ---------------------------------------------------------------------------------------------


def test_sb3_check_env_passes_without_warnings(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env, warn=True)
    assert [str(w.message) for w in caught] == []


def test_gymnasium_check_env_passes_without_warnings(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Render modes are checked through a spec (gym.make) in test_registry.py; a bare env has none
        gym_check_env(env, skip_render_check=True)
    assert [str(w.message) for w in caught] == []


def test_spaces(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer, tokenizer_name="gpt2-test")
    assert env.action_space == spaces.Discrete(len(gpt2_tokenizer))
    assert env.action_space.n == 50257
    space = env.observation_space
    assert isinstance(space, TextObservationSpace)
    assert set(space.spaces) == {"input_ids", "attention_mask"}
    for key, high in (("input_ids", len(gpt2_tokenizer) - 1), ("attention_mask", 1)):
        sub = space[key]
        # An integer Box, never MultiDiscrete (SB3 would one-hot encode it: a 50257-wide float per token)
        assert isinstance(sub, spaces.Box) and not isinstance(sub, spaces.MultiDiscrete)
        assert np.issubdtype(sub.dtype, np.integer)
        assert sub.shape == (MAX_PROMPT + MAX_NEW,)
        assert (sub.low == 0).all() and (sub.high == high).all()
    assert (space.vocab_size, space.max_prompt_tokens, space.max_new_tokens) == (50257, MAX_PROMPT, MAX_NEW)
    assert space.tokenizer_name == "gpt2-test"
    assert space.tokenizer_hash == tokenizer_fingerprint(gpt2_tokenizer)
    assert len(space.tokenizer_hash) == 16


def test_tokenizer_fingerprint_tells_vocabularies_apart(gpt2_tokenizer):
    other = copy.deepcopy(gpt2_tokenizer)
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(gpt2_tokenizer)
    other.add_tokens(["<|new_token|>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(gpt2_tokenizer)


# -- observation layout -----------------------------------------------------------------------------------------


def test_observation_layout(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer)
    prompt_ids = gpt2_tokenizer.encode(PROMPTS[1])
    k = len(prompt_ids)
    assert 0 < k < MAX_PROMPT
    obs, info = env.reset(seed=0, options={"prompt_index": 1})
    assert info == {"prompt": PROMPTS[1], "prompt_index": 1}
    assert env.observation_space.contains(obs)
    assert obs["input_ids"].dtype == np.int64 and obs["attention_mask"].dtype == np.int64
    # Left padding: zeros, then the prompt ending exactly at column max_prompt_tokens; nothing generated yet
    np.testing.assert_array_equal(obs["input_ids"][MAX_PROMPT - k : MAX_PROMPT], prompt_ids)
    np.testing.assert_array_equal(obs["attention_mask"], [0] * (MAX_PROMPT - k) + [1] * k + [0] * MAX_NEW)
    assert (obs["input_ids"][: MAX_PROMPT - k] == 0).all() and (obs["input_ids"][MAX_PROMPT:] == 0).all()

    generated = [token(gpt2_tokenizer, t) for t in (" over", " the", " lazy")]
    for n, action in enumerate(generated, start=1):
        obs, *_ = env.step(action)
        assert env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs["input_ids"][MAX_PROMPT - k : MAX_PROMPT], prompt_ids)
        np.testing.assert_array_equal(obs["input_ids"][MAX_PROMPT : MAX_PROMPT + n], generated[:n])
        mask = obs["attention_mask"]
        np.testing.assert_array_equal(mask, [0] * (MAX_PROMPT - k) + [1] * (k + n) + [0] * (MAX_NEW - n))
        valid = np.flatnonzero(mask)
        assert (np.diff(valid) == 1).all()  # contiguous


def test_observations_are_copies(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer)
    obs0, _ = env.reset(seed=0, options={"prompt_index": 0})
    before = {k: v.copy() for k, v in obs0.items()}
    env.step(token(gpt2_tokenizer, " jumps"))
    for key in before:
        np.testing.assert_array_equal(obs0[key], before[key])


def test_prompt_longer_than_budget_fills_prompt_region(gpt2_tokenizer, fresh_log_once):
    long_prompt = " ".join(["word"] * 40)
    env = make_env(gpt2_tokenizer, prompts=[long_prompt])
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs["input_ids"][:MAX_PROMPT], gpt2_tokenizer.encode(long_prompt)[-MAX_PROMPT:])
    assert obs["attention_mask"][:MAX_PROMPT].all() and not obs["attention_mask"][MAX_PROMPT:].any()


# -- episodes ---------------------------------------------------------------------------------------------------


def test_episode_terminates_at_stop_token(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer, max_new_tokens=8)
    env.reset(seed=0, options={"prompt_index": 0})
    actions = [token(gpt2_tokenizer, " jumps"), token(gpt2_tokenizer, " high"), gpt2_tokenizer.eos_token_id]
    steps, obs = run_episode(env, actions)
    assert len(steps) == 3
    for reward, terminated, truncated, info in steps[:-1]:
        assert (reward, terminated, truncated, info) == (0.0, False, False, {})
    reward, terminated, truncated, info = steps[-1]
    assert terminated is True and truncated is False
    assert info["completion"] == " jumps high"  # the stop token is not part of the completion
    assert reward == len(" jumps high") + 0.5
    assert info["task_reward"] == reward
    assert info["reward_parts"] == {"char_count": reward}
    assert info["completion_tokens"] == 3
    assert info["ended_by_stop_token"] is True
    assert info["prompt"] == PROMPTS[0] and info["prompt_index"] == 0 and info["reference"] is None
    # The stop token is still in the observation (the policy produced it)
    assert obs["input_ids"][MAX_PROMPT + 2] == gpt2_tokenizer.eos_token_id


def test_episode_truncates_at_max_new_tokens(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer, max_new_tokens=3)
    env.reset(seed=0, options={"prompt_index": 2})
    words = [" met", " on", " Monday"]
    steps, obs = run_episode(env, [token(gpt2_tokenizer, w) for w in words])
    assert [s[1:3] for s in steps] == [(False, False), (False, False), (False, True)]
    assert [s[0] for s in steps[:-1]] == [0.0, 0.0]
    reward, _, _, info = steps[-1]
    assert info["completion"] == "".join(words)
    assert reward == len("".join(words)) + 0.5
    assert info["completion_tokens"] == 3 and info["ended_by_stop_token"] is False
    assert obs["attention_mask"].sum() == len(gpt2_tokenizer.encode(PROMPTS[2])) + 3


def test_custom_stop_token_is_excluded_from_completion(gpt2_tokenizer):
    # A stop token that is an ordinary token: skip_special_tokens would not remove it, the env must
    period = token(gpt2_tokenizer, ".")
    env = make_env(gpt2_tokenizer, stop_token_ids=[period], max_new_tokens=8)
    assert env.stop_token_ids == {period}
    env.reset(seed=0, options={"prompt_index": 0})
    steps, _ = run_episode(env, [token(gpt2_tokenizer, " Hello"), period])
    reward, terminated, truncated, info = steps[-1]
    assert terminated and not truncated
    assert info["completion"] == " Hello"
    assert reward == len(" Hello") + 0.5
    # EOS is no longer a stop token: it is an ordinary (special) token then
    env.reset(seed=0, options={"prompt_index": 0})
    _, _, terminated, truncated, _ = env.step(gpt2_tokenizer.eos_token_id)
    assert not terminated and not truncated


def test_default_stop_tokens_include_end_of_turn_for_chat_tokenizers(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer)
    assert env.stop_token_ids == {gpt2_tokenizer.eos_token_id}
    chat = copy.deepcopy(gpt2_tokenizer)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    end_of_turn = chat.convert_tokens_to_ids("<|im_end|>")
    env = make_env(chat)
    assert env.action_space.n == len(chat) == 50259
    assert env.stop_token_ids == {chat.eos_token_id, end_of_turn}
    env.reset(seed=0, options={"prompt_index": 0})
    _, _, terminated, _, info = env.step(end_of_turn)
    assert terminated and info["completion"] == ""


def test_reward_receives_prompt_completion_and_reference(gpt2_tokenizer):
    calls = []

    def recording(prompts, completions, references):
        calls.append((list(prompts), list(completions), list(references)))
        return [7.25]

    prompts = [TextPrompt("Translate: chat", reference="cat", meta={"id": 3}), "Plain prompt"]
    env = make_env(gpt2_tokenizer, prompts=prompts, reward=recording, max_new_tokens=2)
    assert env.prompts[1] == TextPrompt("Plain prompt")
    env.reset(seed=0, options={"prompt_index": 0})
    steps, _ = run_episode(env, [token(gpt2_tokenizer, " cat"), token(gpt2_tokenizer, " dog")])
    assert calls == [(["Translate: chat"], [" cat dog"], ["cat"])]  # called once, at the end
    reward, _, truncated, info = steps[-1]
    assert truncated and reward == 7.25
    assert info["reference"] == "cat"
    assert info["reward_parts"] == {"recording": 7.25}


# -- prompt order -----------------------------------------------------------------------------------------------


def prompt_sequence(env: TextGenerationEnv, seed: int, n: int) -> list[int]:
    sequence = [env.reset(seed=seed)[1]["prompt_index"]]
    sequence += [env.reset()[1]["prompt_index"] for _ in range(n - 1)]
    return sequence


def test_seeded_prompt_order_is_reproducible_and_covers_every_prompt(gpt2_tokenizer):
    n = len(PROMPTS)
    env = make_env(gpt2_tokenizer)
    first = prompt_sequence(env, seed=1, n=3 * n)
    # Each pass visits every prompt exactly once
    for start in range(0, 3 * n, n):
        assert sorted(first[start : start + n]) == list(range(n))
    # Same seed: same order, on another env and on the same env reseeded mid-pass
    assert prompt_sequence(make_env(gpt2_tokenizer), seed=1, n=3 * n) == first
    env.reset()
    assert prompt_sequence(env, seed=1, n=3 * n) == first
    # Different seeds: different orders (fixed seeds, so this is deterministic)
    others = [prompt_sequence(env, seed=s, n=3 * n) for s in (2, 3, 4)]
    assert all(other != first for other in others)
    # The passes are shuffled afresh, not one permutation repeated
    assert first[:n] != first[n : 2 * n] or first[n : 2 * n] != first[2 * n :]


def test_reset_with_prompt_index(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer)
    for index in (5, 0, 7, 5):
        obs, info = env.reset(options={"prompt_index": index})
        assert info["prompt_index"] == index and info["prompt"] == PROMPTS[index]
        k = len(gpt2_tokenizer.encode(PROMPTS[index]))
        np.testing.assert_array_equal(obs["input_ids"][MAX_PROMPT - k : MAX_PROMPT], gpt2_tokenizer.encode(PROMPTS[index]))
        assert obs["attention_mask"].sum() == k
    # numpy integers work too; an out-of-range index is refused with the valid range
    assert env.reset(options={"prompt_index": np.int64(3)})[1]["prompt_index"] == 3
    for bad in (len(PROMPTS), -1):
        with pytest.raises(IndexError, match=r"EnvTest-v0.*prompt_index .* out of range \[0, 8\)"):
            env.reset(options={"prompt_index": bad})


def test_prompt_index_does_not_disturb_the_seeded_order(gpt2_tokenizer):
    n = len(PROMPTS)
    plain = prompt_sequence(make_env(gpt2_tokenizer), seed=5, n=n)
    env = make_env(gpt2_tokenizer)
    mixed = [env.reset(seed=5)[1]["prompt_index"]]
    env.reset(options={"prompt_index": 0})
    mixed += [env.reset()[1]["prompt_index"] for _ in range(n - 1)]
    assert mixed == plain


# -- prompt truncation ------------------------------------------------------------------------------------------


def test_long_prompts_are_truncated_and_logged_once(gpt2_tokenizer, caplog, fresh_log_once):
    caplog.set_level(logging.WARNING, logger="sb3_textrl")
    long_a = "alpha " * 30 + "the end of A"
    long_b = "beta " * 20 + "the end of B"
    prompts = [long_a, "short one", long_b]
    for _ in range(3):  # e.g. the envs of a VecEnv: one message, not one per env
        env = make_env(gpt2_tokenizer, prompts=prompts, task_id="LongPrompts-v0")
    messages = [r.getMessage() for r in caplog.records if r.name == "sb3_textrl"]
    assert len(messages) == 1, messages
    assert "LongPrompts-v0" in messages[0]
    assert f"2 of 3 prompts are longer than max_prompt_tokens={MAX_PROMPT}" in messages[0]
    assert caplog.records[0].levelno == logging.WARNING
    # Truncation keeps the end of the prompt (where the instruction/cue for the completion is)
    for i, text in enumerate(prompts):
        np.testing.assert_array_equal(env.prompt_ids[i], gpt2_tokenizer.encode(text)[-MAX_PROMPT:])
    assert [len(ids) for ids in env.prompt_ids] == [MAX_PROMPT, len(gpt2_tokenizer.encode("short one")), MAX_PROMPT]


def test_prompts_that_fit_are_not_logged(gpt2_tokenizer, caplog, fresh_log_once):
    caplog.set_level(logging.WARNING, logger="sb3_textrl")
    make_env(gpt2_tokenizer, task_id="FitPrompts-v0")
    assert [r for r in caplog.records if r.name == "sb3_textrl"] == []


# -- errors -----------------------------------------------------------------------------------------------------


def test_constructor_errors(gpt2_tokenizer):
    with pytest.raises(ValueError, match="EnvTest-v0: the task has no prompts"):
        make_env(gpt2_tokenizer, prompts=[])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        make_env(gpt2_tokenizer, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_prompt_tokens must be >= 1, got 0"):
        make_env(gpt2_tokenizer, max_prompt_tokens=0)
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty after tokenization"):
        make_env(gpt2_tokenizer, prompts=["fine", ""])
    with pytest.raises(ValueError, match="no EOS token"):
        make_env(gpt2_tokenizer, stop_token_ids=[])


@pytest.mark.parametrize("action", [50257, -1, 10**9])
def test_action_outside_vocabulary(gpt2_tokenizer, action):
    env = make_env(gpt2_tokenizer)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=rf"EnvTest-v0: action {action} is not a token id in \[0, 50257\)"):
        env.step(action)
    # The refused action left the episode untouched
    obs, *_ = env.step(np.int64(11))
    assert obs["input_ids"][MAX_PROMPT] == 11 and obs["attention_mask"][MAX_PROMPT + 1] == 0


def test_array_actions_are_accepted(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer)
    env.reset(seed=0)
    obs, *_ = env.step(np.array(42))
    obs, *_ = env.step(np.array([43]))
    assert list(obs["input_ids"][MAX_PROMPT : MAX_PROMPT + 2]) == [42, 43]


def test_step_after_the_end_or_before_reset(gpt2_tokenizer):
    env = make_env(gpt2_tokenizer, max_new_tokens=3)
    with pytest.raises(RuntimeError, match="EnvTest-v0: step.. called before reset.. or after the episode ended"):
        env.step(11)
    # After truncation
    env.reset(seed=0)
    run_episode(env, [11, 12, 13])
    with pytest.raises(RuntimeError, match="after the episode ended; call reset"):
        env.step(14)
    # After a stop token, before max_new_tokens
    env.reset(seed=0)
    _, _, terminated, _, _ = env.step(gpt2_tokenizer.eos_token_id)
    assert terminated
    with pytest.raises(RuntimeError, match="after the episode ended; call reset"):
        env.step(11)
    # reset() starts a fresh episode
    obs, _ = env.reset(seed=0)
    assert not obs["attention_mask"][MAX_PROMPT:].any()
    _, reward, terminated, truncated, _ = env.step(11)
    assert (reward, terminated, truncated) == (0.0, False, False)


@pytest.mark.parametrize(
    ("bad_reward", "match"),
    [
        (lambda p, c, r: [math.nan], r"Reward '<lambda>' for task 'BadReward-v0' returned 1 NaN/inf"),
        (lambda p, c, r: [math.inf], r"for task 'BadReward-v0' returned 1 NaN/inf"),
        (lambda p, c, r: [1.0, 2.0], r"for task 'BadReward-v0' returned 2 values for 1 completions"),
        (lambda p, c, r: [], r"for task 'BadReward-v0' returned 0 values for 1 completions"),
        (lambda p, c, r: 1.0, r"for task 'BadReward-v0' returned a single value"),
        (lambda p, c, r: ["high"], r"for task 'BadReward-v0' returned 1 non-numeric"),
    ],
)
def test_bad_reward_values_name_the_task(gpt2_tokenizer, bad_reward, match):
    env = make_env(gpt2_tokenizer, reward=bad_reward, task_id="BadReward-v0", max_new_tokens=2)
    env.reset(seed=0)
    env.step(11)  # non-final steps do not call the reward
    with pytest.raises(ValueError, match=match):
        env.step(12)


# -- render -----------------------------------------------------------------------------------------------------


def test_render_modes(gpt2_tokenizer, capsys):
    assert TextGenerationEnv.metadata["render_modes"] == ["ansi", "human"]
    env = make_env(gpt2_tokenizer, render_mode="ansi")
    env.reset(seed=0, options={"prompt_index": 0})
    assert env.render() == "The quick brown fox[]"
    env.step(token(gpt2_tokenizer, " jumps"))
    assert env.render() == "The quick brown fox[ jumps]"

    env = make_env(gpt2_tokenizer, render_mode="human")
    env.reset(seed=0, options={"prompt_index": 0})
    env.step(token(gpt2_tokenizer, " runs"))
    assert env.render() is None
    assert capsys.readouterr().out == "The quick brown fox[ runs]\n"

    # A TypeError (not ValueError): SB3's make_vec_env asks for "rgb_array" and retries without it on TypeError
    for mode in ("rgb_array", "text"):
        with pytest.raises(TypeError, match=rf"EnvTest-v0: render_mode must be one of \['ansi', 'human'\], got '{mode}'"):
            make_env(gpt2_tokenizer, render_mode=mode)
