"""Candidates for rating (``sample``) and the live human reward, driven by a scripted rater on a real SQLite store."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import numpy as np
import pytest

from sb3_textrl import register_text_task
from sb3_textrl.feedback import FeedbackStore, PreferencePair
from sb3_textrl.feedback.views import item_view
from sb3_textrl.rewards.human import HumanReward, rating_to_reward
from sb3_textrl.sampling import CandidateSource, DecodingSettings, pick_prompts, sample_for_rating
from tests.helpers import PROMPTS, shout, toy_ppo, toy_vec_env


def upper_share_rating(text: str) -> int:
    """The scripted rater's rule: 1 for no upper-case letters, 5 for all upper case."""
    return 1 + round(4 * shout([""], [text], [None])[0])


class ScriptedRater(threading.Thread):
    """Rates every pending single item in the store, as a person on the rating page would."""

    def __init__(self, db, name: str = "script", delay_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.db, self.name_, self.delay_s = db, name, delay_s
        self.stop = threading.Event()
        self.rated: dict[int, int] = {}

    def run(self) -> None:
        with FeedbackStore(self.db) as store:
            while not self.stop.is_set():
                item = store.next_item(self.name_)
                if item is None or item["kind"] != "single":
                    time.sleep(0.01)
                    continue
                time.sleep(self.delay_s)
                candidate = item["candidates"][0]
                score = upper_share_rating(candidate["text"])
                store.record_rating(candidate["id"], self.name_, score)
                self.rated[candidate["id"]] = score


def test_decoding_settings_round_trip():
    settings = DecodingSettings.parse("sample:temperature=0.7,top_k=50,top_p=0.9")
    assert settings == DecodingSettings(greedy=False, temperature=0.7, top_k=50, top_p=0.9)
    assert DecodingSettings.parse(settings.describe()) == settings
    assert DecodingSettings.parse("greedy").greedy
    with pytest.raises(ValueError, match="unknown option"):
        DecodingSettings.parse("sample:temp=0.7")
    with pytest.raises(ValueError, match="greedy"):
        DecodingSettings.parse("beam")


def test_pick_prompts_is_seeded_and_checked():
    assert pick_prompts(10, 4, seed=1) == pick_prompts(10, 4, seed=1)
    assert len(set(pick_prompts(10, 10, seed=0))) == 10
    with pytest.raises(ValueError, match="only 3"):
        pick_prompts(3, 5, seed=0)


def test_sample_stores_two_candidates_per_prompt(tmp_path, tiny_lm):
    task = "SampleToy-v0"
    register_text_task(task, prompts=PROMPTS, reward=shout, tokenizer=tiny_lm, max_new_tokens=5,
                              max_prompt_tokens=16)
    db = tmp_path / "feedback.db"
    pair_ids = sample_for_rating(
        db, task=task, n_prompts=3, source_a=CandidateSource(tiny_lm), n_envs=2, device="cpu", progress_bar=False,
        source_b=CandidateSource(tiny_lm, DecodingSettings(greedy=False, temperature=1.5)),
    )
    assert len(pair_ids) == 3
    with FeedbackStore(db) as store:
        assert store.progress("alice") == (0, 3)
        item = store.next_item("alice")
        assert item["kind"] == "pair"
        assert item["prompt"] in PROMPTS
        texts = [c["text"] for c in item["candidates"]]
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def shown_pairs(db) -> list[list[tuple[str, str, str]]]:
    """Each pair's candidates in the order the raters see them: (source, decoding, text) of A, then of B."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT a.settings, a.text, b.settings, b.text FROM items i JOIN candidates a ON a.id = i.candidate_a "
            "JOIN candidates b ON b.id = i.candidate_b WHERE i.kind = 'pair' ORDER BY i.id"
        ).fetchall()
    finally:
        con.close()
    return [[(json.loads(s)["source"], json.loads(s)["decoding"], t) for s, t in ((sa, ta), (sb, tb))]
            for sa, ta, sb, tb in rows]


def test_greedy_candidates_are_reproducible(tmp_path, tiny_lm):
    task = "SampleToy2-v0"
    register_text_task(task, prompts=PROMPTS, reward=shout, tokenizer=tiny_lm, max_new_tokens=5,
                              max_prompt_tokens=16)
    texts = []
    for name in ("a.db", "b.db"):
        sample_for_rating(tmp_path / name, task=task, n_prompts=2, source_a=CandidateSource(tiny_lm), n_envs=2,
                          device="cpu", progress_bar=False)
        greedy = [text for pair in shown_pairs(tmp_path / name) for source, _, text in pair if source == "a"]
        texts.append(greedy)
    assert texts[0] == texts[1]


def test_pairs_show_the_sources_in_a_seeded_random_order(tmp_path, tiny_lm):
    """Every pair used to show source a (greedy) as A: a position bias that went straight into the reward model."""
    task = "SampleToyOrder-v0"
    register_text_task(task, prompts=PROMPTS, reward=shout, tokenizer=tiny_lm, max_new_tokens=5,
                              max_prompt_tokens=16)
    runs, pair_ids = {}, {}
    for name, seed in (("a.db", 0), ("b.db", 0), ("c.db", 1)):
        pair_ids[name] = sample_for_rating(tmp_path / name, task=task, n_prompts=5, source_a=CandidateSource(tiny_lm),
                                           n_envs=2, seed=seed, device="cpu", progress_bar=False)
        runs[name] = shown_pairs(tmp_path / name)
    first_shown = {name: [pair[0][0] for pair in pairs] for name, pairs in runs.items()}
    assert set(first_shown["a.db"]) == {"a", "b"}  # both orders occur
    assert first_shown["a.db"].count("b") in (2, 3)  # about half of the pairs swapped
    assert first_shown["a.db"] == first_shown["b.db"]  # deterministic for a seed
    assert first_shown["a.db"] != first_shown["c.db"]  # and drawn again for another
    made = [("a", "greedy"), ("b", "sample:temperature=1.0")]
    for pairs in runs.values():  # whatever the order, each candidate knows its source and how it was made
        assert all(sorted((source, decoding) for source, decoding, _ in pair) == made for pair in pairs)

    db = tmp_path / "a.db"
    swapped = first_shown["a.db"].index("b")
    (_, _, sampled_text), (_, _, greedy_text) = runs["a.db"][swapped]
    assert sampled_text != greedy_text
    with FeedbackStore(db) as store:
        pair_id = pair_ids["a.db"][swapped]
        view = item_view(store.item(pair_id))
        assert (view["text_a"], view["text_b"]) == (sampled_text, greedy_text)  # the raters see source b as A
        store.record_preference(pair_id, "ann", "A")
        [pair] = store.preference_pairs()
    assert pair == PreferencePair(pair.prompt, chosen=sampled_text, rejected=greedy_text)


def test_rating_to_reward_scale():
    assert [rating_to_reward(s) for s in (1, 3, 5)] == [-1.0, 0.0, 1.0]


def test_human_reward_uses_the_ratings(tmp_path):
    db = tmp_path / "live.db"
    rater = ScriptedRater(db)
    reward = HumanReward(db, timeout_s=30, poll_interval_s=0.01)
    reward._open_store()  # create the schema before the rater thread opens the file
    rater.start()
    completions = ["all lower", "MIXED case", "ALL UPPER"]
    scores = reward(["p1", "p2", "p1"], completions, [None] * 3)
    rater.stop.set()
    expected = [rating_to_reward(upper_share_rating(c)) for c in completions]
    np.testing.assert_allclose(scores, expected)
    assert reward.n_rated == 3 and reward.n_unrated == 0
    # Two completions of the same prompt share a prompt row, so their ratings pair up as reward-model data.
    with FeedbackStore(db) as store:
        pairs = store.preference_pairs()
    assert [(p.chosen, p.rejected) for p in pairs] == [("ALL UPPER", "all lower")]
    reward.close()


def test_human_reward_unrated_policies(tmp_path):
    db = tmp_path / "nobody.db"
    neutral = HumanReward(db, timeout_s=0.05, poll_interval_s=0.01, neutral_reward=-0.25)
    np.testing.assert_allclose(neutral(["p"], ["c"], [None]), [-0.25])
    assert neutral.n_unrated == 1
    fallback = HumanReward(db, timeout_s=0.05, poll_interval_s=0.01, unrated="fallback", fallback=shout)
    np.testing.assert_allclose(fallback(["p", "q"], ["abc", "ABC"], [None, None]), [0.0, 1.0])
    strict = HumanReward(db, timeout_s=0.0, unrated="error")
    with pytest.raises(TimeoutError, match="sb3-textrl rate --db"):
        strict(["p"], ["c"], [None])
    with pytest.raises(ValueError, match="fallback reward"):
        HumanReward(db, unrated="fallback")
    with pytest.raises(ValueError, match="neutral"):
        HumanReward(db, unrated="maybe")
    # The unrated requests stay open: a rater can still judge them, and the ratings are kept.
    with FeedbackStore(db) as store:
        assert store.progress("late")[1] == 4
    for reward in (neutral, fallback, strict):
        reward.close()


def test_ppo_with_a_scripted_human_rater(tmp_path, tiny_lm):
    """PPO's rollouts are rated live by the scripted rater; the env's task reward is the mapped rating."""
    db = tmp_path / "ppo.db"
    reward = HumanReward(db, timeout_s=60, poll_interval_s=0.01)
    reward._open_store()
    rater = ScriptedRater(db)
    rater.start()
    task = "HumanToy-v0"
    register_text_task(task, prompts=PROMPTS, reward=reward, tokenizer=tiny_lm, max_new_tokens=4,
                              max_prompt_tokens=16)
    env = toy_vec_env(task, n_envs=2)
    model = toy_ppo(env, tiny_lm, n_steps=8)
    model.learn(16)
    rater.stop.set()
    rater.join(timeout=5)
    assert len(rater.rated) >= 4  # 2 envs x 16 steps / 4 tokens per episode
    # The envs share the reward object (gym.make's deepcopy of registered kwargs keeps TextRewards shared).
    assert reward.n_rated == len(rater.rated) and reward.n_unrated == 0
    with FeedbackStore(tmp_path / "ppo.db") as store:
        done, total = store.progress("script")
    assert done == total == len(rater.rated)
