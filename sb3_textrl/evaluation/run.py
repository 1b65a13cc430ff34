"""``evaluate()``: a text policy's completions of a task's prompts and the baselines', scored, in named steps.

The steps: the arguments checked and the task's env made to match the model (:mod:`~sb3_textrl.evaluation.inputs`);
the prompts chosen; the model loaded; the model's completions under each decoding with their KL to the reference
(:mod:`~sb3_textrl.evaluation.samples`, :mod:`~sb3_textrl.evaluation.reference`); the baselines' completions; ROUGE and
lengths for every system; the means and the settings in an :class:`~sb3_textrl.evaluation.results.EvalResult`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.common.metric_keys import COMPLETION_LEN
from sb3_textrl.common.names import DEFAULT_TASK
from sb3_textrl.evaluation.inputs import (
    baselines_available,
    check_arguments,
    check_same_space,
    choose_baselines,
    load_model,
    make_env,
    model_label,
    model_settings,
    select_prompts,
)
from sb3_textrl.evaluation.reference import has_reference, kl_to_reference, reference_identity, sampling_truncated
from sb3_textrl.evaluation.results import EvalResult, EvalSample, summarize
from sb3_textrl.evaluation.samples import Sample, generate_samples, preserved_random_state

if TYPE_CHECKING:
    from sb3_textrl.envs.text_env import TextPrompt
    from sb3_textrl.policies import TransformerLMPolicy
    from sb3_textrl.sampling import DecodingSettings


@dataclass
class _Task:
    """The task's side of an evaluation: its env settings, the chosen prompts, its reward and tokenizer, the baselines."""

    task: str
    dataset: str | None
    env_kwargs: dict[str, Any]
    indices: list[int]
    prompts: list[TextPrompt]
    reward_fn: Any
    tokenizer: Any
    baselines: list[str]

    @property
    def references(self) -> list[str | None]:
        return [p.reference for p in self.prompts]


@dataclass
class _Systems:
    """Every system's completions and per-prompt outputs, system after system (the model's decodings, then baselines)."""

    completions: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # systems whose KL is 0 by construction (no KL pass)


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
    started = time.perf_counter()
    task = task or DEFAULT_TASK
    settings = check_arguments(model, n, n_envs, decoding)
    kwargs = model_settings(model) | ({"dataset": os.fspath(dataset)} if dataset is not None else {}) | (env_kwargs or {})
    requested = len(prompt_indices) if prompt_indices is not None else n
    env = make_env(task, min(n_envs, requested) if requested else n_envs, seed, kwargs)
    try:
        chosen = _choose_prompts(env, model, task, dataset, kwargs, n, prompt_indices, baselines)
        generator = _load_generator(model, env, device, seed, kwargs)
        policy: TransformerLMPolicy = generator.policy  # type: ignore[assignment]
        identity = reference_identity(policy) if has_reference(policy) else None
        systems = _model_systems(generator, env, settings, chosen.indices, seed, identity, progress_bar)
        _baseline_systems(systems, chosen)
    finally:
        env.close()

    notes = _kl_notes(model, policy, identity, systems.skipped, [f"model:{s.describe()}" for s in settings])
    notes += _add_text_metrics(systems, chosen.references)
    metrics = {system: summarize(outputs, systems.completions[system]) for system, outputs in systems.outputs.items()}
    eval_samples = [
        EvalSample(i, p.text, p.meta.get("article"), p.reference, {s: outputs[row] for s, outputs in systems.outputs.items()})
        for row, (i, p) in enumerate(zip(chosen.indices, chosen.prompts))
    ]
    result = EvalResult(metrics, eval_samples, _config(model, chosen, settings, policy, seed, systems, started), notes)
    if output_dir is not None:
        result.save(output_dir, max_samples=report_samples)
    return result


def _choose_prompts(
    env: VecEnv,
    model: str | os.PathLike | BaseAlgorithm | None,
    task: str,
    dataset: str | os.PathLike | None,
    env_kwargs: dict[str, Any],
    n: int | None,
    prompt_indices: Sequence[int] | None,
    baselines: Sequence[str] | None,
) -> _Task:
    """The prompts to complete (checked against an in-memory model's observations) and the baselines that apply."""
    prompts = env.get_attr("prompts", [0])[0]
    reward_fn = env.get_attr("reward_fn", [0])[0]
    tokenizer = env.get_attr("tokenizer", [0])[0]
    indices = select_prompts(len(prompts), n, prompt_indices, task)
    if isinstance(model, BaseAlgorithm):
        check_same_space(model, env, task)
    chosen = [prompts[i] for i in indices]
    names = choose_baselines(baselines, baselines_available(chosen))
    dataset = None if dataset is None else os.fspath(dataset)
    return _Task(task, dataset, env_kwargs, indices, chosen, reward_fn, tokenizer, names)


def _load_generator(
    model: str | os.PathLike | BaseAlgorithm | None, env: VecEnv, device: str, seed: int, env_kwargs: dict[str, Any]
) -> BaseAlgorithm:
    """The model itself, or a model loaded for ``env`` (a saved ``.zip``, an LM, the embedded LM): one with a text policy."""
    from sb3_textrl.policies import TransformerLMPolicy
    from sb3_textrl.sampling import load_generator

    with preserved_random_state():  # SB3 seeds Python's, NumPy's and torch's global generators with the model
        generator = (
            model if isinstance(model, BaseAlgorithm) else load_model(load_generator, model, env, device, seed, env_kwargs)
        )
    if not isinstance(generator.policy, TransformerLMPolicy):
        raise TypeError(f"{model_label(model)} has a {type(generator.policy).__name__}; evaluate needs a TransformerLMPolicy")
    return generator


def _model_systems(
    generator: BaseAlgorithm,
    env: VecEnv,
    settings: Sequence[DecodingSettings],
    indices: list[int],
    seed: int,
    identity: str | None,
    progress_bar: bool,
) -> _Systems:
    """The model's completions under each decoding, with their KL to the reference; generation and KL timed."""
    import torch as th

    from sb3_textrl.sampling import decoding as decoding_context

    policy: TransformerLMPolicy = generator.policy  # type: ignore[assignment]
    # The rollout KV cache matches rows by token ids only: keys computed before the weights last changed (a
    # caller's in-place edit) must not be reused.
    policy._rollout_cache.reset()
    systems = _Systems()
    for setting in settings:
        system = f"model:{setting.describe()}"
        start = time.perf_counter()
        # Sampled decoding is seeded without disturbing the caller's random streams.
        with decoding_context(policy, setting), preserved_random_state():
            th.manual_seed(seed)
            samples = generate_samples(generator, env, indices, deterministic=setting.greedy, progress_bar=progress_bar)
            systems.timings[f"{system}/generate_s"] = time.perf_counter() - start
            start = time.perf_counter()
            kl, skipped = _completion_kls(policy, samples, identity, env.num_envs, progress_bar)
            systems.timings[f"{system}/kl_s"] = time.perf_counter() - start
        if skipped:
            systems.skipped.append(system)
        systems.completions[system] = [s.completion for s in samples]
        systems.outputs[system] = [
            {
                "completion": s.completion,
                "task_reward": float(s.reward),
                "kl_to_ref": None if value is None else float(value),
                COMPLETION_LEN: int(s.completion_tokens),  # the mean over prompts: metric_keys.mean_completion_length
                "stop_rate": float(s.ended_by_stop_token),
            }
            for s, value in zip(samples, kl)
        ]
    return systems


def _completion_kls(
    policy: TransformerLMPolicy, samples: list[Sample], identity: str | None, batch_size: int, progress_bar: bool
) -> tuple[Sequence[float | None] | np.ndarray, bool]:
    """
    Each completion's KL to the reference under the current decoding, and whether the KL pass was skipped.

    :return: None each without a reference; 0 each, skipped, when π = π_ref exactly (the forward passes would only
        measure rounding); else :func:`~sb3_textrl.evaluation.reference.kl_to_reference`'s
    """
    if not has_reference(policy):
        return [None] * len(samples), False
    if identity is not None and not sampling_truncated(policy):
        return [0.0] * len(samples), True
    return kl_to_reference(policy, samples, batch_size, progress_bar), False


def _baseline_systems(systems: _Systems, chosen: _Task) -> None:
    """Add the baselines' completions (lead-3, the reference itself), scored by the task reward."""
    from sb3_textrl.metrics import lead_n
    from sb3_textrl.rewards.base import score_batch

    texts, references = [p.text for p in chosen.prompts], chosen.references
    for name in chosen.baselines:
        baseline = [lead_n(p.meta["article"], 3) for p in chosen.prompts] if name == "lead3" else [str(r) for r in references]
        rewards = score_batch(chosen.reward_fn, texts, baseline, references, chosen.task)
        systems.completions[name] = baseline
        systems.outputs[name] = [
            # No completion length: no policy generated this text (its size is compared in words).
            {"completion": text, "task_reward": float(r)}
            for text, r in zip(baseline, rewards)
        ]


def _add_text_metrics(systems: _Systems, references: list[str | None]) -> list[str]:
    """Add ROUGE (when every prompt has a reference) and the length in words to every output; the notes to report."""
    from sb3_textrl.metrics import rouge_scores, words

    has_references = all(r is not None for r in references)
    for system, system_outputs in systems.outputs.items():
        rouge = rouge_scores(systems.completions[system], references) if has_references else {}  # type: ignore[arg-type]
        for i, output in enumerate(system_outputs):
            output.update({metric: float(values[i]) for metric, values in rouge.items()})
            output["length_words"] = len(words(output["completion"]))
    return [] if has_references else ["No ROUGE: the task has no reference for every prompt."]


def _config(
    model: str | os.PathLike | BaseAlgorithm | None,
    chosen: _Task,
    settings: Sequence[DecodingSettings],
    policy: TransformerLMPolicy,
    seed: int,
    systems: _Systems,
    started: float,
) -> dict[str, Any]:
    """How the evaluation ran: :attr:`EvalResult.config`."""
    from sb3_textrl.rewards.base import reward_name

    plain = (str, int, float, bool, type(None))
    return {
        "model": model_label(model),
        "task": chosen.task,
        "dataset": chosen.dataset,
        "n_prompts": len(chosen.indices),
        "prompt_indices": chosen.indices,
        "decoding": [s.describe() for s in settings],
        "policy_sampling": {"temperature": policy.temperature, "top_k": policy.top_k, "top_p": policy.top_p},
        "baselines": chosen.baselines,
        "reward": reward_name(chosen.reward_fn),
        "seed": seed,
        "env_kwargs": {k: v if isinstance(v, plain) else repr(v) for k, v in chosen.env_kwargs.items()},
        "device": str(policy.device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kl_skipped": systems.skipped,
        "timings_s": systems.timings | {"total_s": time.perf_counter() - started},
    }


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
