"""News summarisation end to end: zero-shot -> SFT -> SFT+PPO on the ROUGE reward, evaluated on held-out articles.

    python examples/news_summary.py --dataset ../shared/data/news_dev.jsonl     # the run behind docs/results.md
    python examples/news_summary.py                                           # built-in generated news
    python examples/news_summary.py --tiny                                    # tiny models, seconds (CI)

The articles are split once (seeded) into a training part (SFT pairs and PPO prompts) and a held-out part (the
evaluation); no evaluated article is seen in training. Every stage is timed. Outputs in --output-dir: the split
(``train.jsonl``, ``eval.jsonl``), the SFT model, the PPO model and its logs (csv + tensorboard) with samples and
periodic held-out evaluation (``TextSampleCallback``, ``TextEvalCallback``), one evaluation report per system
(``eval_*/eval.md``), the training curves as PNGs (``plots/``) and ``results.md`` / ``results.json``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import configure

from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy, evaluate, make_text_vec_env
from sb3_textrl.callbacks import TextEvalCallback, TextSampleCallback
from sb3_textrl.common.options import parse_dataclass_options
from sb3_textrl.envs.news_data import generate_news_examples, load_summary_dataset
from sb3_textrl.models import save_tiny_gpt2_lm
from sb3_textrl.plotting import plot_runs
from sb3_textrl.sft import train_sft


@dataclass
class Options:
    """Everything the example can be told (``--help`` lists the same)."""

    output_dir: str = "runs/news_summary"
    dataset: str | None = None  # JSONL/CSV of article/summary pairs; None: the built-in generated news
    lm: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    n_eval: int = 64  # held-out articles
    sft_examples: int = 256  # at most this many training pairs for SFT
    sft_epochs: int = 1
    ppo_updates: int = 8  # PPO iterations (rollout + training)
    n_envs: int = 8
    n_epochs: int = 2
    max_new_tokens: int = 48
    max_prompt_tokens: int = 320
    kl_coef: float = 0.05
    trainable_layers: int | None = None  # train only the top N blocks, from the rollout's cached lower activations
    learning_rate: float = 1e-4
    reward: str = "rouge1"  # the PPO reward: a ROUGE variant
    tiny: bool = False
    seed: int = 0
    device: str = "auto"


def parse_options() -> Options:
    return parse_dataclass_options(Options, __doc__)


def split_articles(options: Options, out: Path) -> tuple[Path, Path, int]:
    """Write the seeded train / held-out split of the articles as two JSONL files."""
    rows = load_summary_dataset(options.dataset) if options.dataset else generate_news_examples(400, seed=options.seed)
    rows = [{"article": r["article"], "summary": r["summary"]} for r in rows]
    random.Random(options.seed).shuffle(rows)
    if len(rows) < options.n_eval + 8:
        raise ValueError(f"{len(rows)} articles are too few for {options.n_eval} held-out ones; lower --n-eval")
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, part in zip(paths, (rows[options.n_eval :], rows[: options.n_eval])):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return paths[0], paths[1], len(rows) - options.n_eval


def tiny_lm(out: Path) -> str:
    return save_tiny_gpt2_lm(out / "tiny_lm")


def main(options: Options) -> dict[str, Any]:
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if options.tiny:
        options.lm = tiny_lm(out)
        options.max_prompt_tokens, options.max_new_tokens = min(options.max_prompt_tokens, 96), min(options.max_new_tokens, 8)
    train_file, eval_file, n_train = split_articles(options, out)
    task_kwargs = dict(max_new_tokens=options.max_new_tokens, max_prompt_tokens=options.max_prompt_tokens)
    timings: dict[str, float] = {}
    metrics: dict[str, dict[str, Any]] = {}

    def run_eval(label: str, model: str | None, tokenizer: str | None, baselines: tuple[str, ...] = ()) -> None:
        start = time.perf_counter()
        result = evaluate(
            model, dataset=eval_file, n=options.n_eval, baselines=baselines, n_envs=options.n_envs, seed=options.seed,
            device=options.device, output_dir=out / f"eval_{label}",
            env_kwargs=task_kwargs | ({"tokenizer": tokenizer} if tokenizer else {}),
        )
        timings[f"eval_{label}_s"] = time.perf_counter() - start
        for system, values in result.metrics.items():
            metrics[label if system.startswith("model") else system] = values

    print("\n=== zero-shot ===")
    run_eval("zero-shot", options.lm, options.lm, baselines=("lead3",))

    print("\n=== SFT ===")
    sft_dir = out / "sft"
    start = time.perf_counter()
    sft = train_sft(
        options.lm, train_file, sft_dir, limit=options.sft_examples, epochs=options.sft_epochs,
        max_prompt_tokens=options.max_prompt_tokens, max_target_tokens=options.max_new_tokens, seed=options.seed,
        device=options.device, overwrite=True,
    )
    timings["sft_s"] = time.perf_counter() - start
    run_eval("sft", str(sft_dir), str(sft_dir))

    print("\n=== PPO (reward: ROUGE against the reference, KL penalty to the SFT model) ===")
    start = time.perf_counter()
    env_kwargs = task_kwargs | dict(dataset=str(train_file), tokenizer=str(sft_dir), reward=options.reward)
    env = make_text_vec_env("NewsSummary-v0", n_envs=options.n_envs, seed=options.seed, env_kwargs=env_kwargs)
    # Periodic held-out check during training: a few training-split articles the rollouts rarely reach is not
    # held out, so the eval env reads the held-out file.
    eval_env = make_text_vec_env("NewsSummary-v0", n_envs=min(options.n_envs, 8), seed=options.seed,
                            env_kwargs=task_kwargs | dict(dataset=str(eval_file), tokenizer=str(sft_dir)))
    model = PPO(
        TransformerLMPolicy, env, rollout_buffer_class=TextRolloutBuffer, n_steps=options.max_new_tokens,
        batch_size=options.n_envs * options.max_new_tokens, n_epochs=options.n_epochs,
        learning_rate=options.learning_rate,
        policy_kwargs=dict(lm=str(sft_dir), kl_coef=options.kl_coef, trainable_layers=options.trainable_layers),
        seed=options.seed, device=options.device,
    )
    log_dir = out / "ppo_logs"
    model.set_logger(configure(str(log_dir), ["stdout", "csv", "tensorboard"]))
    callbacks = CallbackList([
        TextSampleCallback(every_n_rollouts=2, n_samples=2),
        TextEvalCallback(eval_env, prompt_indices=list(range(min(8, options.n_eval))), eval_freq_rollouts=2,
                         best_model_save_path=out / "ppo_best"),
    ])
    model.learn(options.ppo_updates * options.n_envs * options.max_new_tokens, callback=callbacks, progress_bar=True)
    model.save(out / "ppo_model")
    env.close()
    eval_env.close()
    timings["ppo_s"] = time.perf_counter() - start
    run_eval("sft+ppo", str(out / "ppo_model.zip"), str(sft_dir))

    figures = [str(p) for p in plot_runs([log_dir], out / "plots")]
    summary = {
        "options": asdict(options), "n_train_articles": n_train, "n_eval_articles": options.n_eval,
        "sft": {"eval_loss_before": sft.eval_loss_before, "eval_loss_after": sft.eval_loss_after,
                "n_examples": sft.n_examples, "train_time_s": sft.train_time_s},
        "metrics": metrics, "timings_s": timings, "figures": figures,
    }
    by_source = per_source_metrics(out, options.dataset) if options.dataset else {}
    if by_source:
        summary["metrics_by_source"] = by_source
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    report = results_table(metrics, timings) + (per_source_table(by_source) if by_source else "")
    (out / "results.md").write_text(report)
    print("\n" + report)
    return summary


def read_sources(dataset: str) -> dict[str, str]:
    """Article text -> the row's ``source`` field (e.g. ``cnndm`` / ``xsum``), for JSONL/CSV files that have one."""
    path = Path(dataset)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        import csv

        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        return {}
    return {str(r["article"]).strip(): str(r["source"]) for r in rows if r.get("source") and r.get("article")}


def per_source_metrics(out: Path, dataset: str) -> dict[str, dict[str, dict[str, float]]]:
    """
    ROUGE of every evaluated system per data source of the held-out articles (CNN/DM and XSum summaries differ a lot:
    extractive multi-sentence highlights vs one abstractive sentence), from the per-sample scores of the reports.

    :return: system -> source -> {"n", "rouge1", "rouge2", "rougeL", "length_words"}; empty without sources
    """
    sources = read_sources(dataset)
    if not sources:
        return {}
    eval_rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    scores: dict[str, dict[str, list[dict[str, float]]]] = {}
    for report in sorted(out.glob("eval_*/eval.json"), key=lambda p: p.stat().st_mtime):  # stage order
        label = report.parent.name.removeprefix("eval_")
        for sample in json.loads(report.read_text())["samples"]:
            source = sources.get(eval_rows[int(sample["prompt_index"])]["article"].strip(), "unknown")
            for system, output in sample["outputs"].items():
                name = label if system.startswith("model") else system
                scores.setdefault(name, {}).setdefault(source, []).append(output)
    keys = ("rouge1", "rouge2", "rougeL", "length_words")
    return {
        system: {
            source: {"n": len(outputs)} | {k: sum(o[k] for o in outputs) / len(outputs) for k in keys}
            for source, outputs in sorted(per_source.items())
        }
        for system, per_source in scores.items()
    }


def per_source_table(by_source: dict[str, dict[str, dict[str, float]]]) -> str:
    """ROUGE-1/2/L per system and source."""
    lines = ["", "| system | source | n | rouge1 | rouge2 | rougeL | length (words) |", "|---|---|---:|---:|---:|---:|---:|"]
    for system, per_source in by_source.items():
        for source, row in per_source.items():
            lines.append(
                f"| {system} | {source} | {row['n']} | {row['rouge1']:.3f} | {row['rouge2']:.3f} | {row['rougeL']:.3f} "
                f"| {row['length_words']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def results_table(metrics: dict[str, dict[str, Any]], timings: dict[str, float]) -> str:
    """The headline table: one row per system."""
    columns = ["rouge1", "rouge2", "rougeL", "task_reward", "kl_to_ref", "length_tokens", "stop_rate"]

    def cell(value: Any) -> str:
        return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| system | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(row.get(c)) for c in columns) + " |" for name, row in metrics.items()]
    lines.append("")
    lines.append("Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(parse_options())
