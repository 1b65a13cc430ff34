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

The last block, read only where actions are predicted: a PPO forward reads the final hidden state only at the
positions that predict an action (the last prompt token and the completion's tokens); the prompt's other positions
matter to the last block only through their keys and values. Its position-wise parts (the MLP, the attention's
query and output projections; ~90 % of a SmolLM2 block's matmuls) therefore run on those positions alone, and the
other rows of their outputs are zeros that nothing reads. Found by name (``mlp``; ``q_proj``, ``o_proj``/``c_proj``/
``out_proj``/``dense`` of the attention); a family that names them otherwise runs them everywhere, which is only slower.
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

    def __init__(self, hidden: th.Tensor | None, as_tuple: bool, record: list[th.Tensor] | None = None):
        super().__init__()
        self.hidden = hidden
        self.as_tuple = as_tuple
        self.record = record  # receives the input of each forward (a top block standing aside, see lower_only)

    def forward(self, hidden_states: th.Tensor, *args: Any, **kwargs: Any) -> th.Tensor | tuple[th.Tensor]:
        if self.record is not None:
            self.record.append(hidden_states.detach())
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


class _AtPositions(nn.Module):
    """Runs a position-wise module on the given rows of its (..., S, H) input only; the other output rows are zeros."""

    def __init__(self, inner: nn.Module, rows: th.Tensor, n_rows: int):
        super().__init__()
        self.inner = inner
        self.rows = rows  # (N,) indices into the flattened (B·S) positions
        self.n_rows = n_rows

    def forward(self, x: th.Tensor, *args: Any, **kwargs: Any) -> Any:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.n_rows:  # not the forward the rows were given for: compute everything
            return self.inner(x, *args, **kwargs)
        y = self.inner(flat.index_select(0, self.rows), *args, **kwargs)  # (N, H_out)
        if not isinstance(y, th.Tensor):  # e.g. a mixture of experts returning router logits: not position-wise
            return self.inner(x, *args, **kwargs)
        out = y.new_zeros(flat.shape[0], y.shape[-1]).index_copy(0, self.rows, y)  # (B·S, H_out)
        return out.view(*x.shape[:-1], y.shape[-1])


# Child names of the position-wise parts of a decoder block, by family (Llama/Qwen2/Mistral, GPT-2, Phi, BART-like).
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTENTION_NAMES = ("self_attn", "attn", "attention")
_QUERY_NAMES = ("q_proj",)  # a fused query-key-value projection (GPT-2's c_attn) cannot be split by position
_ATTENTION_OUTPUT_NAMES = ("o_proj", "c_proj", "out_proj", "dense")


def position_wise_parts(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """
    The position-wise submodules of a decoder block whose output at a position feeds only that position's output:
    the MLP, the attention's query projection (not the keys and values, which every later position reads) and its
    output projection.

    :param block: one decoder block
    :return: ``(parent module, attribute name)`` of each part found
    """
    parts = [(block, name) for name in _MLP_NAMES if isinstance(getattr(block, name, None), nn.Module)][:1]
    attention = next((getattr(block, n) for n in _ATTENTION_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    if attention is not None:
        for names in (_QUERY_NAMES, _ATTENTION_OUTPUT_NAMES):
            parts += [(attention, name) for name in names if isinstance(getattr(attention, name, None), nn.Module)][:1]
    return parts


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
    def lower_only(self, model: nn.Module) -> Iterator[list[th.Tensor]]:
        """
        Inside the context a forward of ``model`` runs its frozen lower blocks only: the top blocks hand their input
        on, so the forward's output is not the LM's, and the hidden state entering the first trainable block is
        recorded, as :meth:`capture` records it from a whole forward.

        :param model: the LM (the policy's or the reference's: the lower blocks are the same frozen weights)
        :return: a list that receives one (B, S, H) tensor per forward
        """
        blocks = self.blocks(model)
        top = list(blocks[self.first_trainable :])
        captured: list[th.Tensor] = []
        for offset in range(len(top)):
            blocks[self.first_trainable + offset] = _PassThrough(
                None, self._block_returns_tuple, record=captured if offset == 0 else None
            )
        try:
            yield captured
        finally:
            for offset, block in enumerate(top):
                blocks[self.first_trainable + offset] = block

    @contextlib.contextmanager
    def from_split(self, model: nn.Module, hidden: th.Tensor, read_positions: th.Tensor | None = None) -> Iterator[None]:
        """
        Inside the context a forward of ``model`` skips its lower blocks and starts the top ones from ``hidden``.

        :param model: the LM (the policy's or the reference's: the lower blocks are the same frozen weights)
        :param hidden: (B, S, H) hidden states entering the first trainable block, in the columns of the forward's
            ``input_ids``
        :param read_positions: (N,) flat indices (row · S + column) of the only positions whose final hidden state the
            caller reads: the last block's position-wise parts then run there alone (see the module's docstring).
            None: everywhere. Ignored under gradient checkpointing, whose backward re-runs the block outside the context
        """
        blocks = self.blocks(model)
        lower = list(blocks[: self.first_trainable])
        for index in range(self.first_trainable):
            blocks[index] = _PassThrough(hidden if index == 0 else None, self._block_returns_tuple)
        restricted: list[tuple[nn.Module, str, nn.Module]] = []
        if read_positions is not None and not getattr(model, "is_gradient_checkpointing", False):
            n_rows = hidden.shape[0] * hidden.shape[1]
            for parent, name in position_wise_parts(blocks[-1]):
                inner = getattr(parent, name)
                restricted.append((parent, name, inner))
                setattr(parent, name, _AtPositions(inner, read_positions, n_rows))
        try:
            yield
        finally:
            for parent, name, inner in restricted:
                setattr(parent, name, inner)
            for index, block in enumerate(lower):
                blocks[index] = block
