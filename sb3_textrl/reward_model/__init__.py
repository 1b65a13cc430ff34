"""Reward models learned from pairwise preferences: data loading, Bradley-Terry training (``sb3-textrl train-rm``).

The trained model is used as a reward through :class:`sb3_textrl.rewards.LearnedRewardModel`. The names below are
imported from their modules when first used.
"""

from typing import TYPE_CHECKING

from sb3_textrl.common.lazy import lazy_exports

if TYPE_CHECKING:
    from sb3_textrl.reward_model.config import RewardModelConfig
    from sb3_textrl.reward_model.data import Preference, PreferenceSource, load_preferences, split_preferences
    from sb3_textrl.reward_model.encoding import PairEncoder, Truncations
    from sb3_textrl.reward_model.train import (
        DEFAULT_BACKBONE,
        REWARD_MODEL_FILE,
        RewardModelResult,
        load_backbone,
        resolve_backbone,
        train_reward_model,
    )

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "sb3_textrl.reward_model.config": ("RewardModelConfig",),
        "sb3_textrl.reward_model.data": ("Preference", "PreferenceSource", "load_preferences", "split_preferences"),
        "sb3_textrl.reward_model.encoding": ("PairEncoder", "Truncations"),
        "sb3_textrl.reward_model.train": (
            "DEFAULT_BACKBONE",
            "REWARD_MODEL_FILE",
            "RewardModelResult",
            "load_backbone",
            "resolve_backbone",
            "train_reward_model",
        ),
    },
)

__all__ = [
    "DEFAULT_BACKBONE",
    "REWARD_MODEL_FILE",
    "PairEncoder",
    "Preference",
    "PreferenceSource",
    "RewardModelConfig",
    "RewardModelResult",
    "Truncations",
    "load_backbone",
    "load_preferences",
    "resolve_backbone",
    "split_preferences",
    "train_reward_model",
]
