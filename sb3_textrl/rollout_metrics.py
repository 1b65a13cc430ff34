"""
The rollout metrics of :class:`~sb3_textrl.buffers.TextRolloutBuffer`, and its alarms: the means over the episodes
that ended in a rollout, the KL warnings, and ``train/explained_variance`` over the steps that were trained.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import explained_variance

from sb3_textrl.common import metric_keys as keys
from sb3_textrl.common.kl import episode_kl, kl_alarms, mean_episode_kl
from sb3_textrl.common.sb3_bridge import find_algorithm
from sb3_textrl.common.segments import Segment, episode_bounds, flat_steps, scatter_steps

if TYPE_CHECKING:
    from sb3_textrl.policies import TransformerLMPolicy


class RolloutMetrics:
    """
    The methods of :class:`~sb3_textrl.buffers.TextRolloutBuffer` that measure its rollout: ``rollout/task_reward``,
    ``rollout/kl_to_ref`` and ``rollout/completion_len`` (:meth:`_episode_metrics`), the KL alarms
    (:meth:`_check_kl`), and ``train/explained_variance`` over the trained steps (:meth:`explained_variance`).

    A mixin of the buffer, it reads the buffer's attributes declared below.
    """

    buffer_size: int
    segments: list[Segment]
    trained_segments: list[int] | None
    episode_starts: np.ndarray
    task_rewards: np.ndarray
    values: np.ndarray
    returns: np.ndarray
    policy: TransformerLMPolicy | None
    full: bool
    generator_ready: bool
    kl_warn_threshold: float | None
    kl_negative_tolerance: float | None
    _warned_kl: set[str]
    _completion_kls: list[float]

    def _episode_metrics(self, kl: np.ndarray, dones: np.ndarray) -> dict[str, float]:
        """Means over the episodes that ended in this rollout (the KL and length over those wholly in it)."""
        starts_here, ends_here = episode_bounds(self.segments, self.episode_starts, dones, self.buffer_size)
        ended = [s for s, ends in zip(self.segments, ends_here) if ends]
        task = [float(self.task_rewards[s.start : s.start + s.length, s.env].sum()) for s in ended]
        whole = [s for s, starts, ends in zip(self.segments, starts_here, ends_here) if starts and ends]
        self._completion_kls = episode_kl(flat_steps(kl, whole), [s.length for s in whole]).tolist()
        metrics: dict[str, float] = {}
        if task:
            metrics[keys.TASK_REWARD] = float(np.mean(task))
        mean_kl = mean_episode_kl(self._completion_kls)
        if mean_kl is not None:
            metrics[keys.KL_TO_REF] = mean_kl
            metrics[keys.COMPLETION_LEN] = keys.mean_completion_length([s.length for s in whole])
        return metrics

    # -- KL alarms ----------------------------------------------------------------------------------------
    def _check_kl(self, policy: TransformerLMPolicy) -> None:
        """Warn once each when the mean per-completion KL to the reference explodes or is clearly negative."""
        alarms = kl_alarms(
            self._completion_kls, policy.kl_controller.value, self.kl_warn_threshold, self.kl_negative_tolerance
        )
        for condition, message in alarms.items():
            self._warn_kl_once(condition, message)

    def _warn_kl_once(self, condition: str, message: str) -> None:
        if condition in self._warned_kl:
            return
        self._warned_kl.add(condition)
        warnings.warn(message, stacklevel=4)
        algorithm = find_algorithm()
        if algorithm is not None:
            algorithm.logger.warn(f"Warning: {message}")

    # -- explained variance over the trained steps ----------------------------------------------------------
    def trained_steps(self) -> np.ndarray:
        """(buffer_size, n_envs) bool: the steps that ``get()`` yields (every step with GAE; complete groups otherwise)."""
        if self.trained_segments is None:
            return np.ones(self.values.shape, dtype=bool)
        mask = np.zeros(self.values.shape, dtype=bool)
        trained = [self.segments[i] for i in self.trained_segments]
        scatter_steps(mask, trained, np.ones(sum(s.length for s in trained), dtype=bool))
        return mask

    def explained_variance(self) -> float:
        """
        Explained variance of the rollout's values about its returns over the trained steps (SB3's formula).

        :return: 1 − Var[returns − values] / Var[returns]; NaN with a frozen value head (``critic=False``), with no
            trained step, or when the returns do not vary
        """
        if self.policy is not None and not getattr(self.policy, "critic", True):
            return float("nan")
        mask = self.trained_steps()
        if not mask.any():
            return float("nan")
        return float(explained_variance(self.values[mask], self.returns[mask]))

    def record_train_metrics(self, logger: Logger) -> None:
        """
        Record this rollout's ``train/explained_variance`` (:meth:`explained_variance`) in ``logger``, over SB3's.

        The buffer does it by itself when the next rollout starts; a callback that dumps the logs after the last update
        (as :class:`~sb3_textrl.callbacks.TextEvalCallback` does) calls it first.

        :param logger: the algorithm's logger
        """
        if self.full and self.generator_ready:
            logger.record(keys.TRAIN + keys.EXPLAINED_VARIANCE, self.explained_variance())
