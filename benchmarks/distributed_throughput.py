"""Data-parallel PPO throughput: tokens/s of 1 process against N processes under torchrun, and memory per rank.

    python benchmarks/distributed_throughput.py --tiny            # seconds: a tiny random GPT-2, 1 vs 2 CPU processes
    python benchmarks/distributed_throughput.py --updates 3       # the embedded SmolLM2-135M-Instruct
    python benchmarks/distributed_throughput.py --world-sizes 1,8 # on a host with 8 GPUs (NCCL)

Each run is ``examples/distributed_ppo.py`` under ``torchrun --standalone`` (gloo on CPUs, NCCL on GPUs); the runs
take turns, never side by side. On CPUs the processes share the cores: each gets ``cores // N`` threads, so the
ratio measures what data parallel buys on one host, not N hosts. Prints one line per world size and the ratio of
tokens/s against one process; the figures go in docs/benchmarks.md.
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


def run(world_size: int, args: argparse.Namespace, out: Path) -> dict:
    cores = os.cpu_count() or 1
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, cores // world_size)), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
               str(EXAMPLE), "--output-dir", str(out), "--updates", str(args.updates), "--n-envs", str(args.n_envs)]
    command += ["--tiny"] if args.tiny else []
    command += ["--lm", args.lm] if args.lm else []
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"torchrun with {world_size} processes failed:\n{result.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--updates", type=int, default=3, help="PPO iterations per run (default 3)")
    parser.add_argument("--n-envs", type=int, default=8, help="envs per rank (default 8)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random GPT-2 (seconds)")
    parser.add_argument("--lm", default=None, help="LM name or path (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.world_sizes.split(",")]
    print(f"load average at start: {os.getloadavg()}, cores {os.cpu_count()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            summary = run(n, args, Path(tmp) / f"world{n}")
            results[n] = summary
            memory = summary["memory_per_rank"]
            print(
                f"{n} process(es), {summary['backend']}: {summary['tokens']} tokens in {summary['seconds']:.1f} s = "
                f"{summary['tokens_per_s']:.1f} tokens/s; ranks agree: {summary['ranks_agree']}; peak RSS per rank "
                f"{', '.join(format(m['peak_rss_mib'], '.0f') for m in memory)} MiB; parameters per rank "
                f"{memory[0]['parameter_mib']:.0f} MiB"
            )
    base = results[sizes[0]]["tokens_per_s"]
    for n in sizes[1:]:
        print(f"tokens/s ratio {n} vs {sizes[0]} process(es): {results[n]['tokens_per_s'] / base:.2f}x")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
