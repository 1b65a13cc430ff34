"""Evaluation: metrics on known strings, evaluate() on an LM dir and a saved PPO model, KL to the reference, the CLI."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch as th
from helpers import register_toy_task, toy_ppo
from stable_baselines3.common.env_util import make_vec_env

import sb3_textrl
from sb3_textrl.cli import main
from sb3_textrl.envs.news_data import generate_news_examples
from sb3_textrl.evaluation import METRICS, EvalResult, evaluate, generate_samples, kl_to_reference
from sb3_textrl.evaluation_report import escape_cell
from sb3_textrl.metrics import distinct_n, lead_n, rouge_scores, split_sentences, words
from sb3_textrl.sampling import DecodingSettings, decoding, load_generator

# Tiny news settings: short prompts and completions keep each evaluate() call around a second.
NEWS = dict(max_prompt_tokens=96, max_new_tokens=5, n_articles=16)
FAST = dict(n_envs=2, device="cpu", progress_bar=False)


# -- metrics on known strings ----------------------------------------------------------------------------------------


def test_sentence_splitter_and_lead3():
    text = (
        'Mr. Smith met Dr. J. K. Rowling in the U.S. on Friday. "It was great!" he said. '
        "Prices rose 3.5 per cent. He said no. The No. 10 bus was late?\nA new line starts here"
    )
    assert split_sentences(text) == [
        "Mr. Smith met Dr. J. K. Rowling in the U.S. on Friday.",
        '"It was great!" he said.',
        "Prices rose 3.5 per cent.",
        "He said no.",
        "The No. 10 bus was late?",
        "A new line starts here",
    ]
    assert lead_n(text) == (
        'Mr. Smith met Dr. J. K. Rowling in the U.S. on Friday. "It was great!" he said. Prices rose 3.5 per cent.'
    )
    assert lead_n("One sentence only.") == "One sentence only."
    assert split_sentences("lower. case after a period stays") == ["lower. case after a period stays"]
    with pytest.raises(ValueError, match="n >= 1"):
        lead_n(text, 0)


def test_distinct_n_and_words():
    assert words("The cat's hat, THE hat!") == ["the", "cat's", "hat", "the", "hat"]
    texts = ["the cat sat", "The cat ran."]
    assert distinct_n(texts, 1) == 4 / 6  # the, cat, sat, ran of six words
    assert distinct_n(texts, 2) == 3 / 4  # (the cat) twice; n-grams do not cross texts
    assert distinct_n(["a b", "c"], 3) == 0.0  # no trigram at all
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(texts, 0)


def test_rouge_scores_exact():
    scores = rouge_scores(["the cat sat on the mat", "it rains", ""], ["the cat lay on the mat", "it rained", "anything"])
    assert list(scores) == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    # 5 of 6 unigrams match each way; 3 of 5 bigrams; the LCS "the cat on the mat" has 5 words.
    assert scores["rouge1"][0] == pytest.approx(5 / 6, abs=1e-12)
    assert scores["rouge2"][0] == pytest.approx(3 / 5, abs=1e-12)
    assert scores["rougeL"][0] == pytest.approx(5 / 6, abs=1e-12)
    assert scores["rouge1"][1] == 1.0  # Porter stemming: rains / rained -> rain
    assert all(scores[m][2] == 0.0 for m in scores)  # an empty completion scores 0
    # rougeLsum: union LCS over sentences; the sentence order does not matter, unlike rougeL.
    lsum = rouge_scores(["b c. a d."], ["a d. b c."], metrics=["rougeL", "rougeLsum"])
    assert lsum["rougeLsum"][0] == 1.0 and lsum["rougeL"][0] == 0.5


def test_markdown_cells_are_escaped():
    assert escape_cell("a | b\nc <d> & e") == "a \\| b<br>c &lt;d&gt; &amp; e"
    assert escape_cell("   ") == "*(empty)*"
    assert escape_cell("one two three four five", width=12) == "one two ..."


# -- evaluate() ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def news_file(tmp_path_factory):
    """A JSONL of generated (article, summary) pairs; the first article holds a pipe and a line break."""
    rows = [{"article": r["article"], "summary": r["summary"]} for r in generate_news_examples(6, seed=3)]
    rows[0]["article"] = "A | B wins the vote.\n" + rows[0]["article"]
    path = tmp_path_factory.mktemp("data") / "news.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lm):
    """A PPO model after one tiny update, and its saved .zip."""
    env = make_vec_env("NewsSummary-v0", n_envs=2, seed=0, env_kwargs=NEWS | dict(tokenizer=tiny_lm))
    # The tiny LM's completions all score ROUGE 0: without an entropy bonus every advantage is 0, the LoRA B matrices
    # stay exactly zero and the "trained" policy is still its own reference (evaluate() would skip its KL pass).
    model = toy_ppo(env, tiny_lm, n_steps=5, batch_size=10, learning_rate=1e-2, ent_coef=0.01)
    model.learn(10)
    path = tmp_path_factory.mktemp("run") / "model.zip"
    model.save(path)
    return model, path


def test_evaluate_lm_dir_writes_json_and_markdown(tiny_lm, news_file, tmp_path):
    result = evaluate(tiny_lm, dataset=news_file, n=4, env_kwargs=NEWS, output_dir=tmp_path, **FAST)
    assert result.systems == ["model:greedy", "lead3", "reference"]
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data) == {"config", "notes", "metrics", "samples"}
    assert data["config"]["n_prompts"] == 4 and data["config"]["prompt_indices"] == [0, 1, 2, 3]
    assert data["config"]["env_kwargs"]["tokenizer"] == tiny_lm  # the env speaks the LM's vocabulary
    for system in result.systems:
        assert set(data["metrics"][system]) == set(METRICS)
    model, lead3, reference = (data["metrics"][s] for s in result.systems)
    assert all(model[m] is not None for m in METRICS)
    # Baselines have no policy: no KL, no stop rate, no completion length (metric_keys.mean_completion_length).
    assert lead3["kl_to_ref"] is None and lead3["stop_rate"] is None and lead3["completion_len"] is None
    lengths = [s["outputs"]["model:greedy"]["completion_len"] for s in data["samples"]]
    assert model["completion_len"] == pytest.approx(np.mean(lengths))
    assert all(reference[m] == 1.0 for m in ("rouge1", "rouge2", "rougeL", "rougeLsum", "task_reward"))

    # An LM dir gets fresh LoRA adapters: it is its own reference, and the report says why KL is 0.
    assert abs(model["kl_to_ref"]) < 1e-5
    assert any("0 by construction" in note for note in data["notes"])

    rows = [json.loads(line) for line in news_file.read_text().splitlines()]
    lead = [lead_n(r["article"], 3) for r in rows[:4]]
    assert [s["outputs"]["lead3"]["completion"] for s in data["samples"]] == lead
    assert lead3["rouge2"] == pytest.approx(rouge_scores(lead, [r["summary"] for r in rows[:4]])["rouge2"].mean())
    for sample in data["samples"]:
        out = sample["outputs"]["model:greedy"]
        assert set(out) >= {"completion", "task_reward", "rouge1", "kl_to_ref", "completion_len", "length_words"}
        assert out["task_reward"] == pytest.approx(out["rouge1"])  # the task reward is ROUGE-1: same scorer
        assert 1 <= out["completion_len"] <= NEWS["max_new_tokens"]  # generated tokens, a stop token included

    report = (tmp_path / "eval.md").read_text()
    assert "## Metrics" in report and "## Samples (first 4 of 4)" in report
    for system in result.systems:
        assert f"| `{system}` |" in report
    # The article's pipe and line break stay inside its cell: the row has as many cells as the header.
    header, row = (line for line in report.splitlines() if line.startswith(("| # |", "| 0 |")))
    assert "A \\| B wins the vote. " in row
    assert len(re.split(r"(?<!\\)\|", row)) == len(re.split(r"(?<!\\)\|", header)) == 2 + 3 + 2
    assert EvalResult.load(tmp_path).metrics == result.metrics


def test_saved_ppo_zip_evaluates_like_the_model_in_memory(trained, tmp_path):
    model, path = trained
    from_zip = evaluate(path, env_kwargs=dict(n_articles=16), n=4, output_dir=tmp_path, **FAST)
    in_memory = evaluate(model, env_kwargs=dict(n_articles=16), n=4, **FAST)
    # The env takes the saved model's tokenizer and widths (no env_kwargs needed for them).
    assert from_zip.config["env_kwargs"]["max_new_tokens"] == NEWS["max_new_tokens"]
    assert from_zip.config["env_kwargs"]["max_prompt_tokens"] == NEWS["max_prompt_tokens"]
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "eval.md").is_file()
    assert from_zip.metrics["model:greedy"] == pytest.approx(in_memory.metrics["model:greedy"], abs=1e-5)
    texts = [[s.outputs["model:greedy"]["completion"] for s in r.samples] for r in (from_zip, in_memory)]
    assert texts[0] == texts[1]
    assert any("sum over its generated tokens" in note for note in from_zip.notes)
    with pytest.raises(ValueError, match="max_prompt_tokens and max_new_tokens"):
        evaluate(model, env_kwargs=dict(n_articles=16, max_new_tokens=7), n=2, **FAST)


SAMPLED = "model:sample:temperature=1.0"


def sampled_kl(model) -> np.ndarray:
    result = evaluate(model, n=4, env_kwargs=dict(n_articles=16), decoding="sample", **FAST)
    kl = np.array([s.outputs[SAMPLED]["kl_to_ref"] for s in result.samples])
    assert result.metrics[SAMPLED]["kl_to_ref"] == pytest.approx(kl.mean())
    return kl


def test_kl_is_zero_for_untrained_lora_and_equals_a_plain_forward(tiny_lm):
    env = make_vec_env("NewsSummary-v0", n_envs=2, seed=0, env_kwargs=NEWS | dict(tokenizer=tiny_lm))
    model = toy_ppo(env, tiny_lm, n_steps=5, batch_size=10)
    assert np.abs(sampled_kl(model)).max() < 1e-5  # zero-initialised LoRA B: the policy is its reference

    with th.no_grad():  # move the policy away from its reference: random LoRA B matrices
        generator = th.Generator().manual_seed(0)
        for name, parameter in model.policy.lm.named_parameters():
            if "lora_B" in name:
                parameter.copy_(th.randn(parameter.shape, generator=generator))
    assert np.abs(sampled_kl(model)).max() > 1e-3

    # Independent check on one completion: plain HF forwards of the LM with and without its adapters.
    eval_env = make_vec_env("NewsSummary-v0", n_envs=1, env_kwargs=NEWS | dict(tokenizer=tiny_lm))
    with decoding(model.policy, DecodingSettings(greedy=False)):
        sample = generate_samples(model, eval_env, [2], deterministic=False)[0]
    row = th.as_tensor(sample.observation["input_ids"])[th.as_tensor(sample.observation["attention_mask"]).bool()]
    lm = model.policy.lm
    with th.no_grad():
        policy_logp = th.log_softmax(lm(input_ids=row[None]).logits[0, :-1].float(), -1)
        with lm.disable_adapter():
            ref_logp = th.log_softmax(lm(input_ids=row[None]).logits[0, :-1].float(), -1)
    targets = row[1:, None]
    expected = (policy_logp.gather(1, targets) - ref_logp.gather(1, targets))[-sample.completion_tokens :].sum().item()
    assert kl_to_reference(model.policy, [sample])[0] == pytest.approx(expected, abs=1e-4)


def test_kl_grows_when_a_fully_fine_tuned_policy_moves(tiny_lm):
    env = make_vec_env("NewsSummary-v0", n_envs=2, seed=0, env_kwargs=NEWS | dict(tokenizer=tiny_lm))
    model = toy_ppo(env, tiny_lm, n_steps=5, batch_size=10, policy_kwargs=dict(use_lora=False))  # frozen reference copy
    assert np.abs(sampled_kl(model)).max() < 1e-5
    with th.no_grad():  # sharper output logits: a policy far from its reference
        model.policy.lm.get_output_embeddings().weight.mul_(10.0)
    assert sampled_kl(model).min() > 1.0  # nats per completion


def test_greedy_is_reproducible_and_sampling_is_seeded(tiny_lm, news_file):
    def run(**kwargs):
        result = evaluate(tiny_lm, dataset=news_file, n=3, env_kwargs=NEWS, baselines=(), **FAST, **kwargs)
        return [[s.outputs[system]["completion"] for s in result.samples] for system in result.systems], result

    assert run()[0] == run()[0]
    th.manual_seed(123)
    np.random.seed(123)
    torch_state, numpy_state = th.get_rng_state(), np.random.get_state()[1].copy()
    sampled, result = run(decoding=["greedy", "sample:temperature=1.5"], seed=1)
    # The caller's random streams are untouched (SB3 seeds the global generators when it builds a model).
    assert th.equal(th.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], numpy_state)
    assert result.systems == ["model:greedy", "model:sample:temperature=1.5"]
    assert run(decoding=["greedy", "sample:temperature=1.5"], seed=1)[0] == sampled
    assert sampled[0] != sampled[1]


def test_task_without_references_or_articles(tiny_lm):
    task = register_toy_task("EvalToy-v0", tiny_lm, max_new_tokens=4)
    result = evaluate(tiny_lm, task=task, n=3, **FAST)
    assert result.systems == ["model:greedy"]  # no baseline applies to a task without articles and references
    metrics = result.metrics["model:greedy"]
    assert metrics["rouge1"] is None and metrics["task_reward"] is not None
    assert any("No ROUGE" in note for note in result.notes)
    assert "ROUGE-1" not in result.metrics_table()
    with pytest.raises(ValueError, match="baseline 'lead3' does not apply.*article"):
        evaluate(tiny_lm, task=task, n=3, baselines=["lead3"], **FAST)
    with pytest.raises(ValueError, match="takes no dataset="):
        evaluate(tiny_lm, task=task, dataset="x.jsonl", n=3, **FAST)


def test_bad_input_is_reported(tiny_lm, news_file, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'NoSuchTask-v0'.*NewsSummary-v0.*register_text_task"):
        evaluate(tiny_lm, task="NoSuchTask-v0", n=2, **FAST)
    no_fields = tmp_path / "bad.jsonl"
    no_fields.write_text(json.dumps({"title": "t", "body": "b"}) + "\n")
    with pytest.raises(ValueError, match="none of the expected fields.*'article'.*article_field="):
        evaluate(tiny_lm, dataset=no_fields, n=1, env_kwargs=NEWS, **FAST)
    with pytest.raises(ValueError, match="asked for n=50 prompts but the task has only 6.*at most 6"):
        evaluate(tiny_lm, dataset=news_file, n=50, env_kwargs=NEWS, **FAST)
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate(tiny_lm, dataset=news_file, n=2, env_kwargs=NEWS, baselines=["lead5"], **FAST)
    with pytest.raises(ValueError, match="expected 'greedy', 'sample'"):
        evaluate(tiny_lm, dataset=news_file, n=2, env_kwargs=NEWS, decoding="beam", **FAST)
    with pytest.raises(FileNotFoundError, match="model.save"):
        evaluate(tmp_path / "missing.zip", n=2, **FAST)
    with pytest.raises(ValueError, match="n must be at least 1"):
        evaluate(tiny_lm, n=0, **FAST)


def test_cli_eval_of_a_saved_run(trained, capsys):
    _, path = trained
    code = main(["eval", "--model", str(path), "--n", "2", "--n-envs", "2", "--device", "cpu", "--quiet",
                 "--env-kwarg", "n_articles=16", "--baselines", "lead3", "--decoding", "greedy", "--decoding", "sample"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| `model:greedy` |" in out and "| `model:sample:temperature=1.0` |" in out and "| `lead3` |" in out
    assert "`reference`" not in out
    # Written next to the model by default.
    data = json.loads((path.parent / "eval.json").read_text())
    assert data["config"]["baselines"] == ["lead3"] and data["config"]["env_kwargs"]["n_articles"] == 16
    assert (path.parent / "eval.md").is_file()


class PathLikeOnly:
    """An ``os.PathLike`` that is not a ``pathlib.Path`` (SB3's loader opens only str, Path and open files)."""

    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return os.fspath(self.path)


def test_load_generator_opens_any_path_like(trained):
    model, path = trained
    loaded = load_generator(PathLikeOnly(path), model.get_env(), device="cpu")
    for mine, theirs in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()):
        assert th.equal(mine, theirs)


def test_evaluate_is_exported():
    assert sb3_textrl.evaluate is evaluate and "evaluate" in sb3_textrl.__all__


def test_generate_samples_keeps_envs_busy_when_episodes_end_early(tiny_lm):
    """The env loop (fast=False): envs whose completions stop early start their next queued prompt at once: every
    prompt is completed exactly once, in the order asked, with no step wasted before the last prompt has started."""
    from helpers import ragged_stop_ids

    task = register_toy_task("RaggedGen-v0", tiny_lm, max_new_tokens=8, stop_token_ids=ragged_stop_ids(4))
    env = make_vec_env(task, n_envs=3, seed=0)
    model = toy_ppo(env, tiny_lm)
    steps = 0
    step = env.step

    def counting_step(actions):
        nonlocal steps
        steps += 1
        return step(actions)

    env.step = counting_step
    order = [4, 0, 3, 1, 2, 0, 4]
    samples = generate_samples(model, env, order, deterministic=False, fast=False)
    assert [s.prompt_index for s in samples] == order
    lengths = [s.completion_tokens for s in samples]
    assert min(lengths) < 8  # some episodes did end early
    # Busy envs: at most the tokens of each env's own queue, plus one spare episode's worth at the tail.
    per_env = [sum(lengths[slot::3]) for slot in range(3)]
    assert max(per_env) <= steps <= max(per_env)  # the longest queue takes its steps, no env takes more
    # The queues are cleared: later resets follow the seeded order again.
    assert all(queue == [] for queue in env.get_attr("_prompt_queue"))
