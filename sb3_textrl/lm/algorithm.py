"""What a text policy settles with the algorithm that builds it: the rollout buffer, the rollout size, no observation
normalisation.

A stock ``PPO(TransformerLMPolicy, env)`` (``A2C``, sb3-contrib's ``MaskablePPO``) leaves ``rollout_buffer_class``
at None, which SB3 turns into its per-step ``DictRolloutBuffer``: no KL penalty, and one forward over the whole
context per token in training. :func:`configure_algorithm`, called by the policy while the algorithm builds it, gives
that algorithm the policy's text buffer instead (:class:`~sb3_textrl.buffers.TextRolloutBuffer`,
:class:`~sb3_textrl.maskable.MaskableTextRolloutBuffer` for the maskable policy). The algorithm and the arguments the
user passed come from :func:`~sb3_textrl.common.sb3_bridge.find_algorithm_setup` (SB3 hands a policy neither).

- ``rollout_buffer_class`` left out: the text buffer, built with the arguments SB3 uses (``n_steps``, the spaces,
  ``device``, ``gamma``, ``gae_lambda``, ``n_envs``, ``rollout_buffer_kwargs``). SB3 saves the class in ``model.zip``.
- A per-step buffer passed explicitly (``DictRolloutBuffer``, ``MaskableDictRolloutBuffer``): kept (benchmarks compare
  against it), with a warning at construction that names the fix.
- ``PPO.load`` (no ``__init__`` arguments): the saved buffer class is kept.
- A policy built by hand (no algorithm on the stack): nothing to settle.

Whatever the buffer, an env wrapped in ``VecNormalize(norm_obs=True)`` is refused: normalised token ids are noise.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch as th
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv, unwrap_vec_normalize

from sb3_textrl.common.sb3_bridge import find_algorithm_setup
from sb3_textrl.lm.arguments import _user_stacklevel

if TYPE_CHECKING:
    from stable_baselines3.common.buffers import RolloutBuffer

    from sb3_textrl.policies import TransformerLMPolicy

# Throughput measured by benchmarks/ppo_throughput.py (see docs/benchmarks.md): grouped buffer + KV cache
# against SB3's default buffer with one full forward per token, end to end in PPO.learn (43x on 2 CPU cores).
GROUPED_SPEEDUP = "about 40x"

# Below this many completions per env in SB3's default n_steps, the default is left alone without a warning.
_COMPLETIONS_WORTH_A_WARNING = 8

_TOKEN_KEYS = ("input_ids", "attention_mask")
VEC_NORMALIZE_FIX = "VecNormalize(venv, norm_obs=False, norm_reward=True)"


def configure_algorithm(policy: TransformerLMPolicy) -> None:
    """
    Settle the rollout buffer and the env of the algorithm that is building ``policy`` (see the module docstring).

    :param policy: the policy, in its ``__init__`` (its arguments stored; the LM need not be loaded yet)
    """
    setup = find_algorithm_setup()
    if setup is None:
        return  # built by hand
    algorithm = setup.algorithm
    if algorithm.policy_kwargs.get("lm") not in (None, policy.lm_name):  # what model.save pickles: the absolute path
        algorithm.policy_kwargs = {**algorithm.policy_kwargs, "lm": policy.lm_name}
    if algorithm.env is not None:
        refuse_observation_normalization(algorithm.env)
    arguments = setup.init_arguments
    if arguments is None or not isinstance(algorithm, OnPolicyAlgorithm) or "rollout_buffer_class" not in arguments:
        return  # PPO.load: keep the saved buffer class
    chosen = arguments["rollout_buffer_class"]
    from sb3_textrl.buffers import TextRolloutBuffer  # here: buffers imports the policy, which imports this module

    text_buffer = policy.text_rollout_buffer_class()
    if chosen is None:
        use_text_buffer(algorithm, text_buffer)
        warn_default_n_steps(algorithm, arguments)
    elif not (isinstance(chosen, type) and issubclass(chosen, TextRolloutBuffer)):
        warnings.warn(per_step_buffer_message(policy, chosen, text_buffer, type(algorithm).__name__),
                      UserWarning, stacklevel=_user_stacklevel())
        policy._warned_per_step = True  # not again at the first minibatch


def use_text_buffer(algorithm: OnPolicyAlgorithm, text_buffer: type[RolloutBuffer]) -> None:
    """
    Make ``text_buffer`` the algorithm's ``rollout_buffer_class`` and, when ``_setup_model`` already built SB3's default
    buffer (PPO, A2C build it before the policy; MaskablePPO after), replace it, built as SB3 builds it.
    """
    algorithm.rollout_buffer_class = text_buffer
    if getattr(algorithm, "rollout_buffer", None) is None:
        return  # MaskablePPO: _setup_model builds it after the policy, from rollout_buffer_class
    algorithm.rollout_buffer = text_buffer(
        algorithm.n_steps,
        algorithm.observation_space,
        algorithm.action_space,
        device=algorithm.device,
        gamma=algorithm.gamma,
        gae_lambda=algorithm.gae_lambda,
        n_envs=algorithm.n_envs,
        **algorithm.rollout_buffer_kwargs,
    )


def warn_default_n_steps(algorithm: OnPolicyAlgorithm, arguments: Mapping[str, Any]) -> None:
    """
    Warn when ``n_steps`` is the algorithm's default (PPO's 2048) and holds many completions per env: the first update
    then waits for ``n_steps × n_envs`` generated tokens (with ``n_epochs`` passes of training over them).
    """
    max_new_tokens = getattr(algorithm.observation_space, "max_new_tokens", None)
    default = inspect.signature(type(algorithm).__init__).parameters.get("n_steps")
    n_steps = arguments.get("n_steps")
    if not max_new_tokens or default is None or n_steps != default.default:
        return
    if n_steps < _COMPLETIONS_WORTH_A_WARNING * max_new_tokens:
        return
    name, n_envs = type(algorithm).__name__, algorithm.n_envs
    epochs = f", then n_epochs={algorithm.n_epochs} passes of training over them" if hasattr(algorithm, "n_epochs") else ""
    warnings.warn(
        f"{name}'s default n_steps={n_steps} counts tokens: the first update waits for {n_steps * n_envs:,} generated "
        f"tokens ({n_steps} per env × {n_envs} env{'s' if n_envs > 1 else ''}: at least {n_steps // max_new_tokens} "
        f"completions of up to max_new_tokens={max_new_tokens} per env){epochs}, which with a real LM on a CPU takes "
        f"many minutes before the first log line. Pass n_steps to choose the rollout size, e.g. "
        f"n_steps={4 * max_new_tokens} for 4 completions per env (more envs make bigger updates; docs/configuration.md); "
        f"any value but {n_steps} silences this warning.",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def per_step_buffer_message(
    policy: TransformerLMPolicy, buffer: type | None, text_buffer: type, algorithm_name: str | None = None
) -> str:
    """
    The warning for training a text policy with a per-step rollout buffer: what it costs and the exact fix.

    :param policy: the policy (its class name and ``kl_coef``)
    :param buffer: the per-step buffer class; None when unknown (the warning at the first minibatch)
    :param text_buffer: the text buffer that fixes it
    :param algorithm_name: the algorithm's class name, for the fix; None: MaskablePPO or PPO, after the buffer
    """
    maskable = "Maskable" in text_buffer.__name__
    algorithm_name = algorithm_name or ("MaskablePPO" if maskable else "PPO")
    policy_name = type(policy).__name__
    chosen = f"rollout_buffer_class={buffer.__name__}" if buffer is not None else "a per-step rollout buffer"
    masks = ", stores a float32 mask over the vocabulary per step" if maskable else ""
    penalty = (
        f" The KL penalty to the reference (kl_coef={policy.kl_coef:g}) is applied by {text_buffer.__name__} only: "
        "with this buffer it is NOT applied."
        if policy.kl_coef > 0
        else ""
    )
    text = text_buffer.__name__
    fix = (
        f"leave rollout_buffer_class out ({algorithm_name}({policy_name}, env) uses {text}) or pass "
        f"rollout_buffer_class=sb3_textrl.{text} (keep {buffer.__name__} only to compare with it)"
        if buffer is not None
        else f"{algorithm_name}({policy_name}, env) without rollout_buffer_class uses {text}; a model saved with a "
        f"per-step buffer loads with it through {algorithm_name}.load(path, env, "
        f"custom_objects=dict(rollout_buffer_class=sb3_textrl.{text}))"
    )
    return (
        f"{policy_name} is trained with {chosen}, which re-encodes the whole context for every single token{masks}. "
        f"{text} trains one forward per episode ({GROUPED_SPEEDUP} faster end to end in benchmarks/ppo_throughput.py)."
        f"{penalty} Fix: {fix}."
    )


def refuse_observation_normalization(env: VecEnv) -> None:
    """
    Refuse ``VecNormalize`` with ``norm_obs=True`` over the token ids or mask of a text env (reward normalisation
    alone is fine): the normalised ids are floats near 0, which the LM would read as token 0.
    """
    normalize = unwrap_vec_normalize(env)
    if normalize is None or not normalize.norm_obs:
        return
    keys = normalize.norm_obs_keys if normalize.norm_obs_keys is not None else _TOKEN_KEYS
    normalized = [key for key in _TOKEN_KEYS if key in keys]
    if normalized:
        raise ValueError(
            f"The env is wrapped in VecNormalize with norm_obs=True, which normalises the observations {normalized} "
            "of a text env: the token ids become floats near 0, which the LM would read as token 0. Use "
            f"{VEC_NORMALIZE_FIX} to normalise rewards only (or TextRolloutBuffer's "
            "rollout_buffer_kwargs=dict(normalize_rewards=True))."
        )


def check_token_ids(input_ids: th.Tensor) -> None:
    """
    Refuse float token ids that are not whole numbers (normalised observations: ``VecNormalize(norm_obs=True)`` set
    with ``set_env`` after the policy was built). Integer ids, the usual case, cost nothing.
    """
    if not input_ids.is_floating_point():
        return
    if bool((input_ids != input_ids.round()).any()):
        example = float(input_ids[input_ids != input_ids.round()][0])
        raise ValueError(
            f"The policy got token ids that are not whole numbers (e.g. {example:.4g}): the env's observations were "
            "probably normalised by VecNormalize with norm_obs=True (e.g. set with model.set_env), which turns the "
            f"ids into noise. Use {VEC_NORMALIZE_FIX} to normalise rewards only."
        )

