"""Registering text tasks: gym.make with overrides, every prompt source, errors, list_text_tasks, SB3 make_vec_env."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_util import make_vec_env

from sb3_textrl import TextGenerationEnv, TextPrompt, list_text_tasks, make_text_task_env, register_text_task
from sb3_textrl.envs import load_prompts

PROMPTS = ["The quick brown fox", "Once upon a time", "Breaking news:"]


def n_chars(prompts, completions, references):
    return [float(len(c)) for c in completions]


def constant_three(prompts, completions, references):
    return [3.0] * len(completions)


def reference_match(prompts, completions, references):
    return [float(c.strip() == (r or "")) for c, r in zip(completions, references)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, gpt2_tokenizer) -> str:
    """The GPT-2 tokenizer saved to a directory: registered tasks load it by path (and cache it)."""
    directory = tmp_path_factory.mktemp("gpt2-tokenizer")
    gpt2_tokenizer.save_pretrained(directory)
    return str(directory)


def register(task_id: str, tokenizer_dir: str, prompts=PROMPTS, reward=n_chars, **kwargs) -> str:
    kwargs = dict(max_new_tokens=5, max_prompt_tokens=16) | kwargs
    register_text_task(task_id, prompts=prompts, reward=reward, tokenizer=tokenizer_dir, **kwargs)
    return task_id


def texts(env: gym.Env) -> list[str]:
    return [p.text for p in env.unwrapped.prompts]


def references(env: gym.Env) -> list[str | None]:
    return [p.reference for p in env.unwrapped.prompts]


# -- register + gym.make ----------------------------------------------------------------------------------------


def test_register_then_make(tokenizer_dir, gpt2_tokenizer):
    task_id = register("RegMake-v0", tokenizer_dir)
    env = gym.make(task_id)
    raw = env.unwrapped
    assert isinstance(raw, TextGenerationEnv)
    assert raw.task_id == task_id and env.spec.id == task_id
    assert (raw.max_new_tokens, raw.max_prompt_tokens) == (5, 16)
    assert texts(env) == PROMPTS and references(env) == [None, None, None]
    assert raw.observation_space.tokenizer_name == tokenizer_dir
    assert raw.action_space.n == len(gpt2_tokenizer)
    obs, info = env.reset(seed=0)
    assert obs["input_ids"].shape == (21,)
    eos = gpt2_tokenizer.eos_token_id
    _, reward, terminated, _, info = env.step(gpt2_tokenizer.encode(" hi")[0])
    assert reward == 0.0 and not terminated
    _, reward, terminated, _, info = env.step(eos)
    assert terminated and reward == 3.0 and info["completion"] == " hi"


def test_make_kwargs_override_registered_ones(tokenizer_dir, gpt2_tokenizer):
    task_id = register("RegOverride-v0", tokenizer_dir, max_new_tokens=5, max_prompt_tokens=16)
    env = gym.make(task_id, max_new_tokens=2, max_prompt_tokens=3, reward=constant_three)
    raw = env.unwrapped
    assert (raw.max_new_tokens, raw.max_prompt_tokens) == (2, 3)
    assert raw.reward_fn is not n_chars and raw.reward_fn.__name__ == "constant_three"
    assert env.observation_space["input_ids"].shape == (5,)
    env.reset(seed=0, options={"prompt_index": 1})
    assert len(raw.prompt_ids[1]) == 3  # "Once upon a time" truncated to its last 3 tokens
    steps = [env.step(11), env.step(12)]
    assert [s[3] for s in steps] == [False, True]  # truncated at the overriding max_new_tokens
    assert steps[-1][1] == 3.0 and steps[-1][4]["reward_parts"] == {"constant_three": 3.0}
    # The registered defaults are untouched by the override
    default = gym.make(task_id).unwrapped
    assert (default.max_new_tokens, default.max_prompt_tokens, default.reward_fn.__name__) == (5, 16, "n_chars")


def test_make_kwargs_override_prompts_and_env_arguments(tokenizer_dir, gpt2_tokenizer):
    task_id = register("RegOverride2-v0", tokenizer_dir)
    period = gpt2_tokenizer.encode(".")[0]
    env = gym.make(task_id, prompts=["Other prompt"], stop_token_ids=[period], tokenizer=gpt2_tokenizer)
    assert texts(env) == ["Other prompt"]
    assert env.unwrapped.stop_token_ids == {period}


def test_gymnasium_check_env_with_a_spec_checks_render_modes(tokenizer_dir):
    task_id = register("RegCheck-v0", tokenizer_dir)
    env = gym.make(task_id).unwrapped
    assert env.spec is not None and env.spec.id == task_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env)  # also makes the env with render_mode="ansi" and "human" and renders
    assert [str(w.message) for w in caught] == []
    assert gym.make(task_id, render_mode="ansi").unwrapped.render_mode == "ansi"


def test_make_vec_env_with_registered_task(tokenizer_dir, gpt2_tokenizer):
    task_id = register(
        "RegVec-v0", tokenizer_dir, reward=reference_match, prompts=[{"prompt": p, "reference": "yes"} for p in PROMPTS]
    )
    # SB3 first asks for render_mode="rgb_array": the env refuses it with a TypeError, so SB3 retries without it
    with pytest.raises(TypeError, match="render_mode must be one of"):
        gym.make(task_id, render_mode="rgb_array")
    vec = make_vec_env(task_id, n_envs=2, seed=0, env_kwargs=dict(max_new_tokens=3, max_prompt_tokens=8))
    try:
        assert vec.num_envs == 2
        assert vec.get_attr("render_mode") == [None, None]
        assert vec.get_attr("max_new_tokens") == [3, 3]
        assert vec.get_attr("task_id") == [task_id, task_id]
        obs = vec.reset()
        assert obs["input_ids"].shape == (2, 11) and obs["attention_mask"].shape == (2, 11)
        assert obs["input_ids"].dtype == np.int64
        assert (obs["attention_mask"][:, :8].sum(axis=1) > 0).all() and not obs["attention_mask"][:, 8:].any()
        yes, eos = gpt2_tokenizer.encode(" yes")[0], gpt2_tokenizer.eos_token_id
        _, rewards, dones, _ = vec.step(np.array([yes, 11]))
        assert not dones.any() and (rewards == 0).all()
        _, rewards, dones, infos = vec.step(np.array([eos, 12]))
        assert dones.tolist() == [True, False]
        assert rewards[0] == 1.0 and infos[0]["completion"] == " yes" and infos[0]["reference"] == "yes"
        _, rewards, dones, infos = vec.step(np.array([13, 14]))
        assert dones.tolist() == [False, True] and rewards[1] == 0.0 and infos[1]["TimeLimit.truncated"]
    finally:
        vec.close()


# -- prompt sources ---------------------------------------------------------------------------------------------


def test_prompts_from_list_of_strings(tokenizer_dir):
    env = gym.make(register("SrcStrings-v0", tokenizer_dir, prompts=["a b", "c d"]))
    assert texts(env) == ["a b", "c d"] and references(env) == [None, None]


def test_prompts_from_dicts_with_references(tokenizer_dir):
    records = [
        {"prompt": "Capital of France?", "reference": "Paris", "id": 1},
        {"question": "Capital of Peru?", "answer": "Lima"},
        {"text": "No reference here"},
    ]
    env = gym.make(register("SrcDicts-v0", tokenizer_dir, prompts=records))
    assert texts(env) == ["Capital of France?", "Capital of Peru?", "No reference here"]
    assert references(env) == ["Paris", "Lima", None]
    assert env.unwrapped.prompts[0].meta == {"id": 1}


def test_prompts_from_callable_are_loaded_when_the_env_is_made(tokenizer_dir):
    calls = []

    def source():
        calls.append(1)
        return ["first", {"prompt": "second", "target": "2"}]

    task_id = register("SrcCallable-v0", tokenizer_dir, prompts=source)
    assert calls == []  # not at registration
    env = gym.make(task_id)
    assert len(calls) == 1
    assert texts(env) == ["first", "second"] and references(env) == [None, "2"]


def test_references_argument(tokenizer_dir):
    env = gym.make(register("SrcRefs-v0", tokenizer_dir, prompts=["p1", "p2"], references=["r1", None]))
    assert references(env) == ["r1", None]
    # references= overrides references found in the records
    env = gym.make(register("SrcRefs2-v0", tokenizer_dir, prompts=[{"prompt": "p", "reference": "old"}], references=["new"]))
    assert references(env) == ["new"]


def test_prompts_from_txt_file(tmp_path, tokenizer_dir):
    path = tmp_path / "prompts.txt"
    path.write_text("First prompt\n\n  \nSecond prompt, with a comma\nThird\n", encoding="utf-8")
    env = gym.make(register("SrcTxt-v0", tokenizer_dir, prompts=str(path)))
    assert texts(env) == ["First prompt", "Second prompt, with a comma", "Third"]
    # A Path works as well as a str
    assert texts(gym.make(register("SrcTxtPath-v0", tokenizer_dir, prompts=path))) == texts(env)


def test_prompts_from_jsonl_file(tmp_path, tokenizer_dir):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Q1", "reference": "A1"}, {"input": "Q2"}, {"prompt": "Q3", "completion": "A3", "tag": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    env = gym.make(register("SrcJsonl-v0", tokenizer_dir, prompts=str(path)))
    assert texts(env) == ["Q1", "Q2", "Q3"]
    assert references(env) == ["A1", None, "A3"]
    assert env.unwrapped.prompts[2].meta == {"tag": "x"}


def test_prompts_from_csv_file(tmp_path, tokenizer_dir):
    path = tmp_path / "prompts.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "reference"])
        writer.writeheader()
        writer.writerows([{"prompt": "Say hi, politely", "reference": "Hello"}, {"prompt": "Multi\nline", "reference": "ok"}])
    env = gym.make(register("SrcCsv-v0", tokenizer_dir, prompts=path))
    assert texts(env) == ["Say hi, politely", "Multi\nline"]
    assert references(env) == ["Hello", "ok"]


def test_load_prompts_keeps_textprompts():
    prompt = TextPrompt("already built", "ref", {"k": 1})
    assert load_prompts([prompt, "plain"]) == [prompt, TextPrompt("plain")]


# -- errors -----------------------------------------------------------------------------------------------------


def test_references_length_mismatch(tokenizer_dir):
    with pytest.raises(ValueError, match="RegMismatch-v0: 1 references for 3 prompts"):
        gym.make(register("RegMismatch-v0", tokenizer_dir, references=["only one"]))
    with pytest.raises(ValueError, match="3 references for 2 prompts"):
        load_prompts(["a", "b"], references=["x", "y", "z"])


def test_invalid_json_line_is_named(tmp_path, tokenizer_dir):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        gym.make(register("RegBadJson-v0", tokenizer_dir, prompts=str(path)))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("- a prompt\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported extension '\.yaml'; use \.txt .*\.jsonl or \.csv"):
        load_prompts(str(path))


def test_missing_file_and_bad_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"the prompt set is empty"):
        load_prompts([])
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt\).*the prompt set is empty"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match=r"MyTask, prompt 1: a prompt record needs one of the fields"):
        load_prompts(["ok", {"body": "no prompt field"}], task_id="MyTask")
    with pytest.raises(TypeError, match="prompt 0: a prompt must be a str, a conversation .* or a TextPrompt; got int"):
        load_prompts([42])


def test_unknown_task_id():
    with pytest.raises(gym.error.Error, match="NoSuchTask"):
        gym.make("NoSuchTask-v0")


def test_reward_must_be_callable(tokenizer_dir):
    with pytest.raises(TypeError, match="RegNoReward-v0: reward must be a callable"):
        register_text_task("RegNoReward-v0", prompts=PROMPTS, reward="rouge1", tokenizer=tokenizer_dir)
    assert "RegNoReward-v0" not in gym.registry and "RegNoReward-v0" not in list_text_tasks()
    task_id = register("RegRewardOverride-v0", tokenizer_dir)
    with pytest.raises(TypeError, match="reward must be a callable"):
        gym.make(task_id, reward=None)
    with pytest.raises(TypeError, match="reward must be a callable"):
        make_text_task_env(PROMPTS, 1.0, tokenizer=tokenizer_dir)


def test_tokenizer_spec_errors(gpt2_tokenizer):
    with pytest.raises(TypeError, match="tokenizer must be a name, a path or a tokenizer object, got int"):
        make_text_task_env(PROMPTS, n_chars, tokenizer=3)
    env = make_text_task_env(PROMPTS, n_chars, tokenizer=gpt2_tokenizer)
    assert env.tokenizer is gpt2_tokenizer


def test_list_text_tasks(tokenizer_dir):
    before = list_text_tasks()
    assert "NewsSummary-v0" in before and "sb3_textrl/NewsSummary-v0" in before
    assert "RegListed-v0" not in before
    register("RegListed-v0", tokenizer_dir)
    after = list_text_tasks()
    assert "RegListed-v0" in after and set(before) < set(after)
    assert after == sorted(after)
    assert all(task in gym.registry for task in after)
    # Ordinary Gymnasium envs are not text tasks
    assert "CartPole-v1" in gym.registry and "CartPole-v1" not in after


def test_registered_files_are_read_at_make_time(tmp_path, tokenizer_dir):
    path = tmp_path / "later.txt"
    path.write_text("one\n", encoding="utf-8")
    task_id = register("RegLazyFile-v0", tokenizer_dir, prompts=Path(path))
    path.write_text("one\ntwo\n", encoding="utf-8")
    assert texts(gym.make(task_id)) == ["one", "two"]
