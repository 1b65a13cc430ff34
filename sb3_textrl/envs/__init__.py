"""Text generation environments and the task registry."""

from sb3_textrl.envs.batched import BatchedRewardVecEnv, make_text_vec_env
from sb3_textrl.envs.groups import GroupLockstepVecEnv, GroupWaitWrapper, make_group_vec_env
from sb3_textrl.envs.registry import list_text_tasks, load_prompts, make_text_task_env, register_text_task
from sb3_textrl.envs.text_env import TextGenerationEnv, TextObservationSpace, TextPrompt

__all__ = [
    "BatchedRewardVecEnv",
    "GroupLockstepVecEnv",
    "GroupWaitWrapper",
    "TextGenerationEnv",
    "TextObservationSpace",
    "TextPrompt",
    "list_text_tasks",
    "load_prompts",
    "make_group_vec_env",
    "make_text_task_env",
    "make_text_vec_env",
    "register_text_task",
]
