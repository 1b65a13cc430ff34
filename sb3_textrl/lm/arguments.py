"""The checks of the LM policies' arguments, made before the LM is loaded (and the vocabulary check after)."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

from gymnasium import spaces
from stable_baselines3.common.type_aliases import PyTorchObs
from transformers import PreTrainedModel

from sb3_textrl.common.segments import SEGMENT_LENGTHS
from sb3_textrl.envs.arguments import context_fix
from sb3_textrl.envs.text_env import TextObservationSpace, tokenizer_fingerprint
from sb3_textrl.lm.precision import check_mixed_precision
from sb3_textrl.models import load_tokenizer


def check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """A text env's spaces: Dict observations with token ids and mask, one Discrete action per vocabulary token."""
    if not isinstance(action_space, spaces.Discrete):
        raise TypeError(f"TransformerLMPolicy needs a Discrete (vocabulary) action space, got {action_space}")
    if not isinstance(observation_space, spaces.Dict) or {"input_ids", "attention_mask"} - set(observation_space.spaces):
        raise TypeError(
            "TransformerLMPolicy needs Dict observations with 'input_ids' and 'attention_mask' "
            f"(a TextGenerationEnv, see sb3_textrl.register_text_task); got {observation_space}"
        )


def refuse_segments(obs: PyTorchObs, method: str) -> None:
    """
    Refuse a training batch of whole-episode segments in a policy method that reads single steps.

    :param obs: the observations the method got
    :param method: the method's name, for the message
    """
    # Some learners (sb3-contrib's TRPO) read training batches through get_distribution()/predict_values(); with
    # TextRolloutBuffer those batches are whole episode segments, which only evaluate_actions() understands.
    if isinstance(obs, dict) and SEGMENT_LENGTHS in obs:
        raise NotImplementedError(
            f"{method}() got a training batch of whole-episode segments (TextRolloutBuffer): this learner (e.g. "
            "sb3_contrib.TRPO) reads training batches through get_distribution()/predict_values() instead of "
            "evaluate_actions(), which the text policies do not support. Train with PPO, A2C or MaskablePPO "
            "(see docs/algorithms.md)."
        )


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """
    Refuse sampling settings out of range: a temperature <= 0 inverts or breaks the distribution, ``top_p=0`` keeps
    no token, ``top_k=0`` none either.

    :param temperature: the sampling temperature
    :param top_k: sample among the k most likely tokens only (None: all)
    :param top_p: sample from the nucleus of probability p only (None: all)
    """
    # Written so that NaN fails them (every comparison with NaN is False).
    if not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be > 0 and finite (1.0: the LM's own distribution), got {temperature}")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def check_arguments(policy: Any) -> None:
    """
    Refuse the policy arguments that are out of range or that do not go together (see TransformerLMPolicy).

    :param policy: the policy, its arguments stored as attributes of the same names (``nlpo_top_p`` is checked by
        :func:`~sb3_textrl.nlpo.check_nlpo_top_p`)
    """
    check_sampling(policy.temperature, policy.top_k, policy.top_p)
    trainable_layers, value_warmup_rollouts = policy.trainable_layers, policy.value_warmup_rollouts
    check_mixed_precision(policy.mixed_precision)
    if trainable_layers is not None and not policy.use_kv_cache:
        raise ValueError(
            "trainable_layers keeps the lower blocks' output from the rollout's KV cache: it needs use_kv_cache=True "
            "(or pass trainable_layers=None)"
        )
    if isinstance(value_warmup_rollouts, bool) or not isinstance(value_warmup_rollouts, int) or value_warmup_rollouts < 0:
        raise ValueError(f"value_warmup_rollouts must be an int >= 0 (0: no warm-up), got {value_warmup_rollouts!r}")
    if value_warmup_rollouts and not policy.critic:
        raise ValueError(
            f"value_warmup_rollouts={value_warmup_rollouts} trains the value head alone, but critic=False has no "
            "trainable value head (advantage='rloo'/'grpo' need none): drop value_warmup_rollouts, or use critic=True"
        )


def kl_target_argument(kl_target: float | None, kwargs: dict[str, Any]) -> float | None:
    """
    The adaptive β's target, from ``kl_target`` or from the deprecated ``target_kl`` in ``kwargs`` (removed from it).

    ``target_kl`` was the policy's name until it was renamed for colliding with SB3 PPO's own ``target_kl`` (the early
    stop of an epoch): it still works, with a DeprecationWarning; saved models whose policy_kwargs hold it load.
    """
    if "target_kl" not in kwargs:
        return kl_target
    target_kl = kwargs.pop("target_kl")
    if kl_target is not None:
        raise ValueError(
            f"policy_kwargs has both kl_target={kl_target} and target_kl={target_kl}: they are the same setting (the "
            "adaptive KL penalty's target), target_kl its deprecated name. Pass kl_target only."
        )
    warnings.warn(
        "The policy's target_kl= is deprecated (renamed for colliding with PPO's own target_kl=, the early stop of an "
        f"epoch): use policy_kwargs=dict(kl_target={target_kl}) for the adaptive KL penalty's target.",
        DeprecationWarning,
        stacklevel=_user_stacklevel(),
    )
    return target_kl


def _user_stacklevel(internal: tuple[str, ...] = ("sb3_textrl.", "stable_baselines3.", "sb3_contrib.")) -> int:
    """The ``stacklevel`` that attributes a warning of the caller to the first frame outside ``internal`` packages
    (the user's ``PPO(...)`` or ``PPO.load(...)``), so that Python's default filters show a DeprecationWarning there."""
    frame, level = inspect.currentframe(), 0
    try:
        while frame is not None and frame.f_back is not None:
            frame, level = frame.f_back, level + 1
            if not str(frame.f_globals.get("__name__", "")).startswith(internal):
                return level
        return level
    finally:
        del frame


def model_positions(model: PreTrainedModel) -> int | None:
    """The most positions a decoder-only LM takes (its config's ``max_position_embeddings`` or ``n_positions``)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return None  # the encoder reads the prompt, the decoder the completion: each has its own limit
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_length(model: PreTrainedModel, observation_space: spaces.Space, lm_name: str | None) -> None:
    """
    The env's prompt budget plus completion budget must fit the LM's positions, checked when env and policy meet:
    past them a learned position embedding indexes out of range (an ``IndexError`` in the first rollout, or after
    it) and rotary ones read positions they never saw.
    """
    limit = model_positions(model)
    widths = [getattr(observation_space, key, None) for key in ("max_prompt_tokens", "max_new_tokens")]
    if limit is None or None in widths:
        return
    prompt, new = (int(w) for w in widths)  # type: ignore[arg-type]
    if prompt + new > limit:
        raise ValueError(
            f"The env's max_prompt_tokens + max_new_tokens = {prompt} + {new} = {prompt + new} is more than the "
            f"{limit} positions of the LM ({lm_name or 'embedded'}): {context_fix(limit, prompt, new)} (env_kwargs=...)"
        )


def check_vocabulary(
    model: PreTrainedModel,
    action_space: spaces.Discrete,
    observation_space: spaces.Space,
    lm_name: str | None,
    check_tokenizer: bool,
) -> None:
    """
    The env's tokenizer must be the LM's: no more actions than the LM has logits, and (``check_tokenizer``) the same
    vocabulary as the LM's tokenizer (compared by fingerprint).
    """
    n_actions = int(action_space.n)
    lm_vocab = model.get_output_embeddings().weight.shape[0]
    env_tokenizer = getattr(observation_space, "tokenizer_name", "?")
    hint = (
        "The env's tokenizer must be the LM's: pass the same name or path to both, e.g. "
        "make_vec_env(task, env_kwargs=dict(tokenizer=LM)) and policy_kwargs=dict(lm=LM)."
    )
    if n_actions > lm_vocab:
        raise ValueError(
            f"The env's tokenizer ({env_tokenizer}) has {n_actions} tokens but the LM ({lm_name or 'embedded'}) "
            f"only {lm_vocab} output logits. {hint}"
        )
    if check_tokenizer and isinstance(observation_space, TextObservationSpace) and observation_space.tokenizer_hash:
        lm_tokenizer = load_tokenizer(lm_name)
        if tokenizer_fingerprint(lm_tokenizer) != observation_space.tokenizer_hash:
            raise ValueError(
                f"The env's tokenizer ({env_tokenizer}, {n_actions} tokens) is not the LM's "
                f"({lm_name or 'embedded'}, {len(lm_tokenizer)} tokens): the token ids would mean different "
                f"things. {hint} (check_tokenizer=False skips this check.)"
            )
