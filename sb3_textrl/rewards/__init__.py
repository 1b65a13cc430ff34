from sb3_textrl.rewards.base import RewardFn, TextReward, score_batch
from sb3_textrl.rewards.learned import LearnedRewardModel
from sb3_textrl.rewards.rouge import RougeReward

__all__ = ["LearnedRewardModel", "RewardFn", "RougeReward", "TextReward", "score_batch"]
