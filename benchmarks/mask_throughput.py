"""
Action-mask throughput: the fast PPO path with and without env-side masks, side by side in one process.

Variants (same LM, same NewsSummary-v0 data, same PPO settings; each call is ``learn()`` of one rollout)::

    no mask   PPO(TransformerLMPolicy, rollout_buffer_class=TextRolloutBuffer)
    masked    MaskablePPO(MaskableTransformerLMPolicy, rollout_buffer_class=MaskableTextRolloutBuffer), env
              action_mask="article" (masks computed by the envs, stacked by MaskablePPO, packed into the buffer,
              applied to the logits in rollouts, training and the masked reference forward of the KL penalty)

The calls are interleaved round by round, so machine noise hits both alike; the report is the ratio masked / no mask
of tokens per second (target >= 0.85). By default every completion runs to ``--new-tokens`` (the stop token is an
id the LM never picks), so both variants train on the same number of episodes of the same length; ``--natural-stops``
keeps the task's stop tokens (then episode lengths differ between variants and are printed).

    python benchmarks/mask_throughput.py                       # embedded SmolLM2-135M, modest settings
    python benchmarks/mask_throughput.py --lm path/to/lm --n-envs 16 --new-tokens 64 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sb3_contrib
import stable_baselines3
import torch
import transformers
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

# Benchmark this checkout's sb3_textrl, installed or not (a script's sys.path starts with benchmarks/, not the root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sb3_textrl  # noqa: E402
from sb3_textrl import (  # noqa: E402
    MaskableTextRolloutBuffer,
    MaskableTransformerLMPolicy,
    TextRolloutBuffer,
    TransformerLMPolicy,
)
from sb3_textrl.models import load_tokenizer  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", default=None, help="LM name or path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "auto"')
    parser.add_argument("--n-envs", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens; also PPO's n_steps")
    parser.add_argument("--max-prompt-tokens", type=int, default=192)
    parser.add_argument("--n-articles", type=int, default=64, help="size of NewsSummary-v0's built-in data")
    parser.add_argument("--mask", default="article", help="the env's action_mask in the masked variant")
    parser.add_argument("--n-epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds: one learn() of one rollout per variant")
    parser.add_argument("--warmup-rollouts", type=int, default=1)
    parser.add_argument("--natural-stops", action="store_true", help="keep the task's stop tokens (episodes may end early)")
    parser.add_argument("--min-ratio", type=float, default=0.85, help="PASS threshold of masked / no mask")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class RolloutTimer(BaseCallback):
    """Rollout seconds (collect_rollouts incl. the KL penalty) and completion lengths of the timed calls."""

    def __init__(self) -> None:
        super().__init__()
        self.rollout_seconds: list[float] = []
        self.lengths: list[int] = []
        self._start = 0.0

    def _on_rollout_start(self) -> None:
        self._start = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.rollout_seconds.append(time.perf_counter() - self._start)

    def _on_step(self) -> bool:
        self.lengths += [int(i["completion_tokens"]) for i in self.locals["infos"] if "completion_tokens" in i]
        return True


def make_model(args: argparse.Namespace, masked: bool) -> BaseAlgorithm:
    env_kwargs: dict[str, Any] = dict(
        max_new_tokens=args.new_tokens, max_prompt_tokens=args.max_prompt_tokens, n_articles=args.n_articles
    )
    if args.lm is not None:
        env_kwargs["tokenizer"] = args.lm
    if not args.natural_stops:
        # A token the LM never picks: every completion runs to max_new_tokens in both variants.
        env_kwargs["stop_token_ids"] = [len(load_tokenizer(args.lm)) - 1]
    if masked:
        env_kwargs["action_mask"] = args.mask
    env = make_vec_env("NewsSummary-v0", n_envs=args.n_envs, seed=args.seed, env_kwargs=env_kwargs)
    common = dict(n_steps=args.new_tokens, batch_size=args.new_tokens * args.n_envs, n_epochs=args.n_epochs, gamma=1.0,
                  seed=args.seed, device=args.device, policy_kwargs=dict(lm=args.lm))
    if masked:
        return MaskablePPO(MaskableTransformerLMPolicy, env, rollout_buffer_class=MaskableTextRolloutBuffer, **common)
    return PPO(TransformerLMPolicy, env, rollout_buffer_class=TextRolloutBuffer, **common)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    names = {False: "PPO fast path, no mask", True: f"MaskablePPO fast path, action_mask={args.mask!r}"}
    models = {masked: make_model(args, masked) for masked in (False, True)}
    tokens = args.new_tokens * args.n_envs
    for model in models.values():
        for _ in range(args.warmup_rollouts):
            model.learn(tokens, reset_num_timesteps=False)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    timers = {masked: RolloutTimer() for masked in models}
    for round_ in range(args.rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)  # alternate who goes first
        for masked in order:
            start = time.perf_counter()
            models[masked].learn(tokens, callback=timers[masked], reset_num_timesteps=False)
            seconds[masked].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{names[m]} {seconds[m][-1]:.1f} s" for m in models),
              file=sys.stderr, flush=True)

    print("\n## Action-mask throughput\n")
    print(
        f"NewsSummary-v0 (built-in data, {args.n_articles} articles), LM {args.lm or 'embedded SmolLM2-135M-Instruct'}, "
        f"{args.n_envs} envs, max_prompt_tokens={args.max_prompt_tokens}, {args.new_tokens} new tokens "
        f"({'natural stops' if args.natural_stops else 'every completion runs to the limit'}); PPO n_steps="
        f"{args.new_tokens}, batch_size={tokens} (whole episodes), n_epochs={args.n_epochs}, LoRA r=16, kl_coef=0.05. "
        f"{args.rounds} interleaved rounds after {args.warmup_rollouts} warm-up rollout(s) per variant.\n"
    )
    print("| variant | tokens/s | median tokens/s | seconds per call | rollout share | mean completion length |")
    print("|---|---:|---:|---|---:|---:|")
    rates = {}
    for masked, timing in seconds.items():
        rates[masked] = (tokens * len(timing) / sum(timing), tokens / statistics.median(timing))
        share = sum(timers[masked].rollout_seconds) / sum(timing)
        print(
            f"| {names[masked]} | {rates[masked][0]:,.1f} | {rates[masked][1]:,.1f} | {', '.join(f'{s:.1f}' for s in timing)} "
            f"| {100 * share:.0f}% | {np.mean(timers[masked].lengths):.1f} |"
        )
    ratio, median_ratio = rates[True][0] / rates[False][0], rates[True][1] / rates[False][1]
    verdict = "PASS" if ratio >= args.min_ratio else "FAIL"
    print(f"\n- masked / no mask = {ratio:.3f} [median {median_ratio:.3f}] (target >= {args.min_ratio:g}): {verdict}")
    buffer = models[True].rollout_buffer
    print(f"- masks in the buffer: {buffer.packed_masks.nbytes / 2**20:.2f} MiB packed (sb3-contrib's float32 layout: "
          f"{buffer.packed_masks.shape[0] * buffer.packed_masks.shape[1] * buffer.mask_dims * 4 / 2**20:.1f} MiB)")
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"stable-baselines3 {stable_baselines3.__version__}, sb3-contrib {sb3_contrib.__version__}, "
        f"sb3_textrl {sb3_textrl.__version__}; device {args.device}; nproc {nproc}, torch threads "
        f"{torch.get_num_threads()}, load average {load}; wall time {time.perf_counter() - wall:.0f} s"
    )


if __name__ == "__main__":
    main()
