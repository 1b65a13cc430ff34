"""
Loading language models and tokenizers: a hub name, a local directory, or the embedded default LM.

``None`` (or ``"embedded"``) means the embedded SmolLM2-135M-Instruct, converted once per machine into a Hugging Face
directory (see :func:`sb3_textrl.models.assets.embedded_lm_dir`); any other LM is loaded as it is. A load that fails
says what to pass instead.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sb3_textrl.models.assets import EMBEDDED_LM_NAME, embedded_lm_dir

_EMBEDDED_ALIASES = ("embedded", EMBEDDED_LM_NAME)


def resolve_lm_path(name_or_path: str | os.PathLike | None) -> str:
    """
    The name or path to pass to ``from_pretrained``.

    ``None``, ``"embedded"`` and ``"SmolLM2-135M-Instruct"`` mean the embedded default LM (converted on first
    use, see :func:`embedded_lm_dir`); anything else (a hub name, a local directory) is returned as it is.

    :param name_or_path: a hub name, a local directory, or None for the embedded default
    :return: a hub name or a local directory
    """
    if name_or_path is None or str(name_or_path) in _EMBEDDED_ALIASES:
        return str(embedded_lm_dir())
    return os.fspath(name_or_path)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "namespace/name"; anything else is meant as a directory.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """
    Whether the Hugging Face hub answers a TCP connection (once per process): offline, transformers retries a name it
    cannot find for a minute before it fails.

    :param timeout_s: how long to wait for the connection
    :return: False when ``HF_HUB_OFFLINE`` is set or the hub's host cannot be reached
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _in_hub_cache(name: str) -> bool:
    """Whether a hub name has files in the local Hugging Face cache (transformers loads those offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(
            isinstance(try_to_load_from_cache(name, filename), str)
            for filename in ("config.json", "tokenizer_config.json")
        )
    except Exception:  # an id the hub would refuse (HFValidationError) is in no cache
        return False


def _check_local(name_or_path: str | os.PathLike | None, path: str, what: str) -> None:
    """
    Fail at once when ``path`` cannot load: otherwise transformers asks the hub, and retries for a minute offline.

    A missing directory fails; so does a name with one slash whose first part is a directory here (``runs/sft``
    when ``runs/`` exists: meant as a path, not a hub id), and a hub name that is in no local cache while the hub
    cannot be reached.
    """
    if Path(path).expanduser().is_dir():
        return
    if _looks_like_path(path):
        raise OSError(_load_error_message(name_or_path, what, f"there is no directory {path!r}"))
    first = path.split("/")[0]
    if "/" in path and Path(first).is_dir():
        reason = f"there is no directory {path!r} here (though {first}/ is: it reads as a local path, not a hub name)"
        raise OSError(_load_error_message(name_or_path, what, reason))
    if not _in_hub_cache(path) and not hub_reachable():
        reason = (
            f"{path!r} is not a local directory (from {os.getcwd()}), not in the Hugging Face cache, and the hub "
            "cannot be reached from this machine"
        )
        raise OSError(_load_error_message(name_or_path, what, reason))


def _load_error_message(name_or_path: str | os.PathLike | None, what: str, reason: str) -> str:
    files = "tokenizer.json or vocabulary files" if what == "tokenizer" else "config.json and weights"
    return (
        f"Could not load the {what} {str(name_or_path)!r}: {reason.rstrip('.')}. Pass a local directory that holds "
        f"a Hugging Face {what} ({files}, as written by save_pretrained), or a hub name if the Hugging Face hub is "
        f"reachable from this machine; `None` uses the embedded default LM ({EMBEDDED_LM_NAME}), which works offline."
    )


def _load_error(err: Exception, name_or_path: str | os.PathLike | None, what: str) -> Exception:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    message = _load_error_message(name_or_path, what, reason)
    # Keep the exception family callers may already catch (transformers raises OSError for missing files).
    if isinstance(err, ValueError) and not isinstance(err, OSError):
        return ValueError(message)
    return OSError(message)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Batched generation appends tokens on the right, so prompts are padded on the left.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token: set one before use.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """
    Load a tokenizer, padded on the left and with a pad token (the eos token if it had none).

    :param name_or_path: a hub name, a local directory, or None (or ``"embedded"``) for the embedded default LM's
    :param kwargs: passed to ``AutoTokenizer.from_pretrained``
    :return: the tokenizer
    """
    path = resolve_lm_path(name_or_path)
    _check_local(name_or_path, path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(err, name_or_path, "tokenizer") from err
    return _prepare_tokenizer(tokenizer)


def load_causal_lm(
    name_or_path: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """
    Load a causal language model (``AutoModelForCausalLM``), in eval mode.

    :param name_or_path: a hub name, a local directory, or None (or ``"embedded"``) for the embedded default LM
    :param torch_dtype: the parameters' dtype. None means float32, the safe choice for PPO updates whatever
        the checkpoint's dtype; pass ``torch.bfloat16`` for large models on GPU, or ``"auto"`` for the
        checkpoint's own dtype.
    :param kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``)
    :return: the model
    """
    return _load_pretrained(AutoModelForCausalLM, name_or_path, resolve_lm_path(name_or_path), torch_dtype, kwargs)


def _check_family(path: str, name_or_path: str | os.PathLike | None, encoder_decoder: bool) -> None:
    # A model of the other family fails inside transformers with "Unrecognized configuration class": name the fix.
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return
    if bool(getattr(config, "is_encoder_decoder", False)) == encoder_decoder:
        return
    if encoder_decoder:
        raise ValueError(
            f"{str(name_or_path)!r} is a decoder-only (causal) LM ({config.model_type}), not an encoder-decoder: "
            "use sb3_textrl.TransformerLMPolicy for it (Seq2SeqLMPolicy is for T5-family models)."
        )
    raise ValueError(
        f"{str(name_or_path)!r} is an encoder-decoder LM ({config.model_type}), not a causal LM: "
        "use sb3_textrl.Seq2SeqLMPolicy for it (TransformerLMPolicy is for decoder-only models)."
    )


def load_seq2seq_lm(
    name_or_path: str | os.PathLike,
    torch_dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """
    Load an encoder-decoder language model (``AutoModelForSeq2SeqLM``, e.g. T5), in eval mode.

    :param name_or_path: a hub name or a local directory
    :param torch_dtype: the parameters' dtype; None means float32 (see :func:`load_causal_lm`)
    :param kwargs: passed to ``AutoModelForSeq2SeqLM.from_pretrained``
    :return: the model
    """
    return _load_pretrained(AutoModelForSeq2SeqLM, name_or_path, os.fspath(name_or_path), torch_dtype, kwargs)


def _load_pretrained(
    auto_class: Any, name_or_path: str | os.PathLike | None, path: str, torch_dtype: Any, kwargs: dict[str, Any]
) -> PreTrainedModel:
    """``auto_class.from_pretrained(path)`` in eval mode, float32 unless told; a failure names the problem and the fix."""
    _check_local(name_or_path, path, "model")
    dtype = torch.float32 if torch_dtype is None else torch_dtype
    try:
        model = auto_class.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        _check_family(path, name_or_path, encoder_decoder=auto_class is AutoModelForSeq2SeqLM)
        raise _load_error(err, name_or_path, "model") from err
    return model.eval()
