"""The KL penalty to the reference model π_ref: its per-token estimate, its per-episode statistic and its coefficient β.

Every place that penalises, reports or adapts on the KL to the reference goes through this module:

- :func:`action_log_probs` gives log π_ref(a) from the reference's logits, normalised the way torch's ``Categorical``
  normalises the policy's, so that an untuned policy's estimate below is exactly 0 (``log_softmax`` differs by about
  1e-5 in float32);
- :func:`token_kl` is the per-token estimate ``log π(a_t) − log π_ref(a_t)`` of the sampled token a_t (its expectation
  under π is KL(π‖π_ref) at that step), 0 at idle steps (a member of a lock-step group waiting for its siblings);
- :func:`penalized_rewards` is what PPO trains on: ``r_t − β·kl_t``;
- :func:`episode_kl` sums the estimate over each episode (one completion) and :func:`mean_episode_kl` averages those
  sums: the statistic logged as ``rollout/kl_to_ref`` (:class:`~sb3_textrl.buffers.TextRolloutBuffer`, over the
  rollout's whole episodes), ``eval/kl_to_ref`` (:class:`~sb3_textrl.callbacks.TextEvalCallback`) and, per completion,
  by :func:`sb3_textrl.evaluation.evaluate`; in nats per completion;
- :func:`kl_alarms` says when that statistic shows a problem (the policy far from the reference, or a clearly
  negative mean: sampling and reference do not match); the buffer warns with its messages;
- :class:`KLController` holds β and adapts it from an observed mean KL per episode.

Who calls what: the buffer scores the reference at the end of a rollout, penalises the rewards with the current β,
records ``rollout/kl_to_ref`` and then feeds that statistic to :meth:`KLController.update` — through its optional
``kl_reducer`` hook (:data:`KLReducer`), which :func:`sb3_textrl.distributed.make_data_parallel` sets to an average over
the ranks so that every rank adapts β alike. :func:`sb3_textrl.evaluation.kl_to_reference` scores finished
completions with the same two functions (:func:`token_kl`, :func:`episode_kl`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch as th
from torch import nn

from sb3_textrl.common.deprecation import renamed_kwargs

# The buffer's hook between the KL it measured and β's update: (mean KL per episode of this rollout, or None when no
# episode lies wholly in it; tokens sampled) -> (the KL and token count to adapt β from; None: leave β as it is).
KLReducer = Callable[[float | None, int], tuple[float | None, int]]


def action_log_probs(logits: th.Tensor, actions: th.Tensor) -> th.Tensor:
    """
    Log-probs of ``actions`` under the distribution of ``logits``, normalised exactly as torch's ``Categorical`` does
    (logits − logsumexp), so that a reference whose logits equal the policy's gives log π_ref = log π bit for bit.

    :param logits: (N, V) logits (the reference's: temperature and any mask already applied)
    :param actions: (N,) token ids
    :return: (N,) log-probs
    """
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    return log_probs.gather(1, actions.long().view(-1, 1)).squeeze(1)


def token_kl(log_probs: np.ndarray, ref_log_probs: np.ndarray, idle: np.ndarray | None = None) -> np.ndarray:
    """
    The per-token KL estimate log π(a_t) − log π_ref(a_t) of the sampled tokens.

    :param log_probs: log π of each sampled token (float32, any shape)
    :param ref_log_probs: log π_ref of the same tokens, same shape
    :param idle: bool mask of the same shape, True where nothing was sampled (waiting steps): their estimate is 0
    :return: float32 array of the same shape
    """
    kl = np.asarray(log_probs) - np.asarray(ref_log_probs)
    if idle is not None:
        kl = np.where(idle, 0.0, kl)
    return kl.astype(np.float32)


def penalized_rewards(rewards: np.ndarray, kl: np.ndarray, beta: float) -> np.ndarray:
    """
    The rewards with the per-token KL penalty: r_t − β·kl_t.

    :param rewards: task rewards, any shape (float32)
    :param kl: :func:`token_kl` of the same steps
    :param beta: the coefficient β (:attr:`KLController.value`)
    :return: the penalised rewards, the shape and dtype of ``rewards``
    """
    return rewards - beta * kl


def episode_kl(kl: np.ndarray, lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """
    The KL of each episode: the sum of its tokens' estimates, accumulated in float64.

    :param kl: (sum(lengths),) :func:`token_kl` of the episodes' tokens, episode after episode
    :param lengths: tokens of each episode (0 gives a KL of 0)
    :return: float64 array, one sum per episode
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    kl = np.asarray(kl, dtype=np.float64).reshape(-1)
    if len(kl) != int(lengths.sum()):
        raise ValueError(f"{len(kl)} token estimates for episodes of {int(lengths.sum())} tokens in all")
    sums = np.zeros(len(lengths), dtype=np.float64)
    nonempty = lengths > 0
    if nonempty.any():
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        sums[nonempty] = np.add.reduceat(kl, starts[nonempty])
    return sums


def mean_episode_kl(episode_kls: Sequence[float] | np.ndarray) -> float | None:
    """
    The reported statistic (``rollout/kl_to_ref``, ``eval/kl_to_ref``): the mean KL per episode, in nats.

    :param episode_kls: :func:`episode_kl` of the episodes
    :return: their mean, or None without an episode
    """
    if len(episode_kls) == 0:
        return None
    return float(np.mean(episode_kls))


def kl_alarms(
    episode_kls: Sequence[float] | np.ndarray, beta: float, warn_threshold: float | None, negative_tolerance: float | None
) -> dict[str, str]:
    """
    What a rollout's KL to the reference says is wrong, if anything, with the message to warn with.

    - ``"high"``: the mean KL per completion (:func:`mean_episode_kl`) exceeds ``warn_threshold``;
    - ``"negative"``: it is below −max(``negative_tolerance``, 3 standard errors of the mean). Sampled from the policy,
      the estimate's expectation is ≥ 0, so a clearly negative mean means that the sampling and the reference do not
      match.

    :param episode_kls: :func:`episode_kl` of the rollout's whole episodes
    :param beta: the current β (named in the advice)
    :param warn_threshold: nats per completion; None: never ``"high"``
    :param negative_tolerance: nats per completion; None: never ``"negative"``
    :return: condition -> message; empty when all is well or there is no episode
    """
    mean = mean_episode_kl(episode_kls)
    if mean is None:
        return {}
    n = len(episode_kls)
    stderr = float(np.std(episode_kls, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    where = f"rollout/kl_to_ref = {mean:.4g} nats per completion (mean of {n}, standard error {stderr:.2g})"
    alarms = {}
    if warn_threshold is not None and mean > warn_threshold:
        alarms["high"] = (
            f"{where} exceeds kl_warn_threshold={warn_threshold:g}: the policy is moving far from the reference "
            f"(degenerate text, reward hacking). Lower the learning rate (or n_epochs / clip_range), raise kl_coef "
            f"(β is {beta:.4g}) or let kl_target adapt β (policy_kwargs=dict(kl_coef=..., kl_target=...))."
        )
    if negative_tolerance is not None and mean < -max(negative_tolerance, 3 * stderr):
        alarms["negative"] = (
            f"{where} is negative beyond noise (kl_negative_tolerance={negative_tolerance:g}, 3 standard "
            "errors): sampled from the policy, Σ(log π − log π_ref) has a non-negative mean, so the rollout's "
            "log-probs and the reference's do not match. Check that the reference is the intended model (the LM with "
            "its adapters disabled, or the frozen copy), and that nothing samples from another distribution than the "
            "policy's (temperature / top_k / top_p in policy_kwargs, masks, an env wrapper changing actions)."
        )
    return alarms


class KLController(nn.Module):
    """
    Holds β and, when ``kl_target`` is given, adapts it after every rollout.

    The adaptive rule is the proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences", §2.2): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon), with KL the mean per-episode sum of
    the per-token estimate (:func:`mean_episode_kl`) and n the number of tokens in the batch. The current β lives in
    the buffer :attr:`beta` (:attr:`value` as a float) so that ``model.save``/``PPO.load`` keep it; ``kl_coef``
    always names the *initial* β, as the policy's argument does (``rollout/kl_coef`` logs the current one).

    :param kl_coef: initial β; 0 disables the penalty (and the reference forward passes)
    :param kl_target: target mean KL per episode, in nats; None keeps β fixed (``target_kl``, the old name, warns)
    :param horizon: number of tokens over which β may change by at most a factor of about e^0.2
    """

    beta: th.Tensor  # a registered buffer (nn.Module's __getattr__ would type it Tensor | Module)

    @renamed_kwargs(target_kl="kl_target")
    def __init__(self, kl_coef: float = 0.05, kl_target: float | None = None, horizon: int = 10_000):
        super().__init__()
        # NaN passes every comparison: `nan < 0` is False, and a NaN β would switch the penalty off without a word.
        if not math.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0 and finite (0 turns the KL penalty off), got {kl_coef}")
        if kl_target is not None and (not math.isfinite(kl_target) or kl_target <= 0):
            raise ValueError(f"kl_target must be > 0 and finite (or None for a fixed kl_coef), got {kl_target}")
        if kl_target is not None and kl_coef == 0:
            raise ValueError("An adaptive KL controller (kl_target) needs kl_coef > 0 to start from")
        if not math.isfinite(horizon) or horizon <= 0:
            raise ValueError(f"horizon must be > 0 and finite, got {horizon}")
        self.kl_target = kl_target
        self.horizon = horizon
        self.register_buffer("beta", th.tensor(float(kl_coef), dtype=th.float64))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Saved before 0.2 the current β was the buffer "kl_coef" (a second meaning of the initial β's name).
        if prefix + "kl_coef" in state_dict and prefix + "beta" not in state_dict:
            state_dict[prefix + "beta"] = state_dict.pop(prefix + "kl_coef")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def kl_coef(self) -> th.Tensor:
        """Deprecated name of :attr:`beta`, the current β (``kl_coef`` names the initial β)."""
        warnings.warn(
            "KLController.kl_coef (the current β) is deprecated: use KLController.beta, or .value for a float",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.beta

    @property
    def target_kl(self) -> float | None:
        """Deprecated name of :attr:`kl_target` (it collided with PPO's ``target_kl``, an early stop)."""
        warnings.warn("KLController.target_kl is deprecated, use kl_target", DeprecationWarning, stacklevel=2)
        return self.kl_target

    @property
    def value(self) -> float:
        """Current β."""
        return float(self.beta.item())

    @property
    def enabled(self) -> bool:
        """Whether the penalty is applied at all."""
        return self.value > 0

    @property
    def adaptive(self) -> bool:
        """Whether β follows a target KL (else it stays at its initial ``kl_coef``)."""
        return self.kl_target is not None

    def update(self, mean_episode_kl: float, n_tokens: int) -> float:
        """
        Adapt β to the KL measured in the last rollout (no-op for a fixed β).

        :param mean_episode_kl: mean over episodes of the summed per-token KL estimate
        :param n_tokens: tokens in the rollout
        :return: the new β
        """
        if self.kl_target is not None and n_tokens > 0:
            error = min(max(mean_episode_kl / self.kl_target - 1.0, -0.2), 0.2)
            self.beta.mul_(1.0 + error * n_tokens / self.horizon)
        return self.value

    def extra_repr(self) -> str:
        return f"beta={self.value:.4g}, kl_target={self.kl_target}, horizon={self.horizon}"
