"""
Peak memory of one PPO iteration (rollout + train) on the embedded SmolLM2-135M: full fine-tuning against LoRA
(against LoRA + gradient checkpointing), each configuration in a fresh process, next to the size of the weights::

    python benchmarks/memory.py                       # CPU: full, lora, lora+ckpt (a few minutes on 2 cores)
    python benchmarks/memory.py --bf16                # also the bf16-autocast configurations
    python benchmarks/memory.py --device cuda         # on a GPU the bf16 configurations are included

What is measured, per configuration, in a child process that builds ``PPO(TransformerLMPolicy, "NewsSummary-v0")``
and runs ``learn()`` for exactly one rollout and one training epoch:

- CPU: the process's resident set (``VmRSS``) after the imports (nothing loaded), after building the model, and
  its peak (``VmHWM``, reset through ``/proc/self/clear_refs`` just before ``learn()``) during the iteration.
  "PPO memory" = peak - RSS after imports: what the model, its reference, the optimizer and the iteration's
  activations take on top of a bare Python + torch process.
- CUDA: ``torch.cuda.memory_allocated`` after building and ``torch.cuda.max_memory_allocated`` during the
  iteration (peak statistics reset before ``learn()``); PPO memory = that peak.

"weights" is the LM's own size (parameters x bytes, one copy): 134.5 M x 4 bytes in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Every configuration the benchmark knows: name -> TransformerLMPolicy keyword arguments.
CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(use_lora=False, mixed_precision="no"),
    "lora": dict(use_lora=True, mixed_precision="no"),
    "lora+ckpt": dict(use_lora=True, mixed_precision="no", gradient_checkpointing=True),
    "full bf16": dict(use_lora=False, mixed_precision="bf16"),
    "lora bf16": dict(use_lora=True, mixed_precision="bf16"),
    "lora+ckpt bf16": dict(use_lora=True, mixed_precision="bf16", gradient_checkpointing=True),
}
MB = 1024**2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:1"... ("auto": cuda if available)')
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                        help="configurations to run (default: the float32 ones; with --bf16 or on CUDA all)")
    parser.add_argument("--bf16", action="store_true", help="also run the bf16-autocast configurations on CPU")
    parser.add_argument("--n-envs", type=int, default=4, help="envs (episodes per rollout)")
    parser.add_argument("--prompt-tokens", type=int, default=192, help="max_prompt_tokens (articles are cut to fit)")
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens; also PPO's n_steps")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=list(CONFIGS), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# -- child: one configuration, one PPO iteration ---------------------------------------------------------------


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: this benchmark measures CPU memory on Linux only")
    return int(match.group(1)) / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from sb3_textrl.models import embedded_lm_dir

    embedded_lm_dir()  # converting the GGUF (first use on a machine) must not count as the iteration's memory
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import sb3_textrl  # noqa: F401  (registers NewsSummary-v0)
    from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    cuda = device.type == "cuda"
    rss_imports = proc_status_mb("VmRSS")

    policy_kwargs = dict(CONFIGS[args.child])
    env = make_vec_env(
        "NewsSummary-v0",
        n_envs=args.n_envs,
        seed=args.seed,
        env_kwargs=dict(max_new_tokens=args.new_tokens, max_prompt_tokens=args.prompt_tokens),
    )
    full = not policy_kwargs["use_lora"]
    model = PPO(
        TransformerLMPolicy,
        env,
        n_steps=args.new_tokens,
        batch_size=args.n_envs * args.new_tokens,  # every episode in one minibatch
        n_epochs=1,
        learning_rate=1e-5 if full else 3e-4,
        rollout_buffer_class=TextRolloutBuffer,
        policy_kwargs=policy_kwargs,
        seed=args.seed,
        device=device,
        verbose=0,
    )
    policy = model.policy
    # The LM's own weights, without the LoRA adapters peft injected into it.
    lm_weights = [p for name, p in policy._hf_model().named_parameters() if "lora_" not in name]
    lm_bytes = sum(p.numel() * p.element_size() for p in lm_weights)
    # Unique tensors of the policy: the LM, its adapters, the value head and (full fine-tuning) the reference copy.
    held = {id(t): t for t in [*policy.parameters(), *policy.buffers()]}
    held_bytes = sum(t.numel() * t.element_size() for t in held.values())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)

    if cuda:
        torch.cuda.synchronize(device)
        built = torch.cuda.memory_allocated(device) / MB
        torch.cuda.reset_peak_memory_stats(device)
    rss_built = proc_status_mb("VmRSS")
    peak_reset = reset_peak_rss()
    start = time.perf_counter()
    model.learn(args.n_envs * args.new_tokens)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    optimizer_bytes = sum(
        v.numel() * v.element_size() for state in policy.optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )
    result = dict(
        config=args.child,
        device=str(device),
        lm_mb=lm_bytes / MB,
        lm_params=sum(p.numel() for p in lm_weights),
        held_mb=held_bytes / MB,
        trainable=trainable,
        optimizer_mb=optimizer_bytes / MB,
        rss_imports_mb=rss_imports,
        rss_built_mb=rss_built,
        peak_rss_mb=proc_status_mb("VmHWM"),
        peak_rss_reset=peak_reset,
        seconds=seconds,
        autocast=str(policy.autocast_dtype()),
        context_tokens=int(env.observation_space["input_ids"].shape[0]),
    )
    if cuda:
        result |= dict(cuda_built_mb=built, cuda_peak_mb=torch.cuda.max_memory_allocated(device) / MB)
    return result


# -- parent: one child per configuration, then the table ---------------------------------------------------------


def run_config(name: str, argv: Sequence[str]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"configuration {name!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, cuda: bool) -> None:
    first = rows[0]
    print("\n## Peak memory of one PPO iteration\n")
    print(
        f"Embedded SmolLM2-135M-Instruct ({first['lm_params'] / 1e6:.1f} M parameters, weights {first['lm_mb']:.0f} MiB "
        f"in float32), NewsSummary-v0, {args.n_envs} envs, contexts of {first['context_tokens']} tokens "
        f"(prompt <= {args.prompt_tokens}, {args.new_tokens} new tokens), one rollout of {args.n_envs * args.new_tokens} "
        f"tokens + one epoch of training (Adam; LoRA r=16 on the default target modules), device {first['device']}. "
        "Each configuration in a fresh process.\n"
    )
    if cuda:
        print("| config | trainable params | weights held (MiB) | Adam state (MiB) | GPU after build (MiB) "
              "| GPU peak in iteration (MiB) | peak / LM weights | iteration s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['config']} | {r['trainable'] / 1e6:.2f} M | {r['held_mb']:.0f} | {r['optimizer_mb']:.0f} "
                  f"| {r['cuda_built_mb']:.0f} | {r['cuda_peak_mb']:.0f} | {r['cuda_peak_mb'] / r['lm_mb']:.2f} "
                  f"| {r['seconds']:.1f} |")
        key = "cuda_peak_mb"
    else:
        print("| config | trainable params | weights held (MiB) | Adam state (MiB) | RSS after imports (MiB) "
              "| RSS after build (MiB) | peak RSS in iteration (MiB) | PPO memory = peak - imports (MiB) "
              "| PPO memory / LM weights | iteration s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            r["ppo_mb"] = r["peak_rss_mb"] - r["rss_imports_mb"]
            print(f"| {r['config']} | {r['trainable'] / 1e6:.2f} M | {r['held_mb']:.0f} | {r['optimizer_mb']:.0f} "
                  f"| {r['rss_imports_mb']:.0f} | {r['rss_built_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['ppo_mb']:.0f} "
                  f"| {r['ppo_mb'] / r['lm_mb']:.2f} | {r['seconds']:.1f} |")
        key = "ppo_mb"
        if not all(r["peak_rss_reset"] for r in rows):
            print("\n(The kernel refused to reset VmHWM: the peaks include model loading.)")
    by_name = {r["config"]: r for r in rows}
    print()
    for suffix in ("", " bf16"):
        full, lora = by_name.get("full" + suffix), by_name.get("lora" + suffix)
        if full and lora:
            print(f"- LoRA{suffix} / full{suffix}: {lora[key] / full[key]:.2f} of the memory "
                  f"({full[key] - lora[key]:,.0f} MiB saved)")
        ckpt = by_name.get("lora+ckpt" + suffix)
        if lora and ckpt:
            print(f"- LoRA + gradient checkpointing{suffix} / LoRA{suffix}: {ckpt[key] / lora[key]:.2f} "
                  f"({lora[key] - ckpt[key]:,.0f} MiB saved, iteration {ckpt['seconds'] / lora['seconds']:.2f}x the time)")


def machine_lines(device: str) -> list[str]:
    import peft
    import stable_baselines3
    import torch
    import transformers

    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"stable-baselines3 {stable_baselines3.__version__}, peft {peft.__version__}",
        f"- machine: {platform.machine()}, nproc {nproc}, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
    ]
    if device.startswith("cuda"):
        lines.append(f"- GPU: {torch.cuda.get_device_name(torch.device(device))}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    names = args.configs or [n for n in CONFIGS if cuda or args.bf16 or "bf16" not in n]
    child_argv = [a for a in argv if a != "--bf16"]
    child_argv = [*child_argv, "--device", device] if "--device" not in child_argv else child_argv
    rows = []
    for name in names:
        print(f"running {name}...", file=sys.stderr, flush=True)
        rows.append(run_config(name, child_argv))
    print_table(rows, args, cuda)
    print("\n### Environment\n")
    print("\n".join(machine_lines(device)))


# Benchmark this checkout's sb3_textrl, installed or not (a script's sys.path starts with benchmarks/, not the root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    main()
