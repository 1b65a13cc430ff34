"""
Reward scoring per episode vs batched: the VecEnv step in which N text envs finish together, with a real
``LearnedRewardModel`` (all-MiniLM-L6-v2 with a fresh scalar head, saved and loaded as ``train-rm`` output is; the
weights of the head are untrained, which does not change the cost).

Variants (same envs, same prompts, same completions; SB3 ``DummyVecEnv`` of N envs)::

    per-episode   make_vec_env(...)         each env calls the reward model for its own episode (N forwards of 1)
    batched       make_text_vec_env(...)    one reward call for the N episodes of the step (N / batch_size forwards)

The prompts are built-in news articles (NewsSummary-style), each completion is the first ``--new-tokens`` tokens of
its reference summary, so every env ends its episode at the same, last step, whose time is measured (scoring
dominates it); one earlier step is timed too, to show what the batched path costs on steps that end nothing. Rounds
are interleaved (per-episode then batched, then the other order) in one process, so machine noise hits both alike.

    python benchmarks/reward_batching.py                  # MiniLM reward model, 8 and 64 envs, 5 rounds
    python benchmarks/reward_batching.py --threads 1      # one torch thread (small forwards on a busy machine)
    python benchmarks/reward_batching.py --tiny --rounds 1   # a 2-layer BERT (quick check; what the test runs)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

# Benchmark this checkout's sb3_textrl, installed or not (a script's sys.path starts with benchmarks/, not the root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sb3_textrl import make_text_task_env, make_text_vec_env  # noqa: E402
from sb3_textrl.envs.news_data import generate_news_examples  # noqa: E402
from sb3_textrl.models import load_gpt2_tokenizer, minilm_dir  # noqa: E402
from sb3_textrl.reward_model import load_backbone  # noqa: E402
from sb3_textrl.rewards import LearnedRewardModel  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-envs", type=int, nargs="+", default=[8, 64], help="envs finishing together")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
    parser.add_argument("--new-tokens", type=int, default=32, help="completion length (the step of the finish)")
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--rm-batch-size", type=int, default=32, help="LearnedRewardModel(batch_size=...)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide BERT reward model (quick mode)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser.parse_args(argv)


def save_reward_model(directory: Path, tiny: bool) -> Path:
    """MiniLM (or a tiny BERT with MiniLM's tokenizer) with a fresh scalar head, saved as a model directory."""
    if tiny:
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=512, num_labels=1,
                            pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
    else:
        model, tokenizer = load_backbone(None)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class Bench:
    """N envs over N articles, env i completing article i with its reference summary's first tokens."""

    def __init__(self, n_envs: int, reward: LearnedRewardModel, args: argparse.Namespace) -> None:
        tokenizer = load_gpt2_tokenizer()
        rows = generate_news_examples(n_envs, seed=0)
        prompts = [{"prompt": row["article"] + "\n\nTL;DR:", "reference": row["summary"]} for row in rows]
        self.n_envs, self.new_tokens = n_envs, args.new_tokens
        filler = tokenizer.encode(" the")[0]
        self.actions = np.full((args.new_tokens, n_envs), filler, dtype=np.int64)  # (T, N)
        for i, row in enumerate(rows):
            ids = tokenizer.encode(" " + row["summary"])[: args.new_tokens]
            self.actions[: len(ids), i] = ids
        self.factory = functools.partial(
            make_text_task_env, prompts=prompts, reward=reward, tokenizer=tokenizer, max_new_tokens=args.new_tokens,
            max_prompt_tokens=args.max_prompt_tokens, stop_token_ids=[tokenizer.eos_token_id], task_id="RewardBench-v0",
        )

    def make(self, batched: bool) -> VecEnv:
        if batched:
            return make_text_vec_env(self.factory, n_envs=self.n_envs, seed=0)
        return make_vec_env(self.factory, n_envs=self.n_envs, seed=0)

    def run(self, env: VecEnv) -> tuple[float, float, np.ndarray]:
        """(seconds of one step that ends nothing, seconds of the step that ends every episode, its rewards)."""
        for i in range(self.n_envs):
            env.env_method("queue_prompts", [i], indices=[i])
        env.reset()
        mid = 0.0
        for t in range(self.new_tokens - 1):
            start = time.perf_counter()
            _, _, dones, _ = env.step(self.actions[t])
            if t == self.new_tokens // 2:
                mid = time.perf_counter() - start
            assert not dones.any()
        start = time.perf_counter()
        _, rewards, dones, _ = env.step(self.actions[-1])
        last = time.perf_counter() - start
        assert dones.all(), "every env must finish at the last step"
        return mid, last, rewards


def count_forwards(reward: LearnedRewardModel) -> list[int]:
    sizes: list[int] = []
    reward.model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(len(kwargs["input_ids"])),
                                       with_kwargs=True)
    return sizes


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() if os.name == "posix" else "n/a"
    print(f"uptime: {load}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"reward model: {'tiny BERT (2x64)' if args.tiny else 'all-MiniLM-L6-v2'} (MiniLM tokenizer from {minilm_dir()}), "
          f"batch_size {args.rm_batch_size}; completions of {args.new_tokens} tokens; {args.rounds} rounds")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_reward_model(Path(tmp) / "rm", args.tiny)
        reward = LearnedRewardModel(path, normalize=False, device="cpu", batch_size=args.rm_batch_size)
        forwards = count_forwards(reward)
        print(f"{'envs':>5} {'per-episode s':>14} {'batched s':>10} {'ratio':>7} {'forwards':>10} "
              f"{'other step: per-ep / batched ms':>32}")
        for n_envs in args.n_envs:
            bench = Bench(n_envs, reward, args)
            envs = {"per-episode": bench.make(False), "batched": bench.make(True)}
            times: dict[str, list[float]] = {name: [] for name in envs}
            mids: dict[str, list[float]] = {name: [] for name in envs}
            n_forwards: dict[str, int] = {}
            rewards: dict[str, np.ndarray] = {}
            for round_ in range(args.rounds + 1):  # round 0 warms up (first forwards, allocator) and is not counted
                order = list(envs) if round_ % 2 == 0 else list(envs)[::-1]
                for name in order:
                    del forwards[:]
                    mid, last, rewards[name] = bench.run(envs[name])
                    n_forwards[name] = len(forwards)
                    if round_ > 0:
                        times[name].append(last)
                        mids[name].append(mid)
            per, batched = statistics.median(times["per-episode"]), statistics.median(times["batched"])
            diff = float(np.abs(rewards["per-episode"] - rewards["batched"]).max())
            results.append(dict(n_envs=n_envs, per_episode_s=per, batched_s=batched, ratio=per / batched,
                                per_episode_forwards=n_forwards["per-episode"], batched_forwards=n_forwards["batched"],
                                max_abs_diff=diff))
            mid_ms = f"{1e3 * statistics.median(mids['per-episode']):.2f} / {1e3 * statistics.median(mids['batched']):.2f}"
            print(f"{n_envs:>5} {per:>14.4f} {batched:>10.4f} {per / batched:>6.2f}x "
                  f"{n_forwards['per-episode']:>4} / {n_forwards['batched']:<3} {mid_ms:>32}")
            for env in envs.values():
                env.close()
    print("ratio = per-episode / batched time of the step that finishes every env (median of the rounds); "
          "max |reward difference| " + ", ".join(f"{r['max_abs_diff']:.1e}" for r in results))
    return results


if __name__ == "__main__":
    main()
