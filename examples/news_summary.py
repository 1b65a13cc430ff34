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
from sb3_textrl.envs.groups import make_group_vec_env
from sb3_textrl.envs.news_data import generate_news_examples, load_summary_dataset
from sb3_textrl.metrics.bootstrap import PairedDifference, paired_bootstrap
from sb3_textrl.models import save_tiny_gpt2_lm
from sb3_textrl.plotting import plot_runs
from sb3_textrl.policies import fast_mixed_precision
from sb3_textrl.sft import train_sft

EVAL_BATCH = 8  # articles decoded together in every evaluation (greedy summaries depend on it only by float rounding)


@dataclass
class Options:
    """Everything the example can be told (``--help`` lists the same)."""

    output_dir: str = "runs/news_summary"
    dataset: str | None = None  # JSONL/CSV of article/summary pairs; None: the built-in generated news
    source: str | None = "cnndm"  # keep only the dataset rows whose "source" field is this (None: every row)
    lm: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    n_eval: int = 32  # held-out articles: the reported evaluation, never used to choose anything
    n_val: int = 16  # validation articles from the training part: they pick the PPO checkpoint
    sft_examples: int = 256  # at most this many training pairs for SFT
    sft_epochs: int = 2
    ppo_updates: int = 180  # PPO iterations (rollout + training)
    n_envs: int = 8  # 2 articles x k = 4 summaries per rollout
    samples_per_prompt: int = 4  # k completions of each article per rollout, judged against each other
    advantage: str = "rloo"  # "rloo", "grpo" (no critic) or "gae" (value head)
    n_epochs: int = 2
    minibatches: int = 1  # gradient steps per epoch
    normalize_advantage: bool = True  # PPO's per-minibatch advantage scaling (turn off: --no-normalize-advantage)
    temperature: float = 1.0  # of the rollouts' sampling and of the log-probs PPO trains (evaluation is greedy)
    max_new_tokens: int = 48
    max_prompt_tokens: int = 320
    kl_coef: float = 0.05
    trainable_layers: int | None = 4  # train only the top N blocks, from the rollout's cached lower activations
    learning_rate: float = 3e-4
    reward: str = "rougeL"  # the PPO reward: a ROUGE variant against the reference
    mixed_precision: str = "auto"  # SFT's and PPO's autocast: "bf16", "no", or "auto" (bf16 where it is fast)
    train_stop_tokens: bool = False  # let rollout summaries end at EOS (evaluation always does)
    eval_every: int = 10  # rollouts between validation evaluations (the learning curve and the checkpoint choice)
    tiny: bool = False
    seed: int = 0
    device: str = "auto"


def parse_options() -> Options:
    return parse_dataclass_options(Options, __doc__)


def split_articles(options: Options, out: Path) -> tuple[Path, Path, Path, int]:
    """Write the seeded train / validation / held-out split of the articles as three JSONL files."""
    if options.dataset:
        rows = load_summary_dataset(options.dataset)
        if options.source is not None:
            sources = read_sources(options.dataset)
            if not sources:
                raise ValueError(f"{options.dataset} has no 'source' field to filter on; pass --source None to use every row")
            kept = [r for r in rows if sources.get(r["article"].strip()) == options.source]
            if not kept:
                found = ", ".join(sorted(set(sources.values())))
                raise ValueError(f"no row of {options.dataset} has source {options.source!r} (it has: {found}); fix --source")
            rows = kept
    else:
        rows = generate_news_examples(400, seed=options.seed)
    rows = [{"article": r["article"], "summary": r["summary"]} for r in rows]
    random.Random(options.seed).shuffle(rows)
    if len(rows) < options.n_eval + options.n_val + 8:
        raise ValueError(
            f"{len(rows)} articles are too few for {options.n_eval} held-out and {options.n_val} validation ones and 8 "
            "for training; lower --n-eval or --n-val"
        )
    if options.n_val < 1:
        raise ValueError(f"n_val must be >= 1 (the validation articles choose the PPO checkpoint), got {options.n_val}")
    parts = {
        "eval.jsonl": rows[: options.n_eval],
        "val.jsonl": rows[options.n_eval : options.n_eval + options.n_val],
        "train.jsonl": rows[options.n_eval + options.n_val :],
    }
    for name, part in parts.items():
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return out / "train.jsonl", out / "val.jsonl", out / "eval.jsonl", len(parts["train.jsonl"])


def tiny_lm(out: Path) -> str:
    return save_tiny_gpt2_lm(out / "tiny_lm")


def main(options: Options) -> dict[str, Any]:
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if options.tiny:
        options.lm = tiny_lm(out)
        options.max_prompt_tokens, options.max_new_tokens = min(options.max_prompt_tokens, 96), min(options.max_new_tokens, 8)
        if options.trainable_layers is not None:  # the tiny LM has 2 blocks
            options.trainable_layers = 1
    rollout_size = options.n_envs * options.max_new_tokens
    if options.minibatches < 1 or rollout_size % options.minibatches:
        raise ValueError(f"minibatches={options.minibatches} must be >= 1 and divide the rollout's {rollout_size} tokens "
                         f"(n_envs {options.n_envs} x max_new_tokens {options.max_new_tokens}); fix --minibatches")
    precision = fast_mixed_precision(options.device) if options.mixed_precision == "auto" else options.mixed_precision
    train_file, val_file, eval_file, n_train = split_articles(options, out)
    task_kwargs = dict(max_new_tokens=options.max_new_tokens, max_prompt_tokens=options.max_prompt_tokens)
    timings: dict[str, float] = {}
    metrics: dict[str, dict[str, Any]] = {}
    run_start = time.perf_counter()

    def run_eval(label: str, model: Any, tokenizer: str | None, baselines: tuple[str, ...] = ()) -> None:
        start = time.perf_counter()
        result = evaluate(
            model, dataset=eval_file, n=options.n_eval, baselines=baselines, n_envs=EVAL_BATCH, seed=options.seed,
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
        options.lm, train_file, sft_dir, limit=options.sft_examples, epochs=options.sft_epochs, eval_data=val_file,
        max_prompt_tokens=options.max_prompt_tokens, max_target_tokens=options.max_new_tokens, seed=options.seed,
        device=options.device, overwrite=True, bf16=precision == "bf16",
    )
    timings["sft_s"] = time.perf_counter() - start
    run_eval("sft", str(sft_dir), str(sft_dir))

    print(f"\n=== PPO (reward: {options.reward} against the reference, KL penalty to the SFT model) ===")
    start = time.perf_counter()
    env_kwargs = task_kwargs | dict(dataset=str(train_file), tokenizer=str(sft_dir), reward=options.reward)
    if not options.train_stop_tokens:
        # Rollout summaries run to max_new_tokens: CNN/DM highlights (~65 tokens) are longer than the 48-token budget
        # (3 % of greedy summaries stop early), and no group member then idles waiting for its siblings.
        env_kwargs["stop_token_ids"] = [-1]
    group_advantage = options.advantage != "gae"
    if group_advantage:
        env = make_group_vec_env("NewsSummary-v0", n_envs=options.n_envs, samples_per_prompt=options.samples_per_prompt,
                                 seed=options.seed, env_kwargs=env_kwargs)
    else:
        env = make_text_vec_env("NewsSummary-v0", n_envs=options.n_envs, seed=options.seed, env_kwargs=env_kwargs)
    # The validation articles: the learning curve and the choice of the checkpoint (never the held-out ones).
    val_env = make_text_vec_env("NewsSummary-v0", n_envs=EVAL_BATCH, seed=options.seed,
                                env_kwargs=task_kwargs | dict(dataset=str(val_file), tokenizer=str(sft_dir)))
    model = PPO(
        TransformerLMPolicy, env, rollout_buffer_class=TextRolloutBuffer,
        rollout_buffer_kwargs=dict(advantage=options.advantage), n_steps=options.max_new_tokens,
        batch_size=rollout_size // options.minibatches, n_epochs=options.n_epochs,
        learning_rate=options.learning_rate, normalize_advantage=options.normalize_advantage, gamma=1.0,
        policy_kwargs=dict(lm=str(sft_dir), kl_coef=options.kl_coef, trainable_layers=options.trainable_layers,
                           critic=not group_advantage, mixed_precision=precision, temperature=options.temperature),
        seed=options.seed, device=options.device,
    )
    log_dir = out / "ppo_logs"
    model.set_logger(configure(str(log_dir), ["stdout", "csv", "tensorboard"]))
    validation = TextEvalCallback(val_env, eval_freq_rollouts=options.eval_every, eval_at_start=True,
                                  best_model_save_path=out / "ppo_best", log_path=log_dir, metric="rougeL")
    callbacks = CallbackList([TextSampleCallback(every_n_rollouts=options.eval_every, n_samples=2), validation])
    model.learn(options.ppo_updates * options.n_envs * options.max_new_tokens, callback=callbacks, progress_bar=True)
    model.save(out / "ppo_model")
    env.close()
    val_env.close()
    timings["ppo_s"] = time.perf_counter() - start
    # The reported PPO model: the checkpoint with the best validation ROUGE-L, evaluated in float32 like the others.
    best = out / "ppo_best" / "best_model.zip"
    float32 = {"policy_kwargs": model.policy_kwargs | {"mixed_precision": "no"}}
    chosen = PPO.load(best, device=options.device, custom_objects=float32)
    run_eval("sft+ppo", chosen, str(sft_dir))
    timings["total_s"] = time.perf_counter() - run_start

    figures = [str(p) for p in plot_runs([log_dir], out / "plots")]
    comparisons = paired_comparisons(out)
    summary = {
        "options": asdict(options), "mixed_precision": precision, "n_train_articles": n_train,
        "n_val_articles": options.n_val, "n_eval_articles": options.n_eval,
        "sft": {"eval_loss_before": sft.eval_loss_before, "eval_loss_after": sft.eval_loss_after,
                "n_examples": sft.n_examples, "train_time_s": sft.train_time_s},
        "ppo": {"best_validation_rougeL": validation.best_mean_reward, "validation_curve": validation_curve(log_dir)},
        "metrics": metrics, "comparisons": {name: c.to_dict() for name, c in comparisons.items()},
        "timings_s": timings, "figures": figures,
    }
    by_source = per_source_metrics(out, options.dataset) if options.dataset and options.source is None else {}
    if by_source:
        summary["metrics_by_source"] = by_source
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    report = results_table(metrics, timings) + comparisons_table(comparisons)
    report += per_source_table(by_source) if by_source else ""
    (out / "results.md").write_text(report)
    print("\n" + report)
    return summary


# The differences the recipe reports, (baseline, system), each on the same held-out articles.
COMPARISONS = (("zero-shot", "sft"), ("sft", "sft+ppo"), ("zero-shot", "sft+ppo"), ("lead3", "sft+ppo"))
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def per_article_outputs(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """
    system -> held-out article index -> its scores (ROUGE, length...), from the evaluation reports
    (``eval_*/eval.json``), systems in stage order.
    """
    outputs: dict[str, dict[int, dict[str, Any]]] = {}
    for report in sorted(out.glob("eval_*/eval.json"), key=lambda p: p.stat().st_mtime):
        label = report.parent.name.removeprefix("eval_")
        for sample in json.loads(report.read_text())["samples"]:
            for system, output in sample["outputs"].items():
                name = label if system.startswith("model") else system
                outputs.setdefault(name, {})[int(sample["prompt_index"])] = output
    return outputs


def paired_comparisons(out: Path) -> dict[str, PairedDifference]:
    """``"B - A rougeL"`` -> the paired bootstrap 95 % interval of B's mean minus A's on the same held-out articles."""
    scores = per_article_outputs(out)
    result = {}
    for baseline, system in COMPARISONS:
        if baseline not in scores or system not in scores:
            continue
        articles = sorted(set(scores[baseline]) & set(scores[system]))
        for key in ROUGE_KEYS:
            a = [float(scores[baseline][i][key]) for i in articles]
            b = [float(scores[system][i][key]) for i in articles]
            result[f"{system} - {baseline} {key}"] = paired_bootstrap(a, b)
    return result


def comparisons_table(comparisons: dict[str, PairedDifference]) -> str:
    """The differences with their paired bootstrap 95 % intervals; * marks an interval that excludes 0."""
    lines = ["", "| difference (held-out articles) | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---:|---:|---:|"]
    pairs = dict.fromkeys(name.rsplit(" ", 1)[0] for name in comparisons)
    for pair in pairs:
        cells = []
        for key in ROUGE_KEYS:
            c = comparisons.get(f"{pair} {key}")
            mark = "*" if c is not None and c.significant else ""
            cells.append("—" if c is None else f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]{mark}")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Paired bootstrap 95 % intervals (10,000 resamples of the articles); * : the interval excludes 0.")
    return "\n".join(lines) + "\n"


def validation_curve(log_dir: Path) -> list[dict[str, float]]:
    """Validation ROUGE-L by generated tokens (0: the SFT model), from TextEvalCallback's ``evaluations.jsonl``."""
    path = log_dir / "evaluations.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"timesteps": float(r["timesteps"]), "rougeL": float(r["metrics"]["rougeL"])} for r in records]


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
    scores: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for system, by_article in per_article_outputs(out).items():
        for index, output in by_article.items():
            source = sources.get(eval_rows[index]["article"].strip(), "unknown")
            scores.setdefault(system, {}).setdefault(source, []).append(output)
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
    columns = ["rouge1", "rouge2", "rougeL", "task_reward", "kl_to_ref", "completion_len", "stop_rate"]

    def cell(value: Any) -> str:
        return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| system | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(row.get(c)) for c in columns) + " |" for name, row in metrics.items()]
    lines.append("")
    lines.append("Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(parse_options())
