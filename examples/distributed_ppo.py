"""Data-parallel PPO on NewsSummary-v0 under torchrun: each rank runs its own envs and its own SB3 PPO.

    torchrun --standalone --nproc_per_node=2 examples/distributed_ppo.py --tiny   # 2 CPU processes (gloo), tiny LM
    torchrun --standalone --nproc_per_node=8 examples/distributed_ppo.py          # 8 GPUs of one host (NCCL), SmolLM2
    torchrun --standalone --nproc_per_node=2 examples/distributed_ppo.py --tiny --strategy fsdp  # weights sharded
    python examples/distributed_ppo.py --tiny                                     # one process, no torchrun

Every rank builds the same PPO with its own seed (other prompts, other samples); ``make_data_parallel`` broadcasts
rank 0's weights, makes the LM's modules DDP replicas (``--strategy ddp``: gradients averaged inside SB3's unchanged
train loop) or shards them with FSDP2 (``--strategy fsdp``), and keeps β and the minibatch count in step. Rank 0
alone logs (stdout + csv in --output-dir/logs) and writes checkpoints and the final model (the ranks gather them
together with ``save_model``).
Several hosts and the other torchrun options: docs/distributed.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch as th
import torch.distributed as dist
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure

from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy, make_text_vec_env
from sb3_textrl.common.options import parse_dataclass_options
from sb3_textrl.distributed import (
    DistributedCheckpointCallback,
    init_distributed,
    local_shard,
    make_data_parallel,
    parameter_bytes_per_rank,
    save_model,
)
from sb3_textrl.models import save_tiny_gpt2_lm


@dataclass
class Options:
    """Everything the example can be told (``--help`` lists the same); sizes are per rank."""

    output_dir: str = "runs/distributed_ppo"
    dataset: str | None = None  # JSONL/CSV of article/summary pairs; None: the built-in generated news
    lm: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    n_envs: int = 8  # envs per rank
    updates: int = 4  # PPO iterations (rollout + training)
    max_new_tokens: int = 32  # also PPO's n_steps: one completion per env per rollout
    max_prompt_tokens: int = 256
    batch_size: int = 64  # steps per minibatch, per rank
    n_epochs: int = 2
    learning_rate: float = 1e-4
    kl_coef: float = 0.05
    kl_target: float = 0.0  # > 0: adapt β towards this KL per episode (averaged over the ranks)
    checkpoint_every: int = 0  # timesteps per rank between checkpoints; 0: only the final model
    strategy: str = "ddp"  # "ddp": the whole model on every rank; "fsdp": the LM's weights sharded over the ranks
    full_finetune: bool = False  # train every weight instead of LoRA adapters (needs untied embeddings)
    backend: str = "auto"  # NCCL with CUDA, else gloo
    tiny: bool = False  # a tiny random GPT-2 and short texts: seconds, for CI
    seed: int = 0
    device: str = "auto"  # "auto": this rank's GPU (LOCAL_RANK) or the CPU


def parse_options() -> Options:
    return parse_dataclass_options(Options, __doc__)


def tiny_lm(out: Path) -> str:
    return save_tiny_gpt2_lm(out / "tiny_lm")


def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports kibibytes, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main(options: Options) -> dict[str, Any]:
    ctx = init_distributed(options.backend)
    out = Path(options.output_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if options.tiny:
            tiny_lm(out)
    ctx.barrier()  # the tiny LM is written before any rank loads it
    if options.tiny:
        options.lm = str(out / "tiny_lm")
        options.max_prompt_tokens, options.max_new_tokens = min(options.max_prompt_tokens, 64), min(options.max_new_tokens, 8)
        options.n_envs, options.batch_size = min(options.n_envs, 4), min(options.batch_size, 16)

    seed = ctx.seed(options.seed, options.n_envs)  # other prompts on every rank
    env_kwargs = dict(dataset=options.dataset, tokenizer=options.lm, max_new_tokens=options.max_new_tokens,
                      max_prompt_tokens=options.max_prompt_tokens)
    env = make_text_vec_env("NewsSummary-v0", n_envs=options.n_envs, seed=seed, env_kwargs=env_kwargs)
    model = PPO(
        TransformerLMPolicy, env, rollout_buffer_class=TextRolloutBuffer,
        n_steps=options.max_new_tokens, batch_size=options.batch_size, n_epochs=options.n_epochs, gamma=1.0,
        learning_rate=options.learning_rate, seed=seed, verbose=int(ctx.is_main),
        device=ctx.device if options.device == "auto" else options.device,
        policy_kwargs=dict(lm=options.lm, kl_coef=options.kl_coef, kl_target=options.kl_target or None,
                           use_lora=not options.full_finetune),
    )
    if ctx.is_main:
        model.set_logger(configure(str(out / "logs"), ["stdout", "csv"]))
    make_data_parallel(model, ctx, strategy=options.strategy)  # on every rank, before learn

    steps_per_rank = options.updates * options.max_new_tokens * options.n_envs
    # Run by every rank (the ranks gather a sharded model together); rank 0 writes.
    checkpoints = DistributedCheckpointCallback(options.checkpoint_every or steps_per_rank, out / "checkpoints")
    start = time.perf_counter()
    model.learn(steps_per_rank, callback=checkpoints)
    seconds = time.perf_counter() - start

    # The ranks are one model: compare a checksum of the trainable weights (a sharded one's local shard: summed over
    # the ranks it is the whole tensor's checksum, which every rank then holds) across the ranks.
    checksum = th.stack([local_shard(p).detach().double().sum() for p in model.policy.parameters() if p.requires_grad]).sum()
    if options.strategy == "fsdp" and ctx.is_distributed:
        checksum = checksum.to(ctx.device)
        dist.all_reduce(checksum)
    checksums = [checksum.to(ctx.device) for _ in range(ctx.world_size)]
    if ctx.is_distributed:
        dist.all_gather(checksums, checksum.to(ctx.device))
    # Memory per rank, after training: the process's peak resident set (and the GPU's peak), the parameters and the
    # optimizer state it holds (under DDP the whole model on every rank; under FSDP2 its shards).
    optimizer_bytes = sum(local_shard(t).nbytes for state in model.policy.optimizer.state.values() for t in state.values())
    memory = dict(peak_rss_mib=_peak_rss_mib(), parameter_mib=parameter_bytes_per_rank(model.policy) / 2**20,
                  optimizer_mib=optimizer_bytes / 2**20)
    if ctx.device.type == "cuda":
        memory["peak_cuda_mib"] = th.cuda.max_memory_allocated(ctx.device) / 2**20
    memories = [memory] * ctx.world_size
    if ctx.is_distributed:
        memories = [None] * ctx.world_size
        dist.all_gather_object(memories, memory)
    summary = dict(
        world_size=ctx.world_size, backend=ctx.backend or "none", tokens=steps_per_rank * ctx.world_size,
        seconds=round(seconds, 2), tokens_per_s=round(steps_per_rank * ctx.world_size / seconds, 1),
        kl_coef=model.policy.kl_controller.value, ranks_agree=len({float(c) for c in checksums}) == 1,
        rank0_rollout=model.rollout_buffer.metrics, memory_per_rank=memories, options=asdict(options),
    )
    save_model(model, out / "ppo_model.zip")  # every rank: a sharded model is gathered
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: v for k, v in summary.items() if k != "options"}, indent=2))
    return summary


if __name__ == "__main__":
    main(parse_options())
    if dist.is_initialized():
        dist.destroy_process_group()
