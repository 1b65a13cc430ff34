"""Choose the demo's settings on validation articles: one demo training run, scored before and after on several
validation sets of generated news (never the demo's held-out seed-1000 articles), greedily and by sampling.

Each validation set is the built-in generator with its own data seed; the last ``--n-articles`` articles of each are
scored with the untuned model and again after training, greedily (what the demo reports) and by sampling at the
policy's temperature (the distribution PPO trains; mean of ``--n-sampled`` summaries per article). Every difference
comes with its paired bootstrap 95 % interval. One JSON line per run goes to stdout and to ``--results``::

    python examples/demo_validation.py                                         # the demo's defaults
    python examples/demo_validation.py --set n_envs=16 --set learning_rate=2e-3
    python examples/demo_validation.py --ppo-kwarg normalize_advantage=false --policy-kwarg use_lora=false

docs/results.md (the demo section) lists the runs made with it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.logger import configure

from sb3_textrl.demo import DemoConfig, demo_envs, demo_model
from sb3_textrl.envs.batched import make_text_vec_env
from sb3_textrl.evaluation import generate_sample_sets
from sb3_textrl.metrics.bootstrap import paired_bootstrap


def _pairs(items: list[str], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> dict, VALUE read as JSON where it parses."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what} {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a DemoConfig field")
    parser.add_argument("--policy-kwarg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ppo-kwarg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--validation-seeds", default="2000,3000", help="data seeds of the validation sets")
    parser.add_argument("--n-articles", type=int, default=64, help="articles scored per validation set")
    parser.add_argument("--n-sampled", type=int, default=2, help="sampled summaries per article")
    parser.add_argument("--draw-counts", default=None,
                        help="also score the sampled gain from the first K draws of each article, for each K of this "
                             "comma-separated list (default: --n-sampled only), to see how the interval narrows")
    parser.add_argument("--eval-envs", type=int, default=32, help="articles decoded per batch")
    parser.add_argument("--output-dir", default="runs/demo_validation")
    parser.add_argument("--results", default=None, help="JSONL file to append the run's line to")
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.validation_seeds.split(",")]
    if 1000 in seeds:
        raise SystemExit("--validation-seeds: 1000 is the demo's held-out set; choose settings on other seeds")
    draw_counts = [args.n_sampled] if args.draw_counts is None else [int(k) for k in args.draw_counts.split(",")]
    if not all(1 <= k <= args.n_sampled for k in draw_counts):
        raise SystemExit(f"--draw-counts {args.draw_counts}: each must be between 1 and --n-sampled {args.n_sampled}")
    settings = _pairs(args.set, "--set")
    config = DemoConfig(**settings, output_dir=args.output_dir, policy_kwargs=_pairs(args.policy_kwarg, "--policy-kwarg"),
                        ppo_kwargs=_pairs(args.ppo_kwarg, "--ppo-kwarg"))
    env, _, _ = demo_envs(config)
    model = demo_model(config, env)
    model.set_logger(configure(str(Path(args.output_dir) / "logs"), ["csv"]))
    env_kwargs = dict(tokenizer=config.lm if config.tokenizer is None else config.tokenizer, max_new_tokens=config.n_steps,
                      max_prompt_tokens=config.max_prompt_tokens) | config.env_kwargs
    sets = {}
    for seed in seeds:
        venv = make_text_vec_env("NewsSummary-v0", n_envs=min(args.eval_envs, args.n_articles), seed=config.seed + 1,
                                 env_kwargs=env_kwargs | {"data_seed": seed})
        n = len(venv.get_attr("prompts", [0])[0])
        if n < args.n_articles:
            raise SystemExit(f"--n-articles {args.n_articles}: the validation set has {n} articles")
        sets[seed] = (venv, list(range(n - args.n_articles, n)))

    def score() -> dict[int, tuple[list[float], np.ndarray]]:
        # Per set: greedy rewards, and the (n_sampled, articles) rewards of the draws (seeded alike before and after).
        out = {}
        for seed, (venv, indices) in sets.items():
            drawn = generate_sample_sets(model, venv, indices, args.n_sampled, seed=config.seed)
            out[seed] = ([s.reward for s in drawn.greedy], np.array([[s.reward for s in d] for d in drawn.sampled]))
        return out

    start = time.perf_counter()
    before = score()
    eval_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model.learn(total_timesteps=config.updates * config.n_steps * config.n_envs)
    train_seconds = time.perf_counter() - start
    after = score()
    line: dict[str, Any] = {"settings": settings, "policy_kwargs": config.policy_kwargs, "ppo_kwargs": config.ppo_kwargs,
                            "train_seconds": round(train_seconds), "eval_seconds": round(eval_seconds)}
    for seed in seeds:
        gain = paired_bootstrap(before[seed][0], after[seed][0], seed=config.seed)
        line[f"seed{seed}_greedy"] = f"{gain.mean_a:.3f} -> {gain.mean_b:.3f}, {gain}"
        for k in draw_counts:
            mean_before, mean_after = before[seed][1][:k].mean(axis=0), after[seed][1][:k].mean(axis=0)
            gain = paired_bootstrap(list(mean_before), list(mean_after), seed=config.seed)
            name = f"seed{seed}_sampled" + ("" if k == args.n_sampled and len(draw_counts) == 1 else f"_{k}draws")
            line[name] = f"{gain.mean_a:.3f} -> {gain.mean_b:.3f}, {gain} (width {gain.high - gain.low:.3f})"
    print(json.dumps(line))
    if args.results:
        with open(args.results, "a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")
    return line


if __name__ == "__main__":
    main()
