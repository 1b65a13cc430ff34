"""A learned reward: a reward model trained on preferences (``sb3-textrl train-rm``) scores each completion."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sb3_textrl.reward_model.encoding import PairEncoder, Truncations, max_positions, score_encodings
from sb3_textrl.reward_model.train import (
    FORMAT_NAME,
    FORMAT_VERSION,
    REWARD_MODEL_FILE,
    quiet_transformers,
    resolve_device,
)
from sb3_textrl.rewards.base import TextReward

# Files of which a saved tokenizer has at least one (fast tokenizers, BPE vocabularies, WordPiece, SentencePiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")

logger = logging.getLogger("sb3_textrl")
# Pairs longer than this are cut when a directory does not say its training length (a plain HF classifier).
_FALLBACK_MAX_LENGTH = 512


class LearnedRewardModel(TextReward):
    """
    Reward from a trained reward model: its scalar output for each (prompt, completion), optionally normalised.

    The reward model reads the texts with its own tokenizer, so it may differ from the policy's (a BERT-style
    encoder judging a GPT-2 policy, say). Completions are scored in batches, without gradients, in eval mode.
    Use it as the reward of any task: ``register_text_task(..., reward=LearnedRewardModel(dir))`` or
    ``gym.make("NewsSummary-v0", reward=LearnedRewardModel(dir))``.

    Copies made by ``gym.make`` share one model (see :class:`TextReward`); a pickled reward (``SubprocVecEnv``)
    travels as its path and settings and loads the model again on arrival.

    :param path: a directory saved by :func:`~sb3_textrl.reward_model.train_reward_model` (``sb3-textrl train-rm``),
        or any Hugging Face sequence-classification model with one output (then pass ``normalize=False``)
    :param batch_size: (prompt, completion) pairs per forward pass
    :param normalize: subtract the mean and divide by the standard deviation the reward had on the training
        completions (saved with the model), so that rewards sit around 0 with unit spread
    :param device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
    :param max_length: tokens per pair (default: the length the model was trained with); longer prompts are cut
        from their start
    :param name: the reward's name in logs and episode info (default ``"learned_rm"``)
    """

    name = "learned_rm"

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 32,
        normalize: bool = True,
        device: str | torch.device = "auto",
        max_length: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self._settings = dict(path=os.fspath(path), batch_size=batch_size, normalize=normalize, device=str(device),
                              max_length=max_length, name=name)
        self.path = Path(path).expanduser()
        if batch_size < 1:
            raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"Reward model directory {str(self.path)!r} does not exist; train one with "
                "`sb3-textrl train-rm --dataset feedback.db --output-dir DIR` (or train_reward_model) and pass DIR."
            )
        self._check_files()
        self.info = self._read_info()
        stats = self.info.get("normalization")
        if normalize and not stats:
            raise ValueError(
                f"{str(self.path)!r} holds no normalisation statistics ({REWARD_MODEL_FILE}, written by train-rm); "
                "pass normalize=False to use its raw scores, or train it with `sb3-textrl train-rm`."
            )
        self.normalize = normalize
        self.mean = float(stats["mean"]) if stats else 0.0
        self.std = float(stats["std"]) if stats else 1.0
        self.batch_size = batch_size
        self.device = resolve_device(device)

        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            self.model = AutoModelForSequenceClassification.from_pretrained(str(self.path), dtype=torch.float32)
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{str(self.path)!r} is a classifier with {self.model.config.num_labels} outputs; a reward model has one "
                "scalar output (num_labels=1). Train one with `sb3-textrl train-rm`."
            )
        self.model.to(self.device).eval().requires_grad_(False)
        if max_length is None:
            fallback = min(_FALLBACK_MAX_LENGTH, max_positions(self.model) or _FALLBACK_MAX_LENGTH)
            max_length = int(self.info.get("max_length", fallback))
        self.encoder = PairEncoder(tokenizer, max_length)
        self.truncations = Truncations()  # running counts over every scored pair
        self._warned = False

    def _check_files(self) -> None:
        """Refuse a directory without a model config or tokenizer files, before transformers builds a stand-in (without
        tokenizer files it built a 5-token tokenizer, and the model scored garbage)."""
        where = f"{str(self.path)!r}"
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"{where} holds no config.json: it is not a saved model. Pass the directory `sb3-textrl train-rm` (or "
                "train_reward_model) wrote, or a save_pretrained directory of a sequence-classification model."
            )
        if not any((self.path / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{where} holds no tokenizer files (any of {', '.join(_TOKENIZER_FILES)}); train-rm saves them with the "
                "model. Add the tokenizer the model was trained with: AutoTokenizer.from_pretrained(BACKBONE)"
                f".save_pretrained({where})."
            )

    def _read_info(self) -> dict[str, Any]:
        file = self.path / REWARD_MODEL_FILE
        if not file.is_file():
            return {}
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{file} is not valid JSON ({error}); train the reward model again to rewrite it.") from error
        if not isinstance(info, dict) or info.get("format", FORMAT_NAME) != FORMAT_NAME:
            found = info.get("format") if isinstance(info, dict) else type(info).__name__
            raise ValueError(
                f"{file} is not a reward-model file of sb3_textrl (format {found!r}, expected {FORMAT_NAME!r}); pass a "
                "directory written by `sb3-textrl train-rm`, or remove the file and pass normalize=False."
            )
        version = info.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{file} has format version {version!r}, newer than the {FORMAT_VERSION} this sb3_textrl reads (it "
                f"was written by sb3_textrl {info.get('sb3_textrl_version', '?')}); upgrade sb3_textrl to load it."
            )
        return info

    @property
    def metrics(self) -> dict[str, Any]:
        """The training metrics saved with the model (held-out pairwise accuracy and loss, ...)."""
        return dict(self.info.get("metrics", {}))

    def raw_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """
        The reward model's outputs, before normalisation.

        :param prompts: the prompt of each completion
        :param completions: the completions
        :return: float64 array of shape ``(len(completions),)``
        """
        encodings, counts = self.encoder.encode(list(prompts), list(completions))
        self.truncations = self.truncations + counts
        if counts.prompts and not self._warned:
            self._warned = True
            logger.warning(
                f"{self.name}: some (prompt, completion) pairs are longer than max_length={self.encoder.max_length} "
                "tokens; their prompts are cut from the start (running counts in .truncations)."
            )
        if not encodings:
            return np.zeros(0, dtype=np.float64)
        return score_encodings(self.model, self.encoder, encodings, self.batch_size, self.device).double().numpy()

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
    ) -> np.ndarray:
        """
        Score a batch of completions (references are not used).

        :param prompts: the prompt of each episode
        :param completions: the generated texts
        :param references: unused; a learned reward judges the completion, not its distance to a reference
        :return: float64 array of shape ``(len(completions),)``
        """
        raw = self.raw_scores(prompts, completions)
        return (raw - self.mean) / self.std if self.normalize else raw

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (e.g. into SubprocVecEnv workers) as its settings: the worker loads the model from the directory.
        return dict(self._settings)

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self, **state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, normalize={self.normalize}, device={str(self.device)!r})"
