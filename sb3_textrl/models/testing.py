"""
Small models for tests, benchmarks and the ``--tiny`` example runs: a byte-level BPE tokenizer trained on local text, a
tiny random GPT-2 and T5 built from configs, and a tiny GPT-2 LM directory with GPT-2's tokenizer. Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerFast

from sb3_textrl.models.assets import GPT2_EOS_TOKEN, load_gpt2_tokenizer


def train_small_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    save_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """
    Train a small byte-level BPE tokenizer on local text (a small vocabulary keeps tiny test models fast).

    ``<|endoftext|>`` (id 0) is its bos, eos and pad token; prompts are padded on the left. Byte-level BPE
    encodes any text, so decoding an encoding gives the text back. The vocabulary may come out smaller than
    ``vocab_size`` on little text: size a model with ``len(tokenizer)``.

    :param texts: the training text
    :param vocab_size: the largest vocabulary size, special token included
    :param save_dir: if given, the tokenizer is saved there (``save_pretrained``) so ``load_tokenizer(save_dir)`` works
    :return: the tokenizer
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[GPT2_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is out of vocabulary
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=GPT2_EOS_TOKEN,
        eos_token=GPT2_EOS_TOKEN,
        pad_token=GPT2_EOS_TOKEN,
        padding_side="left",
    )
    if save_dir is not None:
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer


def tiny_gpt2(
    vocab_size: int,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 512,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dropout: float = 0.0,
    tie_word_embeddings: bool = True,
) -> GPT2LMHeadModel:
    """
    A small randomly initialized GPT-2 for tests and benchmarks, in eval mode.

    The eos id defaults to ``vocab_size - 1``, which is ``<|endoftext|>`` for GPT-2's tokenizer; with
    :func:`train_small_tokenizer` pass ``eos_token_id=tokenizer.eos_token_id`` (0). bos and pad follow eos.

    :param vocab_size: the vocabulary size (``len(tokenizer)``)
    :param n_layer: number of Transformer blocks
    :param n_embd: width of the residual stream
    :param n_head: number of attention heads (divides ``n_embd``)
    :param n_positions: the longest sequence (prompt + generated tokens)
    :param seed: seed of the random initialization; the caller's torch RNG state is left as it was
    :param bos_token_id: beginning-of-sequence id (default: ``eos_token_id``)
    :param eos_token_id: end-of-sequence id (default ``vocab_size - 1``)
    :param pad_token_id: padding id (default: ``eos_token_id``)
    :param dropout: dropout of residuals, embeddings and attention (0 keeps train and eval mode identical)
    :param tie_word_embeddings: share one matrix between the input embedding and the output head (GPT-2's layout)
    :return: the model
    """
    eos_token_id = vocab_size - 1 if eos_token_id is None else eos_token_id
    bos_token_id = eos_token_id if bos_token_id is None else bos_token_id
    pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.bos_token_id = bos_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()


def tiny_t5(
    vocab_size: int,
    num_layers: int = 2,
    d_model: int = 64,
    num_heads: int = 4,
    d_ff: int = 128,
    seed: int = 0,
    eos_token_id: int = 0,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """
    A small randomly initialized T5 (encoder-decoder) for tests and examples, in eval mode, without dropout.

    The decoder starts from the pad token, as T5 does. With :func:`train_small_tokenizer` the defaults fit: id 0 is
    its eos and pad token.

    :param vocab_size: the vocabulary size (``len(tokenizer)``)
    :param num_layers: Transformer blocks in the encoder and in the decoder
    :param d_model: width of the residual stream
    :param num_heads: attention heads (``d_model / num_heads`` wide each)
    :param d_ff: width of the feed-forward layers
    :param seed: seed of the random initialization; the caller's torch RNG state is left as it was
    :param eos_token_id: end-of-sequence id
    :param pad_token_id: padding id and decoder start id (default: ``eos_token_id``)
    :return: the model (``T5ForConditionalGeneration``)
    """
    from transformers import T5Config, T5ForConditionalGeneration

    pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        dropout_rate=0.0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    # Set after construction: T5Config's typed signature lists its own fields only (it takes this one as **kwargs).
    config.decoder_start_token_id = pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    return model.eval()


def save_tiny_gpt2_lm(directory: str | os.PathLike, seed: int = 0, n_layer: int = 2, n_embd: int = 64) -> str:
    """
    Save a tiny random GPT-2 with GPT-2's tokenizer as an LM directory: the stand-in LM of ``--tiny`` example runs and
    smoke tests (seconds on a CPU, nothing downloaded).

    :param directory: where to save (created)
    :param seed: initialisation seed
    :param n_layer: transformer layers
    :param n_embd: width
    :return: the directory, as a string for ``policy_kwargs=dict(lm=...)`` and ``tokenizer=``
    """
    tokenizer = load_gpt2_tokenizer()
    tiny_gpt2(len(tokenizer), n_layer=n_layer, n_embd=n_embd, seed=seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
