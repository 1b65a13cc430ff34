"""NewsSummary-v0 through gym.make: built-in and real data, prompt templates, truncation, rewards, data errors."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re

import gymnasium as gym
import numpy as np
import pytest

from sb3_textrl.envs import text_env as text_env_module
from sb3_textrl.envs.news import INSTRUCTION, TASK_ID, prompt_template
from sb3_textrl.envs.news_data import generate_news_examples
from sb3_textrl.rewards import RougeReward

TLDR = "\n\nTL;DR:"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def fresh_log_once(monkeypatch):
    """Forget the messages log_once already logged in this process, so each test sees its own."""
    monkeypatch.setattr(text_env_module, "_already_logged", set())


@pytest.fixture(scope="module")
def chat_tokenizer(gpt2_tokenizer):
    """A copy of the GPT-2 tokenizer with a small ChatML-style chat template."""
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_news(tokenizer, **kwargs) -> gym.Env:
    return gym.make(TASK_ID, tokenizer=tokenizer, **kwargs)


def step_text(env: gym.Env, tokenizer, text: str, stop: bool = True):
    """Generate ``text`` (then EOS) token by token; return the last step's (reward, terminated, truncated, info)."""
    actions = tokenizer.encode(text) + ([tokenizer.eos_token_id] if stop else [])
    for i, action in enumerate(actions):
        _, reward, terminated, truncated, info = env.step(action)
        if i < len(actions) - 1:
            assert (reward, terminated, truncated) == (0.0, False, False)
    return reward, terminated, truncated, info


def sb3_log_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sb3_textrl"]


def test_task_is_registered():
    assert TASK_ID in gym.registry and f"sb3_textrl/{TASK_ID}" in gym.registry


def test_builtin_data_prompts_and_references(gpt2_tokenizer, caplog, fresh_log_once):
    caplog.set_level(logging.WARNING, logger="sb3_textrl")
    env = make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=32, n_articles=40, data_seed=3)
    raw = env.unwrapped
    rows = generate_news_examples(40, seed=3)
    assert len(raw.prompts) == 40
    assert raw.task_id == TASK_ID and raw.max_new_tokens == 32 and raw.max_prompt_tokens == 512
    for prompt, row in zip(raw.prompts, rows):
        # GPT-2 has no chat template: the article followed by the TL;DR cue, whole (512 tokens is enough)
        assert prompt.text == row["article"] + TLDR
        assert prompt.reference == row["summary"]
        assert prompt.meta["article"] == row["article"]
    assert sb3_log_messages(caplog) == []  # nothing truncated
    assert isinstance(raw.reward_fn, RougeReward) and raw.reward_fn.name == "rouge1"
    assert raw.stop_token_ids == {gpt2_tokenizer.eos_token_id}


def test_default_builtin_size(gpt2_tokenizer):
    assert len(make_news(gpt2_tokenizer, max_prompt_tokens=128, max_new_tokens=8).unwrapped.prompts) == 512


def test_tokenizer_by_path(tmp_path, gpt2_tokenizer):
    gpt2_tokenizer.save_pretrained(tmp_path)
    env = make_news(str(tmp_path), max_prompt_tokens=512, max_new_tokens=8, n_articles=4)
    assert env.unwrapped.observation_space.tokenizer_name == str(tmp_path)
    assert env.unwrapped.action_space.n == len(gpt2_tokenizer)
    assert env.unwrapped.prompts[0].text.endswith(TLDR)


@pytest.mark.parametrize("metric", ["rouge1", "rougeL"])
def test_reference_completion_scores_one(gpt2_tokenizer, metric):
    kwargs = {} if metric == "rouge1" else {"reward": metric}  # rouge1 is the default
    env = make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=128, n_articles=8, **kwargs)
    raw = env.unwrapped
    assert raw.reward_fn.name == metric
    for index in (0, 5):
        env.reset(seed=0, options={"prompt_index": index})
        reference = raw.prompts[index].reference
        reward, terminated, truncated, info = step_text(env, gpt2_tokenizer, reference)
        assert terminated and not truncated
        assert info["completion"] == reference and info["reference"] == reference
        assert reward == pytest.approx(1.0)
        assert info["reward_parts"] == {metric: pytest.approx(1.0)}
    # The first half of the reference: precision 1, recall about 1/2, so an F-measure about 2/3
    env.reset(seed=0, options={"prompt_index": 0})
    words = raw.prompts[0].reference.split()
    reward, *_ = step_text(env, gpt2_tokenizer, " ".join(words[: len(words) // 2]))
    assert 0.5 < reward < 0.8
    # Unrelated words score 0
    env.reset(seed=0, options={"prompt_index": 0})
    reward, *_ = step_text(env, gpt2_tokenizer, " zzz qqq")
    assert reward == 0.0


def test_rouge1_and_rougeL_differ_on_reordered_words(gpt2_tokenizer):
    scores = {}
    for metric in ("rouge1", "rougeL"):
        env = make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=128, n_articles=2, reward=metric)
        env.reset(seed=0, options={"prompt_index": 0})
        words = env.unwrapped.prompts[0].reference.split()
        scores[metric], *_ = step_text(env, gpt2_tokenizer, " " + " ".join(reversed(words)))
    assert scores["rouge1"] == pytest.approx(1.0)  # same words
    assert scores["rougeL"] < 0.5  # out of order


def test_callable_reward(gpt2_tokenizer):
    calls = []

    def mentions_a_number(prompts, completions, references):
        calls.append((len(prompts), references[0] is not None))
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    env = make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=8, n_articles=3, reward=mentions_a_number)
    assert env.unwrapped.reward_fn is not None and not isinstance(env.unwrapped.reward_fn, RougeReward)
    env.reset(seed=0)
    reward, _, _, info = step_text(env, gpt2_tokenizer, " 42 people")
    assert reward == 1.0 and info["reward_parts"] == {"mentions_a_number": 1.0}
    assert calls == [(1, True)]


def test_reward_by_object(gpt2_tokenizer):
    reward = RougeReward("rouge2", name="r2")
    env = make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=8, n_articles=3, reward=reward)
    assert env.unwrapped.reward_fn is reward


def test_unknown_rouge_name(gpt2_tokenizer):
    with pytest.raises(ValueError, match="rouge3"):
        make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=8, n_articles=3, reward="rouge3")


def test_limit_on_builtin_data(gpt2_tokenizer):
    env = make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=8, limit=7)
    rows = generate_news_examples(7)
    assert [p.reference for p in env.unwrapped.prompts] == [r["summary"] for r in rows]
    # limit above the data size keeps all of it
    env = make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=8, n_articles=5, limit=50)
    assert len(env.unwrapped.prompts) == 5
    with pytest.raises(ValueError, match="limit must be a positive number"):
        make_news(gpt2_tokenizer, max_prompt_tokens=512, max_new_tokens=8, limit=0)


# -- real data --------------------------------------------------------------------------------------------------


def test_real_dataset_loads_and_truncates_long_articles(gpt2_tokenizer, shared_news, caplog, fresh_log_once):
    caplog.set_level(logging.WARNING, logger="sb3_textrl")
    max_prompt = 256
    env = make_news(gpt2_tokenizer, dataset=shared_news, max_prompt_tokens=max_prompt, max_new_tokens=16)
    prompts = env.unwrapped.prompts
    assert len(prompts) == 351
    with open(shared_news, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    assert [p.reference for p in prompts] == [r["summary"].strip() for r in rows]
    assert all(p.meta["article"] == r["article"].strip() for p, r in zip(prompts, rows))

    cut = [p for p in prompts if p.text != p.meta["article"] + TLDR]
    assert 0 < len(cut) < 351  # some real articles are short enough, most are not
    for p in cut:
        article = p.text[: -len(TLDR)]
        assert p.text.endswith(TLDR) and article.endswith(" ...")
        assert p.meta["article"].startswith(article[: -len(" ...")])  # a prefix of the article, cut at a token end

    # One message, with the count of truncated articles; the env itself had nothing left to truncate
    messages = sb3_log_messages(caplog)
    assert len(messages) == 1, messages
    assert re.search(rf"{TASK_ID}: {len(cut)} of 351 articles are longer than the \d+-token article budget", messages[0])
    assert f"max_prompt_tokens={max_prompt}" in messages[0]
    lengths = [len(gpt2_tokenizer(p.text)["input_ids"]) for p in prompts]
    assert max(lengths) <= max_prompt
    assert max(lengths) >= max_prompt - 8  # the budget is used, not wasted
    assert all(len(ids) == n for ids, n in zip(env.unwrapped.prompt_ids, lengths))


def test_real_dataset_limit(gpt2_tokenizer, shared_news):
    env = make_news(gpt2_tokenizer, dataset=str(shared_news), max_prompt_tokens=256, max_new_tokens=16, limit=10)
    assert len(env.unwrapped.prompts) == 10


def test_real_dataset_with_chat_template_fits_budget(chat_tokenizer, shared_news, fresh_log_once):
    max_prompt = 200
    env = make_news(chat_tokenizer, dataset=shared_news, max_prompt_tokens=max_prompt, max_new_tokens=16, limit=60)
    prompts = env.unwrapped.prompts
    lengths = [len(chat_tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert max(lengths) <= max_prompt
    assert all(len(ids) == n for ids, n in zip(env.unwrapped.prompt_ids, lengths))


# -- prompt templates -------------------------------------------------------------------------------------------


def test_prompt_template_without_chat_template(gpt2_tokenizer):
    assert not getattr(gpt2_tokenizer, "chat_template", None)
    assert prompt_template(gpt2_tokenizer) == ("", TLDR, False)


def test_prompt_template_with_chat_template(chat_tokenizer):
    prefix, suffix, templated = prompt_template(chat_tokenizer)
    assert prefix == f"<|im_start|>user\n{INSTRUCTION}\n\n"
    assert suffix == "<|im_end|>\n<|im_start|>assistant\n"
    assert templated is True


def test_news_env_follows_the_chat_template(chat_tokenizer):
    env = make_news(chat_tokenizer, max_prompt_tokens=512, max_new_tokens=8, n_articles=6)
    raw = env.unwrapped
    rows = generate_news_examples(6)
    for prompt, row in zip(raw.prompts, rows):
        assert prompt.text == f"<|im_start|>user\n{INSTRUCTION}\n\n{row['article']}<|im_end|>\n<|im_start|>assistant\n"
        assert TLDR not in prompt.text
        assert prompt.reference == row["summary"]
    # The template holds the special tokens, so the env does not add any
    obs, info = env.reset(seed=0, options={"prompt_index": 2})
    expected = chat_tokenizer(raw.prompts[2].text, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(obs["input_ids"][512 - len(expected) : 512], expected)
    assert obs["attention_mask"].sum() == len(expected)


def test_chat_template_truncation_keeps_the_template(chat_tokenizer, caplog, fresh_log_once):
    caplog.set_level(logging.WARNING, logger="sb3_textrl")
    env = make_news(chat_tokenizer, max_prompt_tokens=96, max_new_tokens=8, n_articles=10)
    prompts = env.unwrapped.prompts
    for p in prompts:
        assert p.text.startswith(f"<|im_start|>user\n{INSTRUCTION}\n\n")
        assert p.text.endswith(" ...<|im_end|>\n<|im_start|>assistant\n")
        assert len(chat_tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 96
    messages = sb3_log_messages(caplog)
    assert len(messages) == 1 and "10 of 10 articles are longer" in messages[0]


# The first 4 built-in prompts' token ids (sha256 of str(list of lists)), their lengths and the stop tokens, recorded
# before custom tasks got chat templates (issue #14): NewsSummary-v0 templates its prompts itself and must not change.
NEWS_TOKENS_BEFORE_CHAT_TASKS = {
    "embedded": ("2caf8616f9d9d1f6", [278, 222, 218, 232], [2]),
    "gpt2": ("d1cc12d03f17698f", [224, 175, 170, 188], [50256]),
    "chat": ("49a8ccdfc0ec66dd", [259, 210, 205, 223], [50256]),
}


@pytest.mark.parametrize("name", sorted(NEWS_TOKENS_BEFORE_CHAT_TASKS))
def test_news_prompt_tokens_are_unchanged(name, gpt2_tokenizer, chat_tokenizer):
    tokenizer = {"embedded": None, "gpt2": gpt2_tokenizer, "chat": chat_tokenizer}[name]
    env = make_news(tokenizer, n_articles=4).unwrapped
    ids = [env.prompt_ids[i].tolist() for i in range(4)]
    digest = hashlib.sha256(str(ids).encode()).hexdigest()[:16]
    assert (digest, [len(i) for i in ids], sorted(env.stop_token_ids)) == NEWS_TOKENS_BEFORE_CHAT_TASKS[name]
    assert all(p.templated is None and p.messages is None for p in env.prompts)


def test_budget_too_small_for_the_template(gpt2_tokenizer):
    with pytest.raises(ValueError, match=r"NewsSummary-v0: max_prompt_tokens=20 leaves \d+ tokens for the article"):
        make_news(gpt2_tokenizer, max_prompt_tokens=20, max_new_tokens=8, n_articles=2)


# -- dataset errors ---------------------------------------------------------------------------------------------


def test_dataset_without_the_needed_fields(tmp_path, gpt2_tokenizer):
    path = tmp_path / "news.jsonl"
    path.write_text(json.dumps({"title": "A headline", "body": "Some text."}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"news\.jsonl, line 1: none of the expected fields \['article'.*'title'"):
        make_news(gpt2_tokenizer, dataset=path, max_prompt_tokens=256, max_new_tokens=8)
    # Naming the fields makes it work
    env = make_news(
        gpt2_tokenizer, dataset=path, article_field="body", summary_field="title", max_prompt_tokens=256, max_new_tokens=8
    )
    assert env.unwrapped.prompts[0].text == "Some text." + TLDR
    assert env.unwrapped.prompts[0].reference == "A headline"


def test_empty_dataset_file(tmp_path, gpt2_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the dataset is empty"):
        make_news(gpt2_tokenizer, dataset=str(path), max_prompt_tokens=256, max_new_tokens=8)


def test_missing_dataset_file(tmp_path, gpt2_tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_news(gpt2_tokenizer, dataset=tmp_path / "nope.jsonl", max_prompt_tokens=256, max_new_tokens=8)


def test_envs_of_one_tokenizer_share_the_tokenization_but_not_their_prompts(gpt2_tokenizer):
    # The memo (sb3_textrl/envs/memo.py): a second env reuses the first one's token ids, and owns its objects.
    first = make_news(copy.deepcopy(gpt2_tokenizer), limit=6)
    tokenizer = first.unwrapped.tokenizer
    second = make_news(tokenizer, limit=6)
    a, b = first.unwrapped, second.unwrapped
    assert [ids.tolist() for ids in a.prompt_ids] == [ids.tolist() for ids in b.prompt_ids]
    assert a.prompt_ids[0] is not b.prompt_ids[0] and a.prompts[0] is not b.prompts[0]
    assert a.prompts[0].meta is not b.prompts[0].meta
    b.prompt_ids[0][:] = 0  # one env's arrays are its own
    assert a.prompt_ids[0].tolist() != b.prompt_ids[0].tolist()
    fingerprint = a.observation_space.tokenizer_hash
    tokenizer.add_tokens(["<brand-new-token>"])  # a longer tokenizer is fingerprinted afresh
    assert make_news(tokenizer, limit=6).unwrapped.observation_space.tokenizer_hash != fingerprint
