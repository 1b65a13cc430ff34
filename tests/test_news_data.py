import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sb3_textrl.envs.news_data import generate_news_examples, load_summary_dataset
from sb3_textrl.rewards import RougeReward
from sb3_textrl.rewards.rouge import split_sentences

# Real CNN/DM + XSum rows, shared by path only (never copied into the project)
NEWS_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "news_dev.jsonl"
needs_news_dev = pytest.mark.skipif(not NEWS_DEV.exists(), reason=f"shared real-news file not found at {NEWS_DEV}")


def _lead3_rouge(rows: list[dict[str, str]]) -> dict[str, float]:
    completions = [" ".join(split_sentences(row["article"])[:3]) for row in rows]
    references = [row["summary"] for row in rows]
    prompts = [""] * len(rows)
    return {m: float(RougeReward(m).score(prompts, completions, references).mean()) for m in ("rouge1", "rouge2", "rougeL")}


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------


def test_generator_deterministic_and_seeded():
    first = generate_news_examples(20, seed=3)
    assert first == generate_news_examples(20, seed=3)
    other = generate_news_examples(20, seed=4)
    assert all(a["article"] != b["article"] for a, b in zip(first, other))
    # Example i depends only on (seed, i): a longer list extends a shorter one
    assert generate_news_examples(50, seed=3)[:20] == first
    assert generate_news_examples(0) == []
    with pytest.raises(ValueError):
        generate_news_examples(-1)


def test_generator_variety_and_lengths():
    examples = generate_news_examples(400, seed=0)
    assert set(examples[0]) == {"id", "topic", "article", "summary"}
    assert len({e["topic"] for e in examples[:8]}) == 8  # any 8 consecutive examples cover every template
    assert len({e["article"] for e in examples}) == 400
    assert len({e["summary"] for e in examples}) > 390

    words = np.array([len(e["article"].split()) for e in examples])
    sentences = np.array([len(split_sentences(e["article"])) for e in examples])
    summary_sentences = np.array([len(split_sentences(e["summary"])) for e in examples])
    assert words.min() >= 120 and words.max() <= 250
    assert 140 < words.mean() < 180 and words.std() > 15
    assert sentences.min() >= 5 and sentences.max() <= 9 and len(set(sentences)) >= 4
    assert set(summary_sentences) == {1, 2}
    assert all(len(e["summary"].split()) < len(e["article"].split()) / 2 for e in examples)


def test_generator_summary_facts_come_from_article():
    # Every number in a reference summary is stated in the article, so ROUGE rewards faithful key facts
    for example in generate_news_examples(300, seed=1):
        for number in re.findall(r"\d[\d,.]*\d|\d", example["summary"]):
            assert number in example["article"], (number, example)


def test_generator_lead3_rouge():
    scores = _lead3_rouge(generate_news_examples(200, seed=0))
    # The lead restates the key facts: lead-3 is a strong but imperfect baseline, as on real news
    assert 0.35 < scores["rouge1"] < 0.6
    assert 0.2 < scores["rouge2"] < 0.45
    assert 0.25 < scores["rougeL"] < 0.5


# ---------------------------------------------------------------------------------------------------------------
# Loading files
# ---------------------------------------------------------------------------------------------------------------


@needs_news_dev
def test_load_shared_jsonl():
    rows = load_summary_dataset(NEWS_DEV)
    assert len(rows) == 351
    assert all(set(row) == {"article", "summary"} for row in rows)
    assert all(row["article"] and row["summary"] for row in rows)
    assert load_summary_dataset(str(NEWS_DEV), limit=5) == rows[:5]


@needs_news_dev
def test_lead3_on_real_cnndm_matches_published_figures():
    # Sanity check of the metric code: lead-3 on CNN/DM is about R1 0.41 / R2 0.19 / RL 0.26 (see shared/data/README.md)
    rows = load_summary_dataset(NEWS_DEV)
    with open(NEWS_DEV, encoding="utf-8") as f:
        sources = [json.loads(line)["source"] for line in f if line.strip()]
    cnndm = [row for row, source in zip(rows, sources) if source == "cnndm"]
    assert len(cnndm) == 100
    scores = _lead3_rouge(cnndm)
    assert scores["rouge1"] == pytest.approx(0.41, abs=0.02)
    assert scores["rouge2"] == pytest.approx(0.19, abs=0.02)
    assert scores["rougeL"] == pytest.approx(0.26, abs=0.02)


def test_load_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        'id,document,highlights\n1,"First article, with a comma.\nAnd a second line.",First summary.\n2,Second article.,'
        "Second summary.\n",
        encoding="utf-8",
    )
    rows = load_summary_dataset(path)
    assert rows == [
        {"article": "First article, with a comma.\nAnd a second line.", "summary": "First summary."},
        {"article": "Second article.", "summary": "Second summary."},
    ]
    assert load_summary_dataset(path, article_field="id", summary_field="document", limit=1) == [
        {"article": "1", "summary": "First article, with a comma.\nAnd a second line."}
    ]


def test_load_json_list_and_splits(tmp_path):
    rows = [{"text": "An article.", "target": "A summary."}]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(rows))
    assert load_summary_dataset(path) == [{"article": "An article.", "summary": "A summary."}]

    path = tmp_path / "splits.json"
    path.write_text(
        json.dumps({"train": [{"article": "train a", "summary": "s"}], "test": [{"article": "test a", "summary": "s"}]})
    )
    assert load_summary_dataset(path)[0]["article"] == "test a"
    assert load_summary_dataset(path, split="train")[0]["article"] == "train a"
    with pytest.raises(ValueError, match=r"Pass split= one of \['train', 'test'\]"):
        load_summary_dataset(path, split="validation")


def test_field_auto_detect_order(tmp_path):
    # "article" wins over "source" (in the shared file, "source" names the corpus), "summary" over "reference"
    path = tmp_path / "order.jsonl"
    path.write_text(json.dumps({"source": "cnndm", "article": "A", "reference": "R", "summary": "S"}) + "\n")
    assert load_summary_dataset(path) == [{"article": "A", "summary": "S"}]


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*does not exist"):
        load_summary_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_summary_dataset("data/missing.csv")  # a relative path, not a hub name


def test_unsupported_extension(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("article\tsummary\n")
    with pytest.raises(
        ValueError, match=r"pairs\.txt: unsupported file extension '\.txt'; supported are \.jsonl, \.json, \.csv"
    ):
        load_summary_dataset(path)
    with pytest.raises(ValueError, match="is a directory"):
        load_summary_dataset(tmp_path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"article": "a", "summary": "s"}\n\n{"article": "b", "summary": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: invalid JSON"):
        load_summary_dataset(path)
    path = tmp_path / "bad.json"
    path.write_text("[{]")
    with pytest.raises(ValueError, match=r"bad\.json, line 1: invalid JSON"):
        load_summary_dataset(path)


def test_missing_fields(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text(json.dumps({"body": "a", "abstract": "s"}) + "\n")
    with pytest.raises(ValueError) as excinfo:
        load_summary_dataset(path)
    message = str(excinfo.value)
    assert "fields.jsonl, line 1" in message
    assert "['article', 'document', 'text', 'source']" in message
    assert "['body', 'abstract']" in message
    assert "article_field=" in message
    with pytest.raises(ValueError, match=r"none of the expected fields \['summary', 'highlights', 'reference', 'target'\]"):
        load_summary_dataset(path, article_field="body")
    assert load_summary_dataset(path, article_field="body", summary_field="abstract") == [{"article": "a", "summary": "s"}]
    with pytest.raises(ValueError, match=r"field 'headline' \(from summary_field=\) not found; the data has fields"):
        load_summary_dataset(path, article_field="body", summary_field="headline")


def test_field_missing_on_later_row(tmp_path):
    path = tmp_path / "later.jsonl"
    lines = [{"article": "a", "summary": "s"}, {"article": "b", "summary": "t"}, {"article": "c", "highlights": "u"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(
        ValueError, match=r"later\.jsonl, line 3: missing field 'summary'.*has fields \['article', 'highlights'\]"
    ):
        load_summary_dataset(path)
    assert len(load_summary_dataset(path, limit=2)) == 2

    path = tmp_path / "empty_value.csv"
    path.write_text("article,summary\na,s\nb,\n")
    with pytest.raises(ValueError, match=r"empty_value\.csv, line 3: field 'summary' \(the summary\) must be non-empty text"):
        load_summary_dataset(path)


def test_empty_dataset(tmp_path):
    for name, text in (("empty.jsonl", "\n\n"), ("header_only.csv", "article,summary\n"), ("empty.json", "[]")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: the dataset is empty"):
            load_summary_dataset(path)
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_summary_dataset(tmp_path / "empty.json", limit=0)


# ---------------------------------------------------------------------------------------------------------------
# Hub names (through `datasets`; never touches the network here)
# ---------------------------------------------------------------------------------------------------------------


def test_hub_name_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install datasets.*hub must be reachable"):
        load_summary_dataset("xsum")
    with pytest.raises(ImportError, match="pip install datasets"):
        load_summary_dataset("EdinburghNLP/xsum")


def test_hub_name_with_fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "abisee/cnn_dailymail":
            return [{"article": f"article {i}", "highlights": f"highlight {i}", "id": str(i)} for i in range(5)]
        return [{"document": "doc", "summary": "sum", "id": "0"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = load_summary_dataset("cnn_dailymail", split="validation", limit=2)
    assert rows == [{"article": "article 0", "summary": "highlight 0"}, {"article": "article 1", "summary": "highlight 1"}]
    assert load_summary_dataset("EdinburghNLP/xsum") == [{"article": "doc", "summary": "sum"}]
    assert calls == [("abisee/cnn_dailymail", "3.0.0", "validation"), ("EdinburghNLP/xsum", None, "test")]
