"""Mixed precision (bf16 autocast) and activation checkpointing of the LM policies' forwards."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

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


def autocast(dtype: th.dtype | None, device: th.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return th.autocast(device_type=device.type, dtype=dtype)


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
