"""
Turning (prompt, completion) text pairs into reward-model inputs, and scoring them.

A reward model reads the prompt and the completion as one text pair (``[CLS] prompt [SEP] completion [SEP]`` for a
BERT-style tokenizer). When the pair is longer than the model's budget the *prompt* loses tokens, from its start,
so the completion (what the reward judges) and the end of the prompt next to it are kept. Truncations are counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Encoding, Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("sb3_textrl")


@dataclass
class Truncations:
    """
    How many pairs did not fit the token budget.

    :param prompts: pairs whose prompt lost tokens (from its start)
    :param completions: pairs whose completion alone was too long and lost its end (the prompt then keeps only
        a quarter of the budget)
    """

    prompts: int = 0
    completions: int = 0

    def __add__(self, other: Truncations) -> Truncations:
        return Truncations(self.prompts + other.prompts, self.completions + other.completions)


def prepare_rm_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str = "the reward model") -> PreTrainedTokenizerBase:
    """
    Check that a tokenizer can serve a reward model and give it a pad token (its eos token if it had none).

    :param tokenizer: a fast (Rust-backed) Hugging Face tokenizer
    :param where: names the model in error messages
    :return: the same tokenizer
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The tokenizer of {where} ({type(tokenizer).__name__}) is a slow Python tokenizer; the reward model needs "
            "a fast one: save the backbone with a tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {where} has neither a pad nor an eos token; set one (tokenizer.pad_token = ...) "
                "and save it with the backbone."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class PairEncoder:
    """
    Encodes (prompt, completion) pairs for a sequence-classification reward model, truncating prompts first.

    :param tokenizer: the reward model's (fast) tokenizer; it may differ from the policy's
    :param max_length: the longest encoded pair, special tokens included
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        prepare_rm_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.n_special = tokenizer.num_special_tokens_to_add(pair=True)
        if max_length < self.n_special + 2:
            raise ValueError(
                f"max_length={max_length} leaves no room for text after {self.n_special} special tokens; raise it."
            )
        self.max_length = max_length
        # A private copy of the Rust tokenizer: a tokenizer.json may switch on truncation/padding (MiniLM's pads
        # everything to 128), which would undo the budget computed here.
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self.use_token_type_ids = "token_type_ids" in tokenizer.model_input_names
        self.pad_id = int(tokenizer.pad_token_id)

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[Encoding], Truncations]:
        """
        Encode pairs, cutting what does not fit the budget.

        :param prompts: one prompt per pair
        :param completions: one completion per pair
        :return: one encoding per pair (token ids, token type ids) and the truncation counts
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions; give one prompt per completion")
        budget = self.max_length - self.n_special
        prompt_encs = self._backend.encode_batch(list(prompts), add_special_tokens=False)
        completion_encs = self._backend.encode_batch(list(completions), add_special_tokens=False)
        counts = Truncations()
        encodings = []
        for prompt_text, completion_text, prompt, completion in zip(prompts, completions, prompt_encs, completion_encs):
            n_prompt, n_completion = len(prompt.ids), len(completion.ids)
            if n_prompt + n_completion > budget:
                # A completion longer than the whole budget keeps its start and leaves a quarter to the prompt.
                completion_room = budget - min(n_prompt, budget // 4)
                if n_completion > completion_room:
                    completion = self._cut(completion_text, completion, completion_room, keep_end=False)
                    counts.completions += 1
                prompt = self._cut(prompt_text, prompt, budget - len(completion.ids), keep_end=True)
                counts.prompts += 1
            encodings.append(self._backend.post_process(prompt, completion, add_special_tokens=True))
        return encodings, counts

    def _cut(self, text: str, encoding: Encoding, keep: int, keep_end: bool) -> Encoding:
        """The encoding of the part of ``text`` made of ``keep`` tokens of ``encoding``, from its end or its start."""
        if keep <= 0:
            return self._backend.encode("", add_special_tokens=False)
        # Cut the text at a token boundary and encode the piece again: Encoding.truncate alone would keep the cut-off
        # tokens as "overflowing" chunks that post_process then pairs up (seconds for a long article).
        n = len(encoding.ids)
        piece = text[encoding.offsets[n - keep][0] :] if keep_end else text[: encoding.offsets[keep - 1][1]]
        cut = self._backend.encode(piece, add_special_tokens=False)
        if len(cut.ids) > keep:  # the seam tokenised differently: drop the extra token or two
            cut.truncate(keep, direction="left" if keep_end else "right")
        return cut

    def collate(self, encodings: Sequence[Encoding], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """
        Pad encodings on the right into a batch of model inputs.

        :param encodings: encodings from :meth:`encode`
        :param device: where the tensors go
        :return: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model uses them), each (B, T)
        """
        width = max(len(e.ids) for e in encodings)
        input_ids = torch.full((len(encodings), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encodings), width), dtype=torch.long)
        type_ids = torch.zeros((len(encodings), width), dtype=torch.long)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            input_ids[row, :n] = torch.tensor(enc.ids)
            attention_mask[row, :n] = 1
            type_ids[row, :n] = torch.tensor(enc.type_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.use_token_type_ids:
            batch["token_type_ids"] = type_ids
        return {k: v.to(device) for k, v in batch.items()}


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence a model's position embeddings cover (None when its config does not say)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def forward_rewards(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """
    The scalar reward of each sequence of a batch.

    :param model: a sequence-classification model with one output (``num_labels=1``)
    :param batch: inputs from :meth:`PairEncoder.collate`
    :return: (B,) rewards
    """
    return model(**batch).logits.squeeze(-1).float()  # (B, 1) -> (B,)


@torch.no_grad()
def score_encodings(
    model: PreTrainedModel,
    encoder: PairEncoder,
    encodings: Sequence[Encoding],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """
    Raw rewards of encoded pairs, in batches, without gradients (the model should be in eval mode).

    Pairs are batched by length so that little padding is computed; the result is in the input order.

    :param model: the reward model
    :param encoder: the encoder that made ``encodings``
    :param encodings: encoded pairs
    :param batch_size: pairs per forward pass
    :param device: the model's device
    :return: (N,) float32 rewards on the CPU
    """
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    rewards = torch.empty(len(encodings), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = encoder.collate([encodings[i] for i in index], device)
        rewards[index] = forward_rewards(model, batch).cpu()
    return rewards


def log_truncations(counts: Truncations, total: int, max_length: int, what: str = "pairs") -> None:
    """Log how many pairs were truncated (a warning: the reward model did not see all of their text)."""
    if counts.prompts:
        logger.warning(
            f"reward model: {counts.prompts} of {total} {what} are longer than max_length={max_length} tokens; their "
            f"prompts were cut from the start ({counts.completions} completions were also cut at the end). Raise "
            "max_length to keep more."
        )
