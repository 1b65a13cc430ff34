"""LoRA adapters (peft) for the LM policies: the default settings, and adapters restricted to ``trainable_layers``."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from sb3_textrl.common.layer_split import LayerSplit


def lora_kwargs(model: PreTrainedModel, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """
    ``peft.LoraConfig`` arguments: r=16, alpha=32, no dropout, the model family's default target modules, then
    ``overrides`` (the policy's ``lora_config``).
    """
    kwargs: dict[str, Any] = dict(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    if model.config.model_type == "gpt2":
        kwargs["fan_in_fan_out"] = True  # GPT-2 stores its projections as Conv1D (in, out)
    kwargs.update(overrides)
    return kwargs


# Our defaults override these LoraConfig fields, so a LoraConfig object always passes its own values for them.
_OVERRIDDEN_DEFAULTS = ("r", "lora_alpha", "lora_dropout", "bias")


def lora_overrides(lora_config: Mapping[str, Any] | LoraConfig | None) -> dict[str, Any]:
    """
    The policy's ``lora_config`` as ``peft.LoraConfig`` keyword arguments (a plain dict, which pickles into
    ``model.zip`` without peft's classes).

    :param lora_config: a dict of ``LoraConfig`` arguments, or a ``peft.LoraConfig`` (TRL's ``peft_config=`` habit):
        every field it sets away from peft's defaults, and always its ``r``, ``lora_alpha``, ``lora_dropout`` and
        ``bias`` (which our defaults would otherwise replace); its ``task_type`` when set
    :return: the keyword arguments
    """
    if lora_config is None:
        return {}
    if isinstance(lora_config, LoraConfig):
        if lora_config.inference_mode:
            raise ValueError("lora_config has inference_mode=True, which freezes the adapters: PPO could not train them")
        defaults = LoraConfig()
        kwargs = {
            field.name: getattr(lora_config, field.name)
            for field in dataclasses.fields(LoraConfig)
            if field.init
            and (field.name in _OVERRIDDEN_DEFAULTS or getattr(lora_config, field.name) != getattr(defaults, field.name))
        }
        if isinstance(kwargs.get("target_modules"), set):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return kwargs
    if isinstance(lora_config, Mapping):
        return dict(lora_config)
    raise TypeError(
        f"lora_config must be a dict of peft.LoraConfig arguments or a peft.LoraConfig, got {type(lora_config).__name__}"
    )


def make_layer_split(model: PreTrainedModel, trainable_layers: int | None) -> LayerSplit | None:
    """The frozen/trainable split of ``trainable_layers`` (None: every layer trains, nothing to cache)."""
    if trainable_layers is None:
        return None
    split = LayerSplit(model, trainable_layers)
    return split if split.first_trainable > 0 else None


def add_lora(model: PreTrainedModel, kwargs: dict[str, Any], split: LayerSplit | None = None) -> PeftModel:
    """
    Wrap ``model`` with LoRA adapters; with a layer split only in its trainable top blocks.

    :param model: the LM
    :param kwargs: ``peft.LoraConfig`` arguments (:func:`lora_kwargs`)
    :param split: the ``trainable_layers`` split, or None: adapters wherever ``kwargs`` put them
    :return: the peft model
    """
    kwargs = dict(kwargs)
    if split is not None:
        kwargs.update(layers_to_transform=split.trainable_indices, layers_pattern=split.pattern)
    with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            peft_model = get_peft_model(model, LoraConfig(**kwargs))
        except ValueError as err:
            _explain_split_error(err, model, kwargs, split)
            raise
    if split is not None:
        _check_lower_blocks_untouched(peft_model, kwargs, split)
    return peft_model


def _explain_split_error(err: ValueError, model: PreTrainedModel, kwargs: dict[str, Any], split: LayerSplit | None) -> None:
    """Raise a clearer error for peft's refusal of ``target_modules`` under a layer split (return: keep peft's)."""
    if split is None:
        return
    targets = kwargs.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(
            f"LoRA target_modules {targets!r} is a regular expression, which peft cannot restrict to the top "
            f"{split.n_trainable} blocks of trainable_layers: give target_modules as a list of module names (e.g. "
            "['q_proj', 'v_proj'])"
        ) from err
    if "not found" in str(err):
        raise ValueError(
            f"LoRA target_modules {targets!r} select no module in the top {split.n_trainable} blocks (blocks "
            f"{split.first_trainable}-{split.n_blocks - 1} of '{split.blocks_name}') of {type(model).__name__}: name "
            "modules of those blocks in lora_config=dict(target_modules=[...]), e.g. the attention projections"
        ) from err


def _check_lower_blocks_untouched(peft_model: PeftModel, kwargs: dict[str, Any], split: LayerSplit) -> None:
    """A regex ``target_modules`` ignores ``layers_to_transform``: refuse adapters in the frozen blocks."""
    names = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    lower = sorted({i for i in map(split.lower_block_of, names) if i is not None})
    if lower:
        raise ValueError(
            f"LoRA target_modules {kwargs.get('target_modules')!r} put adapters in the frozen blocks {lower[:5]} "
            f"(trainable_layers={split.n_trainable} trains blocks {split.first_trainable}-{split.n_blocks - 1}): "
            "give target_modules as a list of module names, which trainable_layers restricts to the top blocks"
        )
