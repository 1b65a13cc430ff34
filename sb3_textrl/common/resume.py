"""What a checkpoint needs besides what SB3 saves, for a resumed run to continue exactly as an uninterrupted one.

SB3's ``model.save`` keeps the weights, the optimizer and the algorithm's attributes (``num_timesteps``, ``_last_obs``),
and ``PPO.load`` then reseeds Python's, NumPy's and torch's generators with the run's *initial* seed: the minibatch
order and the sampled tokens after a resume differ from those of the run that went on. The envs are made anew, so
their prompt order starts over and the episode in flight is gone. This module captures those generators and each
text env's state (:meth:`~sb3_textrl.envs.text_env.TextGenerationEnv.resume_state`) and puts them back;
:func:`~sb3_textrl.save_model` stores them in the zip and :func:`~sb3_textrl.load_model` restores them. Exact means
bit for bit on CPU when the model was saved between ``learn()`` calls (tests/test_resume.py). A checkpoint taken
inside a rollout (a callback's) resumes close to, not exactly as, the run: SB3 saves no rollout buffer, and its saved
observation is then one step behind the envs.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

RESUME_ENTRY = "sb3_textrl_resume.state"  # in model.zip, beside SB3's entries (not .pth: SB3 loads every .pth as weights)
RESUME_FORMAT_VERSION = 1


def capture_resume_state(model: BaseAlgorithm) -> dict[str, Any]:
    """
    The random generators' states and the text envs' states of ``model``'s run, now.

    :param model: the algorithm (its env, when it has one, is asked for each env's state)
    :return: a dict of plain objects and tensors (``torch.save`` stores it)
    """
    state: dict[str, Any] = {
        "format_version": RESUME_FORMAT_VERSION,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": th.get_rng_state(),
        "cuda": th.cuda.get_rng_state_all() if th.cuda.is_available() else None,
        "envs": None,
    }
    env = model.get_env()
    if env is not None:
        try:
            state["envs"] = env.env_method("resume_state")
        except AttributeError:  # not text envs: their state is theirs to keep
            state["envs"] = None
    return state


def restore_resume_state(model: BaseAlgorithm, state: dict[str, Any]) -> None:
    """
    Put the generators and (when ``model`` has envs of the same number) the envs back as :func:`capture_resume_state`
    found them.

    :param model: the loaded algorithm, with its env set
    :param state: what :func:`capture_resume_state` returned
    """
    version = state.get("format_version")
    if version != RESUME_FORMAT_VERSION:
        raise ValueError(
            f"the checkpoint's resume state has format version {version!r}, this sb3_textrl reads "
            f"{RESUME_FORMAT_VERSION}; load it with resume=False (the weights load, the run does not continue exactly)"
        )
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    th.set_rng_state(state["torch"])
    if state["cuda"] is not None and th.cuda.is_available() and len(state["cuda"]) == th.cuda.device_count():
        th.cuda.set_rng_state_all(state["cuda"])
    env, env_states = model.get_env(), state["envs"]
    if env is None or env_states is None:
        return
    if len(env_states) != env.num_envs:
        raise ValueError(
            f"the checkpoint was saved with {len(env_states)} envs, the env given has {env.num_envs}: resume with as "
            "many envs (or load with resume=False)"
        )
    # A reset first, so that the wrappers SB3 adds (Monitor) take the envs as running; then the envs' own state
    # replaces what the reset drew. (Monitor's statistics of the episode in flight start from the checkpoint.)
    env.reset()
    for index, env_state in enumerate(env_states):
        env.env_method("restore_resume_state", env_state, indices=[index])
