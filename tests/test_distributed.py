"""Data-parallel PPO: two real processes under torchrun with gloo (tests/distributed_worker.py), compared here."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch as th
from conftest import save_tiny_lm
from distributed_worker import FSDP_VARIANTS, N_ENVS, STEP
from helpers import register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO
from stable_baselines3.common.logger import Logger
from transformers import AutoConfig

from sb3_textrl.buffers import Segment
from sb3_textrl.distributed import (
    DistributedContext,
    init_distributed,
    load_sharded_checkpoint,
    make_data_parallel,
    save_model,
    save_sharded_checkpoint,
    split_segments,
)
from sb3_textrl.envs.news_data import generate_news_examples
from sb3_textrl.models import tiny_t5, train_small_tokenizer

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(out: Path, tiny_lm: str, *strategy: str) -> list[dict]:
    """Run the worker on 2 gloo ranks; each leaves its weights, buffers and messages in a pickle."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(out), tiny_lm, *strategy]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    for r in results:
        r["out"] = out
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_lm) -> list[dict]:
    """DDP: every rank holds the whole model."""
    return launch(tmp_path_factory.mktemp("distributed"), tiny_lm)


@pytest.fixture(scope="module")
def untied_lm(tmp_path_factory, gpt2_tokenizer) -> str:
    """The tiny GPT-2 with separate input and output embeddings (trainable under full fine-tuning)."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2-untied"), gpt2_tokenizer, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_t5_lm(tmp_path_factory) -> str:
    """A 2+2-layer T5 with a 300-token BPE vocabulary (its embedding shared by encoder, decoder and head)."""
    tokenizer = train_small_tokenizer([r["article"] for r in generate_news_examples(50)], vocab_size=300)
    path = tmp_path_factory.mktemp("tiny-t5")
    tiny_t5(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory, tiny_lm, untied_lm, tiny_t5_lm) -> list[dict]:
    """FSDP2: the LM's blocks and the value head sharded over the 2 ranks."""
    return launch(tmp_path_factory.mktemp("fsdp"), tiny_lm, "fsdp", untied_lm, tiny_t5_lm)


def max_difference(a: dict[str, th.Tensor], b: dict[str, th.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach().double() - b[k].detach().double()).abs().max()) for k in a)


def test_ranks_end_with_identical_weights_and_beta(ranks):
    first, second = ranks
    assert first["world_size"] == second["world_size"] == 2
    # Different data per rank: seeds seed + rank * n_envs give other prompts and other sampled completions.
    assert not np.array_equal(first["contexts"], second["contexts"]) or first["segment_lengths"] != second["segment_lengths"]
    # After three PPO updates (two epochs of several minibatches each) every tensor of the policy is identical,
    # the adaptive β (a buffer of the policy) included, and β did move away from its start.
    synced = first["synced"], second["synced"]
    assert synced[0].keys() == synced[1].keys()
    assert all(th.equal(synced[0][k], synced[1][k]) for k in synced[0])
    assert first["kl_coef"] == second["kl_coef"] != 0.1
    # The control: the same start (broadcast) without the gradient sync, one update -> the ranks drift apart.
    assert max_difference(first["control_before"], second["control_before"]) == 0
    assert max_difference(first["control_after"], second["control_after"]) > 1e-3


def union_step(tiny_lm: str, before: dict[str, th.Tensor], parts: list[dict], **policy_kwargs) -> dict[str, th.Tensor]:
    """One SB3 PPO.train() step of a single process whose rollout buffer holds all ``parts`` side by side."""
    task = f"DistStep-{Path(tiny_lm).name}-v0"
    if task not in gym.registry:
        register_toy_task(task, tiny_lm, max_new_tokens=5)
    n_envs = N_ENVS * len(parts)
    step = STEP | dict(batch_size=STEP["n_steps"] * n_envs, policy_kwargs=STEP["policy_kwargs"] | policy_kwargs)
    model = toy_ppo(toy_vec_env(task, n_envs), tiny_lm, **step)
    missing, unexpected = model.policy.load_state_dict(before, strict=False)
    assert not unexpected and not set(before) & set(missing)
    buffer = model.rollout_buffer
    for name in parts[0]:
        if name != "segments":
            axis = 0 if name.startswith("context") else 1  # per-step arrays are (n_steps, n_envs)
            setattr(buffer, name, np.concatenate([p[name] for p in parts], axis=axis))
    buffer.segments, env_offset, context_offset = [], 0, 0
    for part in parts:
        buffer.segments += [Segment(env + env_offset, start, length, context + context_offset)
                            for env, start, length, context in part["segments"]]
        env_offset, context_offset = env_offset + N_ENVS, context_offset + len(part["contexts"])
    buffer.full, buffer.pos = True, buffer.buffer_size
    model.set_logger(Logger(None, []))
    model.train()
    return {n: p.detach().clone() for n, p in model.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy, variant", [("ddp", None), ("fsdp", None), *(("fsdp", v) for v in FSDP_VARIANTS)])
def test_one_step_on_two_ranks_equals_one_step_on_both_minibatches(strategy, variant, request, tiny_lm):
    """
    Each rank took one SGD step on its own minibatch (all its 10 steps: equal sizes, so the mean of the two
    ranks' mean losses is the mean loss over the 20 steps; normalize_advantage=False, because per-minibatch
    statistics would differ). A single process that trains once on both minibatches together must land on
    the same weights, to float tolerance. max_grad_norm is below the gradient's norm, so the clipping is
    active: averaging after clipping (rank-local norms) would not match. Under FSDP2 each rank reduces, clips
    (SB3's clip_grad_norm_ on the sharded gradients) and steps its own shards.
    """
    first, second = request.getfixturevalue("ranks" if strategy == "ddp" else "fsdp_ranks")
    policy_kwargs = {}
    if variant is not None:  # LoRA on the top block only, checkpointed, or full fine-tuning of the untied LM
        first, second, policy_kwargs = first[variant], second[variant], FSDP_VARIANTS[variant]
        tiny_lm = request.getfixturevalue("untied_lm") if variant == "full" else tiny_lm
    before = first["step_before"]
    assert max_difference(before, second["step_before"]) == 0  # rank 0's initial weights were broadcast
    assert max_difference(first["step_after"], second["step_after"]) == 0
    together = union_step(tiny_lm, before, [first["step_buffer"], second["step_buffer"]], **policy_kwargs)
    update = {k: first["step_after"][k] - before[k] for k in before}
    scale = max(float(u.abs().max()) for u in update.values())
    assert scale > 1e-4
    assert max_difference(together, first["step_after"]) < 1e-5 * max(scale, 1.0)
    # SGD's step is lr * the clipped gradient: its norm is lr * max_grad_norm when the clipping is active.
    norm = th.sqrt(sum((u.double() ** 2).sum() for u in update.values()))
    assert float(norm) == pytest.approx(STEP["learning_rate"] * STEP["max_grad_norm"], rel=1e-4)
    # And the comparison can fail: rank 0's minibatch alone gives another step.
    alone = union_step(tiny_lm, before, [first["step_buffer"]], **policy_kwargs)
    assert max_difference(alone, first["step_after"]) > 100 * max_difference(together, first["step_after"]) + 1e-5


def test_only_rank_zero_logs_and_saves(ranks):
    out = ranks[0]["out"]
    log = pd.read_csv(out / "logs_rank0" / "progress.csv")
    assert len(log) == 3 and log["rollout/kl_coef"].notna().all()
    assert (out / "logs_rank1" / "progress.csv").stat().st_size == 0  # configured, then silenced
    assert sorted(p.name for p in (out / "checkpoints_rank0").iterdir()) == [
        "rl_model_16_steps.zip", "rl_model_32_steps.zip", "rl_model_48_steps.zip"]
    assert not (out / "checkpoints_rank1").exists()
    assert len(ranks[0]["rank0_alone"]) == 1  # rank 0 ran a forward alone without hanging rank 1


def test_rank_zero_checkpoint_loads_in_one_process(ranks, tiny_lm):
    """The model.zip rank 0 writes is a plain single-process checkpoint: same state dict names, no DDP trace."""
    out = ranks[0]["out"]
    if "DistTrain-v0" not in gym.registry:
        register_toy_task("DistTrain-v0", tiny_lm, max_new_tokens=6)
    loaded = PPO.load(out / "final_model.zip", env=toy_vec_env("DistTrain-v0", 1), device="cpu")
    state = loaded.policy.state_dict()
    synced = ranks[0]["synced"]
    assert state.keys() == synced.keys()
    assert all(th.equal(state[k], synced[k]) for k in synced)
    assert "DDP" not in type(loaded.policy.hf_model.base_model).__name__


def test_fsdp_holds_half_of_each_sharded_parameter_per_rank(fsdp_ranks, tiny_lm):
    """After training, each rank holds a shard of every parameter but the tied embedding (kept whole: the head uses
    it outside the trunk), about half of them; the rest is the same on both ranks, so together they are the model."""
    config = AutoConfig.from_pretrained(tiny_lm)
    embedding = config.vocab_size * config.n_embd * 4  # float32, tied input/output embedding
    for rank in fsdp_ranks:
        whole, sharded = rank["bytes_whole"] - embedding, rank["bytes_sharded"] - embedding
        assert whole > 0 and sharded == pytest.approx(whole / 2, rel=0.01)  # a shard is padded to a multiple of 2 rows
    # Every rank took the same steps: the same β, the same number of timesteps.
    assert fsdp_ranks[0]["kl_coef"] == fsdp_ranks[1]["kl_coef"] != 0.1
    assert len(fsdp_ranks[0]["rank0_alone"]) == 1  # gathered before training: rank 0 ran a forward alone


def test_fsdp_model_zip_loads_in_one_process(fsdp_ranks, tiny_lm):
    """save_model: the ranks gather, rank 0 writes a plain model.zip: same tensors and optimizer state, no shard."""
    out, saved = fsdp_ranks[0]["out"], fsdp_ranks[0]["saved"]
    assert fsdp_ranks[1]["saved"] is None  # rank 0 alone gets the gathered state
    if "DistTrain-v0" not in gym.registry:
        register_toy_task("DistTrain-v0", tiny_lm, max_new_tokens=6)
    loaded = PPO.load(out / "final_model.zip", env=toy_vec_env("DistTrain-v0", 1), device="cpu")
    state = loaded.policy.state_dict()
    assert state.keys() == saved["policy"].keys() and max_difference(state, saved["policy"]) == 0
    assert all(type(t) is th.Tensor or isinstance(t, th.nn.Parameter) for t in state.values())
    optimizer = loaded.policy.optimizer.state_dict()["state"]
    assert optimizer.keys() == saved["policy.optimizer"]["state"].keys() and len(optimizer) > 0
    for index, moments in optimizer.items():
        assert all(th.equal(moments[k], saved["policy.optimizer"]["state"][index][k]) for k in moments)
    assert loaded.num_timesteps == fsdp_ranks[0]["num_timesteps"] == 48
    # The periodic checkpoints of DistributedCheckpointCallback, and model.save refused with the way out.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "rl_model_16_steps.zip", "rl_model_32_steps.zip", "rl_model_48_steps.zip"]
    for rank in fsdp_ranks:
        assert "sharded over the ranks" in rank["save_error"] and "save_model(model, path)" in rank["save_error"]
    assert not list(out.glob("refused_rank*.zip"))


def test_fsdp_shards_an_encoder_decoder(fsdp_ranks, tiny_t5_lm):
    """Seq2SeqLMPolicy: its encoder and decoder blocks are sharded (the shared token embedding stays whole), it
    trains on 2 ranks, and the gathered model.zip loads in one process with the ranks' trained weights."""
    config = AutoConfig.from_pretrained(tiny_t5_lm)
    embedding = config.vocab_size * config.d_model * 4
    for rank in fsdp_ranks:
        whole, sharded = rank["t5_bytes_whole"] - embedding, rank["t5_bytes_sharded"] - embedding
        assert sharded == pytest.approx(whole / 2, rel=0.01)
    assert max_difference(fsdp_ranks[0]["t5_trained"], fsdp_ranks[1]["t5_trained"]) == 0
    loaded = PPO.load(fsdp_ranks[0]["out"] / "t5_model.zip", device="cpu")
    trained = {n: p for n, p in loaded.policy.named_parameters() if p.requires_grad}
    assert max_difference(trained, fsdp_ranks[0]["t5_trained"]) == 0


def test_fsdp_sharded_checkpoint_round_trip(fsdp_ranks):
    """save_sharded_checkpoint / load_sharded_checkpoint: a model built with another seed takes every tensor, the
    optimizer moments and the counters, into its shards, and trains on."""
    first, second = fsdp_ranks
    saved, loaded = first["saved"], first["loaded"]
    assert max_difference(first["other_before"], {k: saved["policy"][k] for k in first["other_before"]}) > 1e-3
    assert max_difference(loaded["policy"], saved["policy"]) == 0
    for index, moments in saved["policy.optimizer"]["state"].items():
        assert all(th.equal(moments[k], loaded["policy.optimizer"]["state"][index][k]) for k in moments)
    assert (first["out"] / "sharded" / ".metadata").is_file()
    for rank in fsdp_ranks:
        assert rank["loaded_num_timesteps"] == 48 and rank["resumed_num_timesteps"] == 64


def test_refusals_name_the_problem_and_the_fix(ranks):
    for rank in ranks:
        assert "target_kl=None" in rank["target_kl_error"] and "PPO(target_kl=0.05)" in rank["target_kl_error"]
        assert "n_steps (8..10)" in rank["mismatch_error"] and "same n_steps" in rank["mismatch_error"]


def test_split_segments_gives_exactly_the_count_asked():
    rng = np.random.default_rng(0)
    for _ in range(200):
        segments = [Segment(0, 0, int(n), i) for i, n in enumerate(rng.integers(1, 9, size=rng.integers(1, 30)))]
        n_groups = int(rng.integers(1, len(segments) + 1))
        groups = split_segments(segments, n_groups)
        assert len(groups) == n_groups and all(groups)
        assert [s for g in groups for s in g] == segments  # every segment once, in order
    # Balanced by steps when the segments allow it.
    even = [Segment(0, 0, 2, i) for i in range(12)]
    assert [sum(s.length for s in g) for g in split_segments(even, 3)] == [8, 8, 8]
    with pytest.raises(ValueError, match="cannot split 2 segments into 3"):
        split_segments(even[:2], 3)


def test_without_torchrun_everything_is_single_process(tiny_lm, monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    context = init_distributed()
    assert context == DistributedContext() and context.is_main and not context.is_distributed
    assert context.seed(7, n_envs=4) == 7 and DistributedContext(rank=2).seed(7, n_envs=4) == 15
    task = register_toy_task("DistSingle-v0", tiny_lm, max_new_tokens=3)
    model = toy_ppo(toy_vec_env(task, 1), tiny_lm, n_steps=3, batch_size=3)
    assert make_data_parallel(model) is model and model.rollout_buffer.minibatch_partition is None
    assert make_data_parallel(model, strategy="fsdp") is model  # one process: nothing to shard over
    with pytest.raises(TypeError, match="on-policy SB3 algorithm"):
        make_data_parallel(model.policy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strategy must be one of 'ddp', 'fsdp', got 'zero3'"):
        make_data_parallel(model, strategy="zero3")
    with pytest.raises(ValueError, match="strategy='fsdp'"):
        save_sharded_checkpoint(model, tmp_path / "sharded")
    with pytest.raises(ValueError, match="strategy='fsdp' first"):
        load_sharded_checkpoint(model, tmp_path / "sharded")
    save_model(model, tmp_path / "alone.zip")  # without a process group: model.save
    loaded = PPO.load(tmp_path / "alone.zip", env=toy_vec_env(task, 1), device="cpu")
    assert max_difference(loaded.policy.state_dict(), model.policy.state_dict()) == 0


def test_example_runs_alone_without_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    path = Path(__file__).resolve().parents[1] / "examples" / "distributed_ppo.py"
    spec = importlib.util.spec_from_file_location("example_distributed_ppo", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up while the class is built
    spec.loader.exec_module(example)
    summary = example.main(example.Options(output_dir=str(tmp_path), tiny=True, updates=1, n_epochs=1, device="cpu"))
    assert summary["world_size"] == 1 and summary["ranks_agree"] and summary["tokens"] == 8 * 4
    assert (tmp_path / "ppo_model.zip").is_file() and (tmp_path / "logs" / "progress.csv").is_file()
