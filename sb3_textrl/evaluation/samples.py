"""The completions of an evaluation: :class:`Sample`, :func:`generate_samples` (the fast path, or the env loop) and
:func:`generate_sample_sets` (greedy and sampled completions of the same prompts, each prompt prefilled once)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch as th
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm


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
    deterministic: bool | Sequence[bool] = True,
    progress_bar: bool = False,
    fast: bool = True,
    batch_size: int | None = None,
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
    :param deterministic: greedy decoding (True) or sampling from the policy; or one flag per entry of
        ``prompt_indices`` (the env loop then runs the greedy and the sampled ones apart)
    :param progress_bar: show a progress bar over prompts
    :param fast: decode with the fast path where it applies (False: always the env loop)
    :param batch_size: prompts the fast path decodes at once (None: ``env.num_envs``); a batch prefills each distinct
        prompt once
    :return: one :class:`Sample` per prompt, in the order given
    """
    from sb3_textrl.common.generation import row_flags

    flags = row_flags(deterministic, len(prompt_indices))
    if fast:
        from sb3_textrl.common.generation import FastPathUnsupported, fast_path_unsupported, generate_env_samples
        from sb3_textrl.envs.text_env import log_once

        reason = fast_path_unsupported(model, env)
        if reason is None:
            try:
                return generate_env_samples(model, env, prompt_indices, flags, batch_size, progress_bar)
            except FastPathUnsupported as error:
                reason = str(error)
        log_once(f"generate_samples: decoding through the env loop (model.predict + env.step, slower): {reason}")
    samples: list[Sample | None] = [None] * len(flags)
    for flag in sorted(set(flags), reverse=True):  # greedy first, then the draws
        positions = [position for position, f in enumerate(flags) if f == flag]
        done = _generate_samples_env_loop(model, env, [prompt_indices[i] for i in positions], flag, progress_bar)
        for position, sample in zip(positions, done, strict=True):
            samples[position] = sample
    return cast(list[Sample], samples)


@dataclass
class SampleSets:
    """
    Greedy and sampled completions of the same prompts (:func:`generate_sample_sets`).

    :param greedy: one greedy completion per prompt, in the order asked
    :param sampled: ``sampled[j]`` holds the j-th sampled completion of every prompt, in the same order
    """

    greedy: list[Sample]
    sampled: list[list[Sample]]

    def sampled_rewards(self) -> list[float]:
        """Each prompt's mean reward over its sampled completions (the policy's own expected reward, estimated)."""
        if not self.sampled:
            return []
        return [float(np.mean([draw[i].reward for draw in self.sampled])) for i in range(len(self.greedy))]


def generate_sample_sets(
    model: BaseAlgorithm,
    env: VecEnv,
    prompt_indices: Sequence[int],
    n_sampled: int,
    seed: int | None = None,
    progress_bar: bool = False,
) -> SampleSets:
    """
    One greedy and ``n_sampled`` sampled completions of each prompt, decoded together: on the fast path each batch of
    ``env.num_envs`` prompts is prefilled once for all ``1 + n_sampled`` completions (the prefill of a long prompt
    costs more than a short completion). Where the fast path does not apply, the env loop runs the greedy and the
    sampled completions apart (:func:`generate_samples`).

    :param model: a trained SB3 model with a TransformerLMPolicy
    :param env: a VecEnv of the task
    :param prompt_indices: which of the task's prompts to complete
    :param n_sampled: sampled completions per prompt (0: greedy only)
    :param seed: seed of the sampling draws, with torch's random state restored afterwards, so two calls on the same
        prompts draw alike (common random numbers for a before/after comparison); None: torch's global generator
    :param progress_bar: show a progress bar over completions
    :return: the greedy completions and the sampled ones
    """
    if n_sampled < 0:
        raise ValueError(f"n_sampled must be >= 0, got {n_sampled}")
    width = 1 + n_sampled  # completions per prompt, next to each other: greedy, then the draws
    rows = [int(i) for i in prompt_indices for _ in range(width)]
    flags = [slot == 0 for _ in prompt_indices for slot in range(width)]
    with contextlib.nullcontext() if seed is None else preserved_random_state():
        if seed is not None:
            th.manual_seed(seed)
        samples = generate_samples(model, env, rows, flags, progress_bar, batch_size=env.num_envs * width)
    return SampleSets(samples[::width], [samples[j::width] for j in range(1, width)])


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore the global random generators (Python, NumPy, torch on the CPU and every GPU) afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(th.cuda.device_count())) if th.cuda.is_initialized() else []
    with th.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


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
        for slot in np.flatnonzero(dones).tolist():
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
