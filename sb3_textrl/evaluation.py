"""Evaluating a text policy: batched generation, ROUGE, task reward, KL to the reference, length, diversity, baselines.

``evaluate(model, task, ...)`` completes the task's prompts with a saved model (or an LM directory), scores the
completions and the baselines (lead-3, the reference itself) and returns an :class:`EvalResult` that writes a JSON
file and a Markdown report. ``sb3-textrl eval`` (:mod:`sb3_textrl.cli.evaluate`) is the same from the command line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm

from sb3_textrl.common.names import DEFAULT_TASK

if TYPE_CHECKING:
    from sb3_textrl.policies import TransformerLMPolicy
    from sb3_textrl.sampling import DecodingSettings

BASELINES = ("lead3", "reference")
JSON_NAME = "eval.json"
MARKDOWN_NAME = "eval.md"
# Metrics of a system, in report order (a system lacks those that do not apply to it: None).
METRICS = (
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "task_reward",
    "kl_to_ref",
    "length_tokens",
    "length_words",
    "distinct1",
    "distinct2",
    "stop_rate",
)


@dataclass
class Sample:
    """
    One generated completion with its task reward.

    :param prompt_index: index of the prompt in the task
    :param prompt: the prompt text
    :param completion: the generated text (without the stop token)
    :param reference: the task's reference for the prompt, if any
    :param reward: the task reward of the completion
    :param completion_tokens: tokens generated, a final stop token included
    :param ended_by_stop_token: whether a stop token ended the completion (else it reached ``max_new_tokens``)
    :param observation: the episode's last observation (prompt and every generated token), for scoring the
        completion's log-probs with one teacher-forced forward
    """

    prompt_index: int
    prompt: str
    completion: str
    reference: str | None
    reward: float
    completion_tokens: int
    ended_by_stop_token: bool = False
    observation: dict[str, np.ndarray] | None = field(default=None, repr=False)


def generate_samples(
    model: BaseAlgorithm,
    env: VecEnv,
    prompt_indices: Sequence[int],
    deterministic: bool = True,
    progress_bar: bool = False,
    fast: bool = True,
) -> list[Sample]:
    """
    Complete each prompt once, ``env.num_envs`` prompts at a time, and score the completions with the task reward.

    The fast path (:func:`sb3_textrl.common.generation.generate_env_samples`) drives the policy's LM directly, as
    ``generate()`` does: one prefill of the batch's prompts, then one batched one-token forward per token with a KV
    cache, under the policy's sampling distribution (temperature, top-k/top-p, NLPO sets, and the env's action masks
    for a ``MaskableTransformerLMPolicy``) and the env's stop rules; rewards are scored in one batch. Greedy decoding
    gives the env loop's tokens. Where it does not apply (:func:`~sb3_textrl.common.generation.fast_path_unsupported`:
    an encoder-decoder policy, a SubprocVecEnv, an env subclass or wrapper that changes steps or rewards, a KV cache
    with other than full-attention layers) the env loop runs instead, and the reason is logged.

    The env loop (``fast=False``) runs one episode per prompt through ``model.predict`` and ``env.step`` (the policy's
    rollout KV cache makes each step one batched one-token forward); an env that finishes starts its next prompt at once.

    :param model: a trained SB3 model with a TransformerLMPolicy
    :param env: a VecEnv of the task (the env loop resets its envs to the requested prompts; the fast path only reads it)
    :param prompt_indices: which of the task's prompts to complete
    :param deterministic: greedy decoding (True) or sampling from the policy
    :param progress_bar: show a progress bar over prompts
    :param fast: decode with the fast path where it applies (False: always the env loop)
    :return: one :class:`Sample` per prompt, in the order given
    """
    if fast:
        from sb3_textrl.common.generation import FastPathUnsupported, fast_path_unsupported, generate_env_samples
        from sb3_textrl.envs.text_env import log_once

        reason = fast_path_unsupported(model, env)
        if reason is None:
            try:
                return generate_env_samples(model, env, prompt_indices, deterministic, progress_bar=progress_bar)
            except FastPathUnsupported as error:
                reason = str(error)
        log_once(f"generate_samples: decoding through the env loop (model.predict + env.step, slower): {reason}")
    return _generate_samples_env_loop(model, env, prompt_indices, deterministic, progress_bar)


def _generate_samples_env_loop(
    model: BaseAlgorithm, env: VecEnv, prompt_indices: Sequence[int], deterministic: bool, progress_bar: bool
) -> list[Sample]:
    """:func:`generate_samples` through ``model.predict`` and ``env.step``, one batched step per token."""
    order = [int(i) for i in prompt_indices]
    n_envs = env.num_envs
    # Each env works through its own queue of prompts. A VecEnv resets a finished env by itself, and that reset
    # starts the env's next queued prompt: no env spends steps (and prompt encodings) on throwaway episodes while
    # the others finish theirs, which matters when completions end early at EOS.
    queues = [order[slot::n_envs] for slot in range(n_envs)]
    for slot, queue in enumerate(queues):
        env.env_method("queue_prompts", queue, indices=[slot])
    env.set_options(None)
    obs = env.reset()
    finished = [0] * n_envs
    by_position: dict[int, Sample] = {}
    # A maskable policy (MaskablePPO) decodes under the env's action masks, as it did in training.
    masked = isinstance(model.policy, MaskableActorCriticPolicy) and is_masking_supported(env)
    bar = tqdm(total=len(order), desc="generating", disable=not progress_bar)
    while len(by_position) < len(order):
        mask_kwargs = {"action_masks": get_action_masks(env)} if masked else {}
        actions, _ = model.predict(obs, deterministic=deterministic, **mask_kwargs)  # type: ignore[arg-type]
        obs, _, dones, infos = env.step(actions)
        for slot in np.flatnonzero(dones):
            k = finished[slot]
            if k == len(queues[slot]):
                continue  # an env past its queue runs spare episodes until the others are done
            info = infos[slot]
            assert info["prompt_index"] == queues[slot][k], "the env did not start its queued prompt"
            by_position[slot + k * n_envs] = Sample(
                prompt_index=queues[slot][k],
                prompt=info["prompt"],
                completion=info["completion"],
                reference=info["reference"],
                reward=info["task_reward"],
                completion_tokens=info["completion_tokens"],
                ended_by_stop_token=bool(info.get("ended_by_stop_token", False)),
                observation=info.get("terminal_observation"),  # SB3's VecEnvs keep it before the auto-reset
            )
            finished[slot] += 1
            bar.update(1)
    bar.close()
    env.env_method("queue_prompts", [])  # later resets go back to the seeded prompt order
    return [by_position[position] for position in range(len(order))]


# ----------------------------------------------------------------------------------------------------------------
# KL to the reference
# ----------------------------------------------------------------------------------------------------------------


def has_reference(policy: TransformerLMPolicy) -> bool:
    """Whether the policy has a reference model π_ref (LoRA adapters to disable, or a frozen copy)."""
    from peft import PeftModel

    return policy.ref_lm is not None or isinstance(policy.lm, PeftModel)


def reference_identity(policy: TransformerLMPolicy) -> str | None:
    """
    Why the policy's weights are exactly its reference's (so every KL to it is 0), or None when they may differ.

    Read off the weights, not from how the model was made: with LoRA, every ``lora_B`` matrix of the active adapter is
    zero (fresh or untrained adapters add B·A = 0) and the adapter has no other trainable part (``modules_to_save``,
    DoRA magnitudes, trainable tokens); with a frozen reference copy, every tensor of the LM equals the copy's.

    :param policy: the policy
    :return: the reason, or None
    """
    import torch as th
    from peft import LoraConfig, PeftModel

    if policy.ref_lm is not None:
        ours, theirs = policy.lm.state_dict(), policy.ref_lm.state_dict()
        if ours.keys() == theirs.keys() and all(th.equal(ours[key], theirs[key]) for key in ours):
            return "the LM's weights equal its frozen reference copy's"
        return None
    if not isinstance(policy.lm, PeftModel):
        return None
    active = policy.lm.active_adapter
    config = policy.lm.peft_config[active]
    if not isinstance(config, LoraConfig) or config.modules_to_save or config.use_dora:
        return None
    if getattr(config, "trainable_token_indices", None):
        return None
    lora_b = [
        parameter for name, parameter in policy.lm.named_parameters()
        if (".lora_B." in name or ".lora_embedding_B." in name) and f".{active}" in name
    ]
    if lora_b and not any(bool(parameter.any()) for parameter in lora_b):
        return "every LoRA B matrix is zero (fresh or untrained adapters)"
    return None


def _truncated(policy: TransformerLMPolicy) -> bool:
    """Whether the sampling distribution is truncated (top-k, top-p, NLPO): it then differs from π_ref on equal weights."""
    top_k = policy.top_k is not None and policy.top_k < int(policy.action_space.n)  # type: ignore[attr-defined]
    top_p = policy.top_p is not None and policy.top_p < 1.0
    return top_k or top_p or policy.nlpo_top_p is not None


def kl_to_reference(
    policy: TransformerLMPolicy, samples: Sequence[Sample], batch_size: int = 8, progress_bar: bool = False
) -> np.ndarray:
    """
    KL to the reference of each completion: the sum over its generated tokens (a final stop token included) of
    log π(a|s) − log π_ref(a|s), the quantity TextRolloutBuffer penalises and logs as ``rollout/kl_to_ref`` (both
    compute it with :func:`sb3_textrl.common.kl.token_kl` and :func:`~sb3_textrl.common.kl.episode_kl`).

    π is the policy's sampling distribution (its temperature, top-k and top-p: wrap the call in
    :func:`sb3_textrl.sampling.decoding` to score under other settings) and π_ref the reference at the same
    temperature. Each completion costs one teacher-forced forward of the policy and one of the reference
    (:meth:`TransformerLMPolicy.evaluate_actions` and :meth:`TransformerLMPolicy.reference_log_probs`), ``batch_size``
    completions at a time. For sampled completions the mean is an unbiased estimate of KL(π‖π_ref) per completion;
    for greedy ones it is the log-ratio of the greedy completion.

    :param policy: the policy that generated the samples
    :param samples: samples from :func:`generate_samples` (they carry their last observation)
    :param batch_size: completions per forward
    :param progress_bar: show a progress bar
    :return: float64 array, one sum per sample
    """
    import torch as th

    from sb3_textrl.common.kl import episode_kl, token_kl
    from sb3_textrl.common.segments import completion_batch

    if not has_reference(policy):
        raise RuntimeError("this policy has no reference model (kl_coef=0 without LoRA), so it has no KL to a reference")
    missing = [s.prompt_index for s in samples if s.observation is None]
    if missing:
        raise ValueError(
            f"samples of prompts {missing[:5]} carry no last observation; generate them with generate_samples() on an "
            "SB3 VecEnv (it keeps the 'terminal_observation' of each episode)"
        )
    kl = np.zeros(len(samples), dtype=np.float64)
    bar = tqdm(total=len(samples), desc="KL to reference", disable=not progress_bar)
    for first in range(0, len(samples), batch_size):
        chunk = samples[first : first + batch_size]
        ids = np.stack([s.observation["input_ids"] for s in chunk])  # type: ignore[index]
        mask = np.stack([s.observation["attention_mask"] for s in chunk])  # type: ignore[index]
        lengths = np.array([s.completion_tokens for s in chunk], dtype=np.int64)
        # The generated tokens are the last `length` valid tokens of a row: TextRolloutBuffer's segment layout.
        obs, actions_t = completion_batch(ids, mask, lengths, policy.device)
        with th.no_grad():
            _, log_prob, _ = policy.evaluate_actions(obs, actions_t)  # (N,) under the sampling distribution
            ref_log_prob = policy.reference_log_probs(obs, actions_t)  # (N,)
        kl[first : first + len(chunk)] = episode_kl(token_kl(log_prob.cpu().numpy(), ref_log_prob.cpu().numpy()), lengths)
        bar.update(len(chunk))
    bar.close()
    return kl


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalSample:
    """
    One prompt of an evaluation with every system's completion.

    :param prompt_index: index of the prompt in the task
    :param prompt: the prompt text
    :param article: the raw article (news tasks), else None
    :param reference: the task's reference, if any
    :param outputs: system name -> ``{"completion", "task_reward", "rouge1", ..., "kl_to_ref", "length_tokens",
        "length_words"}`` (values that do not apply are None)
    """

    prompt_index: int
    prompt: str
    article: str | None
    reference: str | None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvalResult:
    """
    What :func:`evaluate` measured.

    :param metrics: system name -> metric name (:data:`METRICS`) -> mean over the prompts (None where it does not
        apply: no ROUGE without references, no KL for baselines or a policy without reference)
    :param samples: one :class:`EvalSample` per prompt
    :param config: how the evaluation ran (model, task, data, prompts, decoding, seed, reward, timings)
    :param notes: remarks a reader of the numbers needs (e.g. why KL is 0)
    """

    metrics: dict[str, dict[str, float | None]]
    samples: list[EvalSample]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def systems(self) -> list[str]:
        """The evaluated systems: the model under each decoding, then the baselines."""
        return list(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``config``, ``notes``, ``metrics``, ``samples``."""
        samples = [asdict(s) for s in self.samples]
        return {"config": self.config, "notes": self.notes, "metrics": self.metrics, "samples": samples}

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_markdown(self, max_samples: int = 8) -> str:
        """
        A Markdown report: settings, a metrics table (one row per system) and a table of samples.

        :param max_samples: prompts shown in the samples table
        """
        from sb3_textrl.evaluation_report import render_markdown

        return render_markdown(self, max_samples=max_samples)

    def metrics_table(self) -> str:
        """The metrics table alone, in Markdown (what ``sb3-textrl eval`` prints)."""
        from sb3_textrl.evaluation_report import metrics_table

        return metrics_table(self)

    def save(self, output_dir: str | os.PathLike, max_samples: int = 8) -> tuple[Path, Path]:
        """
        Write :data:`JSON_NAME` and :data:`MARKDOWN_NAME` into ``output_dir`` (created if missing).

        :param output_dir: the directory
        :param max_samples: prompts shown in the Markdown samples table (the JSON keeps all)
        :return: the paths of the JSON file and of the Markdown report
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = out / JSON_NAME, out / MARKDOWN_NAME
        json_path.write_text(self.to_json() + "\n", encoding="utf-8")
        markdown_path.write_text(self.to_markdown(max_samples), encoding="utf-8")
        return json_path, markdown_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        """
        Read a result written by :meth:`save` (``eval.json``, or the directory holding it).

        :param path: the JSON file or its directory
        """
        path = Path(path)
        if path.is_dir():
            path = path / JSON_NAME
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["metrics"], [EvalSample(**s) for s in data["samples"]], data["config"], data.get("notes", []))


# ----------------------------------------------------------------------------------------------------------------
# evaluate()
# ----------------------------------------------------------------------------------------------------------------


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


def _model_settings(model: str | os.PathLike | BaseAlgorithm | None) -> dict[str, Any]:
    """Env settings that make the task's env match the model: the same tokenizer and, for a trained model, widths."""
    if isinstance(model, BaseAlgorithm):
        space = model.observation_space
        settings: dict[str, Any] = {name: int(getattr(space, name)) for name in ("max_prompt_tokens", "max_new_tokens")
                                    if hasattr(space, name)}
        lm = getattr(model.policy, "lm_name", None)
        return settings | ({"tokenizer": lm} if lm is not None else {})
    if model is None:
        return {}
    if os.fspath(model).endswith(".zip"):
        return saved_model_settings(model)
    return {"tokenizer": os.fspath(model)}


def _model_label(model: str | os.PathLike | BaseAlgorithm | None) -> str:
    if isinstance(model, BaseAlgorithm):
        return f"{type(model).__name__} (in memory, LM {getattr(model.policy, 'lm_name', None) or 'embedded'})"
    return "embedded" if model is None else os.fspath(model)


def _make_env(task: str, n_envs: int, seed: int, env_kwargs: dict[str, Any]) -> VecEnv:
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


def _parse_decodings(decoding: str | DecodingSettings | Sequence[str | DecodingSettings]) -> list[DecodingSettings]:
    from sb3_textrl.sampling import DecodingSettings

    items = [decoding] if isinstance(decoding, (str, DecodingSettings)) else list(decoding)
    if not items:
        raise ValueError("decoding: give at least one of 'greedy', 'sample' or 'sample:temperature=T,top_k=K,top_p=P'")
    settings = [DecodingSettings.parse(d) if isinstance(d, str) else d for d in items]
    names = [s.describe() for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"decoding: {names} names the same settings twice; give each once")
    return settings


def _select_prompts(n_available: int, n: int | None, prompt_indices: Sequence[int] | None, where: str) -> list[int]:
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
            f"{where}: asked for n={n} prompts but the task has only {n_available}; lower n (--n) to at most "
            f"{n_available}, or evaluate on a larger dataset"
        )
    return list(range(n))


def _baselines_available(prompts: Sequence[Any]) -> dict[str, str | None]:
    """Baseline name -> None when it applies to these prompts, else why not."""
    return {
        "lead3": None if all(p.meta.get("article") for p in prompts) else "the task's prompts carry no article "
        "(lead-3 needs a news task, whose prompts keep meta['article'])",
        "reference": None if all(p.reference is not None for p in prompts) else "the task has no reference for every prompt",
    }


def _choose_baselines(requested: Sequence[str] | None, available: dict[str, str | None]) -> list[str]:
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


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present and len(present) == len(values) else None


def _summarize(outputs: list[dict[str, Any]], completions: list[str]) -> dict[str, float | None]:
    from sb3_textrl.metrics import distinct_n

    metrics: dict[str, float | None] = {}
    for name in METRICS:
        if name in ("distinct1", "distinct2"):
            metrics[name] = distinct_n(completions, int(name[-1]))
        else:
            metrics[name] = _mean([o.get(name) for o in outputs])
    return metrics


def evaluate(
    model: str | os.PathLike | BaseAlgorithm | None = None,
    task: str | None = DEFAULT_TASK,
    dataset: str | os.PathLike | None = None,
    n: int | None = 32,
    decoding: str | DecodingSettings | Sequence[str | DecodingSettings] = "greedy",
    baselines: Sequence[str] | None = None,
    n_envs: int = 8,
    seed: int = 0,
    device: str = "auto",
    env_kwargs: dict[str, Any] | None = None,
    prompt_indices: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    report_samples: int = 8,
    progress_bar: bool = True,
) -> EvalResult:
    """
    Evaluate a text policy on a task: complete ``n`` prompts, score the completions and the baselines.

    Every system gets ROUGE-1/2/L/Lsum (F-measure, Porter stemming; needs references), the task reward, mean length
    (LM tokens and words) and distinct-1/2; the model also gets the KL to its reference per completion
    (:func:`kl_to_reference`) and the share of completions ended by a stop token. The baselines are ``lead3`` (the
    article's first three sentences, :func:`sb3_textrl.metrics.lead_n`) and ``reference`` (the reference itself,
    scored by the task reward: ROUGE gives 1.0, a sanity row; a learned reward gives a meaningful score).

    The env is made to match the model: the model's LM is the task's tokenizer and, for a saved or in-memory SB3
    model, ``max_prompt_tokens``/``max_new_tokens`` are the ones it was trained with (``env_kwargs`` override).

    Completions are decoded by :func:`generate_samples`'s fast path (a batched KV-cache decode at ``generate()`` speed,
    under the policy's own sampling distribution and the env's stop rules and action masks; the env loop where it does
    not apply, with the reason logged). When the policy's weights equal its reference's (:func:`reference_identity`:
    every LoRA B matrix zero, e.g. an LM directory wrapped in fresh adapters, or a full fine-tune equal to its frozen
    copy) and its decoding is not truncated (no top-k/top-p/NLPO), the KL is reported as 0 without a KL pass, and a
    note says why.

    :param model: a ``.zip`` saved by ``model.save()``, an LM name or directory (wrapped with fresh LoRA adapters,
        so its KL to the reference is 0), an SB3 model in memory, or None for the embedded LM
    :param task: a registered text task; None means :data:`DEFAULT_TASK` (``NewsSummary-v0``)
    :param dataset: a JSONL/CSV/JSON file of (article, summary) pairs for a news task (``dataset=`` of the env)
    :param n: evaluate the task's first ``n`` prompts (None: all of them)
    :param decoding: ``"greedy"``, ``"sample"``, ``"sample:temperature=T,top_k=K,top_p=P"``, a
        :class:`~sb3_textrl.sampling.DecodingSettings`, or a list of them (one system per decoding)
    :param baselines: names from :data:`BASELINES`; None: every baseline the task supports; ``()``: none
    :param n_envs: prompts completed at once (the batch of the decode: one batched forward per generated token)
    :param seed: seed of the envs, of the wrapper model and of sampled decoding (the caller's torch RNG is restored)
    :param device: torch device for a model loaded here (``"auto"``: CUDA when present)
    :param env_kwargs: further keyword arguments of the task's env (``max_new_tokens``, ``data_seed``, ...)
    :param prompt_indices: evaluate these prompts instead of the first ``n``
    :param output_dir: if given, write ``eval.json`` and ``eval.md`` there
    :param report_samples: prompts shown in the Markdown samples table
    :param progress_bar: show progress bars
    :return: the :class:`EvalResult`
    """
    import torch as th

    from sb3_textrl.metrics import lead_n, rouge_scores, words
    from sb3_textrl.policies import TransformerLMPolicy
    from sb3_textrl.rewards.base import reward_name, score_batch
    from sb3_textrl.sampling import decoding as decoding_context
    from sb3_textrl.sampling import load_generator

    started = time.perf_counter()
    task = task or DEFAULT_TASK
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 prompt (or None for all), got {n}")
    if n_envs < 1:
        raise ValueError(f"n_envs must be at least 1, got {n_envs}")
    settings = _parse_decodings(decoding)
    if isinstance(model, BaseAlgorithm) and not isinstance(model.policy, TransformerLMPolicy):
        raise TypeError(f"evaluate needs a model with a TransformerLMPolicy, got {type(model.policy).__name__}")

    kwargs = _model_settings(model) | ({"dataset": os.fspath(dataset)} if dataset is not None else {}) | (env_kwargs or {})
    requested = len(prompt_indices) if prompt_indices is not None else n
    env = _make_env(task, min(n_envs, requested) if requested else n_envs, seed, kwargs)
    try:
        prompts = env.get_attr("prompts", [0])[0]
        reward_fn = env.get_attr("reward_fn", [0])[0]
        tokenizer = env.get_attr("tokenizer", [0])[0]
        indices = _select_prompts(len(prompts), n, prompt_indices, task)
        if isinstance(model, BaseAlgorithm):
            _check_same_space(model, env, task)
        chosen = [prompts[i] for i in indices]
        names = _choose_baselines(baselines, _baselines_available(chosen))

        with _preserved_random_state():  # SB3 seeds Python's, NumPy's and torch's global generators with the model
            generator = model if isinstance(model, BaseAlgorithm) else _load(load_generator, model, env, device, seed, kwargs)
        policy = generator.policy
        if not isinstance(policy, TransformerLMPolicy):
            raise TypeError(f"{_model_label(model)} has a {type(policy).__name__}; evaluate needs a TransformerLMPolicy")
        identity = reference_identity(policy) if has_reference(policy) else None
        skipped: list[str] = []  # systems whose KL is 0 by construction (no KL pass)
        # The rollout KV cache matches rows by token ids only: keys computed before the weights last changed (a
        # caller's in-place edit) must not be reused.
        policy._rollout_cache.reset()
        completions: dict[str, list[str]] = {}
        outputs: dict[str, list[dict[str, Any]]] = {}
        timings: dict[str, float] = {}
        for setting in settings:
            system = f"model:{setting.describe()}"
            start = time.perf_counter()
            # Sampled decoding is seeded without disturbing the caller's random streams.
            with decoding_context(policy, setting), _preserved_random_state():
                th.manual_seed(seed)
                samples = generate_samples(generator, env, indices, deterministic=setting.greedy, progress_bar=progress_bar)
                timings[f"{system}/generate_s"] = time.perf_counter() - start
                start = time.perf_counter()
                if not has_reference(policy):
                    kl: Sequence[float | None] = [None] * len(samples)
                elif identity is not None and not _truncated(policy):
                    kl = [0.0] * len(samples)  # π = π_ref exactly: the forward passes would only measure rounding
                    skipped.append(system)
                else:
                    kl = kl_to_reference(policy, samples, env.num_envs, progress_bar)
                timings[f"{system}/kl_s"] = time.perf_counter() - start
            completions[system] = [s.completion for s in samples]
            outputs[system] = [
                {
                    "completion": s.completion,
                    "task_reward": float(s.reward),
                    "kl_to_ref": None if value is None else float(value),
                    "length_tokens": s.completion_tokens - int(s.ended_by_stop_token),
                    "stop_rate": float(s.ended_by_stop_token),
                }
                for s, value in zip(samples, kl)
            ]

        texts = [p.text for p in chosen]
        references = [p.reference for p in chosen]
        for name in names:
            baseline = [lead_n(p.meta["article"], 3) for p in chosen] if name == "lead3" else [str(r) for r in references]
            rewards = score_batch(reward_fn, texts, baseline, references, task)
            completions[name] = baseline
            outputs[name] = [
                {"completion": text, "task_reward": float(r), "length_tokens": len(tokenizer(text, add_special_tokens=False)
                                                                                   ["input_ids"])}
                for text, r in zip(baseline, rewards)
            ]
    finally:
        env.close()

    notes = _kl_notes(model, policy, identity, skipped, [f"model:{s.describe()}" for s in settings])
    has_references = all(r is not None for r in references)
    if not has_references:
        notes.append("No ROUGE: the task has no reference for every prompt.")
    for system, system_outputs in outputs.items():
        rouge = rouge_scores(completions[system], references) if has_references else {}  # type: ignore[arg-type]
        for i, output in enumerate(system_outputs):
            output.update({metric: float(values[i]) for metric, values in rouge.items()})
            output["length_words"] = len(words(output["completion"]))

    metrics = {system: _summarize(system_outputs, completions[system]) for system, system_outputs in outputs.items()}
    eval_samples = [
        EvalSample(i, p.text, p.meta.get("article"), p.reference, {system: outputs[system][row] for system in outputs})
        for row, (i, p) in enumerate(zip(indices, chosen))
    ]
    config = {
        "model": _model_label(model),
        "task": task,
        "dataset": None if dataset is None else os.fspath(dataset),
        "n_prompts": len(indices),
        "prompt_indices": indices,
        "decoding": [s.describe() for s in settings],
        "policy_sampling": {"temperature": policy.temperature, "top_k": policy.top_k, "top_p": policy.top_p},
        "baselines": names,
        "reward": reward_name(reward_fn),
        "seed": seed,
        "env_kwargs": {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in kwargs.items()},
        "device": str(policy.device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kl_skipped": skipped,
        "timings_s": timings | {"total_s": time.perf_counter() - started},
    }
    result = EvalResult(metrics, eval_samples, config, notes)
    if output_dir is not None:
        result.save(output_dir, max_samples=report_samples)
    return result


@contextmanager
def _preserved_random_state() -> Iterator[None]:
    """Restore the global random generators (Python, NumPy, torch on the CPU and every GPU) afterwards."""
    import random

    import torch as th

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(th.cuda.device_count())) if th.cuda.is_initialized() else []
    with th.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _check_same_space(model: BaseAlgorithm, env: VecEnv, task: str) -> None:
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


def _load(load_generator: Any, model: Any, env: VecEnv, device: str, seed: int, kwargs: dict[str, Any]) -> BaseAlgorithm:
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


def _kl_notes(
    model: str | os.PathLike | BaseAlgorithm | None,
    policy: TransformerLMPolicy,
    identity: str | None,
    skipped: Sequence[str],
    systems: Sequence[str],
) -> list[str]:
    if not has_reference(policy):
        return ["KL to the reference: none, the policy has no reference model (trained without LoRA and with kl_coef=0)."]
    notes = []
    if skipped:
        origin = (
            " An LM directory or name is wrapped with fresh LoRA adapters, so it is its own reference: evaluate a PPO "
            "model (.zip) to measure how far training moved it."
            if model is None or (not isinstance(model, BaseAlgorithm) and not os.fspath(model).endswith(".zip"))
            else ""
        )
        notes.append(
            f"KL to the reference is 0 by construction for {', '.join(skipped)}: {identity}, so the policy's distribution "
            f"is its reference's; the KL pass was skipped.{origin}"
        )
    if len(skipped) < len(systems):
        notes.append(
            "KL to the reference: per completion, the sum over its generated tokens of log π − log π_ref under the "
            "distribution it was decoded from (an unbiased KL estimate for sampled decoding; the log-ratio of the greedy "
            "completion for greedy decoding)."
            + (" Top-k/top-p/NLPO truncation makes π differ from π_ref even on equal weights." if identity else "")
        )
    return notes


# ----------------------------------------------------------------------------------------------------------------
# Where the CLI writes
# ----------------------------------------------------------------------------------------------------------------


def default_output_dir(model: str | None) -> Path:
    """
    Where ``sb3-textrl eval`` writes its report without ``--output``: next to a saved ``.zip`` (its directory), inside
    a local LM directory, else ``runs/eval``.
    """
    if model is not None:
        path = Path(model)
        if path.suffix == ".zip":
            return path.parent
        if path.is_dir():
            return path
    return Path("runs") / "eval"
