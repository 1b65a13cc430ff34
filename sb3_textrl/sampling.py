"""Candidates to judge: two completions per prompt of a text task, stored in a feedback database for raters.

The two candidates of a prompt come from two models (e.g. the SFT checkpoint and a PPO checkpoint) or from one model
with two decoding settings (greedy and sampled). Each candidate is stored with the model and the settings that made
it, and each prompt's two candidates become one pair for the rating page (``sb3-textrl rate``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.checkpoints import check_saved_model
from sb3_textrl.common.names import DEFAULT_TASK
from sb3_textrl.envs.batched import make_text_vec_env
from sb3_textrl.evaluation import Sample, generate_samples
from sb3_textrl.evaluation.inputs import model_settings
from sb3_textrl.lm.arguments import check_sampling
from sb3_textrl.policies import TransformerLMPolicy

logger = logging.getLogger("sb3_textrl")


@dataclass(frozen=True)
class DecodingSettings:
    """
    How a candidate is decoded.

    :param greedy: take the most likely token at each step (``deterministic=True`` in SB3's ``predict``)
    :param temperature: sampling temperature (ignored when greedy)
    :param top_k: sample among the k most likely tokens only
    :param top_p: sample from the nucleus of probability p only
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)

    @classmethod
    def parse(cls, spec: str) -> DecodingSettings:
        """
        Read ``"greedy"``, ``"sample"`` or ``"sample:temperature=0.7,top_p=0.9"`` (the CLI's ``--decoding-a/-b``).

        :param spec: the text form
        :return: the settings
        """
        kind, _, options = spec.partition(":")
        if kind not in ("greedy", "sample"):
            raise ValueError(
                f"decoding {spec!r}: expected 'greedy', 'sample' or 'sample:temperature=T,top_k=K,top_p=P'"
            )
        values: dict[str, Any] = {}
        for item in filter(None, options.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in ("temperature", "top_k", "top_p"):
                raise ValueError(f"decoding {spec!r}: unknown option {item!r}; use temperature=, top_k= or top_p=")
            try:
                values[key] = int(value) if key == "top_k" else float(value)
            except ValueError:
                kind_of = "a whole number" if key == "top_k" else "a number"
                raise ValueError(f"decoding {spec!r}: {key} must be {kind_of}, got {value!r}") from None
        if kind == "greedy" and values:
            raise ValueError(f"decoding {spec!r}: greedy decoding takes no options; use 'sample:{options}'")
        try:
            return cls(greedy=kind == "greedy", **values)
        except ValueError as error:
            raise ValueError(f"decoding {spec!r}: {error}") from None

    def describe(self) -> str:
        """Short text form, the inverse of :meth:`parse`."""
        if self.greedy:
            return "greedy"
        options = [f"{k}={v}" for k, v in asdict(self).items() if k != "greedy" and v is not None]
        return "sample:" + ",".join(options)


@dataclass(frozen=True)
class CandidateSource:
    """
    One side of the comparison: a model and how it decodes.

    :param model: an LM name or directory (e.g. an SFT output), a saved SB3 model (``.zip``), or None for the
        embedded default LM
    :param decoding: decoding settings
    """

    model: str | None = None
    decoding: DecodingSettings = DecodingSettings()

    @property
    def label(self) -> str:
        """What the store records as the candidate's model."""
        return self.model or "embedded"


def load_generator(model: str | os.PathLike | None, env: VecEnv, device: str = "auto", seed: int = 0) -> BaseAlgorithm:
    """
    An SB3 model that can generate on ``env``: a saved ``.zip`` is loaded, an LM name/path is wrapped in a fresh
    PPO with :class:`TransformerLMPolicy` (untrained adapters leave the LM's outputs unchanged).

    :param model: ``.zip`` of a saved SB3 model, an LM name or directory, or None for the embedded LM
    :param env: the task's VecEnv
    :param device: torch device
    :param seed: seed of the wrapper model
    :return: the model
    """
    lm = None if model is None else os.fspath(model)  # str(path_like) is no path unless it is a str or Path
    if lm is not None and lm.endswith(".zip"):
        if not Path(lm).is_file():
            raise FileNotFoundError(f"saved model {lm} not found; pass a .zip written by model.save() or an LM path")
        check_saved_model(lm)  # a damaged file: one clear error, not SB3's or torch's
        return PPO.load(Path(lm), env=env, device=device)  # SB3 opens a str or Path, not any os.PathLike
    # Only generates, never trains: no advantage normalization, which SB3 refuses for a one-env, one-step buffer.
    return PPO(
        TransformerLMPolicy,
        env,
        policy_kwargs=dict(lm=lm),
        n_steps=1,
        batch_size=env.num_envs,
        normalize_advantage=False,
        device=device,
        seed=seed,
    )


@contextmanager
def decoding(policy: TransformerLMPolicy, settings: DecodingSettings) -> Iterator[None]:
    """Temporarily decode with ``settings`` (the policy's own settings come back afterwards)."""
    saved = (policy.temperature, policy.top_k, policy.top_p)
    if not settings.greedy:
        policy.temperature, policy.top_k, policy.top_p = settings.temperature, settings.top_k, settings.top_p
    try:
        yield
    finally:
        policy.temperature, policy.top_k, policy.top_p = saved


def generate_candidates(
    model: BaseAlgorithm, env: VecEnv, prompt_indices: Sequence[int], settings: DecodingSettings, progress_bar: bool = True
) -> list[Sample]:
    """
    Complete each prompt once with ``settings``.

    :param model: a model with a :class:`TransformerLMPolicy`
    :param env: the task's VecEnv
    :param prompt_indices: which prompts to complete
    :param settings: decoding settings
    :param progress_bar: show a progress bar
    :return: one sample per prompt
    """
    policy = model.policy
    if not isinstance(policy, TransformerLMPolicy):
        raise TypeError(f"generating candidates needs a TransformerLMPolicy, got {type(policy).__name__}")
    with decoding(policy, settings):
        return generate_samples(model, env, prompt_indices, deterministic=settings.greedy, progress_bar=progress_bar)


SAMPLE_KEY = "sample_key"  # prompt metadata: what produced its pair, so a rerun skips it


def sample_key(task: str, prompt_index: int, seed: int, source_a: CandidateSource, source_b: CandidateSource) -> str:
    """What makes two runs of :func:`sample_for_rating` produce the same pair for a prompt, as text."""
    sources = [[source.label, source.decoding.describe()] for source in (source_a, source_b)]
    return json.dumps({"task": task, "prompt_index": prompt_index, "seed": seed, "sources": sources}, sort_keys=True)


def pick_prompts(n_available: int, n_prompts: int, seed: int) -> list[int]:
    """``n_prompts`` distinct prompt indices, in a seeded random order."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be at least 1, got {n_prompts}")
    if n_prompts > n_available:
        raise ValueError(f"asked for {n_prompts} prompts but the task has only {n_available}; lower n_prompts (--n-prompts)")
    return [int(i) for i in np.random.default_rng(seed).permutation(n_available)[:n_prompts]]


def sample_for_rating(
    db: str | os.PathLike,
    task: str = DEFAULT_TASK,
    n_prompts: int = 16,
    source_a: CandidateSource | None = None,
    source_b: CandidateSource | None = None,
    env_kwargs: dict[str, Any] | None = None,
    n_envs: int = 4,
    seed: int = 0,
    device: str = "auto",
    progress_bar: bool = True,
) -> list[int]:
    """
    Generate two candidates for each of ``n_prompts`` prompts of ``task`` and store them as pairs to judge.

    By default both candidates come from the embedded LM, source a greedy and source b sampled. Each pair shows them
    in a seeded random order (``settings["source"]`` of a candidate says which side it is).

    :param db: the feedback database (created if missing)
    :param task: a registered text task
    :param n_prompts: how many prompts to draw (seeded)
    :param source_a: model and decoding of candidate A
    :param source_b: model and decoding of candidate B (default: A's model, sampled)
    :param env_kwargs: keyword arguments of the task (``dataset=``, ``tokenizer=``, ``max_new_tokens=`` ...); the
        tokenizer (and a saved model's widths) default to model A's
    :param n_envs: prompts completed at once
    :param seed: seed of the prompt draw and of sampling
    :param device: torch device
    :param progress_bar: show progress bars
    :return: the ids of the pairs stored by this call. Each prompt, its two candidates and their pair are stored in one
        transaction; prompts that already have a pair from the same sources, decodings and seed are skipped, so a
        rerun after a stop (or with a larger ``n_prompts``) completes the set instead of duplicating it
    """
    from sb3_textrl.feedback import FeedbackStore, random_pair_orders

    if not n_prompts >= 1 or not n_envs >= 1:
        raise ValueError(f"n_prompts and n_envs must be >= 1, got n_prompts={n_prompts}, n_envs={n_envs}")
    source_a = source_a or CandidateSource()
    source_b = source_b or CandidateSource(source_a.model, DecodingSettings(greedy=False))
    # The env speaks model A's tokenizer (and a saved model's widths) unless env_kwargs say otherwise.
    env_kwargs = model_settings(source_a.model) | (env_kwargs or {})
    # The store is opened first: a path that cannot hold a database fails before minutes of generation, not after.
    with FeedbackStore(db) as store:
        env = make_text_vec_env(task, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)
        prompts = env.get_attr("prompts", [0])[0]
        indices = pick_prompts(len(prompts), n_prompts, seed)
        # Which source is shown first is drawn per pair (seeded), so "A" is no source and carries no position bias.
        swaps = dict(zip(indices, random_pair_orders(len(indices), seed)))
        # A rerun (after a stop, or to add prompts) samples only the prompts not yet stored with these settings.
        stored = {meta.get(SAMPLE_KEY) for meta in store.prompt_metadata(task)}
        keys = {index: sample_key(task, index, seed, source_a, source_b) for index in indices}
        todo = [index for index in indices if keys[index] not in stored]
        if len(todo) < len(indices):
            logger.info(
                f"{len(indices) - len(todo)} of the {len(indices)} prompts already have pairs from these sources, "
                f"decodings and seed in {db}; sampling the other {len(todo)}"
            )
        candidates = []
        generator = None
        for source in (source_a, source_b) if todo else ():
            if generator is None or source.model != source_a.model:
                generator = load_generator(source.model, env, device=device, seed=seed)
            candidates.append(generate_candidates(generator, env, todo, source.decoding, progress_bar=progress_bar))
        env.close()
        pair_ids = []
        for index, sample_a, sample_b in zip(todo, *candidates):
            prompt = prompts[index]
            with store.transaction():  # the prompt, its candidates and their pair: all stored, or none
                prompt_id = store.add_prompt(
                    prompt.text, task=task, reference=prompt.reference, article=prompt.meta.get("article"),
                    metadata={"prompt_index": index, SAMPLE_KEY: keys[index]},
                )
                ids = [
                    store.add_candidate(
                        prompt_id, sample.completion, model=source.label,
                        settings={"source": side, "decoding": source.decoding.describe(), "seed": seed,
                                  "task_reward": sample.reward},
                    )
                    for side, source, sample in (("a", source_a, sample_a), ("b", source_b, sample_b))
                ]
                pair_ids.append(store.add_pair(prompt_id, *(ids[::-1] if swaps[index] else ids)))
    return pair_ids
