"""One rank of the data-parallel tests, launched twice by tests/test_distributed.py through torchrun (gloo):

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT_DIR TINY_LM [fsdp UNTIED_LM T5]

Writes rank{r}.pkl into OUT_DIR for the test process to compare (strategy "ddp" by default, or "fsdp").
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import gymnasium as gym
import torch as th
from helpers import ragged_stop_ids, register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.logger import configure
from torch.distributed.tensor import DTensor

from sb3_textrl import Seq2SeqLMPolicy, TextRolloutBuffer
from sb3_textrl.distributed import (
    DistributedCheckpointCallback,
    MainProcessCallback,
    broadcast_parameters,
    gathered_parameters,
    init_distributed,
    load_sharded_checkpoint,
    make_data_parallel,
    parameter_bytes_per_rank,
    save_model,
    save_sharded_checkpoint,
)

# One gradient step: one rollout of N_STEPS x N_ENVS steps, one epoch, one minibatch holding all of it.
STEP = dict(n_steps=5, batch_size=10, n_epochs=1, normalize_advantage=False, learning_rate=1.0, max_grad_norm=0.05,
            policy_kwargs=dict(kl_coef=0.1, optimizer_class=th.optim.SGD))
# Several updates with ragged episodes (different minibatch counts per rank) and an adaptive β.
TRAIN = dict(n_steps=8, batch_size=6, n_epochs=2, learning_rate=1e-2,
             policy_kwargs=dict(kl_coef=0.1, kl_target=0.01, kl_horizon=50))
N_ENVS = 2


def full(tensor: th.Tensor) -> th.Tensor:
    """A tensor's full value: a sharded one gathered (a collective), any other as it is."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def trainable(model) -> dict[str, th.Tensor]:
    return {n: full(p) for n, p in model.policy.named_parameters() if p.requires_grad}




def buffer_parts(model) -> dict:
    buffer = model.rollout_buffer
    names = ["actions", "rewards", "task_rewards", "returns", "episode_starts", "values", "log_probs", "ref_log_probs",
             "advantages", "contexts", "context_masks"]
    parts = {name: getattr(buffer, name).copy() for name in names}
    parts["segments"] = [(s.env, s.start, s.length, s.context) for s in buffer.segments]
    return parts


# The policy variants of the FSDP2 update check, by name: LoRA on the top block only (the lower block's output
# cached from the rollout), gradient checkpointing, and full fine-tuning of an LM with untied embeddings (a frozen
# reference copy).
FSDP_VARIANTS = {"top_block": dict(trainable_layers=1), "checkpointed": dict(gradient_checkpointing=True),
                 "full": dict(use_lora=False)}


def one_step(ctx, lm: str, strategy: str, **policy_kwargs) -> dict:
    """One gradient step, for the equivalence with a single process on both ranks' minibatches."""
    step_task = register_toy_task(f"DistStep{len(gym.registry)}-v0", lm, max_new_tokens=5)
    step = STEP | dict(policy_kwargs=STEP["policy_kwargs"] | policy_kwargs)
    model = toy_ppo(toy_vec_env(step_task, N_ENVS, seed=ctx.seed(1, N_ENVS)), lm, seed=ctx.seed(1, N_ENVS), **step)
    make_data_parallel(model, ctx, strategy=strategy)
    results = {"step_before": trainable(model)}
    model.learn(STEP["n_steps"] * N_ENVS)
    return results | {"step_after": trainable(model), "step_buffer": buffer_parts(model)}


def main_fsdp(out: Path, lm: str, untied_lm: str, t5_lm: str) -> None:
    """The same update check, and the checkpoints, with the LM's blocks sharded by FSDP2."""
    ctx = init_distributed("gloo")
    rank = ctx.rank
    results: dict = {"world_size": ctx.world_size}

    results |= one_step(ctx, lm, "fsdp")  # 1. the update check, and its variants
    for name, policy_kwargs in FSDP_VARIANTS.items():
        results[name] = one_step(ctx, untied_lm if name == "full" else lm, "fsdp", **policy_kwargs)

    # 2. Several updates (ragged episodes, adaptive β), checkpoints of both kinds, memory.
    train_task = register_toy_task("DistTrain-v0", lm, max_new_tokens=6, stop_token_ids=ragged_stop_ids())
    train = TRAIN | dict(policy_kwargs=TRAIN["policy_kwargs"] | dict(save_base_lm=True))  # every tensor in model.zip
    model = toy_ppo(toy_vec_env(train_task, N_ENVS, seed=ctx.seed(0, N_ENVS)), lm, seed=ctx.seed(0, N_ENVS), **train)
    results["bytes_whole"] = parameter_bytes_per_rank(model.policy)
    make_data_parallel(model, ctx, strategy="fsdp")
    if rank == 0:  # the weights are gathered until training starts: rank 0 may run a forward alone
        results["rank0_alone"] = model.predict(toy_vec_env(train_task, 1, seed=5).reset(), deterministic=True)[0]
    checkpoints = DistributedCheckpointCallback(TRAIN["n_steps"], out / "checkpoints")
    model.learn(3 * TRAIN["n_steps"] * N_ENVS, callback=checkpoints)
    results["bytes_sharded"] = parameter_bytes_per_rank(model.policy)  # after training: sharded
    try:
        model.save(out / f"refused_rank{rank}.zip")
    except RuntimeError as error:
        results["save_error"] = str(error)
    save_model(model, out / "final_model.zip")
    save_sharded_checkpoint(model, out / "sharded")
    results["saved"] = gathered_parameters(model)  # from the shards; rank 0's, None on rank 1
    results["kl_coef"] = model.policy.kl_controller.value
    results["num_timesteps"] = model.num_timesteps

    # 3. Resume: a model built with another seed takes the sharded checkpoint's weights, optimizer state and counters.
    other = toy_ppo(toy_vec_env(train_task, N_ENVS, seed=ctx.seed(9, N_ENVS)), lm, seed=ctx.seed(9, N_ENVS), **train)
    make_data_parallel(other, ctx, strategy="fsdp")
    results["other_before"] = trainable(other)
    load_sharded_checkpoint(other, out / "sharded")
    results["loaded"] = gathered_parameters(other)
    results["loaded_num_timesteps"] = other.num_timesteps
    other.learn(TRAIN["n_steps"] * N_ENVS, reset_num_timesteps=False)  # and trains on from there
    results["resumed_num_timesteps"] = other.num_timesteps

    # 4. An encoder-decoder (Seq2SeqLMPolicy): encoder and decoder blocks sharded, the shared embedding whole.
    t5_task = register_toy_task("DistSeq2Seq-v0", t5_lm, max_new_tokens=5, stop_token_ids=ragged_stop_ids()[:38])
    t5 = PPO(Seq2SeqLMPolicy, toy_vec_env(t5_task, N_ENVS, seed=ctx.seed(0, N_ENVS)), n_steps=8, batch_size=8,
             policy_kwargs=dict(lm=t5_lm, kl_coef=0.1), seed=ctx.seed(0, N_ENVS), device="cpu",
             rollout_buffer_class=TextRolloutBuffer)
    results["t5_bytes_whole"] = parameter_bytes_per_rank(t5.policy)
    make_data_parallel(t5, ctx, strategy="fsdp")
    t5.learn(2 * 8 * N_ENVS)
    results["t5_bytes_sharded"] = parameter_bytes_per_rank(t5.policy)
    results["t5_trained"] = trainable(t5)
    save_model(t5, out / "t5_model.zip")

    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))


def main(out: Path, lm: str) -> None:
    ctx = init_distributed("gloo")
    rank = ctx.rank
    results: dict = {"world_size": ctx.world_size}

    results |= one_step(ctx, lm, "ddp")  # 1. the update check

    # 2. Several updates: weights, β, logs and checkpoints.
    train_task = register_toy_task("DistTrain-v0", lm, max_new_tokens=6, stop_token_ids=ragged_stop_ids())
    model = toy_ppo(toy_vec_env(train_task, N_ENVS, seed=ctx.seed(0, N_ENVS)), lm, seed=ctx.seed(0, N_ENVS), **TRAIN)
    model.set_logger(configure(str(out / f"logs_rank{rank}"), ["csv"]))  # make_data_parallel silences rank 1
    make_data_parallel(model, ctx)
    if rank == 0:  # a forward of one rank alone (an evaluation callback's) must not wait for the other
        results["rank0_alone"] = model.predict(toy_vec_env(train_task, 1, seed=5).reset(), deterministic=True)[0]
    checkpoints = CheckpointCallback(TRAIN["n_steps"], str(out / f"checkpoints_rank{rank}"))
    model.learn(3 * TRAIN["n_steps"] * N_ENVS, callback=MainProcessCallback(checkpoints, ctx))
    results["synced"] = {k: v.clone() for k, v in model.policy.state_dict().items()}
    if ctx.is_main:
        model.save(out / "final_model.zip")
    results["kl_coef"] = model.policy.kl_controller.value
    results["contexts"] = model.rollout_buffer.contexts.copy()
    results["segment_lengths"] = [s.length for s in model.rollout_buffer.segments]

    # 3. Control: same start (broadcast) but no gradient sync -> the ranks' weights must drift apart.
    control = toy_ppo(toy_vec_env(train_task, N_ENVS, seed=ctx.seed(0, N_ENVS)), lm, seed=ctx.seed(0, N_ENVS), **TRAIN)
    broadcast_parameters(control.policy)
    results["control_before"] = trainable(control)
    control.learn(TRAIN["n_steps"] * N_ENVS)
    results["control_after"] = trainable(control)

    # 4. Refusals: PPO's own target_kl, and ranks built differently.
    control.target_kl = 0.05
    try:
        make_data_parallel(control, ctx)
    except ValueError as error:
        results["target_kl_error"] = str(error)
    control.target_kl = None
    odd = toy_ppo(toy_vec_env(train_task, N_ENVS), lm, **(TRAIN | dict(n_steps=8 + 2 * rank)))
    try:
        make_data_parallel(odd, ctx)
    except ValueError as error:
        results["mismatch_error"] = str(error)

    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    if sys.argv[3:4] == ["fsdp"]:
        main_fsdp(Path(sys.argv[1]), sys.argv[2], sys.argv[4], sys.argv[5])
    else:
        main(Path(sys.argv[1]), sys.argv[2])
