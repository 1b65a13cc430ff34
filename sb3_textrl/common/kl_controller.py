"""The coefficient β of the per-token KL penalty −β·(log π − log π_ref): fixed, or adapted towards a target KL.

The adaptive rule is the proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from
Human Preferences", §2.2): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon), with KL the mean per-episode
sum of the per-token log-ratio and n the number of tokens in the batch. β lives in a buffer so that
``model.save``/``PPO.load`` keep its current value.
"""

from __future__ import annotations

import torch as th
from torch import nn


class KLController(nn.Module):
    """
    Holds β and, when ``target_kl`` is given, adapts it after every rollout.

    :param kl_coef: initial β; 0 disables the penalty (and the reference forward passes)
    :param target_kl: target mean KL per episode, in nats; None keeps β fixed
    :param horizon: number of tokens over which β may change by at most a factor of about e^0.2
    """

    def __init__(self, kl_coef: float = 0.05, target_kl: float | None = None, horizon: int = 10_000):
        super().__init__()
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if target_kl is not None and target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 (or None for a fixed kl_coef), got {target_kl}")
        if target_kl is not None and kl_coef == 0:
            raise ValueError("An adaptive KL controller (target_kl) needs kl_coef > 0 to start from")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.target_kl = target_kl
        self.horizon = horizon
        self.register_buffer("kl_coef", th.tensor(float(kl_coef), dtype=th.float64))

    @property
    def value(self) -> float:
        """Current β."""
        return float(self.kl_coef.item())

    @property
    def enabled(self) -> bool:
        """Whether the penalty is applied at all."""
        return self.value > 0

    def update(self, mean_episode_kl: float, n_tokens: int) -> float:
        """
        Adapt β to the KL measured in the last rollout (no-op for a fixed β).

        :param mean_episode_kl: mean over episodes of the summed per-token KL estimate
        :param n_tokens: tokens in the rollout
        :return: the new β
        """
        if self.target_kl is not None and n_tokens > 0:
            error = min(max(mean_episode_kl / self.target_kl - 1.0, -0.2), 0.2)
            self.kl_coef.mul_(1.0 + error * n_tokens / self.horizon)
        return self.value

    def extra_repr(self) -> str:
        return f"kl_coef={self.value:.4g}, target_kl={self.target_kl}, horizon={self.horizon}"
