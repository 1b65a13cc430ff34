"""
Evaluation decoding throughput: the env loop, the fast path and HF ``generate()`` on one batch, in one process.

What ``evaluate()`` / ``sb3-textrl eval`` and ``sb3-textrl sample`` spend their time on is decoding the prompts. This
times, round by round (the order rotates, so machine noise hits every variant alike):

1. **env loop**: ``generate_samples(..., fast=False)``: ``model.predict`` + ``env.step`` per token (the old path);
2. **fast path**: ``generate_samples(...)``: :mod:`sb3_textrl.common.generation` (one prefill, one batched one-token
   forward per token with a DynamicCache, the policy's distribution, the env's stop rules, rewards in one batch);
3. **fast path, no stop**: :func:`sb3_textrl.common.generation.decode` with no stop token: every row runs to
   ``--new-tokens``, the same work as (4);
4. **HF generate()**: the same LM module (LoRA layers included), the same left-padded prompts, KV cache, no gradients,
   greedy, ``min_new_tokens = max_new_tokens`` so every row runs to the limit.

Reported: tokens/s (tokens actually generated / seconds), fast no-stop / generate() (target >= 0.8) and fast / env
loop. Greedy decoding everywhere; the fast path's tokens are checked equal to the env loop's.

    python benchmarks/eval_throughput.py            # embedded SmolLM2-135M, 8 real news articles, 320 + 48 tokens
    python benchmarks/eval_throughput.py --tiny     # tiny GPT-2, seconds (CI)

Weights: the embedded SmolLM2-135M-Instruct; without its package, random weights of its architecture (said so).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from stable_baselines3.common.env_util import make_vec_env

# Benchmark this checkout's sb3_textrl (a script's sys.path starts with benchmarks/, not the root).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sb3_textrl  # noqa: E402
from sb3_textrl.common.generation import decode, text_env_of  # noqa: E402
from sb3_textrl.evaluation import generate_samples  # noqa: E402
from sb3_textrl.sampling import load_generator  # noqa: E402

DEFAULT_DATASET = ROOT / ".." / "shared" / "data" / "news_dev.jsonl"
TARGET = 0.8  # fast path (no stop) / generate()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny GPT-2, 4 prompts, 64 + 8 tokens, 1 round (CI)")
    parser.add_argument("--lm", default="auto", choices=("auto", "embedded", "random"),
                        help="auto: the embedded SmolLM2 if installed, else random weights of its architecture")
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="JSONL of article/summary pairs (NewsSummary-v0)")
    parser.add_argument("--n-prompts", type=int, default=8, help="the batch: prompts decoded at once")
    parser.add_argument("--max-prompt-tokens", type=int, default=320)
    parser.add_argument("--new-tokens", type=int, default=48, help="max_new_tokens")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one call of each variant per round)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.n_layers = None  # gpu_throughput.prepare_lm's argument: the full architecture
    if args.tiny:
        args.n_prompts, args.max_prompt_tokens, args.new_tokens, args.rounds = 4, 64, 8, 1
    return args


def load_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare(args: argparse.Namespace, directory: Path) -> tuple[str, str]:
    """The LM directory and a line saying which weights these are."""
    if args.tiny:
        from sb3_textrl.models import save_tiny_gpt2_lm

        return save_tiny_gpt2_lm(directory), "tiny random GPT-2 (2 layers x 64, GPT-2 tokenizer), --tiny"
    from gpu_throughput import prepare_lm

    lm_dir, _, what = prepare_lm(args, directory)
    if "RANDOM" in what:
        print(f"note: {what}", flush=True)
    return str(lm_dir), what


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"uptime at start: {load_line()}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        lm_dir, what = prepare(args, Path(tmp))
        env_kwargs: dict[str, Any] = dict(tokenizer=lm_dir, max_prompt_tokens=args.max_prompt_tokens,
                                          max_new_tokens=args.new_tokens)
        dataset = Path(args.dataset)
        if dataset.is_file():
            env_kwargs["dataset"] = str(dataset)
            data = f"{dataset.name} (first {args.n_prompts} articles)"
        elif args.tiny:  # CI without the shared data: the built-in generated news
            env_kwargs["n_articles"] = 16
            data = "built-in generated news (the shared data is missing)"
        else:
            raise SystemExit(f"{dataset} not found: pass --dataset FILE (a JSONL of article/summary pairs)")
        env = make_vec_env("NewsSummary-v0", n_envs=args.n_prompts, seed=args.seed, env_kwargs=env_kwargs)
        model = load_generator(lm_dir, env, device=args.device, seed=args.seed)  # what evaluate() decodes with
        policy = model.policy
        text_env = text_env_of(env)
        indices = list(range(args.n_prompts))
        prompts = [text_env.prompt_ids[i] for i in indices]
        lm = policy._hf_model()  # the policy's LM module, its (zero-B) LoRA layers included

        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left-padded, as generate() wants a decoder-only batch
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(policy.device), mask.to(policy.device)
        pad = lm.generation_config.pad_token_id
        pad = pad if pad is not None else int(next(iter(text_env.stop_token_ids)))
        outputs: dict[str, Any] = {}

        def env_loop() -> int:
            outputs["env loop"] = generate_samples(model, env, indices, deterministic=True, fast=False)
            return sum(s.completion_tokens for s in outputs["env loop"])

        def fast() -> int:
            outputs["fast path"] = generate_samples(model, env, indices, deterministic=True)
            return sum(s.completion_tokens for s in outputs["fast path"])

        def fast_no_stop() -> int:
            out = decode(policy, prompts, args.new_tokens, stop_token_ids=(), deterministic=True)
            return sum(len(t) for t in out.tokens)

        def hf_generate() -> int:
            with torch.no_grad(), policy._autocast():
                out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, temperature=None, top_p=None,
                                  top_k=None, pad_token_id=pad, use_cache=True)
            return int(out[:, width:].numel())

        variants = {
            "env loop: generate_samples(fast=False)": env_loop,
            "fast path: generate_samples() (env stop tokens)": fast,
            "fast path, no stop: decode(stop_token_ids=())": fast_no_stop,
            "HF generate() (min_new_tokens=max_new_tokens)": hf_generate,
        }
        names = list(variants)
        fast_no_stop(), hf_generate()  # untimed warm-up of the two short calls (allocator, kernels)
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotate who goes first
            for name in order:
                results[name].append(timed(variants[name]))
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n.split(':')[0]} {results[n][-1][0]:.1f} s"
                                                                   for n in names), file=sys.stderr, flush=True)
        env.close()

    rates = {}
    print("\n## Evaluation decoding throughput\n")
    print(f"NewsSummary-v0 on {data}; LM: {what}; {args.n_prompts} prompts in one batch (n_envs={args.n_prompts}), "
          f"max_prompt_tokens={args.max_prompt_tokens} (prompts of {min(map(len, prompts))}-{width} tokens), "
          f"max_new_tokens={args.new_tokens}, greedy; device {args.device}; {args.rounds} interleaved rounds.\n")
    print("| variant | tokens/s | median tokens/s | tokens per call | seconds per call |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        seconds = [s for s, _ in results[name]]
        tokens = [n for _, n in results[name]]
        rates[name] = sum(tokens) / sum(seconds)
        median = statistics.median(n / s for s, n in results[name])
        print(f"| {name} | {rates[name]:,.1f} | {median:,.1f} | {statistics.mean(tokens):.0f} | "
              f"{', '.join(f'{s:.2f}' for s in seconds)} |")
    ratio = rates[names[2]] / rates[names[3]]
    same = all(
        (a.completion, a.completion_tokens, a.ended_by_stop_token)
        == (b.completion, b.completion_tokens, b.ended_by_stop_token)
        and np.array_equal(a.observation["input_ids"], b.observation["input_ids"])
        for a, b in zip(outputs["env loop"], outputs["fast path"])
    )
    print(f"\n- fast path (no stop) / generate() = {ratio:.2f} (target >= {TARGET}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    print(f"- fast path / env loop = {rates[names[1]] / rates[names[0]]:.1f}x (tokens/s, both with the env's stop tokens)")
    print(f"- fast path (env stop tokens) / generate() = {rates[names[1]] / rates[names[3]]:.2f}")
    print(f"- greedy completions of the fast path identical to the env loop's: {'yes' if same else 'NO'} "
          f"({sum(s.ended_by_stop_token for s in outputs['fast path'])} of {args.n_prompts} ended by a stop token)")
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"sb3_textrl {sb3_textrl.__version__}; nproc {nproc}, torch threads {torch.get_num_threads()}; "
          f"wall time {time.perf_counter() - wall:.0f} s")
    print(f"- uptime at the end: {load_line()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
