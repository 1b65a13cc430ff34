"""Supervised fine-tuning: the loss masks the prompt, lowers held-out loss, and writes a model PPO can start from."""

from __future__ import annotations

import json
import os
import random

import gymnasium as gym
import pytest
import torch as th
from helpers import toy_ppo
from stable_baselines3.common.env_util import make_vec_env

from sb3_textrl import register_text_task
from sb3_textrl.cli import main
from sb3_textrl.models import load_causal_lm, load_tokenizer
from sb3_textrl.sft import (
    IGNORE_INDEX,
    RESULT_FILE,
    collate_sft,
    evaluate_sft_loss,
    load_sft_examples,
    news_sft_examples,
    target_nll,
    task_sft_examples,
    train_sft,
)

NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Erin", "Farah", "Gus", "Hana"]
ITEMS = ["apples", "bikes", "books", "lamps", "chairs", "kites"]
CITIES = ["Leeds", "Oslo", "Lyon", "Porto", "Kyoto"]
FAST = dict(max_prompt_tokens=64, device="cpu", progress_bar=False)


def market_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Articles whose summary restates three facts of the lead sentence in a fixed form (a learnable mapping)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item, city, count = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CITIES), rng.randint(2, 99)
        article = (
            f"On a busy morning in {city}, {name} sold {count} {item} at the market. Traders said demand was strong "
            "and prices held steady through the day."
        )
        rows.append({"article": article, "summary": f"{name} sold {count} {item} in {city}."})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def full_sft(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "model"
    result = train_sft(tiny_lm, market_rows(64, 0), out, eval_data=market_rows(16, 1), epochs=4, learning_rate=3e-3, **FAST)
    return result


def test_labels_are_the_summary_and_eos_only(gpt2_tokenizer, tmp_path):
    rows = market_rows(5, 0)
    rows[2]["article"] = " ".join([rows[2]["article"]] * 8)  # longer than the prompt budget: cut like the env does
    examples, prompts_cut, targets_cut = news_sft_examples(rows, gpt2_tokenizer, max_prompt_tokens=64, max_target_tokens=48)
    assert (prompts_cut, targets_cut) == (1, 0)
    batch = collate_sft(examples, gpt2_tokenizer.pad_token_id)
    width_p = batch["prompt_width"]
    eos = gpt2_tokenizer.eos_token_id
    for row, (example, source) in enumerate(zip(examples, rows)):
        expected = gpt2_tokenizer(" " + source["summary"], add_special_tokens=False)["input_ids"] + [eos]
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        assert (labels[:width_p] == IGNORE_INDEX).all()  # the whole prompt region is masked
        assert labels[width_p : width_p + len(expected)].tolist() == ids[width_p : width_p + len(expected)].tolist()
        # The prompt sits right before the target (left-padded), exactly as the env will feed it to the policy
        assert ids[width_p - len(example.prompt_ids) : width_p].tolist() == example.prompt_ids
        assert mask.sum() == len(example.prompt_ids) + len(expected)

    # The prompt token ids are the env's own: same template, same truncation
    data = write_jsonl(tmp_path / "news.jsonl", rows)
    env = gym.make("NewsSummary-v0", dataset=data, tokenizer=gpt2_tokenizer, max_prompt_tokens=64).unwrapped
    assert [e.prompt_ids for e in examples] == [ids.tolist() for ids in env.prompt_ids]
    assert env.prompts[0].text.endswith("TL;DR:")


def test_loss_is_the_lm_loss_on_summary_tokens_whatever_the_padding(gpt2_tokenizer, tiny_lm):
    model = load_causal_lm(tiny_lm)
    rows = market_rows(4, 0)
    rows[1]["summary"] += " Trade was brisk."  # different lengths: the batch pads prompts and targets
    examples, _, _ = news_sft_examples(rows, gpt2_tokenizer, max_prompt_tokens=64, max_target_tokens=48)
    pad = gpt2_tokenizer.pad_token_id
    total, count = 0.0, 0
    with th.no_grad():
        for example in examples:
            single = collate_sft([example], pad)
            nll, n = target_nll(model, single)
            # transformers' own causal-LM loss (mean over labels != -100, shifted by one) on the unpadded sequence
            reference = model(input_ids=single["input_ids"], labels=single["labels"]).loss
            assert n == len(example.target_ids)
            assert float(nll) / n == pytest.approx(float(reference), rel=1e-5)
            total, count = total + float(nll), count + n
        nll, n = target_nll(model, collate_sft(examples, pad))
    assert n == count and float(nll) == pytest.approx(total, rel=1e-4)


def test_long_summaries_are_cut_without_eos(gpt2_tokenizer):
    examples, _, targets_cut = news_sft_examples(market_rows(4, 0), gpt2_tokenizer, max_prompt_tokens=64, max_target_tokens=3)
    assert targets_cut == 4
    assert all(len(e.target_ids) == 3 and gpt2_tokenizer.eos_token_id not in e.target_ids for e in examples)


def test_sft_lowers_held_out_loss_and_saves_a_loadable_model(full_sft, tiny_lm, gpt2_tokenizer):
    result = full_sft
    assert result.n_examples == 64 and result.n_eval_examples == 16
    assert result.optimizer_steps == 4 * 8
    # Measured: 10.84 -> 5.73 nats per summary token (an untrained 50257-token model starts at ln(50257) = 10.8)
    assert result.eval_loss_before > 10.0
    assert result.eval_loss_after < result.eval_loss_before - 3.0
    assert result.train_losses[-1] < result.train_losses[0] - 3.0

    model = load_causal_lm(result.output_dir)
    tokenizer = load_tokenizer(result.output_dir)
    assert len(tokenizer) == len(gpt2_tokenizer)
    # The saved weights are the trained ones: the reloaded model gives the same held-out loss
    held_out, _ = load_sft_examples(market_rows(16, 1), tokenizer, max_prompt_tokens=64)
    assert evaluate_sft_loss(model, held_out, tokenizer.pad_token_id) == pytest.approx(result.eval_loss_after, abs=1e-4)
    untrained = evaluate_sft_loss(load_causal_lm(tiny_lm), held_out, tokenizer.pad_token_id)
    assert untrained == pytest.approx(result.eval_loss_before, abs=1e-4)
    saved = json.loads((result.output_dir / RESULT_FILE).read_text())
    assert saved["eval_loss_after"] == result.eval_loss_after and saved["config"]["learning_rate"] == 3e-3


def test_ppo_starts_from_the_sft_model(full_sft, tmp_path):
    out = str(full_sft.output_dir)
    data = write_jsonl(tmp_path / "news.jsonl", market_rows(6, 2))
    env_kwargs = dict(dataset=data, tokenizer=out, max_prompt_tokens=64, max_new_tokens=4)
    env = make_vec_env("NewsSummary-v0", n_envs=2, seed=0, env_kwargs=env_kwargs)
    model = toy_ppo(env, out, n_steps=4, batch_size=8)
    before = {k: v.clone() for k, v in model.policy.state_dict().items() if "lora_B" in k}
    model.learn(8)
    assert model.num_timesteps == 8
    assert model.policy.lm_name == out
    # One PPO update ran on top of the SFT weights (LoRA B starts at zero and moved)
    after = model.policy.state_dict()
    assert any(not th.equal(before[k], after[k]) for k in before)


def test_lora_saves_a_merged_plain_model(tiny_lm, tmp_path):
    out = tmp_path / "lora"
    result = train_sft(tiny_lm, market_rows(24, 0), out, use_lora=True, lora_config=dict(r=4, lora_alpha=8),
                       eval_fraction=0.25, learning_rate=1e-2, batch_size=6, epochs=2, **FAST)
    assert result.eval_loss_after < result.eval_loss_before
    assert not (out / "adapter_config.json").exists()
    merged, base = load_causal_lm(out), load_causal_lm(tiny_lm)
    assert not any("lora" in name for name in merged.state_dict())
    assert merged.state_dict().keys() == base.state_dict().keys()
    changed = [k for k, v in merged.state_dict().items() if not th.equal(v, base.state_dict()[k])]
    assert changed and all("attn" in k for k in changed)  # only the LoRA-targeted projections moved
    tokenizer = load_tokenizer(out)
    examples, _ = load_sft_examples(market_rows(24, 0), tokenizer, max_prompt_tokens=64)
    held_out, _ = load_sft_examples(market_rows(8, 5), tokenizer, max_prompt_tokens=64)
    assert len(examples) == 24 and len(held_out) == 8
    # Merging kept the function the adapters learned: the merged model beats the base on unseen rows
    pad = tokenizer.pad_token_id
    assert evaluate_sft_loss(merged, held_out, pad) < evaluate_sft_loss(base, held_out, pad)


def test_gradient_accumulation_matches_a_bigger_batch(tiny_lm, tmp_path):
    rows = market_rows(16, 0)
    for i, row in enumerate(rows):  # summaries of very different lengths: every token must weigh the same
        row["summary"] = " ".join([row["summary"]] * (1 + 3 * (i % 3)))
    common = dict(eval_fraction=0.0, learning_rate=1e-3, group_by_length=False, seed=3, **FAST)
    train_sft(tiny_lm, rows, tmp_path / "big", batch_size=4, **common)
    train_sft(tiny_lm, rows, tmp_path / "acc", batch_size=2, gradient_accumulation_steps=2, **common)
    big, acc = load_causal_lm(tmp_path / "big").state_dict(), load_causal_lm(tmp_path / "acc").state_dict()
    assert all(th.allclose(big[k], acc[k], atol=1e-5) for k in big)
    key = "transformer.h.0.mlp.c_fc.weight"
    assert not th.equal(big[key], load_causal_lm(tiny_lm).state_dict()[key])


def test_default_data_is_the_built_in_news_task(gpt2_tokenizer):
    examples, counts = load_sft_examples(None, gpt2_tokenizer, max_prompt_tokens=64, limit=4)
    env = gym.make("NewsSummary-v0", tokenizer=gpt2_tokenizer, max_prompt_tokens=64).unwrapped
    assert len(examples) == 4 and [e.prompt_ids for e in examples] == [ids.tolist() for ids in env.prompt_ids[:4]]
    summary = env.prompts[0].reference
    assert examples[0].target_ids[:-1] == gpt2_tokenizer(" " + summary, add_special_tokens=False)["input_ids"]


def test_registered_task_with_references(tiny_lm, gpt2_tokenizer, tmp_path):
    prompts = [{"prompt": f"Q: what is {a} plus {b}? A:", "reference": str(a + b)} for a in range(4) for b in range(3)]
    register_text_task("SftAdd-v0", prompts=prompts, reward=lambda p, c, r: [0.0] * len(c), tokenizer=tiny_lm,
                       max_new_tokens=4, max_prompt_tokens=16)
    examples, _ = task_sft_examples("SftAdd-v0", gpt2_tokenizer)
    env = gym.make("SftAdd-v0").unwrapped
    assert [e.prompt_ids for e in examples] == [ids.tolist() for ids in env.prompt_ids]
    eos = gpt2_tokenizer.eos_token_id
    assert examples[5].target_ids == gpt2_tokenizer(" 3", add_special_tokens=False)["input_ids"] + [eos]
    result = train_sft(tiny_lm, None, tmp_path / "add", task="SftAdd-v0", eval_fraction=0.25, learning_rate=3e-3, epochs=3,
                       batch_size=3, device="cpu", progress_bar=False)
    assert (result.n_examples, result.n_eval_examples) == (9, 3)
    assert result.eval_loss_after < result.eval_loss_before

    register_text_task("SftNoRef-v0", prompts=["a", "b"], reward=lambda p, c, r: [0.0] * len(c), tokenizer=tiny_lm)
    with pytest.raises(ValueError, match="no references"):
        task_sft_examples("SftNoRef-v0", gpt2_tokenizer)
    with pytest.raises(ValueError, match="Drop the data"):
        load_sft_examples(market_rows(2, 0), gpt2_tokenizer, task="SftAdd-v0")
    with pytest.raises(ValueError, match="not registered"):
        task_sft_examples("NoSuchTask-v0", gpt2_tokenizer)


def test_bad_data_is_reported(tiny_lm, tmp_path):
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"article": "a", "summary": "b"}) + "\n" + json.dumps({"article": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: missing field 'summary'"):
        train_sft(tiny_lm, missing, tmp_path / "o1", **FAST)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        train_sft(tiny_lm, empty, tmp_path / "o2", **FAST)
    with pytest.raises(ValueError, match="empty"):
        train_sft(tiny_lm, [], tmp_path / "o3", **FAST)
    with pytest.raises(ValueError, match="row 1: needs non-empty 'article' and 'summary'"):
        train_sft(tiny_lm, [{"article": "x", "summary": "y"}, {"text": "x"}], tmp_path / "o4", **FAST)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_sft(tiny_lm, tmp_path / "nope.jsonl", tmp_path / "o5", **FAST)
    with pytest.raises(ValueError, match="leave none to train on"):
        train_sft(tiny_lm, market_rows(1, 0), tmp_path / "o6", **FAST)
    assert not any(tmp_path.glob("o*")), "a failed run must not leave an output directory"


def test_cli_trains_and_refuses_a_non_empty_output(tiny_lm, tmp_path, capsys):
    data = write_jsonl(tmp_path / "news.jsonl", market_rows(12, 0))
    out = tmp_path / "cli"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    args = ["sft", "--data", data, "--lm", tiny_lm, "--output", str(out), "--max-prompt-tokens", "64", "--limit", "10",
            "--eval-fraction", "0.2", "--batch-size", "4", "--lr", "3e-3", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "user file"

    assert main([*args, "--overwrite", "--lora", "--lora-r", "4"]) == 0
    printed = capsys.readouterr().out
    assert "8 training examples" in printed and "Held-out loss per completion token (2 examples)" in printed
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    # Permissions of a plain new directory and files (not private temp-dir ones): others can read the model
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["config"]["use_lora"] is True and saved["config"]["lora_config"] == {"r": 4, "lora_alpha": 8}
    assert saved["eval_loss_after"] < saved["eval_loss_before"]
