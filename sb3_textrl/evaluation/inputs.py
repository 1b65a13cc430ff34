"""What :func:`~sb3_textrl.evaluation.evaluate` is asked to evaluate, checked: the model's env settings, the task's env,
the decodings, the prompts and the baselines."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.common.names import DEFAULT_TASK

if TYPE_CHECKING:
    from sb3_textrl.sampling import DecodingSettings

BASELINES = ("lead3", "reference")


def check_arguments(
    model: str | os.PathLike | BaseAlgorithm | None,
    n: int | None,
    n_envs: int,
    decoding: str | DecodingSettings | Sequence[str | DecodingSettings],
) -> list[DecodingSettings]:
    """Refuse what :func:`~sb3_textrl.evaluation.evaluate` cannot run, before any env or model is made; the decodings."""
    from sb3_textrl.policies import TransformerLMPolicy

    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 prompt (or None for all), got {n}")
    if n_envs < 1:
        raise ValueError(f"n_envs must be at least 1, got {n_envs}")
    settings = parse_decodings(decoding)
    if isinstance(model, BaseAlgorithm) and not isinstance(model.policy, TransformerLMPolicy):
        raise TypeError(f"evaluate needs a model with a TransformerLMPolicy, got {type(model.policy).__name__}")
    return settings


def saved_model_settings(path: str | os.PathLike) -> dict[str, Any]:
    """
    The env settings a saved model was trained with, read from the ``.zip`` without loading its weights.

    :param path: a ``.zip`` written by ``model.save()``
    :return: ``tokenizer`` (the policy's LM, when not the embedded one), ``max_prompt_tokens`` and ``max_new_tokens``
        (from its text observation space), where found
    """
    import zipfile

    from stable_baselines3.common.save_util import json_to_data

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"saved model {path} not found; pass a .zip written by model.save() or an LM directory")
    try:
        with zipfile.ZipFile(path) as archive:
            data = json_to_data(archive.read("data").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{path} is not a model saved by SB3's model.save() (no 'data' entry): {error}") from error
    settings: dict[str, Any] = {}
    lm = (data.get("policy_kwargs") or {}).get("lm")
    if lm is not None:
        settings["tokenizer"] = lm
    space = data.get("observation_space")
    for name in ("max_prompt_tokens", "max_new_tokens"):
        if hasattr(space, name):
            settings[name] = int(getattr(space, name))
    return settings


def model_settings(model: str | os.PathLike | BaseAlgorithm | None) -> dict[str, Any]:
    """Env settings that make the task's env match the model: the same tokenizer and, for a trained model, widths."""
    if isinstance(model, BaseAlgorithm):
        space = model.observation_space
        settings: dict[str, Any] = {
            name: int(getattr(space, name)) for name in ("max_prompt_tokens", "max_new_tokens") if hasattr(space, name)
        }
        lm = getattr(model.policy, "lm_name", None)
        return settings | ({"tokenizer": lm} if lm is not None else {})
    if model is None:
        return {}
    if os.fspath(model).endswith(".zip"):
        return saved_model_settings(model)
    return {"tokenizer": os.fspath(model)}


def model_label(model: str | os.PathLike | BaseAlgorithm | None) -> str:
    if isinstance(model, BaseAlgorithm):
        return f"{type(model).__name__} (in memory, LM {getattr(model.policy, 'lm_name', None) or 'embedded'})"
    return "embedded" if model is None else os.fspath(model)


def make_env(task: str, n_envs: int, seed: int, env_kwargs: dict[str, Any]) -> VecEnv:
    import gymnasium as gym

    from sb3_textrl.envs import list_text_tasks, make_text_vec_env

    if task not in gym.registry:
        raise ValueError(
            f"unknown task {task!r}; registered text tasks: {', '.join(list_text_tasks()) or 'none'}. Pass one of those, "
            "or register yours first with sb3_textrl.register_text_task (from the CLI: give --dataset FILE to evaluate "
            "on your own article/summary pairs with NewsSummary-v0)"
        )
    try:
        return make_text_vec_env(task, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)
    except TypeError as error:
        if "dataset" in env_kwargs and "dataset" in str(error):
            raise ValueError(
                f"task {task!r} takes no dataset= (only news tasks such as {DEFAULT_TASK} read article/summary files); "
                f"evaluate the file with task={DEFAULT_TASK!r}, or register your task with its prompts"
            ) from error
        raise


def parse_decodings(decoding: str | DecodingSettings | Sequence[str | DecodingSettings]) -> list[DecodingSettings]:
    from sb3_textrl.sampling import DecodingSettings

    items = [decoding] if isinstance(decoding, (str, DecodingSettings)) else list(decoding)
    if not items:
        raise ValueError("decoding: give at least one of 'greedy', 'sample' or 'sample:temperature=T,top_k=K,top_p=P'")
    settings = [DecodingSettings.parse(d) if isinstance(d, str) else d for d in items]
    names = [s.describe() for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"decoding: {names} names the same settings twice; give each once")
    return settings


def select_prompts(n_available: int, n: int | None, prompt_indices: Sequence[int] | None, where: str) -> list[int]:
    if prompt_indices is not None:
        indices = [int(i) for i in prompt_indices]
        bad = [i for i in indices if not 0 <= i < n_available]
        if bad:
            raise ValueError(f"{where}: prompt indices {bad[:5]} are out of range; the task has {n_available} prompts")
        if not indices:
            raise ValueError(f"{where}: prompt_indices is empty; give at least one index")
        return indices
    if n is None:
        return list(range(n_available))
    if n > n_available:
        raise ValueError(
            f"{where}: asked for n={n} prompts but the task has only {n_available}; lower n (--n-prompts) to at most "
            f"{n_available}, or evaluate on a larger dataset"
        )
    return list(range(n))


def baselines_available(prompts: Sequence[Any]) -> dict[str, str | None]:
    """Baseline name -> None when it applies to these prompts, else why not."""
    return {
        "lead3": None
        if all(p.meta.get("article") for p in prompts)
        else "the task's prompts carry no article (lead-3 needs a news task, whose prompts keep meta['article'])",
        "reference": None if all(p.reference is not None for p in prompts) else "the task has no reference for every prompt",
    }


def choose_baselines(requested: Sequence[str] | None, available: dict[str, str | None]) -> list[str]:
    if requested is None:  # the default: every baseline that applies
        return [name for name, why_not in available.items() if why_not is None]
    if isinstance(requested, str):
        requested = [requested]
    unknown = [name for name in requested if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)} (or none)")
    for name in requested:
        if available[name] is not None:
            raise ValueError(f"baseline {name!r} does not apply here: {available[name]}; leave it out")
    return list(dict.fromkeys(requested))


def check_same_space(model: BaseAlgorithm, env: VecEnv, task: str) -> None:
    """An in-memory model must see the observations it was built for: same tokenizer, same widths."""
    ours, theirs = model.observation_space, env.observation_space
    if getattr(ours, "tokenizer_hash", "") != getattr(theirs, "tokenizer_hash", ""):
        raise ValueError(
            f"{task}'s tokenizer ({getattr(theirs, 'tokenizer_name', '?')}) is not the model's "
            f"({getattr(ours, 'tokenizer_name', '?')}): pass env_kwargs=dict(tokenizer=<the model's LM>)"
        )
    if ours != theirs:
        raise ValueError(
            f"the model was built for observations {ours} but {task} gives {theirs}; evaluate with the model's "
            "max_prompt_tokens and max_new_tokens (the defaults: leave them out of env_kwargs)"
        )


def load_model(load_generator: Any, model: Any, env: VecEnv, device: str, seed: int, kwargs: dict[str, Any]) -> BaseAlgorithm:
    try:
        return load_generator(model, env, device=device, seed=seed)
    except ValueError as error:
        if "spaces do not match" not in str(error).lower():
            raise
        raise ValueError(
            f"{model}: the saved model's observation space does not match the env's ({error}). A saved model keeps the "
            "max_prompt_tokens / max_new_tokens / tokenizer it was trained with; evaluate with those (they are the "
            f"defaults here; env settings used: {kwargs})"
        ) from error
