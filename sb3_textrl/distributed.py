"""Data-parallel PPO under ``torchrun``: every rank runs its own envs and its own stock SB3 ``PPO``.

The ranks stay one model because :func:`make_data_parallel`

- broadcasts rank 0's trainable parameters and floating-point buffers (β of the adaptive KL controller) once,
- makes the modules the policy calls (LM trunk, head, value head) DDP replicas with PyTorch's composable
  ``replicate``: DDP averages the gradients over the ranks during every ``loss.backward()`` — before SB3 clips
  their norm, so every rank clips the same averaged gradient and takes the same optimizer step;
  or, with ``strategy="fsdp"``, shards them with FSDP2's ``fully_shard`` (each block, then the rest of each module):
  each rank holds and steps 1/N of the weights, gradients and optimizer state, and the full weights are gathered
  for each rollout (:class:`_ShardedPolicy`); :func:`save_model` and :func:`save_sharded_checkpoint` save it,
- makes :class:`~sb3_textrl.buffers.TextRolloutBuffer` yield the same number of minibatches on every rank (each
  rank packs whole episodes, whose lengths differ per rank; a rank with one backward pass fewer would hang),
- adapts β from the KL averaged over the ranks,
- silences the logger of every rank but 0 (wrap callbacks that write files in :class:`MainProcessCallback`).

Launch a script that calls :func:`init_distributed` and :func:`make_data_parallel` with
``torchrun --nproc_per_node=N script.py`` (NCCL on GPUs, gloo on CPUs); see docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import torch as th
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sb3_textrl.buffers import Segment, TextRolloutBuffer
from sb3_textrl.common.sb3_bridge import save_with_parameters
from sb3_textrl.lm import checkpoint

# The data-parallel policies (weak: an entry goes away with its policy; nothing is stored on the model).
_DATA_PARALLEL: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job (torchrun's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""

    rank: int = 0  # global rank, 0 .. world_size - 1
    local_rank: int = 0  # rank on this host: the GPU index
    world_size: int = 1  # number of processes in the job
    backend: str | None = None  # "nccl" or "gloo"; None: not distributed
    device: th.device = field(default_factory=lambda: th.device("cpu"))  # this rank's device (pass it to PPO)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0: the one that logs, evaluates and saves."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    def seed(self, seed: int, n_envs: int = 1) -> int:
        """
        This rank's seed, so that no two envs of the job share a prompt order.

        SB3 seeds env ``i`` of a ``VecEnv`` with ``seed + i``; rank ``r`` therefore starts at ``seed + r * n_envs``.

        :param seed: the job's seed
        :param n_envs: envs per rank
        :return: the seed to give ``PPO(seed=...)`` and ``make_vec_env(seed=...)`` on this rank
        """
        return seed + self.rank * n_envs

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if _initialized():
            dist.barrier()

    @classmethod
    def current(cls) -> DistributedContext:
        """The context of the initialized process group, or a single-process context without one."""
        if not _initialized():
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = th.device("cuda", local_rank) if th.cuda.is_available() else th.device("cpu")
        return cls(dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend(), device)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistributedContext:
    """
    Join the ``torchrun`` job of this process (reads ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); outside ``torchrun`` return a single-process context, so the same script also runs alone.

    :param backend: "auto" (NCCL with CUDA, else gloo), "nccl" or "gloo"
    :param timeout_s: how long a collective waits for the other ranks before failing
    :return: this process's place in the job
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistributedContext.current()
    if backend == "auto":
        backend = "nccl" if th.cuda.is_available() else "gloo"
    if backend == "nccl" and not th.cuda.is_available():
        raise RuntimeError("backend='nccl' needs CUDA GPUs; on CPUs use backend='gloo' (or 'auto')")
    if th.cuda.is_available():
        th.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not _initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext.current()


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true without a process group)."""
    return not _initialized() or dist.get_rank() == 0


# -- gradients --------------------------------------------------------------------------------------------------
def _modules_to_replicate(policy: nn.Module) -> list[nn.Module]:
    """
    The called modules that hold trainable parameters, each trainable parameter in exactly one of them: DDP reduces
    the gradient of a module's parameters after the backward through that module's forward, so a parameter outside
    every called module would never be averaged, and one in two of them would be averaged twice.
    """
    called = getattr(policy, "called_modules", None)  # TransformerLMPolicy's, Seq2SeqLMPolicy's
    if called is None:
        raise TypeError(
            f"make_data_parallel needs a policy that names the modules it calls (called_modules()), such as "
            f"TransformerLMPolicy; got {type(policy).__name__}"
        )
    modules: list[nn.Module] = list(called())
    owner: dict[int, int] = {}
    for index, module in enumerate(modules):
        for p in module.parameters():
            if p.requires_grad and owner.setdefault(id(p), index) != index:
                raise ValueError(
                    f"A trainable parameter of shape {tuple(p.shape)} is shared by two modules the policy calls "
                    f"({type(modules[owner[id(p)]]).__name__} and {type(module).__name__}: tied input and output "
                    "embeddings, trained). Data parallel cannot average it once: train LoRA adapters (use_lora=True, "
                    "the default) or untie the embeddings (config.tie_word_embeddings=False)."
                )
    names = {id(p): n for n, p in policy.named_parameters()}
    outside = [names[id(p)] for p in policy.parameters() if p.requires_grad and id(p) not in owner]
    if outside:
        raise ValueError(
            f"Trainable parameters outside the modules the policy calls ({', '.join(outside[:3])}...): no data-parallel "
            "engine would average their gradients. Freeze them, or make the policy's called_modules() include them."
        )
    used = set(owner.values())
    return [module for index, module in enumerate(modules) if index in used]


def _replicate(module: nn.Module, context: DistributedContext) -> None:
    """
    Make ``module`` a DDP replica (PyTorch's composable ``replicate``: DDP's reducer on the module's own forward, so
    its parameter names, and the policy's state dict, stay as they are).

    - ``broadcast_buffers=False``: a forward run by one rank only (rank 0's evaluation callback) must not wait for
      the others; the policy's buffers are broadcast once by :func:`broadcast_parameters`.
    - ``find_unused_parameters=True``: a rank whose minibatch leaves a parameter out (value-head warm-up runs the
      LM without gradient) gives it a zero gradient instead of hanging the others.
    - ``init_sync=False``: :func:`broadcast_parameters` has already sent rank 0's trainable weights, and the frozen
      ones come from the same checkpoint on every rank (DDP would send the whole LM again).
    - initialized now, on every rank (DDP's constructor is a collective; it would otherwise run at the first
      forward, which may be rank 0's alone).
    """
    kwargs: dict = dict(broadcast_buffers=False, find_unused_parameters=True, init_sync=False)
    if context.device.type == "cuda":
        kwargs["device_id"] = context.device
    replicate(module, **kwargs)
    replicate.state(module).lazy_init()


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """
    Copy rank ``src``'s trainable parameters and floating-point buffers into every rank's ``module``.

    The frozen weights are not sent: every rank loads them from the same checkpoint.

    :param module: the policy (same architecture on every rank)
    :param src: the rank whose values win
    """
    with th.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=src)
        for b in module.buffers():
            if b.is_floating_point():
                dist.broadcast(b, src=src)


# -- sharding (FSDP2) ------------------------------------------------------------------------------------------
STRATEGIES = ("ddp", "fsdp")


def _block_lists(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks in ``module``: the entries of every ``nn.ModuleList`` of two or more modules of one type
    that is not inside another such list (Llama's ``layers``, GPT-2's ``h``, T5's ``block``)."""
    blocks: list[nn.Module] = []
    lists: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(outer + ".") for outer in lists):
            continue
        if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
            lists.append(name)
            blocks.extend(child)
    return blocks


class _ShardedPolicy:
    """
    The FSDP2 modules of a sharded policy, and whether their full weights are gathered.

    FSDP2 all-gathers a module's weights at each of its forwards, a collective every rank must join. Training is in
    lock-step (every rank runs the same minibatch count), but a rollout is not: ranks decode, score the reference
    and evaluate (rank 0 alone) a different number of times. So the full weights are gathered once, at the first
    forward after training (every rank gets there at the same point: the first step of ``collect_rollouts``), and
    kept for the whole rollout, as DeepSpeed-Chat's hybrid engine and TRL's ``unwrap_model_for_generation`` do for
    generation under ZeRO-3; the first forward of training frees them again (a local operation).
    """

    def __init__(self, policy: nn.Module, modules: list[FSDPModule], roots: list[nn.Module]):
        self._policy = weakref.ref(policy)
        self.modules = modules  # blocks first, then the roots: the same order on every rank
        self.gathered = False
        for root in roots:
            root.register_forward_pre_hook(self._before_forward, prepend=True)  # before FSDP's own hook

    def gather(self) -> None:
        """All-gather every module's full weights and keep them until :meth:`release` (a collective)."""
        for module in self.modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        self.gathered = True

    def release(self) -> None:
        """Free the full weights: each rank keeps its shards, and every forward gathers a block's weights again."""
        for module in self.modules:
            module.set_reshard_after_forward(True, recurse=False)
            module.reshard()
        self.gathered = False

    @contextlib.contextmanager
    def shards(self) -> Iterator[None]:
        """
        Register the shards as the modules' parameters for the duration (the policy's state dict then holds each
        rank's shards: what DCP saves and loads into), then gather again if the weights were gathered before. A
        collective when they were: every rank enters it.
        """
        was_gathered = self.gathered
        if was_gathered:
            self.release()
        try:
            yield
        finally:
            if was_gathered:
                self.gather()

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        policy = self._policy()
        training = policy is not None and policy.training  # SB3's train() sets it; collect_rollouts() clears it
        if training and self.gathered:
            self.release()
        elif not training and not self.gathered:
            self.gather()


# The sharded policies and their FSDP2 modules (weak, like _DATA_PARALLEL).
_SHARDED: weakref.WeakKeyDictionary[nn.Module, _ShardedPolicy] = weakref.WeakKeyDictionary()


def _shared_parameters(modules: list[nn.Module]) -> set[nn.Parameter]:
    """The parameters that more than one of ``modules`` holds (tied input and output embeddings)."""
    first_holder: dict[int, int] = {}
    shared: set[nn.Parameter] = set()
    for index, module in enumerate(modules):
        for p in module.parameters():
            if first_holder.setdefault(id(p), index) != index:
                shared.add(p)
    return shared


def _shard(policy: nn.Module, context: DistributedContext) -> _ShardedPolicy:
    """
    Shard the policy's LM and value head over the ranks with FSDP2 (``fully_shard``): each block of every called
    module, then the called module itself (its remaining weights: embeddings, final norm, head). A parameter shared
    by two called modules (tied input and output embeddings) cannot sit in two FSDP2 groups: it stays whole on every
    rank (``ignored_params``), which :func:`_modules_to_replicate` (run first by :func:`make_data_parallel`) allows
    only when it is frozen. The optimizer is rebuilt over the sharded parameters (each rank steps its own shard).
    """
    called: list[nn.Module] = list(policy.called_modules())  # type: ignore[operator]
    shared = _shared_parameters(called)
    # FSDP2 warns that the trunk returns a view (GPT-2 reshapes its last hidden state), in case an in-place op on it
    # drops the pre-backward hook; the policy never writes into the trunk's output (the update test checks the
    # gradients against a single process).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    kwargs: dict = dict(mesh=mesh, ignored_params=shared)
    block_kwargs = dict(kwargs)
    autocast_dtype = getattr(policy, "autocast_dtype", None)  # TransformerLMPolicy's mixed_precision
    dtype = autocast_dtype() if autocast_dtype is not None else None
    if context.device.type == "cuda" and dtype is not None:
        # The blocks' weights all-gathered in the autocast dtype (they run under autocast anyway), the gradients
        # reduced in float32; the rest (embeddings, heads, the value head) keeps its float32 forward.
        block_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=th.float32)
    modules: list[FSDPModule] = []
    roots: list[nn.Module] = []
    for module in called:
        if all(p in shared for p in module.parameters()):
            continue  # a tied output head: its only weight is the (unsharded) input embedding
        for block in _block_lists(module):
            modules.append(fully_shard(block, **block_kwargs))
        modules.append(fully_shard(module, **kwargs))
        roots.append(module)
    optimizer = cast(th.optim.Optimizer, policy.optimizer)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    policy.optimizer = type(optimizer)(trainable, **optimizer.defaults)  # type: ignore[assignment]
    return _ShardedPolicy(policy, modules, roots)


def refuse_sharded(policy: nn.Module, action: str) -> None:
    """
    Refuse to take a sharded policy's own state dict (``model.save`` on one rank would write this rank's shards, or
    the weights gathered for a rollout, and a half-sharded optimizer).

    :param policy: the policy
    :param action: what was asked, for the message
    """
    if policy in _SHARDED:
        raise RuntimeError(
            f"{action}: this policy is sharded over the ranks (make_data_parallel(strategy='fsdp')), so one rank does not "
            "hold its weights. Save it on every rank with sb3_textrl.distributed.save_model(model, path) (rank 0 writes "
            "one model.zip that PPO.load reads in a single process; with CheckpointCallback use "
            "DistributedCheckpointCallback) or save_sharded_checkpoint(model, directory) to resume."
        )


def local_shard(tensor: th.Tensor) -> th.Tensor:
    """This rank's part of a tensor: a sharded (DTensor) one's local shard, any other tensor whole."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def parameter_bytes_per_rank(policy: nn.Module) -> int:
    """The bytes of parameters this rank holds: a sharded parameter's local shard, every other parameter whole."""
    return sum(local_shard(p).nbytes for p in policy.parameters())


def _full(value: object) -> object:
    """A copy of the value on the CPU, a sharded tensor's gathered (a collective); values other than tensors as they are."""
    if isinstance(value, DTensor):
        return value.full_tensor().detach().cpu()
    if isinstance(value, th.Tensor):
        return value.detach().cpu().clone()  # not a view of the live tensor, which training goes on changing
    if isinstance(value, dict):
        return {k: _full(v) for k, v in value.items()}
    return value


def gathered_parameters(model: OnPolicyAlgorithm) -> dict[str, dict] | None:
    """
    The model's state dicts with every sharded tensor gathered, as ``model.get_parameters()`` gives them for a
    single process: rank 0 gets them, the other ranks None. A collective: every rank calls it.

    :param model: a model made data-parallel with ``strategy="fsdp"`` (or any other model: its own parameters)
    """
    policy = model.policy
    if policy not in _SHARDED:
        return model.get_parameters() if is_main_process() else None
    with th.no_grad(), _SHARDED[policy].shards():
        tensors = {k: _full(v) for k, v in nn.Module.state_dict(policy).items()}
        optimizer = policy.optimizer.state_dict()
        optimizer["state"] = {i: _full(state) for i, state in optimizer["state"].items()}
    if not is_main_process():
        return None
    state = checkpoint.without_base_weights(policy, dict(tensors), tensors=tensors)  # type: ignore[arg-type]
    return {"policy": state, "policy.optimizer": optimizer}


def save_model(model: OnPolicyAlgorithm, path: str | os.PathLike) -> None:
    """
    Save one single-process ``model.zip`` (``PPO.load`` reads it on one device): ``model.save(path)`` on rank 0, with
    a sharded policy's tensors gathered first. A collective under ``strategy="fsdp"``: every rank calls it, rank 0
    writes. (Under DDP every rank holds the whole model, and rank 0's ``model.save`` alone is the same.)

    :param model: this rank's model
    :param path: the zip file rank 0 writes
    """
    params = gathered_parameters(model)
    if params is not None:
        save_with_parameters(model, path, params)
    if _initialized():
        dist.barrier()  # the file is complete when any rank returns


def _sharded_state(model: OnPolicyAlgorithm) -> dict:
    policy = model.policy
    counters = th.tensor([model.num_timesteps, model._n_updates], dtype=th.int64)
    return {
        "policy": nn.Module.state_dict(policy),  # every tensor: each rank's shards and the unsharded tensors
        "optimizer": get_optimizer_state_dict(policy, policy.optimizer),
        "counters": counters,
    }


def save_sharded_checkpoint(model: OnPolicyAlgorithm, directory: str | os.PathLike) -> None:
    """
    Write a resumable sharded checkpoint (``torch.distributed.checkpoint``): each rank writes its own shards of the
    weights and the optimizer state, in parallel, and nothing is gathered; with the number of timesteps and updates.
    A collective: every rank calls it. Load it with :func:`load_sharded_checkpoint` on the same number of ranks or
    another (DCP reshards on load).

    :param model: this rank's model, made data-parallel with ``strategy="fsdp"``
    :param directory: the checkpoint directory, shared by the ranks (a shared file system across hosts)
    """
    if model.policy not in _SHARDED:
        raise ValueError("save_sharded_checkpoint needs a model made data-parallel with strategy='fsdp'; "
                         "save others with model.save (rank 0) or save_model")
    with _SHARDED[model.policy].shards():
        dcp.save(_sharded_state(model), checkpoint_id=os.fspath(directory))


def load_sharded_checkpoint(model: OnPolicyAlgorithm, directory: str | os.PathLike) -> None:
    """
    Load a checkpoint of :func:`save_sharded_checkpoint` into this rank's model (built like the saved one, then made
    data-parallel with ``strategy="fsdp"``); continue with ``model.learn(..., reset_num_timesteps=False)``.

    :param model: this rank's model
    :param directory: the checkpoint directory
    """
    if model.policy not in _SHARDED:
        raise ValueError("load_sharded_checkpoint needs a model made data-parallel with strategy='fsdp' first")
    policy = model.policy
    with _SHARDED[policy].shards():
        state = _sharded_state(model)
        dcp.load(state, checkpoint_id=os.fspath(directory))  # in place into the shards; small tensors may be replaced
        nn.Module.load_state_dict(policy, state["policy"])
        set_optimizer_state_dict(policy, policy.optimizer, state["optimizer"])
    model.num_timesteps, model._n_updates = (int(v) for v in state["counters"].tolist())
    cache = getattr(policy, "_rollout_cache", None)
    if cache is not None:
        cache.reset()


# -- minibatches ------------------------------------------------------------------------------------------------
def split_segments(segments: list[Segment], n_groups: int) -> list[list[Segment]]:
    """
    Split whole episode segments, in the given order, into exactly ``n_groups`` non-empty groups of about equal
    numbers of steps.

    :param segments: the segments in minibatch order (shuffled by the buffer)
    :param n_groups: the number of groups, 1 .. len(segments)
    :return: the groups
    """
    if not 1 <= n_groups <= len(segments):
        raise ValueError(f"cannot split {len(segments)} segments into {n_groups} non-empty minibatches")
    total = sum(s.length for s in segments)
    groups: list[list[Segment]] = []
    start, done = 0, 0
    for g in range(n_groups):
        later = n_groups - g - 1  # groups still to fill: each needs a segment
        end = start + 1
        steps = segments[start].length
        if later == 0:
            end = len(segments)
        else:
            target = total * (g + 1) / n_groups
            while end < len(segments) - later and done + steps < target:
                steps += segments[end].length
                end += 1
        groups.append(segments[start:end])
        start, done = end, done + steps
    return groups


def agreed_minibatch_partition(segments: list[Segment], batch_size: int) -> list[list[Segment]]:
    """
    ``TextRolloutBuffer.minibatch_partition`` for data-parallel training: every rank yields the same number of
    minibatches, ``ceil(steps / batch_size)`` (SB3's count for its default buffer) or fewer when a rank has fewer
    whole segments than that (the minimum over the ranks, found by one all-reduce).

    :param segments: this rank's segments in shuffled order
    :param batch_size: PPO's ``batch_size`` (steps)
    :return: the minibatches, as groups of whole segments
    """
    total = sum(s.length for s in segments)
    count = th.tensor([min(math.ceil(total / batch_size), len(segments))], dtype=th.int64)
    if _initialized():
        count = _all_reduce(count, dist.ReduceOp.MIN)
    return split_segments(segments, int(count.item()))


def _all_reduce(tensor: th.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> th.Tensor:
    """All-reduce of a small CPU tensor, on the device the backend needs (NCCL: this rank's GPU); returns it on the CPU."""
    moved = tensor.to(DistributedContext.current().device) if dist.get_backend() == "nccl" else tensor.clone()
    dist.all_reduce(moved, op=op)
    return moved.cpu()


# -- the adaptive KL coefficient --------------------------------------------------------------------------------
def _sync_adaptive_kl(buffer: TextRolloutBuffer, policy: BasePolicy) -> None:
    """
    Make the buffer adapt β from the KL of all ranks (its ``kl_reducer`` hook): each rank measures the mean KL of its
    own episodes, and a rank-local β would make the ranks' rewards, hence their gradients, and finally their weights
    drift apart. The hook is a collective, called by every rank once per rollout; every rank then updates the same β
    with the same KL, the mean over the ranks that finished an episode, and the ranks' steps together.
    """
    controller = getattr(policy, "kl_controller", None)
    if controller is None or not controller.adaptive:
        return

    def kl_over_ranks(kl: float | None, n_tokens: int) -> tuple[float | None, int]:
        # The ranks' sampled tokens (lock-step waits left out), as a single process counts its own.
        local = [kl or 0.0, float(kl is not None), float(n_tokens)]
        kl_sum, ranks_with_kl, tokens = _all_reduce(th.tensor(local, dtype=th.float64)).tolist()
        return (kl_sum / ranks_with_kl if ranks_with_kl > 0 else None), int(tokens)

    buffer.kl_reducer = kl_over_ranks


# -- the model --------------------------------------------------------------------------------------------------
def _check_same_configuration(model: OnPolicyAlgorithm, parameters: list[nn.Parameter]) -> None:
    """Refuse ranks whose settings differ: they would hang in a collective or silently average unlike gradients."""
    names = ["n_steps", "n_envs", "batch_size", "n_epochs", "trainable tensors", "trainable elements"]
    local = th.tensor(
        [
            model.n_steps,
            model.n_envs,
            getattr(model, "batch_size", 0),
            getattr(model, "n_epochs", 1),
            len(parameters),
            sum(p.numel() for p in parameters),
        ],
        dtype=th.int64,
    )
    low, high = _all_reduce(local, dist.ReduceOp.MIN), _all_reduce(local, dist.ReduceOp.MAX)
    differ = [f"{n} ({lo}..{hi})" for n, lo, hi in zip(names, low.tolist(), high.tolist()) if lo != hi]
    if differ:
        raise ValueError(
            f"The ranks are configured differently: {', '.join(differ)}. Every rank must build the same PPO and policy "
            "(same n_steps, n_envs, batch_size, n_epochs, LM and LoRA settings); only the seeds may differ."
        )


def make_data_parallel(
    model: OnPolicyAlgorithm, context: DistributedContext | None = None, strategy: str = "ddp"
) -> OnPolicyAlgorithm:
    """
    Turn this rank's SB3 ``PPO`` into one replica of a data-parallel job (see the module docstring). Call it on
    every rank after building the model and before ``learn``; without a process group (or with one rank) it
    returns the model unchanged.

    :param model: this rank's PPO (or another on-policy algorithm), built alike on every rank
    :param context: this rank's place in the job; default: the initialized process group's
    :param strategy: "ddp": every rank holds the whole model, DDP averages the gradients; "fsdp": FSDP2 shards the
        weights, gradients and optimizer state of the LM's blocks over the ranks (the full weights are gathered
        for each rollout; save with :func:`save_model` or :func:`save_sharded_checkpoint`, called on every rank)
    :return: the same model
    """
    context = context or DistributedContext.current()
    if not isinstance(model, OnPolicyAlgorithm):
        raise TypeError(f"make_data_parallel needs an on-policy SB3 algorithm such as PPO, got {type(model).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    if not context.is_distributed or not _initialized():
        return model
    target_kl = getattr(model, "target_kl", None)  # PPO's; other on-policy algorithms have none
    if target_kl is not None:
        raise ValueError(
            f"PPO(target_kl={target_kl}) stops an epoch when this rank's approximate KL is too high; the ranks "
            "would decide differently and wait for each other forever. Build PPO with target_kl=None under "
            "data parallel (the policy's own policy_kwargs=dict(kl_target=...), the adaptive KL penalty, is supported)."
        )
    policy = model.policy
    if policy in _DATA_PARALLEL:
        return model  # already data-parallel
    parameters = [p for p in policy.parameters() if p.requires_grad]
    _check_same_configuration(model, parameters)
    modules = _modules_to_replicate(policy)
    broadcast_parameters(policy)
    cache = getattr(policy, "_rollout_cache", None)
    if cache is not None:
        cache.reset()  # it may hold keys and values of the weights before the broadcast
    if strategy == "fsdp":
        base = getattr(policy, "base_weights", None)
        if base is not None:
            base.own_fingerprint(policy)  # digests of the base LM's tensors while they are whole (for save_model)
        sharded = _shard(policy, context)
        sharded.gather()  # every rank is here: a rank-0 callback may run a forward before the first rollout
        _SHARDED[policy] = sharded
    else:
        for module in modules:
            _replicate(module, context)
    _DATA_PARALLEL.add(policy)
    buffer = model.rollout_buffer
    if isinstance(buffer, TextRolloutBuffer):
        buffer.minibatch_partition = agreed_minibatch_partition
        _sync_adaptive_kl(buffer, policy)
    if not context.is_main:
        model.verbose = 0
        model.set_logger(Logger(folder=None, output_formats=[]))  # records are kept and dropped, nothing is written
    return model


# -- callbacks --------------------------------------------------------------------------------------------------
class MainProcessCallback(BaseCallback):
    """
    Run ``callback`` on rank 0 only (checkpoints, evaluations, samples), while every rank agrees on when to stop.

    When the callback stops training (``_on_step`` returns False) on rank 0, every rank stops at the same step: the
    decision is all-reduced at each step (one tiny collective per env step).

    :param callback: the SB3 callback to run on rank 0
    :param context: this rank's place in the job; default: the initialized process group's
    """

    def __init__(self, callback: BaseCallback, context: DistributedContext | None = None):
        super().__init__()
        self.callback = callback
        self.context = context or DistributedContext.current()

    def _init_callback(self) -> None:
        if self.context.is_main:
            self.callback.init_callback(self.model)

    def _on_training_start(self) -> None:
        if self.context.is_main:
            self.callback.on_training_start(self.locals, self.globals)

    def _on_rollout_start(self) -> None:
        if self.context.is_main:
            self.callback.on_rollout_start()

    def _on_step(self) -> bool:
        keep_going = self.callback.on_step() if self.context.is_main else True
        if self.context.is_distributed and _initialized():
            keep_going = bool(_all_reduce(th.tensor([int(keep_going)]), dist.ReduceOp.MIN).item())
        return keep_going

    def _on_rollout_end(self) -> None:
        if self.context.is_main:
            self.callback.on_rollout_end()

    def _on_training_end(self) -> None:
        if self.context.is_main:
            self.callback.on_training_end()

    def update_child_locals(self, locals_: dict) -> None:
        if self.context.is_main:
            self.callback.update_locals(locals_)


class DistributedCheckpointCallback(BaseCallback):
    """
    SB3's ``CheckpointCallback`` for a sharded model: run on every rank (not inside :class:`MainProcessCallback`);
    every ``save_freq`` calls (env steps, the same on every rank) the ranks gather the weights and rank 0 writes
    ``{save_path}/{name_prefix}_{num_timesteps}_steps.zip`` (:func:`save_model`), or, with ``sharded=True``, every
    rank writes its shards into the directory ``{save_path}/{name_prefix}_{num_timesteps}_steps``
    (:func:`save_sharded_checkpoint`, for :func:`load_sharded_checkpoint`).

    :param save_freq: env steps (calls of ``_on_step``) between checkpoints
    :param save_path: the directory of the checkpoints
    :param name_prefix: the start of each checkpoint's name
    :param sharded: write sharded checkpoints instead of single-process ``model.zip`` files
    """

    def __init__(self, save_freq: int, save_path: str | os.PathLike, name_prefix: str = "rl_model", sharded: bool = False):
        super().__init__()
        if save_freq < 1:
            raise ValueError(f"save_freq must be a positive number of env steps, got {save_freq}")
        self.save_freq = save_freq
        self.save_path = os.fspath(save_path)
        self.name_prefix = name_prefix
        self.sharded = sharded

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            path = os.path.join(self.save_path, f"{self.name_prefix}_{self.num_timesteps}_steps")
            if self.sharded:
                save_sharded_checkpoint(self.model, path)  # type: ignore[arg-type]
            else:
                if is_main_process():
                    os.makedirs(self.save_path, exist_ok=True)
                save_model(self.model, path + ".zip")  # type: ignore[arg-type]
        return True
