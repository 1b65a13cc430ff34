"""
Language models and tokenizers: loading them, the offline assets behind the defaults, and tiny models for tests.

* :mod:`sb3_textrl.models.loading`: ``load_tokenizer``, ``load_causal_lm``, ``load_seq2seq_lm``, ``resolve_lm_path``;
* :mod:`sb3_textrl.models.assets`: the embedded default LM (SmolLM2-135M-Instruct), the GPT-2 tokenizer and the MiniLM
  encoder, each shipped in a pip package and built once per machine into a directory under :func:`cache_dir`;
* :mod:`sb3_textrl.models.testing`: ``train_small_tokenizer``, ``tiny_gpt2``, ``tiny_t5``, ``save_tiny_gpt2_lm``.

Every name is importable from here as well (``from sb3_textrl.models import load_causal_lm``).
"""

from sb3_textrl.models.assets import (
    ASSET_PACKAGES,
    ASSETS_INSTALL_COMMAND,
    EMBEDDED_LM_HUB_NAME,
    EMBEDDED_LM_NAME,
    GPT2_EOS_TOKEN,
    GPT2_VOCAB_SIZE,
    MINILM_NAME,
    MissingAssetError,
    cache_dir,
    embedded_gguf_path,
    embedded_lm_dir,
    gpt2_tokenizer_dir,
    install_assets,
    load_gpt2_tokenizer,
    minilm_dir,
    minilm_zip_path,
)

# Private helpers that other modules (sb3_textrl.sft) and the tests use.
from sb3_textrl.models.assets import _build_dir as _build_dir
from sb3_textrl.models.assets import _locate_asset as _locate_asset
from sb3_textrl.models.assets import _quiet_progress as _quiet_progress
from sb3_textrl.models.assets import _read_marker as _read_marker
from sb3_textrl.models.loading import load_causal_lm, load_seq2seq_lm, load_tokenizer, resolve_lm_path
from sb3_textrl.models.testing import save_tiny_gpt2_lm, tiny_gpt2, tiny_t5, train_small_tokenizer

__all__ = [
    "ASSETS_INSTALL_COMMAND",
    "ASSET_PACKAGES",
    "EMBEDDED_LM_HUB_NAME",
    "EMBEDDED_LM_NAME",
    "GPT2_EOS_TOKEN",
    "GPT2_VOCAB_SIZE",
    "MINILM_NAME",
    "MissingAssetError",
    "cache_dir",
    "embedded_gguf_path",
    "embedded_lm_dir",
    "gpt2_tokenizer_dir",
    "install_assets",
    "load_causal_lm",
    "load_gpt2_tokenizer",
    "load_seq2seq_lm",
    "load_tokenizer",
    "minilm_dir",
    "minilm_zip_path",
    "resolve_lm_path",
    "save_tiny_gpt2_lm",
    "tiny_gpt2",
    "tiny_t5",
    "train_small_tokenizer",
]
