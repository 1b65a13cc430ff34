"""
SFT on ``transformers.Trainer``: a subclass that overrides only the loss (the completion-only NLL, with the LM head
run on the completion positions alone), the batches (the env's layout, in the seeded order of
:class:`SFTBatchSampler`) and the count of target tokens that gradient accumulation divides by.

Everything else is the Trainer's: AdamW with linear warmup and decay, gradient accumulation and clipping, bf16,
checkpoints every ``save_steps`` and their exact resume (optimizer, scheduler and RNG states).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch as th
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import Trainer

from sb3_textrl.sft.data import IGNORE_INDEX, SFTExample, _batches
from sb3_textrl.sft.loss import target_nll


class SFTDataset(Dataset):
    """The training examples, for the Trainer's data loader (one :class:`SFTExample` per index)."""

    def __init__(self, examples: Sequence[SFTExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> SFTExample:
        return self.examples[index]


class SFTBatchSampler(Sampler[list[int]]):
    """
    Shuffled batches of example indices, a new order each epoch that depends only on ``(seed, epoch)``: a run resumed
    in the middle of an epoch sees the same batches as one never stopped.

    :param examples: the training examples (their lengths, for ``group_by_length``)
    :param batch_size: examples per batch
    :param seed: the run's seed
    :param group_by_length: batch examples of similar length together (less padding)
    """

    def __init__(self, examples: Sequence[SFTExample], batch_size: int, seed: int, group_by_length: bool) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"sft-batches-{self.seed}-{self.epoch}")
        return iter(_batches(self.examples, self.batch_size, rng, self.group_by_length))

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)


class CompletionOnlyTrainer(Trainer):
    """
    ``transformers.Trainer`` for SFT in the env's layout: the loss is the NLL of the target tokens only
    (:func:`~sb3_textrl.sft.loss.target_nll`), divided by the target tokens of the whole optimizer step, so every
    completion token weighs the same however the step was split into micro-batches.

    :param batch_sampler: the order of the training batches
    :param step_losses: receives the loss per target token of each optimizer step
    :param args: the Trainer's positional arguments
    :param kwargs: the Trainer's keyword arguments (``data_collator``: :func:`~sb3_textrl.sft.data.collate_sft`)
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's target tokens (num_items_in_batch)

    def __init__(self, *args: Any, batch_sampler: SFTBatchSampler, step_losses: list[float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler
        self.step_losses = step_losses
        self._step_loss = 0.0

    def get_train_dataloader(self) -> DataLoader:
        assert isinstance(self.train_dataset, SFTDataset)  # what train_sft gives
        loader = DataLoader(self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator)
        return self.accelerator.prepare(loader)

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: th.device
    ) -> tuple[list, th.Tensor | int | None]:
        # The step's target tokens, whatever the model's forward accepts (the Trainer counts them only for some).
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        return batches, sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)

    def compute_loss(
        self,
        model: th.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: th.Tensor | int | None = None,
    ) -> th.Tensor | tuple[th.Tensor, Any]:
        # target_nll calls the trunk and the LM head itself (not model.forward, which accelerate wraps in autocast)
        with th.autocast(self.args.device.type, dtype=th.bfloat16, enabled=self.args.bf16):
            nll, n_targets = target_nll(model, inputs)  # type: ignore[arg-type]  # the PreTrainedModel or PeftModel given
        loss = nll / max(int(num_items_in_batch) if num_items_in_batch is not None else n_targets, 1)
        return (loss, None) if return_outputs else loss

    def training_step(
        self, model: th.nn.Module, inputs: dict[str, Any], num_items_in_batch: th.Tensor | int | None = None
    ) -> th.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss += float(loss)
        if self.accelerator.gradient_state.sync_gradients:  # the step's last micro-batch: the optimizer steps next
            self.step_losses.append(self._step_loss)
            self._step_loss = 0.0
        return loss
