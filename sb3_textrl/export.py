"""Export of a tuned text policy's LM as a plain Hugging Face model directory (LoRA merged), for ``from_pretrained``.

:func:`export_lm` takes a trained model, its policy, or a saved ``model.zip``. It merges the LoRA adapters into a
copy of the LM (the live policy keeps its adapters and can go on training) and writes that copy, the env's tokenizer
and a generation config with the policy's decoding into a directory that
``AutoModelForCausalLM.from_pretrained(dir)`` (``AutoModelForSeq2SeqLM`` for a
:class:`~sb3_textrl.Seq2SeqLMPolicy`) loads without peft or sb3_textrl.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import PeftModel
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.vec_env import VecEnv
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from sb3_textrl.checkpoints import check_saved_model
from sb3_textrl.common.output_dir import check_output_dir, write_dir_atomically
from sb3_textrl.envs.arguments import default_stop_ids
from sb3_textrl.envs.text_env import tokenizer_fingerprint
from sb3_textrl.maskable import MaskableTransformerLMPolicy
from sb3_textrl.models import load_tokenizer, resolve_lm_path
from sb3_textrl.policies import TransformerLMPolicy

__all__ = ["EXPORT_INFO_FILE", "export_lm", "load_policy", "merged_lm_copy", "policy_generation_config"]

EXPORT_INFO_FILE = "sb3_textrl_export.json"
"""What the export came from and what it leaves out, written next to the model's files."""

ModelSource = BaseAlgorithm | TransformerLMPolicy | str | os.PathLike
TokenizerSource = PreTrainedTokenizerBase | str | os.PathLike | None


def export_lm(
    model: ModelSource,
    output_dir: str | os.PathLike,
    tokenizer: TokenizerSource = None,
    overwrite: bool = False,
    stop_token_ids: Sequence[int] | None = None,
) -> Path:
    """
    Write a text policy's LM as a plain Hugging Face model directory: the weights with the LoRA adapters merged (or,
    without LoRA, the tuned weights as they are), the tokenizer, and a ``generation_config.json`` with the policy's
    decoding. ``AutoModelForCausalLM.from_pretrained(output_dir)`` (``AutoModelForSeq2SeqLM`` for a
    :class:`~sb3_textrl.Seq2SeqLMPolicy`) loads it without peft, and ``generate(..., do_sample=False)`` gives the
    policy's greedy tokens (``model.predict(obs, deterministic=True)`` step by step).

    The adapters are merged into a copy made on the CPU: the live policy is not modified (its LoRA stays active and
    training can continue), and a policy on a GPU needs no second copy there.

    The generation config samples as the policy does in rollouts: ``do_sample=True`` with its ``temperature``,
    ``top_k`` (0: none) and ``top_p`` (1.0: none), ``max_new_tokens`` of the env, the env's stop tokens as
    ``eos_token_id`` and the tokenizer's pad id. Logits beyond the env's vocabulary (an LM with padded embeddings) are
    suppressed, as the policy never takes them. Not part of an export: the value head (it only scores states for
    PPO; ``model.zip`` keeps it, for training on), NLPO's masking and an env's action masks (the environment's rules,
    not the LM's), and mixed precision (the weights are written in their own dtype, float32 unless loaded otherwise).

    :param model: a trained SB3 model with a text policy, the policy itself, or the path of a ``.zip`` written by
        ``model.save()`` (any algorithm: the policy class is read from the file)
    :param output_dir: the directory to write. It is written in a temporary sibling and renamed into place, so an
        interrupted export leaves no half-written directory
    :param tokenizer: the tokenizer to save with the model (an object, a name or a directory). None: the env's (from
        the model's env, else the name its observation space records), else the LM's own. It must be the vocabulary
        the policy was trained with
    :param overwrite: replace ``output_dir`` when it exists and is not empty
    :param stop_token_ids: the tokens that end a completion (``eos_token_id``). None: the model's env's, else the
        tokenizer's defaults as :class:`~sb3_textrl.TextGenerationEnv` picks them (a saved ``.zip`` has no env)
    :return: ``output_dir``
    """
    path = check_output_dir(output_dir, overwrite)  # before anything is loaded
    policy, env, source = _policy_of(model)
    _check_not_the_base_lm(path, policy)
    tok = _resolve_tokenizer(tokenizer, policy, env)
    stops = _stop_ids(stop_token_ids, env, tok)
    lm = merged_lm_copy(policy)
    lm.generation_config = policy_generation_config(policy, lm, tok, stops)
    info = _export_info(policy, source, lm, tok, stops)

    def write(directory: Path) -> None:
        lm.save_pretrained(directory)
        tok.save_pretrained(directory)
        (directory / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    return write_dir_atomically(path, write)


# -- the policy to export ------------------------------------------------------------------------------------------
def _policy_of(model: ModelSource) -> tuple[TransformerLMPolicy, VecEnv | None, str]:
    """The policy, its env (None when there is none) and a description of where it came from."""
    env: VecEnv | None = None
    if isinstance(model, BaseAlgorithm):
        policy, env, source = model.policy, model.get_env(), f"{type(model).__name__} in memory"
    elif isinstance(model, TransformerLMPolicy):
        policy, source = model, "policy in memory"
    elif isinstance(model, (str, os.PathLike)):
        zip_path = _zip_path(model)
        policy, source = load_policy(zip_path), str(zip_path)
    else:
        raise TypeError(
            f"export_lm takes a trained model, its policy or the path of a saved model.zip, got {type(model).__name__}"
        )
    if not isinstance(policy, TransformerLMPolicy):
        raise TypeError(
            f"export_lm exports the LM of a text policy (TransformerLMPolicy or a subclass); this model's policy is "
            f"{type(policy).__name__}"
        )
    return policy, env, source


def _zip_path(path: str | os.PathLike) -> Path:
    zip_path = Path(path).expanduser()
    if zip_path.is_dir():
        raise ValueError(
            f"{zip_path} is a directory: export_lm exports a model saved by model.save() (a .zip). An LM directory "
            "written by save_pretrained is already a plain Hugging Face model."
        )
    if not zip_path.is_file() and Path(f"{zip_path}.zip").is_file():  # model.save("runs/x/model") wrote model.zip
        zip_path = Path(f"{zip_path}.zip")
    if not zip_path.is_file():
        raise FileNotFoundError(f"saved model {zip_path} not found: pass a .zip written by model.save()")
    return zip_path


def _no_learning(_progress_remaining: float) -> float:
    return 0.0  # a loaded policy only has to be exported: its optimizer's learning rate does not matter


def load_policy(path: str | os.PathLike) -> TransformerLMPolicy:
    """
    The text policy of a saved ``model.zip``, on the CPU, whichever algorithm saved it: the policy class, its spaces
    and its arguments are read from the file, then its weights loaded (what ``Algorithm.load`` does for the policy).

    :param path: a ``.zip`` written by ``model.save()``
    :return: the policy
    :raises DamagedModelError: when the file is not a whole ``model.zip``
    """
    check_saved_model(path)
    try:
        data, params, _ = load_from_zip_file(Path(path), device="cpu")
    except (ImportError, AttributeError, pickle.UnpicklingError) as error:  # a pickled class that no longer imports
        raise ValueError(
            f"Cannot determine the policy class of {path}: unpickling it failed ({error}). Install the package that "
            "defines it, or load the model with its algorithm class (e.g. MaskablePPO.load(path, custom_objects=...)) "
            "and pass the loaded model to export_lm."
        ) from error
    except ValueError as error:  # SB3's "wasn't a zip-file", or a "data" entry that is not SB3's JSON
        raise ValueError(f"{path} is not a model saved by model.save(): {error}") from error
    if not data or not isinstance(data.get("policy_class"), type) or "policy" not in params:
        raise ValueError(
            f"Cannot determine the policy class of {path}: the file has no loadable policy class and weights (SB3 warns "
            "above when a class does not unpickle). Load the model with its algorithm class, passing custom_objects=..., "
            "and pass the loaded model to export_lm."
        )
    policy_class = data["policy_class"]
    if not issubclass(policy_class, TransformerLMPolicy):
        raise TypeError(
            f"{path} holds a {policy_class.__name__}: export_lm exports the LM of a text policy (TransformerLMPolicy or "
            "a subclass)"
        )
    kwargs: dict[str, Any] = dict(data.get("policy_kwargs") or {})
    try:
        policy = policy_class(data["observation_space"], data["action_space"], _no_learning, **kwargs)
    except OSError as error:
        raise OSError(
            f"The policy saved in {path} loads its base LM from {kwargs.get('lm') or 'the embedded LM'!r} (its "
            f"policy_kwargs; a relative path is relative to the working directory), which failed: {error}"
        ) from error
    policy.load_state_dict(params["policy"])
    return policy


def _check_not_the_base_lm(path: Path, policy: TransformerLMPolicy) -> None:
    # With overwrite=True the base LM's directory would be deleted, and with it what the saved model.zip loads from.
    if policy.lm_name is None:
        return
    base = Path(resolve_lm_path(policy.lm_name)).expanduser()
    if base.is_dir() and path.resolve() in {base.resolve(), *base.resolve().parents}:
        raise ValueError(
            f"Output directory {path} holds the base LM the policy loads (lm={policy.lm_name!r}): replacing it would "
            "break the saved model. Choose another directory."
        )


# -- tokenizer and stop tokens ---------------------------------------------------------------------------------------
def _resolve_tokenizer(tokenizer: TokenizerSource, policy: TransformerLMPolicy, env: VecEnv | None) -> PreTrainedTokenizerBase:
    """The tokenizer given, else the first of the env's, the observation space's and the LM's that fits the policy."""
    if tokenizer is not None:
        given = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else load_tokenizer(tokenizer)
        problem = _tokenizer_problem(given, policy)
        if problem:
            raise ValueError(f"tokenizer={_name(tokenizer)!r} does not fit the policy: {problem}")
        return given
    tried = []
    for label, candidate in _tokenizer_candidates(policy, env):
        try:
            found = candidate if isinstance(candidate, PreTrainedTokenizerBase) else load_tokenizer(candidate)
        except (OSError, ValueError, ImportError) as error:  # ImportError: the embedded LM's asset is not installed
            tried.append(f"{label}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            continue
        problem = _tokenizer_problem(found, policy)
        if not problem:
            return found
        tried.append(f"{label}: {problem}")
    raise ValueError(
        "No tokenizer found for the policy's LM (" + "; ".join(tried or ["no env, tokenizer name or LM path"]) + "). "
        "Pass the tokenizer the env was built with: tokenizer=NAME_OR_PATH (CLI: --tokenizer)."
    )


def _tokenizer_candidates(policy: TransformerLMPolicy, env: VecEnv | None) -> list[tuple[str, Any]]:
    candidates: list[tuple[str, Any]] = []
    if env is not None:
        with contextlib.suppress(AttributeError):  # not a text env
            candidates.append(("the env's tokenizer", env.get_attr("tokenizer", indices=[0])[0]))
    names = [getattr(policy.observation_space, "tokenizer_name", "") or None, policy.lm_name or "embedded"]
    for name in dict.fromkeys(n for n in names if n):
        candidates.append((f"tokenizer {name!r}", name))
    return candidates


def _tokenizer_problem(tokenizer: PreTrainedTokenizerBase, policy: TransformerLMPolicy) -> str:
    """Why ``tokenizer`` is not the vocabulary the policy was trained with ("" when it is)."""
    expected = getattr(policy.observation_space, "tokenizer_hash", "")
    n_actions = int(policy.action_space.n)
    if expected and tokenizer_fingerprint(tokenizer) != expected:
        return f"its vocabulary ({len(tokenizer)} tokens) is not the env's the policy was trained with"
    if len(tokenizer) != n_actions:
        return f"it has {len(tokenizer)} tokens, the policy's env {n_actions}"
    return ""


def _name(tokenizer: TokenizerSource) -> str:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return os.fspath(tokenizer) if tokenizer is not None else ""


def _stop_ids(stop_token_ids: Sequence[int] | None, env: VecEnv | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: given, else the env's, else the tokenizer's defaults (as the env picks them)."""
    stops: Any = stop_token_ids
    if stops is None and env is not None:
        try:
            stops = env.get_attr("stop_token_ids", indices=[0])[0]
        except AttributeError:
            stops = None
    if stops is None:
        stops = default_stop_ids(tokenizer)  # the env's own rule: one home
    ids = sorted({int(i) for i in stops})
    if not ids:
        raise ValueError("No stop token: the tokenizer has no EOS token. Pass stop_token_ids=[...] (CLI: --stop-token-id).")
    return ids


# -- the exported model -------------------------------------------------------------------------------------------------
def _cpu_copy(module: nn.Module) -> nn.Module:
    """
    A deep copy of ``module`` whose parameters and buffers are copied straight to the CPU (no second copy of the LM
    on its GPU). Weights tied as one parameter object stay tied in the copy.
    """
    memo: dict[int, Any] = {}
    for param in module.parameters():
        memo[id(param)] = nn.Parameter(param.detach().to("cpu", copy=True), requires_grad=param.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer.detach().to("cpu", copy=True)
    return copy.deepcopy(module, memo)


def merged_lm_copy(policy: TransformerLMPolicy) -> PreTrainedModel:
    """
    A CPU copy of the policy's LM with its active LoRA adapters merged into the weights (a plain Hugging Face model);
    without LoRA a copy of the tuned LM. The policy is not modified.

    :param policy: a text policy
    :return: the model, in eval mode
    """
    lm = _cpu_copy(policy.lm)
    if isinstance(lm, PeftModel):
        # Only the trained adapters: NLPO's frozen masking adapter is dropped by the unload.
        lm = lm.merge_and_unload(safe_merge=True, adapter_names=list(lm.active_adapters))
    assert isinstance(lm, PreTrainedModel)
    return lm.eval()


def policy_generation_config(
    policy: TransformerLMPolicy, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_token_ids: Sequence[int]
) -> GenerationConfig:
    """
    The LM's generation config with the policy's decoding: sampling at its temperature, top-k and top-p, the env's
    completion length and stop tokens, the tokenizer's pad id, and the logits beyond the env's vocabulary suppressed.
    """
    config = copy.deepcopy(lm.generation_config)
    stops = list(stop_token_ids)
    config.do_sample = True
    config.temperature = float(policy.temperature)
    config.top_k = 0 if policy.top_k is None else int(policy.top_k)  # 0 turns it off; unset, generate() would use 50
    config.top_p = 1.0 if policy.top_p is None else float(policy.top_p)
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    config.pad_token_id = tokenizer.pad_token_id
    max_new_tokens = getattr(policy.observation_space, "max_new_tokens", None)
    if max_new_tokens:
        config.max_new_tokens = int(max_new_tokens)
    n_actions = int(policy.action_space.n)
    n_logits = int(lm.get_output_embeddings().weight.shape[0])
    if n_logits > n_actions:  # padded embeddings: the policy's distribution is cropped to the env's vocabulary
        config.suppress_tokens = list(range(n_actions, n_logits))
    return config


def _export_info(
    policy: TransformerLMPolicy, source: str, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stops: list[int]
) -> dict[str, Any]:
    from sb3_textrl import __version__

    left_out = ["value head (model.zip keeps it)"]
    if policy.nlpo is not None:
        left_out.append("NLPO masking")
    if isinstance(policy, MaskableTransformerLMPolicy):
        left_out.append("the env's action masks")
    encoder_decoder = bool(getattr(lm.config, "is_encoder_decoder", False))
    return dict(
        sb3_textrl_version=__version__,
        source=source,
        policy_class=f"{type(policy).__module__}.{type(policy).__qualname__}",
        base_lm=policy.lm_name or "embedded",
        lora_merged=isinstance(policy.lm, PeftModel),
        load_with="AutoModelForSeq2SeqLM" if encoder_decoder else "AutoModelForCausalLM",
        tokenizer=_name(tokenizer),
        decoding=dict(
            temperature=policy.temperature,
            top_k=policy.top_k,
            top_p=policy.top_p,
            max_new_tokens=getattr(policy.observation_space, "max_new_tokens", None),
            stop_token_ids=stops,
        ),
        dtype=str(next(lm.parameters()).dtype).removeprefix("torch."),
        not_exported=left_out,
    )
