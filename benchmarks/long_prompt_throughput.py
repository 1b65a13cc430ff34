"""
Long-prompt PPO throughput: ``trainable_layers`` against training every layer, and against HF ``generate()``.

Summarisation prompts are long and completions short. Training every layer encodes each article 2 + n_epochs times
per PPO iteration (rollout prefill, reference pass, a forward and backward per epoch); with ``trainable_layers=N``
the reference pass and the epochs run only the top N blocks from the hidden states the rollout kept. All variants
run in ONE process, interleaved round by round, so their ratios mean something on a shared machine::

    python benchmarks/long_prompt_throughput.py                       # embedded SmolLM2-135M, real news, 2 CPU cores
    python benchmarks/long_prompt_throughput.py --device cuda --n-envs 64 --mixed-precision bf16
    python benchmarks/long_prompt_throughput.py --tiny                # seconds: random 4-layer model (CI smoke run)

Setup: NewsSummary-v0 on ``../shared/data/news_dev.jsonl`` (the repository's sibling folder; ``--dataset``),
``max_prompt_tokens=320``, 48 new tokens with no stop token (every completion runs to the limit), PPO
``n_steps=48`` (one episode per env per iteration), one minibatch per epoch, ``n_epochs=2``, LoRA r=16, β=0.05.
The floor is HF ``generate()`` of the same prompts × 48 tokens with its KV cache and no gradients: an iteration
cannot be cheaper than generating its tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sb3_textrl, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_throughput import prepare_lm  # noqa: E402
from ppo_throughput import SplitTimer, TimedTextRolloutBuffer, Timings, log, machine_lines, sync, timed  # noqa: E402

import sb3_textrl  # noqa: E402, F401  (registers NewsSummary-v0)
from sb3_textrl import TransformerLMPolicy  # noqa: E402

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "news_dev.jsonl"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:1" or "auto"')
    parser.add_argument("--lm", default="auto", choices=("auto", "embedded", "random"),
                        help="auto: the embedded SmolLM2 if installed, else random weights of its architecture")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="news JSONL (None-like 'builtin': synthetic)")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=320, help="max_prompt_tokens of the env")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per completion; also PPO's n_steps")
    parser.add_argument("--n-epochs", type=int, default=2)
    parser.add_argument("--layers", default="before,all,8,4,2",
                        help="comma-separated trainable_layers values ('all' = None; 'before' = None as before this option; "
                             "a ':plain' suffix, e.g. '4:plain': autocast without the frozen weights' bf16 copies)")
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one iteration of every variant each)")
    parser.add_argument("--min-speedup", type=float, default=3.0, help="target: trainable_layers=4 / all layers")
    parser.add_argument("--max-over-floor", type=float, default=2.0, help="target: trainable_layers=4 iteration / generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="random 4-layer model, short prompts, 1 round: a smoke run")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.lm, args.n_layers, args.rounds, args.layers = "random", 4, 1, "before,all,2,2:plain"
        args.prompt_tokens, args.new_tokens, args.n_envs = min(args.prompt_tokens, 64), min(args.new_tokens, 8), 2
    else:
        args.n_layers = None
    return args


BEFORE = "before"  # every layer, with the end-of-rollout bootstrap prefill that this issue removed
PLAIN = ":plain"  # suffix: CPU autocast re-casting every frozen weight at every op, as before FrozenWeightCasts


def layer_settings(spec: str) -> list[int | str | None]:
    names = {"all": None, BEFORE: BEFORE}
    settings: list[int | str | None] = []
    for item in (item.strip() for item in spec.split(",")):
        core = item.removesuffix(PLAIN)
        if core != item:
            settings.append(f"{'all' if names.get(core, core) is None else core}{PLAIN}")
        else:
            settings.append(names[item] if item in names else int(item))
    return settings


def trainable_of(layers: int | str | None) -> int | None:
    """The policy's trainable_layers for a variant."""
    if isinstance(layers, str):
        core = layers.removesuffix(PLAIN)
        return None if core in ("all", BEFORE) else int(core)
    return layers


def label(layers: int | str | None) -> str:
    if isinstance(layers, str) and layers.endswith(PLAIN):
        return f"{label(trainable_of(layers))}, plain autocast (no bf16 weight copies)"
    if layers == BEFORE:
        return "all layers, as before trainable_layers (bootstrap prefill kept)"
    return "all layers" if layers is None else f"trainable_layers={layers}"


class BootstrapPrefillBuffer(TimedTextRolloutBuffer):
    """The buffer as it was before: SB3's end-of-rollout bootstrap prefills the new episodes' prompts for nothing."""

    def add(self, *args: Any, **kwargs: Any) -> None:
        super().add(*args, **kwargs)
        if self.policy is not None:
            self.policy.bootstrap_after_rollout = False


class Runner:
    """One PPO model; each call is one iteration (a rollout of every env's episode, then n_epochs of training)."""

    def __init__(self, args: argparse.Namespace, lm_dir: Path, layers: int | str | None, env_kwargs: dict[str, Any]):
        env = make_vec_env("NewsSummary-v0", n_envs=args.n_envs, seed=args.seed, env_kwargs=env_kwargs)
        trainable = trainable_of(layers)
        self.ppo = PPO(
            TransformerLMPolicy, env, n_steps=args.new_tokens, batch_size=args.n_envs * args.new_tokens,
            n_epochs=args.n_epochs, gamma=1.0, seed=args.seed, device=args.device, verbose=0,
            rollout_buffer_class=BootstrapPrefillBuffer if layers == BEFORE else TimedTextRolloutBuffer,
            policy_kwargs=dict(lm=str(lm_dir), kl_coef=0.05, mixed_precision=args.mixed_precision, trainable_layers=trainable),
        )
        if isinstance(layers, str) and layers.endswith(PLAIN):
            self.ppo.policy.frozen_weight_casts = None  # every frozen weight cast at every op, as before
        self.tokens = args.n_envs * args.new_tokens
        self.timer = SplitTimer(torch.device(args.device))
        self.prompt_lengths = [len(ids) for ids in env.get_attr("prompt_ids")[0]]

    def __call__(self) -> None:
        self.ppo.learn(self.tokens, callback=self.timer, reset_num_timesteps=False)

    def weight_copies_bytes(self) -> int:
        casts = self.ppo.policy.frozen_weight_casts
        return 0 if casts is None else casts.size_in_bytes()

    def split_line(self, timings: Timings) -> str:
        rollout = sum(self.timer.rollout_seconds[1:])  # the first rollout was the untimed warm-up
        returns = sum(self.ppo.rollout_buffer.returns_seconds[1:])
        train = timings.total - rollout
        lengths = self.timer.completion_lengths
        return (f"- {timings.variant}: rollout {rollout / len(timings.seconds):.1f} s per iteration (of which reference "
                f"pass + GAE {returns / len(timings.seconds):.1f} s), training {train / len(timings.seconds):.1f} s; "
                f"buffer {self.ppo.rollout_buffer.size_in_bytes()['total'] / 2**20:.1f} MiB; "
                f"bf16 weight copies {self.weight_copies_bytes() / 2**20:.0f} MiB; "
                f"mean completion {np.mean(lengths):.1f} tokens")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"skipped: no CUDA device (--device {args.device}, but torch {torch.__version__} sees no GPU)")
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*mini-batch size.*")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"load average at start: {load}")
    wall_start = time.perf_counter()
    settings = layer_settings(args.layers)
    with tempfile.TemporaryDirectory(prefix="long-prompt-") as tmp:
        lm_dir, tokenizer, weights = prepare_lm(args, Path(tmp) / "lm")
        dataset = None if str(args.dataset) == "builtin" or not args.dataset.is_file() else str(args.dataset)
        if dataset is None:
            log(f"{args.dataset} not found: the built-in synthetic news instead")
        env_kwargs = dict(dataset=dataset, tokenizer=str(lm_dir), max_prompt_tokens=args.prompt_tokens,
                          max_new_tokens=args.new_tokens, stop_token_ids=[-1])  # no stop token: full-length completions
        log(f"{weights}; building {len(settings)} PPO models...")
        runners = {layers: Runner(args, lm_dir, layers, env_kwargs) for layers in settings}
        timings = {layers: Timings(label(layers), runners[layers].tokens) for layers in settings}

        from sb3_textrl.models import load_causal_lm

        lm = load_causal_lm(lm_dir).to(device)
        first = runners[settings[0]]
        prompt_ids = [first.ppo.env.get_attr("prompt_ids")[0][i] for i in range(args.n_envs)]
        width = max(len(ids) for ids in prompt_ids)
        batch_ids = torch.full((args.n_envs, width), tokenizer.pad_token_id or 0, dtype=torch.long)
        batch_mask = torch.zeros_like(batch_ids)
        for row, ids in enumerate(prompt_ids):  # left-padded, as the env lays prompts out
            batch_ids[row, width - len(ids):] = torch.as_tensor(ids)
            batch_mask[row, width - len(ids):] = 1
        batch_ids, batch_mask = batch_ids.to(device), batch_mask.to(device)
        autocast = first.ppo.policy.autocast_dtype()

        @torch.no_grad()
        def generate() -> None:
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                lm.generate(input_ids=batch_ids, attention_mask=batch_mask, do_sample=True, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)

        floor = Timings("HF generate() (KV cache, no grad): the floor", args.n_envs * args.new_tokens)
        log("warm-up: one iteration of each variant and one generate()...")
        for runner in runners.values():
            runner()
        generate()
        for round_index in range(args.rounds):
            log(f"round {round_index + 1}/{args.rounds}")
            for layers in settings:
                timings[layers].seconds.append(timed(runners[layers], device))
            floor.seconds.append(timed(generate, device))
        sync(device)

    mean_prompt = statistics.mean(first.prompt_lengths)
    print(f"\n## Long-prompt PPO throughput on {device}\n")
    print(f"{weights}; NewsSummary-v0 on {dataset or 'built-in synthetic news'} (prompts {mean_prompt:.0f} tokens on average, "
          f"max {max(first.prompt_lengths)}), {args.n_envs} envs, {args.new_tokens} new tokens each (no stop token), "
          f"n_epochs={args.n_epochs}, one minibatch per epoch, LoRA r=16, autocast {autocast}. {args.rounds} interleaved "
          "rounds after one untimed warm-up iteration of each variant.\n")
    print("| variant | median tokens/s | median s per iteration | speed-up vs all layers | iteration / generate() |")
    print("|---|---:|---:|---:|---:|")
    # Ratios of medians: one round disturbed by another job moves a median less than a mean.
    base = timings.get(None)
    floor_median = statistics.median(floor.seconds)
    for layers in settings:
        t = timings[layers]
        median = statistics.median(t.seconds)
        speedup = f"{statistics.median(base.seconds) / median:.2f}x" if base else "-"
        print(f"| {t.variant} | {t.median_tokens_per_s:,.1f} | {median:.2f} | {speedup} | {median / floor_median:.2f} |")
    print(f"| {floor.variant} | {floor.median_tokens_per_s:,.1f} | {floor_median:.2f} | | 1.00 |\n")
    for layers in settings:
        print(runners[layers].split_line(timings[layers]))
        print(f"  - seconds per timed iteration: {', '.join(f'{x:.1f}' for x in timings[layers].seconds)}")
    print(f"- generate() seconds per timed call: {', '.join(f'{x:.1f}' for x in floor.seconds)}")
    if base is not None and 4 in timings:
        speedup = statistics.median(base.seconds) / statistics.median(timings[4].seconds)
        over_floor = statistics.median(timings[4].seconds) / floor_median
        print(f"\n- target trainable_layers=4 >= {args.min_speedup:g}x all layers: {speedup:.2f}x "
              f"{'PASS' if speedup >= args.min_speedup else 'FAIL'}")
        if BEFORE in timings:
            before = statistics.median(timings[BEFORE].seconds) / statistics.median(timings[4].seconds)
            print(f"- target trainable_layers=4 >= {args.min_speedup:g}x all layers as before trainable_layers: "
                  f"{before:.2f}x {'PASS' if before >= args.min_speedup else 'FAIL'}")
        print(f"- target trainable_layers=4 iteration <= {args.max_over_floor:g}x generate(): {over_floor:.2f}x "
              f"{'PASS' if over_floor <= args.max_over_floor else 'FAIL'}")
    print("\n### Environment\n")
    print("\n".join(machine_lines(device)))
    print(f"- load average at start {load}; benchmark wall time {time.perf_counter() - wall_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
