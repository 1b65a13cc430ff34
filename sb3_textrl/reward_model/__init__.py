"""Reward models learned from pairwise preferences: data loading, Bradley-Terry training, the ``train-rm`` command.

The trained model is used as a reward through :class:`sb3_textrl.rewards.LearnedRewardModel`.
"""

from sb3_textrl.reward_model.data import Preference, PreferenceSource, load_preferences, split_preferences
from sb3_textrl.reward_model.encoding import PairEncoder, Truncations
from sb3_textrl.reward_model.train import (
    DEFAULT_BACKBONE,
    REWARD_MODEL_FILE,
    RewardModelConfig,
    RewardModelResult,
    load_backbone,
    resolve_backbone,
    train_reward_model,
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
