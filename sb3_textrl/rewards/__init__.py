"""Rewards of text tasks: the TextReward base, ROUGE against the reference, a learned reward model, a human rater
(each imported when first used)."""

from typing import TYPE_CHECKING

from sb3_textrl.common.lazy import lazy_exports

if TYPE_CHECKING:
    from sb3_textrl.rewards.base import RewardFn, TextReward, score_batch
    from sb3_textrl.rewards.human import HumanReward
    from sb3_textrl.rewards.learned import LearnedRewardModel
    from sb3_textrl.rewards.rouge import RougeReward

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "sb3_textrl.rewards.base": ("RewardFn", "TextReward", "score_batch"),
        "sb3_textrl.rewards.human": ("HumanReward",),
        "sb3_textrl.rewards.learned": ("LearnedRewardModel",),
        "sb3_textrl.rewards.rouge": ("RougeReward",),
    },
)

__all__ = ["HumanReward", "LearnedRewardModel", "RewardFn", "RougeReward", "TextReward", "score_batch"]
