"""RLHF on news summaries, end to end and offline: SFT -> sample -> ratings -> reward model -> PPO -> before/after.

    python examples/rlhf_news.py                         # embedded SmolLM2-135M + MiniLM reward model (~15 min, 2 cores)
    python examples/rlhf_news.py --dataset ../shared/data/news_dev.jsonl   # real news instead of the built-in news
    python examples/rlhf_news.py --tiny                  # tiny models, a few seconds a stage (what CI runs)
    python examples/rlhf_news.py --rater human           # stop after sampling: rate in the browser, then --resume

Stages (each is also a CLI command; see docs/rlhf.md):

1. ``sft``: supervised fine-tuning of the LM on (article, summary) pairs.
2. ``sample``: two candidate summaries per article (greedy and sampled) into a SQLite feedback store.
3. ratings: a scripted rater judges each pair (it prefers the summary with more word overlap with the reference,
   ROUGE-1, and with more of its words found in the article; a tie within 0.02) -- or a person on the rating page
   (``sb3-textrl rate``).
4. ``train-rm``: a Bradley-Terry reward model on those preferences.
5. PPO with the learned reward model as the reward, KL-penalised towards the SFT model.
6. Before/after: greedy summaries of held-out articles by the base LM, the SFT LM and the PPO LM, scored by the
   learned reward and by ROUGE-1 against the references.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rouge_score import rouge_scorer
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure

from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy, make_text_vec_env
from sb3_textrl.common.options import parse_dataclass_options
from sb3_textrl.evaluation import generate_samples
from sb3_textrl.feedback import FeedbackStore
from sb3_textrl.models import save_tiny_gpt2_lm
from sb3_textrl.reward_model import train_reward_model
from sb3_textrl.rewards import LearnedRewardModel
from sb3_textrl.sampling import CandidateSource, DecodingSettings, load_generator, pick_prompts, sample_for_rating
from sb3_textrl.sft import train_sft


@dataclass
class Options:
    """Everything the example can be told (``--help`` lists the same)."""

    output_dir: str = "runs/rlhf_news"
    dataset: str | None = None  # JSONL/CSV of article/summary pairs; None: the built-in generated news
    lm: str | None = None  # base LM; None: the embedded SmolLM2-135M-Instruct
    rm_backbone: str | None = None  # reward-model backbone; None: the embedded all-MiniLM-L6-v2
    sft_examples: int = 192  # (article, summary) pairs for SFT
    sft_epochs: int = 1
    n_prompts: int = 64  # articles sampled for rating (two candidates each)
    rm_epochs: int = 3
    ppo_updates: int = 4  # PPO iterations
    n_envs: int = 4
    max_new_tokens: int = 32
    max_prompt_tokens: int = 256
    kl_coef: float = 0.05
    learning_rate: float = 3e-4
    n_eval: int = 16  # held-out articles of the before/after comparison
    rater: str = "script"  # "script" or "human" (stop after sampling; rate; rerun with --resume)
    resume: bool = False  # reuse the outputs of finished stages
    tiny: bool = False  # tiny models (CI)
    seed: int = 0
    device: str = "auto"
    # Which articles each stage sees (disjoint): SFT, then rating + PPO, then the evaluation.
    splits: dict[str, int] = field(default_factory=lambda: {"sft": 0, "rl": 1, "eval": 2})


def parse_options() -> Options:
    return parse_dataclass_options(Options, __doc__, skip=("splits",))


def build_tiny_models(out: Path) -> tuple[str, str]:
    """A tiny GPT-2 policy LM and a tiny GPT-2 reward-model backbone, on GPT-2's tokenizer, saved under ``out``."""
    return save_tiny_gpt2_lm(out / "tiny_lm", seed=0), save_tiny_gpt2_lm(out / "tiny_rm_backbone", seed=1)


def news_kwargs(options: Options, split: str, tokenizer: str | None) -> dict[str, Any]:
    """Env kwargs of NewsSummary-v0 for one split of the articles."""
    kwargs: dict[str, Any] = dict(max_new_tokens=options.max_new_tokens, max_prompt_tokens=options.max_prompt_tokens)
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    if options.dataset is None:
        # The built-in generator: another seed is another set of articles.
        kwargs["data_seed"] = 100 + options.splits[split]
        kwargs["n_articles"] = 256
    else:
        kwargs["dataset"] = options.dataset
    return kwargs


def rater_score(scorer: rouge_scorer.RougeScorer, article: str, reference: str, summary: str) -> float:
    """The scripted rater's taste: overlap with the reference (ROUGE-1 F) plus half the share of the summary's words
    that appear in the article (it dislikes made-up words)."""
    words = summary.lower().split()
    article_words = set(article.lower().split())
    grounded = sum(w in article_words for w in words) / len(words) if words else 0.0
    return scorer.score(reference, summary)["rouge1"].fmeasure + 0.5 * grounded


def scripted_ratings(db: Path, rater: str = "script", tie_margin: float = 0.02) -> dict[str, int]:
    """Judge every pair as :func:`rater_score` says; scores closer than ``tie_margin`` are ties."""
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    counts = {"A": 0, "B": 0, "tie": 0}
    with FeedbackStore(db) as store:
        while (item := store.next_item(rater)) is not None:
            article, reference = item["article"] or item["prompt"], item["reference"] or ""
            a, b = (rater_score(scorer, article, reference, c["text"]) for c in item["candidates"])
            choice = "tie" if abs(a - b) < tie_margin else ("A" if a > b else "B")
            store.record_preference(item["id"], rater, choice)
            counts[choice] += 1
    return counts


def held_out_comparison(
    models: dict[str, str | None], options: Options, reward: LearnedRewardModel, tokenizer: str | None
) -> dict[str, dict[str, float]]:
    """Greedy summaries of the held-out articles by each model, scored by the learned reward and by ROUGE-1."""
    env = make_text_vec_env("NewsSummary-v0", n_envs=options.n_envs, seed=options.seed,
                       env_kwargs=news_kwargs(options, "eval", tokenizer))
    n_available = len(env.get_attr("prompts", [0])[0])
    indices = pick_prompts(n_available, min(options.n_eval, n_available), options.seed)
    results = {}
    for label, model_path in models.items():
        generator = load_generator(model_path, env, device=options.device, seed=options.seed)
        samples = generate_samples(generator, env, indices, deterministic=True, progress_bar=True)
        learned = reward([s.prompt for s in samples], [s.completion for s in samples], [s.reference for s in samples])
        results[label] = {
            "learned_reward": float(np.mean(learned)),
            "rouge1": float(np.mean([s.reward for s in samples])),
            "completion_tokens": float(np.mean([s.completion_tokens for s in samples])),
        }
        print(f"  {label:>8}: {samples[0].completion.strip()[:150]!r}")
    env.close()
    return results


def main(options: Options) -> dict[str, Any]:
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if options.tiny:
        options.lm, options.rm_backbone = build_tiny_models(out)
        # Tiny models write noise: short prompts and completions keep the smoke run to seconds per stage.
        options.max_prompt_tokens, options.max_new_tokens = min(options.max_prompt_tokens, 96), min(options.max_new_tokens, 8)

    def stage(name: str) -> float:
        print(f"\n=== {name} ===")
        return time.perf_counter()

    # 1. Supervised warm start.
    sft_dir = out / "sft"
    start = stage("1. SFT")
    if not (options.resume and (sft_dir / "config.json").is_file()):
        sft = train_sft(
            options.lm, options.dataset, sft_dir, task="NewsSummary-v0" if options.dataset is None else None,
            task_kwargs=news_kwargs(options, "sft", options.lm) if options.dataset is None else None,
            limit=options.sft_examples, epochs=options.sft_epochs, max_prompt_tokens=options.max_prompt_tokens,
            seed=options.seed, device=options.device, overwrite=True,
        )
        print(f"held-out loss per summary token: {sft.eval_loss_before:.3f} -> {sft.eval_loss_after:.3f}")
    timings["sft_s"] = time.perf_counter() - start

    # 2. Two candidates per article, to judge.
    db = out / "feedback.db"
    start = stage("2. sample")
    if not (options.resume and db.is_file()):
        db.unlink(missing_ok=True)
        sample_for_rating(
            db, n_prompts=options.n_prompts, n_envs=options.n_envs, seed=options.seed, device=options.device,
            source_a=CandidateSource(str(sft_dir), DecodingSettings(greedy=True)),
            source_b=CandidateSource(str(sft_dir), DecodingSettings(greedy=False, temperature=1.0)),
            env_kwargs=news_kwargs(options, "rl", str(sft_dir)),
        )
    timings["sample_s"] = time.perf_counter() - start

    # 3. Ratings.
    start = stage("3. ratings")
    if options.rater == "human":
        with FeedbackStore(db) as store:
            done, total = store.progress("human")
        if done < total:
            print(f"{total - done} pairs wait for you: sb3-textrl rate --db {db} --rater human ; then rerun with --resume")
            return {}
        counts = {"rated_by": "human"}
    else:
        counts = scripted_ratings(db)
        print(f"scripted judgements: {counts}")
    timings["ratings_s"] = time.perf_counter() - start

    # 4. Reward model from the preferences.
    rm_dir = out / "reward_model"
    start = stage("4. train-rm")
    rm = train_reward_model(db, rm_dir, backbone=options.rm_backbone, epochs=options.rm_epochs, seed=options.seed,
                            device=options.device, **({"learning_rate": 1e-3} if options.tiny else {}))
    timings["train_rm_s"] = time.perf_counter() - start
    rm_metrics = {k: rm.metrics.get(k) for k in ("n_train_pairs", "n_eval_pairs", "train_accuracy", "eval_accuracy")}
    print(f"reward model: {rm_metrics}")
    reward = LearnedRewardModel(rm_dir, device=options.device)

    # 5. PPO on the learned reward, starting from the SFT model.
    start = stage("5. PPO with the learned reward")
    env = make_text_vec_env("NewsSummary-v0", n_envs=options.n_envs, seed=options.seed,
                       env_kwargs=news_kwargs(options, "rl", str(sft_dir)) | {"reward": reward})
    model = PPO(
        TransformerLMPolicy, env, rollout_buffer_class=TextRolloutBuffer, n_steps=options.max_new_tokens,
        batch_size=options.n_envs * options.max_new_tokens, n_epochs=2, learning_rate=options.learning_rate,
        policy_kwargs=dict(lm=str(sft_dir), kl_coef=options.kl_coef), seed=options.seed, device=options.device,
    )
    model.set_logger(configure(str(out / "ppo_logs"), ["stdout", "csv"]))
    model.learn(options.ppo_updates * options.n_envs * options.max_new_tokens, progress_bar=True)
    model.save(out / "ppo_model")
    env.close()
    timings["ppo_s"] = time.perf_counter() - start

    # 6. Before / after on held-out articles.
    start = stage("6. before / after (held-out articles, greedy)")
    base = None if options.lm is None else options.lm
    comparison = held_out_comparison(
        {"base": base, "sft": str(sft_dir), "sft+ppo": str(out / "ppo_model.zip")}, options, reward, str(sft_dir)
    )
    timings["compare_s"] = time.perf_counter() - start
    print("\n| model | learned reward | ROUGE-1 | tokens |\n|---|---:|---:|---:|")
    for label, row in comparison.items():
        print(f"| {label} | {row['learned_reward']:.3f} | {row['rouge1']:.3f} | {row['completion_tokens']:.1f} |")
    summary = {
        "options": asdict(options), "judgements": counts, "timings_s": timings, "comparison": comparison,
        "reward_model": rm_metrics,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ntimings (s): { {k: round(v, 1) for k, v in timings.items()} }; summary in {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(parse_options())
