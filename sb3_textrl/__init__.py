"""sb3_textrl: RLHF for Transformer language models with Stable-Baselines3's PPO.

Importing the package registers the built-in text tasks (``NewsSummary-v0``) with Gymnasium. It loads neither torch
nor transformers: the names below are imported from their modules when first used.
"""

from typing import TYPE_CHECKING

import gymnasium as gym

from sb3_textrl.common.lazy import lazy_exports
from sb3_textrl.envs.task_ids import mark_text_task

if TYPE_CHECKING:
    from sb3_textrl.buffers import TextRolloutBuffer
    from sb3_textrl.callbacks import TextEvalCallback, TextSampleCallback
    from sb3_textrl.checkpoints import DamagedModelError, TextCheckpointCallback, check_saved_model, load_model, save_model
    from sb3_textrl.common.kl_controller import KLController
    from sb3_textrl.envs import (
        BatchedRewardVecEnv,
        TextGenerationEnv,
        TextObservationSpace,
        TextPrompt,
        list_text_tasks,
        make_group_vec_env,
        make_text_task_env,
        make_text_vec_env,
        register_text_task,
    )
    from sb3_textrl.envs.subproc import TextSubprocVecEnv
    from sb3_textrl.evaluation import EvalResult, evaluate
    from sb3_textrl.export import export_lm
    from sb3_textrl.maskable import MaskableTextRolloutBuffer, MaskableTransformerLMPolicy
    from sb3_textrl.policies import TransformerLMPolicy
    from sb3_textrl.rewards import HumanReward, LearnedRewardModel, RougeReward, TextReward
    from sb3_textrl.seq2seq import Seq2SeqLMPolicy

__version__ = "0.1.0"

for _task_id in ("NewsSummary-v0", "sb3_textrl/NewsSummary-v0"):
    if _task_id not in gym.registry:
        gym.register(id=_task_id, entry_point="sb3_textrl.envs.news:make_news_summary_env")
    mark_text_task(_task_id)

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "sb3_textrl.buffers": ("TextRolloutBuffer",),
        "sb3_textrl.callbacks": ("TextEvalCallback", "TextSampleCallback"),
        "sb3_textrl.checkpoints": (
            "DamagedModelError", "TextCheckpointCallback", "check_saved_model", "load_model", "save_model"
        ),
        "sb3_textrl.common.kl_controller": ("KLController",),
        "sb3_textrl.envs.batched": ("BatchedRewardVecEnv", "make_text_vec_env"),
        "sb3_textrl.envs.groups": ("make_group_vec_env",),
        "sb3_textrl.envs.registry": ("make_text_task_env", "register_text_task"),
        "sb3_textrl.envs.subproc": ("TextSubprocVecEnv",),
        "sb3_textrl.envs.task_ids": ("list_text_tasks",),
        "sb3_textrl.envs.text_env": ("TextGenerationEnv", "TextObservationSpace", "TextPrompt"),
        "sb3_textrl.evaluation": ("EvalResult", "evaluate"),
        "sb3_textrl.export": ("export_lm",),
        "sb3_textrl.maskable": ("MaskableTextRolloutBuffer", "MaskableTransformerLMPolicy"),
        "sb3_textrl.policies": ("TransformerLMPolicy",),
        "sb3_textrl.rewards.base": ("TextReward",),
        "sb3_textrl.rewards.human": ("HumanReward",),
        "sb3_textrl.rewards.learned": ("LearnedRewardModel",),
        "sb3_textrl.rewards.rouge": ("RougeReward",),
        "sb3_textrl.seq2seq": ("Seq2SeqLMPolicy",),
    },
)

__all__ = [
    "BatchedRewardVecEnv",
    "DamagedModelError",
    "EvalResult",
    "HumanReward",
    "KLController",
    "LearnedRewardModel",
    "MaskableTextRolloutBuffer",
    "MaskableTransformerLMPolicy",
    "RougeReward",
    "Seq2SeqLMPolicy",
    "TextCheckpointCallback",
    "TextEvalCallback",
    "TextGenerationEnv",
    "TextObservationSpace",
    "TextPrompt",
    "TextReward",
    "TextRolloutBuffer",
    "TextSampleCallback",
    "TextSubprocVecEnv",
    "TransformerLMPolicy",
    "check_saved_model",
    "evaluate",
    "export_lm",
    "list_text_tasks",
    "load_model",
    "make_group_vec_env",
    "make_text_task_env",
    "make_text_vec_env",
    "register_text_task",
    "save_model",
]
