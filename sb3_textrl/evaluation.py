"""Generating completions with a trained policy on a text task, in batches, and scoring them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm


@dataclass
class Sample:
    """One generated completion with its task reward."""

    prompt_index: int
    prompt: str
    completion: str
    reference: str | None
    reward: float
    completion_tokens: int


def generate_samples(
    model: BaseAlgorithm,
    env: VecEnv,
    prompt_indices: Sequence[int],
    deterministic: bool = True,
    progress_bar: bool = False,
) -> list[Sample]:
    """
    Run one episode per prompt, ``env.num_envs`` prompts at a time (the policy's KV cache makes each step one
    batched one-token forward).

    :param model: a trained SB3 model with a TransformerLMPolicy
    :param env: a VecEnv of the task (its envs are reset to the requested prompts)
    :param prompt_indices: which of the task's prompts to complete
    :param deterministic: greedy decoding (True) or sampling from the policy
    :param progress_bar: show a progress bar over prompts
    :return: one :class:`Sample` per prompt, in the order given
    """
    samples: list[Sample] = []
    bar = tqdm(total=len(prompt_indices), desc="generating", disable=not progress_bar)
    for first in range(0, len(prompt_indices), env.num_envs):
        batch = list(prompt_indices[first : first + env.num_envs])
        # Envs beyond the batch repeat its last prompt; their results are dropped.
        padded = batch + [batch[-1]] * (env.num_envs - len(batch))
        env.set_options([{"prompt_index": int(i)} for i in padded])
        obs = env.reset()
        finished: dict[int, dict] = {}
        while len(finished) < env.num_envs:
            actions, _ = model.predict(obs, deterministic=deterministic)  # type: ignore[arg-type]
            obs, _, dones, infos = env.step(actions)
            for slot in np.flatnonzero(dones):
                finished.setdefault(int(slot), infos[slot])
        for slot, index in enumerate(batch):
            info = finished[slot]
            samples.append(
                Sample(
                    prompt_index=index,
                    prompt=info["prompt"],
                    completion=info["completion"],
                    reference=info["reference"],
                    reward=info["task_reward"],
                    completion_tokens=info["completion_tokens"],
                )
            )
        bar.update(len(batch))
    bar.close()
    env.set_options(None)  # later resets go back to the seeded prompt order
    return samples
