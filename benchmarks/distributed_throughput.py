"""Data-parallel PPO throughput: tokens/s of 1 process against N processes under torchrun, and memory per rank.

    python benchmarks/distributed_throughput.py --tiny            # seconds: a tiny random GPT-2, 1 vs 2 CPU processes
    python benchmarks/distributed_throughput.py --updates 3       # the embedded SmolLM2-135M-Instruct
    python benchmarks/distributed_throughput.py --world-sizes 1,8 # on a host with 8 GPUs (NCCL)
    python benchmarks/distributed_throughput.py --strategies ddp,fsdp --world-sizes 2 --random-lm smollm2-360m-untied \
        --full-finetune --kl-coef 0                               # memory per rank: whole model (DDP) vs FSDP2 shards

Each run is ``examples/distributed_ppo.py`` under ``torchrun --standalone`` (gloo on CPUs, NCCL on GPUs); the runs
take turns, never side by side. On CPUs the processes share the cores: each gets ``cores // N`` threads, so the
ratio measures what data parallel buys on one host, not N hosts. Prints one line per world size and the ratio of
tokens/s against one process, and with several strategies the memory per rank of each against the first
(parameters and optimizer state held after training, peak resident set); the figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_ppo.py"

# Public architectures with random weights (the embedded SmolLM2 tokenizer, so the vocabulary is SmolLM2's), and
# separate input and output embeddings, so that full fine-tuning can train both and FSDP2 can shard every weight.
RANDOM_LMS = {
    "smollm2-135m-untied": dict(),  # the embedded LM's own architecture (config.json), untied
    # HuggingFaceTB/SmolLM2-360M's config.json: hidden 960, MLP 2560, 32 layers, 15 heads of 64, 5 key-value heads
    "smollm2-360m-untied": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                                num_key_value_heads=5, head_dim=64),
    # Qwen/Qwen2.5-0.5B's config.json (its own 151,936-row vocabulary; the env uses the first 49,152 rows):
    # 630M weights once untied
    "qwen2.5-0.5b-untied": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
}


def save_random_lm(name: str, out: Path) -> str:
    """Save ``RANDOM_LMS[name]`` with random weights (and the embedded tokenizer) into ``out``; return the path."""
    import torch as th
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sb3_textrl.models.assets import embedded_lm_dir

    embedded = embedded_lm_dir()
    fields = dict(RANDOM_LMS[name])
    if "model_type" in fields:  # another family, with the embedded tokenizer's special ids
        own = AutoConfig.from_pretrained(embedded)
        ids = dict(bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id)
        config = AutoConfig.for_model(fields.pop("model_type"), tie_word_embeddings=False, **ids, **fields)
    else:
        config = AutoConfig.from_pretrained(embedded, tie_word_embeddings=False, **fields)
    th.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(embedded).save_pretrained(out)
    return str(out)


def run(world_size: int, strategy: str, args: argparse.Namespace, out: Path) -> dict:
    cores = os.cpu_count() or 1
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, cores // world_size)), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
               str(EXAMPLE), "--output-dir", str(out), "--updates", str(args.updates), "--n-envs", str(args.n_envs)]
    command += ["--strategy", strategy, "--n-epochs", str(args.n_epochs)]
    command += ["--tiny"] if args.tiny else []
    command += ["--lm", args.lm] if args.lm else []
    command += ["--full-finetune"] if args.full_finetune else []
    command += ["--kl-coef", str(args.kl_coef)] if args.kl_coef is not None else []
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"torchrun with {world_size} processes ({strategy}) failed:\n{result.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--updates", type=int, default=3, help="PPO iterations per run (default 3)")
    parser.add_argument("--n-envs", type=int, default=8, help="envs per rank (default 8)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random GPT-2 (seconds)")
    parser.add_argument("--lm", default=None, help="LM name or path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--random-lm", choices=sorted(RANDOM_LMS), default=None,
                        help="a public architecture with random weights and untied embeddings, instead of --lm")
    parser.add_argument("--strategies", default="ddp", help="comma-separated: ddp, fsdp (default ddp)")
    parser.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA adapters")
    parser.add_argument("--kl-coef", type=float, default=None, help="β (0: no KL penalty, no reference copy)")
    parser.add_argument("--n-epochs", type=int, default=2, help="PPO epochs per update (default 2)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.world_sizes.split(",")]
    strategies = args.strategies.split(",")
    print(f"load average at start: {os.getloadavg()}, cores {os.cpu_count()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_lm:
            args.lm = save_random_lm(args.random_lm, Path(tmp) / args.random_lm)
        for strategy in strategies:
            for n in sizes:
                summary = run(n, strategy, args, Path(tmp) / f"{strategy}{n}")
                results[strategy, n] = summary
                memory = summary["memory_per_rank"]
                print(
                    f"{strategy}, {n} process(es), {summary['backend']}: {summary['tokens']} tokens in "
                    f"{summary['seconds']:.1f} s = {summary['tokens_per_s']:.1f} tokens/s; ranks agree: "
                    f"{summary['ranks_agree']}; per rank: peak RSS "
                    f"{', '.join(format(m['peak_rss_mib'], '.0f') for m in memory)} MiB, parameters "
                    f"{', '.join(format(m['parameter_mib'], '.0f') for m in memory)} MiB, optimizer state "
                    f"{', '.join(format(m['optimizer_mib'], '.0f') for m in memory)} MiB"
                )
    for strategy in strategies:
        base = results[strategy, sizes[0]]["tokens_per_s"]
        for n in sizes[1:]:
            ratio = results[strategy, n]["tokens_per_s"] / base
            print(f"{strategy}: tokens/s ratio {n} vs {sizes[0]} process(es): {ratio:.2f}x")
    for strategy in strategies[1:]:
        for n in sizes:
            ours, theirs = results[strategy, n]["memory_per_rank"][0], results[strategies[0], n]["memory_per_rank"][0]
            ratios = ", ".join(f"{key} {ours[key] / theirs[key]:.2f}x" for key in ("parameter_mib", "optimizer_mib",
                                                                                   "peak_rss_mib") if theirs[key] > 0)
            print(f"{strategy} vs {strategies[0]}, {n} process(es), rank 0's memory: {ratios}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
