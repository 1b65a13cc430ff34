"""Write a NewsSummary-v0 data file (JSONL with "article" and "summary") from a summarisation dataset.

Usage:
    python envs/news_summary/prepare_jsonl.py cnn_dailymail --split test --limit 1000 --out cnn_test.jsonl
    python envs/news_summary/prepare_jsonl.py my_articles.csv --article-field body --summary-field abstract --out mine.jsonl

Hub names (cnn_dailymail, xsum) need the `datasets` package and a reachable Hugging Face hub; files are read locally.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sb3_textrl.envs.news_data import load_summary_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a .jsonl/.json/.csv file or a hub dataset name (cnn_dailymail, xsum)")
    parser.add_argument("--out", required=True, type=Path, help="the JSONL file to write")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="keep at most this many rows")
    parser.add_argument("--article-field", default=None)
    parser.add_argument("--summary-field", default=None)
    args = parser.parse_args()

    rows = load_summary_dataset(
        args.source, split=args.split, article_field=args.article_field, summary_field=args.summary_field, limit=args.limit
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"article": row["article"], "summary": row["summary"]}, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
