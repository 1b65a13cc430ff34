"""
PPO throughput benchmark: HF ``generate()``, one forward+backward, their "floor", and ``PPO.learn`` end to end.

Every variant runs on the SAME tiny GPT-2 in ONE process, one after the other, so that the ratios between them
mean something even on a shared, noisy machine (absolute tokens/s do not travel between machines)::

    python benchmarks/ppo_throughput.py                  # the full default run (several minutes on 2 CPU cores)
    python benchmarks/ppo_throughput.py --quick          # fewer repeats, for development
    python benchmarks/ppo_throughput.py --profile fast.prof   # also cProfile the fast path (separate, untimed)
    python benchmarks/ppo_throughput.py --device cuda

Variants (16 envs, 64-token prompts, 64 new tokens, so one PPO rollout is 16 x 64 = 1024 tokens):

1. ``generate``: ``model.generate(do_sample=True, min_new_tokens=max_new_tokens)`` with its KV cache, no grad.
2. ``fwd+bwd``: one teacher-forced forward of the 16 prompt+completion sequences, log-softmax at the completion
   positions, a scalar loss, backward (what PPO's training does per epoch); with the policy's LoRA adapters and
   with all weights trainable.
3. ``floor``: time(generate) + n_epochs x time(fwd+bwd, LoRA) for those 1024 tokens.
4. ``PPO fast``: ``TextRolloutBuffer`` (episode-grouped minibatches) and the rollout KV cache (the defaults).
5. ``PPO naive``: SB3's per-step ``DictRolloutBuffer`` (single-step minibatches, passed explicitly),
   ``use_kv_cache=False`` and ``share_prefixes=False`` (one full forward per token in rollouts and in training, as a
   policy unaware of episodes would do).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import peft
import stable_baselines3
import torch
import transformers
from peft import LoraConfig, get_peft_model
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

# Benchmark this checkout's sb3_textrl, installed or not (a script's sys.path starts with benchmarks/, not the root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sb3_textrl  # noqa: E402
from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy, register_text_task  # noqa: E402
from sb3_textrl.envs.news_data import generate_news_examples  # noqa: E402
from sb3_textrl.models import load_causal_lm, load_tokenizer, tiny_gpt2, train_small_tokenizer  # noqa: E402

TASK_ID = "PPOThroughputBenchmark-v0"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help='"auto" (cuda if available), "cpu", "cuda", "cuda:1"...')
    parser.add_argument("--n-envs", type=int, default=16, help="envs, and the batch of the generate/fwd+bwd baselines")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="every prompt is exactly this many tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens; also PPO's n_steps")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer and the LM")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-epochs", type=int, default=1, help="PPO n_epochs (and the floor's fwd+bwd count)")
    parser.add_argument(
        "--batch-size", type=int, default=1024, help="PPO batch_size in steps; 1024 = all 16 episodes in one minibatch"
    )
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument(
        "--mixed-precision", default="auto", choices=("auto", "bf16", "no"), help="TransformerLMPolicy(mixed_precision=...)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds: one call of generate, fwd+bwd x2 and a fast PPO rollout each"
    )
    parser.add_argument("--warmup-rollouts", type=int, default=1, help="untimed fast-path PPO rollouts before timing")
    parser.add_argument("--naive-rollouts", type=int, default=1, help="timed rollouts of the naive path (slow)")
    parser.add_argument("--naive-warmup-rollouts", type=int, default=1, help="untimed naive-path rollouts before timing")
    parser.add_argument("--skip-naive", action="store_true", help="do not run the naive path (no fast/naive ratio)")
    parser.add_argument("--min-fast-over-floor", type=float, default=0.6, help="PASS threshold of fast / floor")
    parser.add_argument("--min-fast-over-naive", type=float, default=15.0, help="PASS threshold of fast / naive")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 rounds, no warm-up of the naive path: for development")
    parser.add_argument(
        "--profile", type=Path, default=None, help="also cProfile extra (untimed) fast-path rollouts into this .prof file"
    )
    parser.add_argument("--profile-rollouts", type=int, default=2)
    parser.add_argument("--profile-top", type=int, default=30, help="rows of the printed profile tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.naive_warmup_rollouts = 0
    return args


# -- timing helpers -------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a timestamp without a sync measures the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class Timings:
    """The timed calls of one variant; every call produces ``tokens_per_call`` tokens."""

    variant: str
    tokens_per_call: int
    seconds: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_call * len(self.seconds) / self.total

    @property
    def median_tokens_per_s(self) -> float:
        return self.tokens_per_call / statistics.median(self.seconds)


# -- the shared tiny LM and task --------------------------------------------------------------------------------


def letter_case_reward(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
    """Share of upper-case letters: a reward that costs next to nothing, so the benchmark times PPO, not scoring."""
    scores = []
    for text in completions:
        letters = [c for c in text if c.isalpha()]
        scores.append(sum(c.isupper() for c in letters) / len(letters) if letters else 0.0)
    return scores


def build_tokenizer(vocab_size: int, n_articles: int = 2000) -> tuple[Any, int]:
    """
    A BPE tokenizer trained on the synthetic news, padded with filler tokens up to ``vocab_size``.

    The synthetic articles only hold enough distinct text for ~3.6k BPE tokens; the filler tokens make the LM head,
    the log-softmax, the sampling and the action space all ``vocab_size`` wide, as in a real 8k-vocabulary model.
    Text never tokenizes into a filler token, but the (random) LM samples them like any other id.
    """
    texts = [example["article"] for example in generate_news_examples(n_articles, seed=0)]
    tokenizer = train_small_tokenizer(texts, vocab_size=vocab_size)
    trained = len(tokenizer)
    if trained < vocab_size:
        tokenizer.add_tokens([f"<|filler{i}|>" for i in range(vocab_size - trained)])
    return tokenizer, trained


def make_prompts(tokenizer: Any, n_tokens: int, n_prompts: int = 256) -> list[str]:
    """Article openings that tokenize to exactly ``n_tokens`` tokens (re-encoding is checked, not assumed)."""
    prompts = []
    for example in generate_news_examples(4 * n_prompts, seed=1):
        ids = tokenizer(example["article"], add_special_tokens=False)["input_ids"]
        if len(ids) < n_tokens:
            continue
        text = tokenizer.decode(ids[:n_tokens])
        # Cutting can split a merge: keep only openings that encode back to exactly n_tokens tokens.
        if len(tokenizer(text)["input_ids"]) == n_tokens:
            prompts.append(text)
        if len(prompts) == n_prompts:
            return prompts
    if not prompts:
        raise RuntimeError(f"No article opening tokenizes to exactly {n_tokens} tokens")
    return prompts


def build_lm(args: argparse.Namespace, directory: Path) -> tuple[Any, int]:
    """Save the tiny GPT-2 and its tokenizer to ``directory`` (loadable by ``policy_kwargs=dict(lm=...)``)."""
    tokenizer, trained = build_tokenizer(args.vocab_size)
    special = tokenizer.eos_token_id
    model = tiny_gpt2(
        vocab_size=len(tokenizer),
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_positions=max(512, args.prompt_tokens + args.new_tokens),
        seed=args.seed,
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer, trained


# -- baselines: generate, forward+backward ----------------------------------------------------------------------


class Baselines:
    """HF ``generate()`` and teacher-forced forward+backward on the benchmark's LM, outside PPO."""

    def __init__(self, args: argparse.Namespace, lm_dir: Path, prompts: list[str], device: torch.device):
        self.args = args
        self.tokenizer = load_tokenizer(lm_dir)
        self.batch = self.tokenizer(prompts[: args.n_envs], return_tensors="pt", padding=True).to(device)  # left-padded
        assert self.batch["input_ids"].shape[1] == args.prompt_tokens, self.batch["input_ids"].shape
        # Separate copies: get_peft_model injects its adapters into the model it wraps.
        self.plain = load_causal_lm(lm_dir).to(device).requires_grad_(True)
        # TransformerLMPolicy's default adapters (r=16, alpha=32, GPT-2 Conv1D layout): the floor trains what PPO trains.
        lora_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", fan_in_fan_out=True
        )
        self.lora = get_peft_model(load_causal_lm(lm_dir), lora_config).to(device)
        torch.manual_seed(args.seed)
        self.sequences = self.generate()  # (B, P + T): the teacher-forced input of forward+backward
        completion = self.sequences[:, args.prompt_tokens :]
        self.mask = torch.cat([self.batch["attention_mask"], torch.ones_like(completion)], dim=1)
        self.targets = completion

    @torch.no_grad()
    def generate(self) -> torch.Tensor:
        return self.plain.generate(
            **self.batch,
            do_sample=True,
            max_new_tokens=self.args.new_tokens,
            min_new_tokens=self.args.new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _forward_backward(self, lm: Any) -> None:
        # logits_to_keep: the LM head runs only where a completion token is predicted, as in the policy.
        keep = self.args.new_tokens + 1
        logits = lm(input_ids=self.sequences, attention_mask=self.mask, logits_to_keep=keep).logits[:, :-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        (-log_probs.mean()).backward()
        lm.zero_grad(set_to_none=True)

    def forward_backward_full(self) -> None:
        self._forward_backward(self.plain)

    def forward_backward_lora(self) -> None:
        self._forward_backward(self.lora)


# -- PPO end to end -------------------------------------------------------------------------------------------------


class TimedTextRolloutBuffer(TextRolloutBuffer):
    """TextRolloutBuffer that also times its end-of-rollout work (reference scoring, KL penalty, GAE, metrics)."""

    def reset(self) -> None:
        super().reset()
        if not hasattr(self, "returns_seconds"):
            self.returns_seconds: list[float] = []

    def compute_returns_and_advantage(self, last_values: torch.Tensor, dones: np.ndarray) -> None:
        start = time.perf_counter()
        super().compute_returns_and_advantage(last_values, dones)
        sync(torch.device(self.device))
        self.returns_seconds.append(time.perf_counter() - start)


class SplitTimer(BaseCallback):
    """Timestamps rollout start/end: rollout time is collect_rollouts (incl. the KL penalty), the rest is training."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.rollout_seconds: list[float] = []
        self.completion_lengths: list[int] = []
        self._start = 0.0

    def _on_rollout_start(self) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def _on_rollout_end(self) -> None:
        sync(self.device)
        self.rollout_seconds.append(time.perf_counter() - self._start)

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "completion_tokens" in info:
                self.completion_lengths.append(int(info["completion_tokens"]))
        return True


def make_ppo(args: argparse.Namespace, lm_dir: Path, device: torch.device, naive: bool) -> PPO:
    env = make_vec_env(TASK_ID, n_envs=args.n_envs, seed=args.seed)
    lengths = {len(ids) for prompt_ids in env.get_attr("prompt_ids") for ids in prompt_ids}
    assert lengths == {args.prompt_tokens}, f"env prompts are {sorted(lengths)} tokens long, not {args.prompt_tokens}"
    policy_kwargs: dict[str, Any] = dict(lm=str(lm_dir), kl_coef=args.kl_coef, mixed_precision=args.mixed_precision)
    extra: dict[str, Any] = {}
    if naive:
        # A plain per-step policy: full forward every rollout step, one forward per step in training, SB3's per-step
        # buffer (passed explicitly: without rollout_buffer_class the policy gives PPO a TextRolloutBuffer).
        policy_kwargs["use_kv_cache"] = False
        policy_kwargs["share_prefixes"] = False
        extra["rollout_buffer_class"] = DictRolloutBuffer
    else:
        extra["rollout_buffer_class"] = TimedTextRolloutBuffer
    return PPO(
        TransformerLMPolicy,
        env,
        n_steps=args.new_tokens,  # one full-length episode per env per rollout
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        policy_kwargs=policy_kwargs,
        seed=args.seed,
        device=device,
        verbose=0,
        **extra,
    )


class PPORunner:
    """A PPO model built outside the timing; each call learns one rollout (collect + train), timestamped by SplitTimer."""

    def __init__(self, args: argparse.Namespace, lm_dir: Path, device: torch.device, naive: bool):
        self.naive = naive
        with quiet_per_step_warning():
            self.ppo = make_ppo(args, lm_dir, device, naive)
        self.timer = SplitTimer(device)
        self.rollout_tokens = self.ppo.n_steps * self.ppo.n_envs

    def warm_up(self, rollouts: int) -> None:
        with quiet_per_step_warning():
            for _ in range(rollouts):
                self.ppo.learn(self.rollout_tokens, reset_num_timesteps=False)

    def __call__(self) -> None:
        # reset_num_timesteps=False: the envs carry on from the previous call, as inside one long learn().
        with quiet_per_step_warning():
            self.ppo.learn(self.rollout_tokens, callback=self.timer, reset_num_timesteps=False)

    def returns_seconds(self) -> list[float]:
        """Seconds of the buffer's end-of-rollout work (KL penalty with its reference forward, GAE), timed calls only."""
        return list(getattr(self.ppo.rollout_buffer, "returns_seconds", []))


@contextlib.contextmanager
def quiet_per_step_warning() -> Iterator[None]:
    # The naive path is meant to be slow: its "use TextRolloutBuffer" warning would only clutter the report.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TransformerLMPolicy is trained with rollout_buffer_class=DictRolloutBuffer")
        yield


def profile_fast(args: argparse.Namespace, lm_dir: Path, device: torch.device) -> None:
    """cProfile fast-path rollouts after a warm-up; print the hot spots by cumulative and by self time."""
    runner = PPORunner(args, lm_dir, device, naive=False)
    runner.warm_up(1)
    profiler = cProfile.Profile()
    profiler.enable()
    runner.ppo.learn(args.profile_rollouts * runner.rollout_tokens, reset_num_timesteps=False)
    profiler.disable()
    profiler.dump_stats(str(args.profile))
    for key in ("cumulative", "tottime"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats(key).print_stats(args.profile_top)
        print(f"\n### cProfile of fast-path PPO.learn ({args.profile_rollouts} rollouts), sorted by {key}\n")
        print("```")
        print(stream.getvalue().strip())
        print("```")
    print(f"\nFull profile: {args.profile} (e.g. `python -m pstats {args.profile}` or snakeviz)")


# -- report -------------------------------------------------------------------------------------------------------


def verdict(value: float, threshold: float) -> str:
    return "PASS" if value >= threshold else "FAIL"


def machine_lines(device: torch.device) -> list[str]:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"stable-baselines3 {stable_baselines3.__version__}, peft {peft.__version__}, sb3_textrl {sb3_textrl.__version__}",
        f"- machine: {platform.machine()}, processor {platform.processor() or '?'!r}, nproc {nproc} "
        f"(os.cpu_count {os.cpu_count()}), torch.get_num_threads() {torch.get_num_threads()}, load average now {load}",
        f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]


def print_split(name: str, runner: PPORunner, timings: Timings, new_tokens: int) -> None:
    rollout = sum(runner.timer.rollout_seconds)
    total = timings.total
    train = total - rollout
    returns = sum(runner.returns_seconds())
    tokens = timings.tokens_per_call * len(timings.seconds)
    line = f"- {name}: rollout (collect_rollouts) {rollout:.2f} s = {100 * rollout / total:.0f}%"
    if not runner.naive:
        line += f" (of which KL penalty: reference forward + GAE {returns:.2f} s = {100 * returns / total:.0f}%)"
    line += f"; train + learn() overhead {train:.2f} s = {100 * train / total:.0f}%."
    line += f" Rollout {tokens / rollout:,.0f} tokens/s, train {tokens / train:,.0f} tokens/s."
    print(line)
    print(f"  - seconds per timed rollout, collect: {', '.join(f'{x:.2f}' for x in runner.timer.rollout_seconds)}")
    lengths = np.asarray(runner.timer.completion_lengths)
    if len(lengths):
        print(
            f"  - {len(lengths)} episodes ended in the timed rollouts: mean completion length {lengths.mean():.2f} tokens "
            f"(min {lengths.min()}; {int((lengths < new_tokens).sum())} ended by EOS)"
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations inside peft/HF calls
    wall_start = time.perf_counter()
    tokens = args.n_envs * args.new_tokens

    with tempfile.TemporaryDirectory(prefix="ppo-throughput-") as tmp:
        lm_dir = Path(tmp) / "tiny-gpt2"
        tokenizer, trained_vocab = build_lm(args, lm_dir)
        prompts = make_prompts(tokenizer, args.prompt_tokens)
        register_text_task(
            TASK_ID,
            prompts=prompts,
            reward=letter_case_reward,
            tokenizer=str(lm_dir),
            max_new_tokens=args.new_tokens,
            max_prompt_tokens=args.prompt_tokens,
            stop_token_ids=[tokenizer.eos_token_id],  # a random LM samples EOS ~1/vocab per token: see completion length
        )
        log(f"Benchmarking on {device}, torch threads {torch.get_num_threads()}: warm-up...")
        baselines = Baselines(args, lm_dir, prompts, device)
        fast = PPORunner(args, lm_dir, device, naive=False)
        variants: dict[str, tuple[Timings, Callable[[], Any]]] = {
            "generate": (Timings("HF generate() (KV cache, no grad)", tokens), baselines.generate),
            "fwd_bwd_full": (Timings("fwd+bwd, all weights trainable", tokens), baselines.forward_backward_full),
            "fwd_bwd_lora": (Timings("fwd+bwd, LoRA r=16 (as PPO trains)", tokens), baselines.forward_backward_lora),
            "fast": (Timings("PPO.learn fast (TextRolloutBuffer + KV cache)", tokens), fast),
        }
        for name, (_, fn) in variants.items():  # one untimed call each: allocator, kernel choice, lazy init
            fast.warm_up(args.warmup_rollouts) if name == "fast" else fn()
        # Interleaved rounds (order rotated each round): load from other processes hits every variant alike.
        names = list(variants)
        for round_index in range(args.rounds):
            log(f"round {round_index + 1}/{args.rounds}")
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                timings, fn = variants[name]
                timings.seconds.append(timed(fn, device))
        rows = {name: timings for name, (timings, _) in variants.items()}
        # Floor per round: that round's generate + n_epochs x that round's LoRA fwd+bwd.
        floor_seconds = [g + args.n_epochs * f for g, f in zip(rows["generate"].seconds, rows["fwd_bwd_lora"].seconds)]
        rows["floor"] = Timings(f"floor = generate + {args.n_epochs} x fwd+bwd (LoRA)", tokens, floor_seconds)

        naive: PPORunner | None = None
        if not args.skip_naive:
            log("PPO naive path (slow)...")
            naive = PPORunner(args, lm_dir, device, naive=True)
            naive.warm_up(args.naive_warmup_rollouts)
            rows["naive"] = Timings("PPO.learn naive (per-step buffer, no KV cache)", tokens)
            for _ in range(args.naive_rollouts):
                rows["naive"].seconds.append(timed(naive, device))

        print("\n## PPO throughput benchmark\n")
        print(
            f"Tiny GPT-2 {args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads, vocab {len(tokenizer)} "
            f"({trained_vocab} BPE tokens trained on synthetic news + {len(tokenizer) - trained_vocab} filler tokens); "
            f"{args.n_envs} envs, prompts of exactly {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
            f"({tokens} tokens per rollout). PPO: n_steps={args.new_tokens}, batch_size={args.batch_size} "
            f"(fast path: minibatches of whole episodes), n_epochs={args.n_epochs}, LoRA r=16, kl_coef={args.kl_coef}. "
            f"{args.rounds} interleaved rounds of one call of each of the first four variants (a PPO call is learn() of "
            f"one rollout, {tokens} timesteps), after untimed warm-ups ({args.warmup_rollouts} rollout(s) for PPO); "
            f"naive: {len(rows['naive'].seconds) if naive else 0} timed rollout(s) after {args.naive_warmup_rollouts} "
            "warm-up rollout(s), run after the rounds.\n"
        )
        print("tokens/s = all timed tokens / all timed seconds; median = tokens per call / median call.\n")
        print("| variant | tokens/s | seconds | calls | median tokens/s |")
        print("|---|---:|---:|---:|---:|")
        for timings in rows.values():
            print(
                f"| {timings.variant} | {timings.tokens_per_s:,.0f} | {timings.total:.2f} | {len(timings.seconds)} "
                f"| {timings.median_tokens_per_s:,.0f} |"
            )

        print("\n### Ratios (tokens/s; medians in brackets)\n")
        fast_rate, fast_median = rows["fast"].tokens_per_s, rows["fast"].median_tokens_per_s
        ratio = fast_rate / rows["floor"].tokens_per_s
        print(
            f"- fast / floor = {ratio:.2f} [{fast_median / rows['floor'].median_tokens_per_s:.2f}] "
            f"(target >= {args.min_fast_over_floor:g}): {verdict(ratio, args.min_fast_over_floor)}"
        )
        if "naive" in rows:
            ratio = fast_rate / rows["naive"].tokens_per_s
            print(
                f"- fast / naive = {ratio:.1f} [{fast_median / rows['naive'].median_tokens_per_s:.1f}] "
                f"(target >= {args.min_fast_over_naive:g}): {verdict(ratio, args.min_fast_over_naive)}"
            )
        print(
            f"- fast / generate = {fast_rate / rows['generate'].tokens_per_s:.2f} "
            f"[{fast_median / rows['generate'].median_tokens_per_s:.2f}]"
        )

        print("\n### Rollout vs train split\n")
        print_split("fast", fast, rows["fast"], args.new_tokens)
        if naive is not None:
            print_split("naive", naive, rows["naive"], args.new_tokens)

        print("\n### Environment\n")
        print("\n".join(machine_lines(device)))
        print(f"- benchmark wall time {time.perf_counter() - wall_start:.0f} s")

        if args.profile is not None:
            log("Profiling the fast path...")
            profile_fast(args, lm_dir, device)


def log(message: str) -> None:
    # Progress goes to stderr so that stdout is the report alone.
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
