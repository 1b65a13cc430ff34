"""Text generation environments and the task registry (each imported from its module when first used)."""

from typing import TYPE_CHECKING

from sb3_textrl.common.lazy import lazy_exports

if TYPE_CHECKING:
    from sb3_textrl.envs.batched import BatchedRewardVecEnv, make_text_vec_env
    from sb3_textrl.envs.groups import GroupLockstepVecEnv, GroupWaitWrapper, make_group_vec_env
    from sb3_textrl.envs.registry import load_prompts, make_text_task_env, register_text_task
    from sb3_textrl.envs.task_ids import list_text_tasks
    from sb3_textrl.envs.text_env import TextGenerationEnv, TextObservationSpace, TextPrompt

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "sb3_textrl.envs.batched": ("BatchedRewardVecEnv", "make_text_vec_env"),
        "sb3_textrl.envs.groups": ("GroupLockstepVecEnv", "GroupWaitWrapper", "make_group_vec_env"),
        "sb3_textrl.envs.registry": ("load_prompts", "make_text_task_env", "register_text_task"),
        "sb3_textrl.envs.task_ids": ("list_text_tasks",),
        "sb3_textrl.envs.text_env": ("TextGenerationEnv", "TextObservationSpace", "TextPrompt"),
    },
)

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
