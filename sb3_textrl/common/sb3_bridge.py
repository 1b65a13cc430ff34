"""
The links between SB3's algorithms and sb3_textrl's buffer and policy that SB3 has no place for, in one module.

:class:`~sb3_textrl.buffers.TextRolloutBuffer` needs three things SB3 never hands a rollout buffer, and the policy one
thing SB3 never hands a policy (link 4). The order of SB3's own calls
(``stable_baselines3.common.on_policy_algorithm.OnPolicyAlgorithm``) rules out passing them in:

- ``_setup_model()`` builds the buffer *before* the policy, from ``rollout_buffer_class(n_steps, observation_space,
  action_space, device=..., gamma=..., gae_lambda=..., n_envs=..., **rollout_buffer_kwargs)``: there is no policy
  yet to pass, and no argument for one (nor for the algorithm or its logger, which ``learn()`` sets up later).
- ``collect_rollouts()`` then calls, at every step, ``actions, values, log_probs = self.policy(obs)`` and
  ``rollout_buffer.add(obs, actions, rewards, episode_starts, values, log_probs)``: the only objects that travel from
  the policy to the buffer are these tensors; and at the end ``rollout_buffer.compute_returns_and_advantage(
  last_values, dones)``, with no logger and not the observation after the rollout. (sb3-contrib's
  ``MaskablePPO.collect_rollouts`` has the same shape, with ``action_masks`` added to both calls.)

So the links are:

1. **The policy** (:func:`attach_rollout_extras` / :func:`rollout_extras`). The buffer scores the reference model,
   applies the KL penalty, adapts β, keeps ``trainable_layers`` hidden states and tells the policy a rollout ended:
   it needs the policy object. The policy's ``forward`` attaches itself to the log-prob tensor it returns (attribute
   ``textrl_policy``) and ``add`` reads it back. The attribute lives on that step's tensor only; nothing is saved
   (``PPO.save`` pickles no rollout tensor).
2. **NLPO's allowed-token sets** (same functions). With ``nlpo_top_p`` the rollout samples within a top-p set of the
   masking policy; training must mask exactly as the rollout did, so ``add`` stores each step's set, which the
   policy attaches to the same tensor (attribute ``nlpo_allowed``). ``collect_rollouts`` passes nothing else the
   policy computed.
3. **The algorithm** (:func:`find_algorithm` / :func:`record_metrics`). The buffer records its rollout metrics
   (``rollout/task_reward``, ``rollout/kl_to_ref``..., and ``train/explained_variance`` over the trained steps) in
   the algorithm's logger, warns there, checks ``vf_coef`` against a value warm-up, and reads ``_last_obs`` (the
   observation after the rollout) to tell whether its last step waited. Its ``reset`` and
   ``compute_returns_and_advantage`` run inside the algorithm's ``collect_rollouts``, so the algorithm is the
   ``self`` of a frame a few levels up the call stack: :func:`find_algorithm` walks at most :data:`MAX_DEPTH`
   frames up from its caller. Outside an algorithm (a buffer filled by hand, as in tests) there is none, and
   :func:`record_metrics` does nothing.
4. **The algorithm that is building the policy** (:func:`find_algorithm_setup`). With ``TransformerLMPolicy``, a
   stock ``PPO(TransformerLMPolicy, env)`` must train with :class:`~sb3_textrl.buffers.TextRolloutBuffer` (the KL
   penalty, one forward per episode), and a text env wrapped in ``VecNormalize(norm_obs=True)`` must be refused
   before any rollout; :mod:`sb3_textrl.lm.algorithm` decides both when the policy is built. SB3 hands a policy
   neither the algorithm nor its buffer, and the buffer's class alone cannot say whether the user chose SB3's
   ``DictRolloutBuffer`` or left ``rollout_buffer_class=None`` (``OnPolicyAlgorithm._setup_model`` replaces None
   with ``DictRolloutBuffer`` and builds the buffer *before* the policy; sb3-contrib's ``MaskablePPO._setup_model``
   builds the policy first, with ``rollout_buffer_class`` still None). The policy is built inside the algorithm's
   ``_setup_model`` (its frame's ``self`` is the algorithm), which ``PPO.__init__`` (``A2C.__init__``,
   ``MaskablePPO.__init__``) calls itself: the arguments of that ``__init__`` frame say what the user passed.
   ``PPO.load`` calls ``_setup_model`` outside ``__init__`` (``_init_setup_model=False``), so there are no
   arguments, and what was saved is kept. A policy built by hand, outside ``_setup_model``, finds no algorithm.

5. **Saving parameters the algorithm does not hold** (:func:`save_with_parameters`). A policy sharded by FSDP2
   (:mod:`sb3_textrl.distributed`) holds one shard of each tensor per rank; the single-file ``model.zip`` needs the
   gathered full tensors, which every rank computes together and rank 0 writes. ``BaseAlgorithm.save`` takes its
   tensors from ``self.get_parameters()`` and has no argument for others, so the function does what ``save`` does
   with the given parameters.

If SB3 ever offers a hook, each link has a direct replacement: a policy (or algorithm) argument to the buffer, or a
``bind(policy, algorithm)`` call after ``_setup_model``, would replace links 1 and 3 (``self.policy`` and
``self.algorithm.logger``); an ``extras`` dict returned by the policy and passed to ``add`` (as sb3-contrib passes
``action_masks``) would replace link 2; a ``policy_class.default_rollout_buffer_class`` read by ``_setup_model`` (or
the algorithm passed to the policy) would replace link 4; a ``params`` argument to ``save`` would replace link 5.
Until then the rest of sb3_textrl goes through these functions only, so a change is made here.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import recursive_getattr, save_to_zip_file

from sb3_textrl.common.metric_keys import ROLLOUT

if TYPE_CHECKING:
    from sb3_textrl.policies import TransformerLMPolicy

POLICY_ATTRIBUTE = "textrl_policy"  # on a rollout step's log-prob tensor: the policy that sampled it
NLPO_ALLOWED_ATTRIBUTE = "nlpo_allowed"  # on the same tensor: (B, V) bool, the tokens NLPO allowed at that step
MAX_DEPTH = 8  # frames find_algorithm looks at; the buffer calls it at most 5 frames below collect_rollouts
# Frames find_algorithm_setup looks at. From its caller in sb3_textrl.lm.algorithm up to PPO.__init__ there are 5 (that
# caller, the policy's __init__, OnPolicyAlgorithm's and PPO's _setup_model, PPO.__init__); every policy or algorithm
# subclass with its own __init__ adds one.
SETUP_MAX_DEPTH = 16


@dataclass(frozen=True)
class RolloutExtras:
    """What a rollout step's log-prob tensor carries besides its values (each None when absent)."""

    policy: TransformerLMPolicy | None = None
    nlpo_allowed: th.Tensor | None = None


def attach_rollout_extras(
    log_prob: th.Tensor, *, policy: TransformerLMPolicy, nlpo_allowed: th.Tensor | None = None
) -> th.Tensor:
    """
    Attach the policy (and NLPO's allowed-token sets) to the log-prob tensor a policy's ``forward`` returns to SB3.

    :param log_prob: (B,) log-probs of the step's actions
    :param policy: the policy that sampled them
    :param nlpo_allowed: (B, V) bool tokens NLPO allowed at this step; None: not NLPO (nothing attached)
    :return: ``log_prob`` itself, carrying them for :func:`rollout_extras`
    """
    setattr(log_prob, POLICY_ATTRIBUTE, policy)
    if nlpo_allowed is not None:
        setattr(log_prob, NLPO_ALLOWED_ATTRIBUTE, nlpo_allowed)
    return log_prob


def rollout_extras(log_prob: th.Tensor) -> RolloutExtras:
    """
    What :func:`attach_rollout_extras` attached to a log-prob tensor, as the rollout buffer's ``add`` receives it.

    :param log_prob: the log-probs SB3 passed to ``rollout_buffer.add``
    :return: the policy and NLPO sets; both None for a tensor from another policy (or a plain tensor)
    """
    return RolloutExtras(getattr(log_prob, POLICY_ATTRIBUTE, None), getattr(log_prob, NLPO_ALLOWED_ATTRIBUTE, None))


def _algorithm_from(frame: FrameType | None, max_depth: int) -> BaseAlgorithm | None:
    """The first ``self`` that is an SB3 algorithm in ``frame`` or the ``max_depth - 1`` frames above it."""
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, BaseAlgorithm):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame kept alive keeps every local of the stack alive


def _caller(frame: FrameType | None) -> FrameType | None:
    return frame.f_back if frame is not None else None


def find_algorithm(max_depth: int = MAX_DEPTH) -> BaseAlgorithm | None:
    """
    The SB3 algorithm whose method (``collect_rollouts``, ``learn``...) is running the caller (see the module docstring).

    :param max_depth: how many frames to look at, starting with the caller's
    :return: the algorithm, or None when none is on the stack within ``max_depth`` frames
    """
    return _algorithm_from(_caller(inspect.currentframe()), max_depth)


def record_metrics(metrics: Mapping[str, float], prefix: str = ROLLOUT, max_depth: int = MAX_DEPTH) -> bool:
    """
    Record ``metrics`` in the logger of the algorithm running the caller (:func:`find_algorithm`), as ``prefix + key``.

    :param metrics: names (without the prefix) and values
    :param prefix: the logger section, e.g. ``"rollout/"`` or ``"train/"``
    :param max_depth: as for :func:`find_algorithm`
    :return: whether an algorithm was found (False: nothing recorded)
    """
    algorithm = _algorithm_from(_caller(inspect.currentframe()), max_depth)
    if algorithm is None:
        return False
    for key, value in metrics.items():
        algorithm.logger.record(f"{prefix}{key}", value)
    return True


@dataclass(frozen=True)
class AlgorithmSetup:
    """An SB3 algorithm whose ``_setup_model`` is running, and the arguments its ``__init__`` was called with."""

    algorithm: BaseAlgorithm
    # The named arguments of the algorithm's __init__ frame that called _setup_model (``rollout_buffer_class``,
    # ``n_steps``...); None when _setup_model runs outside __init__ (``PPO.load``).
    init_arguments: Mapping[str, Any] | None


def _named_arguments(frame: FrameType) -> dict[str, Any]:
    """The values of a frame's named parameters (not ``*args``/``**kwargs``, not its other locals)."""
    code = frame.f_code
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    local_values = frame.f_locals
    return {name: local_values[name] for name in names if name in local_values and name != "self"}


def find_algorithm_setup(max_depth: int = SETUP_MAX_DEPTH) -> AlgorithmSetup | None:
    """
    The algorithm whose ``_setup_model`` is building the caller (a policy's ``__init__``), see link 4 of the module
    docstring.

    :param max_depth: how many frames to look at, starting with the caller's
    :return: the algorithm and its ``__init__`` arguments (None outside ``__init__``, e.g. in ``PPO.load``); None when
        no ``_setup_model`` of an SB3 algorithm is on the stack within ``max_depth`` frames (a policy built by hand)
    """
    frame = _caller(inspect.currentframe())
    algorithm: BaseAlgorithm | None = None
    try:
        for _ in range(max_depth):
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            name = frame.f_code.co_name
            if algorithm is not None:
                if name == "__init__" and isinstance(candidate, BaseAlgorithm) and candidate is algorithm:
                    # The innermost __init__ is the one that called _setup_model (PPO's, below a subclass's).
                    return AlgorithmSetup(candidate, _named_arguments(frame))
            elif name == "_setup_model" and isinstance(candidate, BaseAlgorithm):
                algorithm = candidate
            frame = frame.f_back
        return None if algorithm is None else AlgorithmSetup(algorithm, None)
    finally:
        del frame  # a frame kept alive keeps every local of the stack alive


def save_with_parameters(model: BaseAlgorithm, path: str | os.PathLike, params: dict[str, dict[str, Any]]) -> None:
    """
    ``model.save(path)`` with ``params`` in place of ``model.get_parameters()`` (link 5 of the module docstring): the
    same attributes, excluded names and PyTorch variables as SB3's ``BaseAlgorithm.save`` (stable-baselines3 2.x).

    :param model: the algorithm whose attributes are saved
    :param path: the zip file to write (SB3 adds ``.zip`` when missing)
    :param params: state dicts by name, as ``get_parameters()`` returns them (``"policy"``, ``"policy.optimizer"``)
    """
    state_dict_names, variable_names = model._get_torch_save_params()
    if set(params) != set(state_dict_names):
        raise ValueError(f"params must hold the state dicts {sorted(state_dict_names)}, got {sorted(params)}")
    exclude = set(model._excluded_save_params()) | {name.split(".")[0] for name in state_dict_names + variable_names}
    data = {key: value for key, value in model.__dict__.items() if key not in exclude}
    variables = {name: recursive_getattr(model, name) for name in variable_names}
    save_to_zip_file(os.fspath(path), data=data, params=params, pytorch_variables=variables)
