"""Trainable top blocks over frozen lower blocks, with the lower blocks' output cached from the rollout.

With ``trainable_layers=N`` only the top N transformer blocks of the LM are trained (LoRA adapters or full weights);
the blocks below are frozen and shared by the policy and its reference. The hidden state that enters the first
trainable block is then a constant of a PPO iteration: the rollout computes it anyway (in its prefill and every
decoding step), so it is kept for every token of each episode, and the reference pass and every training epoch run
only the top N blocks (and the head) from it. On a long prompt this removes most of the work of an iteration.

Exactness: the top blocks see the very tensor the full forward would give them (up to the float rounding that
separates a KV-cached rollout step from a teacher-forced forward, which PPO's ratio already tolerates).

How the top blocks are run without the lower ones: the model's own ``forward`` runs as usual (it builds the
attention mask, the position embeddings and everything else a family needs), but for the duration of the call the
lower blocks in its block list are replaced by pass-through modules, the first of which hands on the cached hidden
state instead of the embeddings. Nothing model-specific is re-implemented, so any family whose decoder blocks sit in
one ``nn.ModuleList`` of ``num_hidden_layers`` modules works (Llama/SmolLM2, GPT-2, Qwen2, Mistral, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch as th
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def find_blocks(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """
    The decoder blocks of a causal LM: the one ``nn.ModuleList`` of ``num_hidden_layers`` modules of its trunk.

    :param model: a Hugging Face causal LM (not wrapped by peft)
    :return: (dotted name of the list inside ``model``, the list)
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len({type(m) for m in module}) == 1
    ]
    if n_layers is None or not lists:
        raise ValueError(
            f"trainable_layers: cannot find the transformer blocks of {type(model).__name__} (looked for one "
            f"nn.ModuleList of config.num_hidden_layers={n_layers} identical blocks); pass trainable_layers=None to "
            "train every layer"
        )
    lists.sort(key=lambda item: item[0].count("."))  # the shallowest: a block's own sub-lists are deeper
    return lists[0]


class _PassThrough(nn.Module):
    """Stands in for a frozen lower block: hands its input on (or, for the first one, the cached hidden state)."""

    def __init__(self, hidden: th.Tensor | None, as_tuple: bool):
        super().__init__()
        self.hidden = hidden
        self.as_tuple = as_tuple

    def forward(self, hidden_states: th.Tensor, *args: Any, **kwargs: Any) -> th.Tensor | tuple[th.Tensor]:
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


class LayerSplit:
    """
    Where an LM is split into frozen lower blocks and ``n_trainable`` trainable top blocks.

    :param model: the Hugging Face causal LM (not wrapped by peft; the split holds no reference to it)
    :param n_trainable: number of top blocks to train, 1 to the model's block count minus one
    """

    def __init__(self, model: PreTrainedModel, n_trainable: Any):
        self.blocks_name, blocks = find_blocks(model)
        self.n_blocks = len(blocks)
        if isinstance(n_trainable, bool) or not isinstance(n_trainable, int) or not 1 <= n_trainable <= self.n_blocks:
            raise ValueError(
                f"trainable_layers must be an integer from 1 to {self.n_blocks} (the number of transformer blocks of "
                f"{type(model).__name__}), or None to train every layer; got {n_trainable!r}"
            )
        self.n_trainable = n_trainable
        self.first_trainable = self.n_blocks - n_trainable  # index of the first trainable block
        self._block_returns_tuple = self._probe_output_type(model, blocks)

    @property
    def pattern(self) -> str:
        """The block list's attribute name (peft's ``layers_pattern``: ``"layers"``, ``"h"``, ...)."""
        return self.blocks_name.rsplit(".", 1)[-1]

    @property
    def trainable_indices(self) -> list[int]:
        return list(range(self.first_trainable, self.n_blocks))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The block list of ``model`` (the policy's LM or its reference copy: same architecture)."""
        blocks = model.get_submodule(self.blocks_name)
        assert isinstance(blocks, nn.ModuleList)
        return blocks

    @staticmethod
    def _probe_output_type(model: PreTrainedModel, blocks: nn.ModuleList) -> bool:
        # Blocks return a tensor in transformers 5 and a tuple in 4.x: the pass-throughs must return the same thing.
        seen: list[bool] = []
        handle = blocks[0].register_forward_hook(lambda module, args, output: seen.append(isinstance(output, tuple)))
        try:
            with th.no_grad():
                device = next(model.parameters()).device
                model.base_model(input_ids=th.zeros(1, 1, dtype=th.long, device=device), use_cache=False)
        finally:
            handle.remove()
        return bool(seen and seen[0])

    def freeze_lower(self, model: PreTrainedModel) -> None:
        """
        Full fine-tuning: train the top blocks and what comes after them (final norm, an untied LM head); freeze the
        lower blocks and the embeddings (which feed the lower blocks; a head tied to them stays frozen with them).
        """
        model.requires_grad_(False)
        blocks = self.blocks(model)
        for block in blocks[self.first_trainable :]:
            block.requires_grad_(True)
        trunk = model.get_submodule(self.blocks_name.rsplit(".", 1)[0]) if "." in self.blocks_name else model
        for child in trunk.children():
            if child is not blocks and not isinstance(child, nn.Embedding):
                child.requires_grad_(True)  # the final norm (its parameters act after the top blocks)
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and head.weight is not embeddings.weight:
            head.requires_grad_(True)

    def lower_block_of(self, parameter_name: str) -> int | None:
        """Index of the lower (frozen) block a parameter belongs to, or None."""
        marker = f"{self.blocks_name}."
        if marker not in parameter_name:
            return None
        index = int(parameter_name.split(marker, 1)[1].split(".", 1)[0])
        return index if index < self.first_trainable else None

    @contextlib.contextmanager
    def capture(self, model: nn.Module) -> Iterator[list[th.Tensor]]:
        """
        Record the hidden state entering the first trainable block during the forwards run inside the context.

        :param model: the LM (its block list is hooked)
        :return: a list that receives one (B, S, H) tensor per forward
        """
        captured: list[th.Tensor] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = self.blocks(model)[self.first_trainable].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield captured
        finally:
            handle.remove()

    @contextlib.contextmanager
    def from_split(self, model: nn.Module, hidden: th.Tensor) -> Iterator[None]:
        """
        Inside the context a forward of ``model`` skips its lower blocks and starts the top ones from ``hidden``.

        :param model: the LM (the policy's or the reference's: the lower blocks are the same frozen weights)
        :param hidden: (B, S, H) hidden states entering the first trainable block, in the columns of the forward's
            ``input_ids``
        """
        blocks = self.blocks(model)
        lower = list(blocks[: self.first_trainable])
        for index in range(self.first_trainable):
            blocks[index] = _PassThrough(hidden if index == 0 else None, self._block_returns_tuple)
        try:
            yield
        finally:
            for index, block in enumerate(lower):
                blocks[index] = block
