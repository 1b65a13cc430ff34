"""Mixed precision (bf16 autocast) and activation checkpointing of the LM policies' forwards."""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch as th
from torch import nn
from transformers import PreTrainedModel

MIXED_PRECISION_OPTIONS = ("auto", "bf16", "no")


@functools.cache
def cuda_supports_bf16(index: int | None) -> bool:
    """Whether the CUDA device ``index`` has native bfloat16 (Ampere and later)."""
    try:  # torch >= 2.3 can tell native bf16 (Ampere and later) from an emulated one
        return th.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return th.cuda.is_bf16_supported()


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """
    Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), with which torch's bf16 matmuls run
    ~3-4x faster than float32 (measured on a 2-core AMD EPYC, docs/benchmarks.md); without them bf16 is emulated and slow.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: do not guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_mixed_precision(device: str | th.device = "auto") -> str:
    """
    The ``mixed_precision`` setting that is fastest on ``device``: ``"bf16"`` on a GPU with native bfloat16 or a CPU
    with bf16 instructions (:func:`cpu_has_fast_bf16`), else ``"no"``. The policy's own ``"auto"`` stays float32 on CPUs.

    :param device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    """
    if str(device) == "auto":
        device = "cuda" if th.cuda.is_available() else "cpu"
    device = th.device(device)
    if device.type == "cuda":
        return "bf16" if cuda_supports_bf16(device.index) else "no"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "no"


def check_mixed_precision(mixed_precision: str) -> None:
    """Refuse a ``mixed_precision`` that is not one of :data:`MIXED_PRECISION_OPTIONS` (fp16: say why)."""
    if mixed_precision in MIXED_PRECISION_OPTIONS:
        return
    fp16 = (
        " fp16 autocast needs loss scaling (a GradScaler), which SB3's train loop (optimizer.step()) does not do: "
        "use 'bf16' (GPUs from Ampere on, and CPUs) or 'no'."
        if mixed_precision in ("fp16", "float16", "half")
        else ""
    )
    raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_OPTIONS}, got {mixed_precision!r}.{fp16}")


def autocast_dtype(mixed_precision: str, device: th.device) -> th.dtype | None:
    """
    The dtype LM forwards autocast to on ``device``, or None for float32.

    :param mixed_precision: ``"auto"`` (bf16 on a CUDA device that has it), ``"bf16"`` (any device) or ``"no"``
    :param device: where the forwards run
    """
    if mixed_precision == "bf16":
        if device.type == "cuda" and not cuda_supports_bf16(device.index):
            raise RuntimeError(
                f"mixed_precision='bf16' but {th.cuda.get_device_name(device)} has no native bfloat16: "
                "use mixed_precision='no' (or 'auto') on this GPU."
            )
        return th.bfloat16
    if mixed_precision == "auto" and device.type == "cuda" and cuda_supports_bf16(device.index):
        return th.bfloat16
    return None


def autocast(
    dtype: th.dtype | None,
    device: th.device,
    model: nn.Module | None = None,
    casts: FrozenWeightCasts | None = None,
) -> contextlib.AbstractContextManager:
    """
    ``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing for None.

    :param model: the module the forward runs; with ``casts``, its frozen weights are read from low-precision copies
    :param casts: the copies (:class:`FrozenWeightCasts`), or None to let autocast cast every weight at every op
    """
    if dtype is None:
        return contextlib.nullcontext()
    if model is None or casts is None or device.type != "cpu":
        return th.autocast(device_type=device.type, dtype=dtype)
    return casts.autocast(model, dtype, device)


# (module class, names of the parameters that its forward feeds to an op autocast casts to low precision)
_CAST_PARAMETERS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = ((nn.Linear, ("weight", "bias")),)
try:  # GPT-2 style projections: torch.addmm(bias, x, weight), cast as a whole by autocast
    from transformers.pytorch_utils import Conv1D

    _CAST_PARAMETERS += ((Conv1D, ("weight", "bias")),)
except ImportError:  # pragma: no cover - transformers without Conv1D
    pass


class FrozenWeightCasts:
    """
    Low-precision copies of a model's frozen matmul weights, read in place of the float32 weights during a forward under
    CPU autocast.

    Why: autocast casts a weight to bf16 at every op, and its own cache keeps only leaves that require grad, so the
    frozen base weights of LoRA (and the blocks below ``trainable_layers``) are re-read in float32 and re-written in
    bf16 at every call: at every decoding step, for all of them (a 8 x 576 by 576 x 1,536 matmul: 346 us under
    autocast, 90 us from a copy, 178 us in float32; docs/benchmarks.md). The copies hold what autocast would compute
    (the cast is deterministic), so outputs and gradients are bitwise those of plain autocast
    (tests/test_weight_casts.py). A copy is remade when its weight is another tensor, moved, updated in place (its
    version counter) or written through ``.data``, which bypasses that counter (peft's ``merge_adapter``): a probe of
    8 of its elements is compared at every use (and the policy drops all copies on ``load_state_dict``).

    Memory: half the float32 size of the frozen weights that are used (SmolLM2-135M: 257 MiB). CPU only: on CUDA,
    memory is the scarce resource and the gain is unmeasured.
    """

    def __init__(self) -> None:
        # module -> {parameter name: (the float32 parameter, its data pointer, its version, its probe, its copy)}
        self._copies: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[th.Tensor, int, int, th.Tensor, th.Tensor]]]
        self._copies = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenWeightCasts:
        return FrozenWeightCasts()  # a cache: a copied policy makes its own

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def clear(self) -> None:
        """Drop every copy (they are remade at the next forward that needs them)."""
        self._copies.clear()

    def size_in_bytes(self) -> int:
        """Bytes the copies hold."""
        return sum(copy.numel() * copy.element_size() for entry in self._copies.values() for *_, copy in entry.values())

    @contextlib.contextmanager
    def autocast(self, model: nn.Module, dtype: th.dtype, device: th.device) -> Iterator[None]:
        """``torch.autocast`` with ``model``'s frozen float32 matmul weights swapped for their ``dtype`` copies."""
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        try:
            with th.autocast(device_type=device.type, dtype=dtype):
                for module in model.modules():
                    names = next((names for kind, names in _CAST_PARAMETERS if isinstance(module, kind)), ())
                    for name in names:
                        tensor = module._parameters.get(name)
                        # Plain frozen float32 CPU parameters only: not trained ones (autocast caches those), not
                        # sharded ones (FSDP2 swaps its own), not copies already in place (a nested forward).
                        if type(tensor) is not nn.Parameter or tensor.requires_grad or tensor.dtype != th.float32:
                            continue
                        if tensor.device.type != "cpu":
                            continue
                        # A plain tensor in the parameter's slot, for this forward only (what functional_call does).
                        module._parameters[name] = self._copy_of(module, name, tensor, dtype)  # type: ignore[assignment]
                        swapped.append((module, name, tensor))
                yield
        finally:
            for module, name, tensor in reversed(swapped):
                module._parameters[name] = tensor

    def _copy_of(self, module: nn.Module, name: str, tensor: th.Tensor, dtype: th.dtype) -> th.Tensor:
        entries = self._copies.setdefault(module, {})
        entry = entries.get(name)
        probe = _probe(tensor)
        if entry is not None:
            held, pointer, version, held_probe, copy = entry
            same = held is tensor and pointer == tensor.data_ptr() and version == tensor._version
            if same and copy.dtype == dtype and th.equal(held_probe, probe):
                return copy
        copy = tensor.detach().to(dtype)
        entries[name] = (tensor, tensor.data_ptr(), tensor._version, probe, copy)
        return copy


def _probe(tensor: th.Tensor, n: int = 8) -> th.Tensor:
    """``n`` elements spread over a tensor (a change of its values through ``.data`` shows in them)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].clone()


def enable_gradient_checkpointing(model: PreTrainedModel) -> list[nn.Module]:
    """
    Non-reentrant activation checkpointing of ``model``'s layers (LoRA's frozen inputs need no requires_grad, and
    no-grad rollouts skip it).

    :return: the checkpointed modules. HF checkpoints a layer only while ``layer.training``; the policy's LM stays in
        eval mode (no dropout), so the policy flips that flag on these modules alone.
    """
    if not model.supports_gradient_checkpointing:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing: pass gradient_checkpointing=False.")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
