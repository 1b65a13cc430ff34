"""The names of the metrics sb3_textrl logs, and the one definition of completion length.

Every writer (the rollout buffer, :class:`~sb3_textrl.callbacks.TextEvalCallback`, NLPO, :func:`~sb3_textrl.evaluate`)
and every reader (:mod:`sb3_textrl.plotting`, the CLI) takes its keys from here, so a rename is one edit. The
logger key of a metric is its section plus its name: ``ROLLOUT + TASK_REWARD == "rollout/task_reward"``.
SB3's own keys (``train/approx_kl``, ``rollout/ep_rew_mean``...) are listed where we read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# SB3 logger sections.
ROLLOUT = "rollout/"
TRAIN = "train/"
EVAL = "eval/"
TOTAL_TIMESTEPS = "time/total_timesteps"  # SB3's x axis: csv column and the step of tensorboard scalars

# Our metrics (names without the section).
TASK_REWARD = "task_reward"  # mean task score of the finished episodes, before the KL penalty and any task penalty
SAMPLED_TASK_REWARD = "sampled_task_reward"  # TextEvalCallback(n_sampled=k): mean task score of k draws per prompt
KL_TO_REF = "kl_to_ref"  # mean KL to the reference per completion, nats (common.kl.mean_episode_kl)
KL_COEF = "kl_coef"  # the KL penalty's current β
COMPLETION_LEN = "completion_len"  # mean completion length (mean_completion_length below)
EXPLAINED_VARIANCE = "explained_variance"  # over the steps PPO trains on (the buffer records it again, over SB3's)
NLPO_REFRESHES = "nlpo_refreshes"  # times NLPO's masking copy of the policy was refreshed
REWARD_NORM_MEAN = "reward_norm_mean"
REWARD_NORM_STD = "reward_norm_std"
GROUPS = "groups"  # RLOO/GRPO groups the advantage used
GROUP_DROPPED_STEPS = "group_dropped_steps"  # steps of incomplete groups, left out of training
GROUP_WAIT_STEPS = "group_wait_steps"  # steps an env waited for its group (lock-step VecEnv), trained on by nobody
ROUGE_METRICS = ("rouge1", "rouge2", "rougeL")  # F-measures TextEvalCallback records when every prompt has a reference
SAMPLES = "samples"  # eval/samples: a markdown table of the evaluated completions (tensorboard text)

# SFT and reward-model training (transformers.Trainer, logged through SB3's logger by common.hf_trainer): the
# Trainer's names under train/ and eval/ (eval_loss -> eval/loss), against time/total_timesteps = the optimizer step.
LOSS = "loss"  # SFT: NLL per completion token (nats); reward model: Bradley-Terry loss per pair
LEARNING_RATE = "learning_rate"
GRAD_NORM = "grad_norm"  # before clipping
EPOCH = "epoch"
ACCURACY = "accuracy"  # reward model: pairs whose chosen completion scores higher (ties count half)

# SB3's metrics that the plots show beside ours.
SB3_EPISODE_REWARD = ROLLOUT + "ep_rew_mean"
SB3_APPROX_KL = TRAIN + "approx_kl"
SB3_LOSSES = tuple(TRAIN + name for name in ("loss", "policy_gradient_loss", "value_loss", "entropy_loss"))


def mean_completion_length(completion_tokens: Sequence[int]) -> float:
    """
    The completion length every metric reports (``rollout/``, ``eval/completion_len``, :func:`~sb3_textrl.evaluate`'s
    ``completion_len``): the tokens the policy generated, the stop token that ended a completion included — the
    number of actions of its episode, what ``max_new_tokens`` bounds, what the KL penalty and the task's
    ``length_penalty`` are paid on (TRL's GRPO counts its ``completions/mean_length`` the same way). A text
    baseline that no policy generated (a reference summary, lead-3) has none; text sizes are compared in words
    (``length_words``).

    :param completion_tokens: each completion's generated tokens (``info["completion_tokens"]`` of a text env, a
        whole episode's segment length in the rollout buffer)
    :return: their mean
    """
    if not len(completion_tokens):
        raise ValueError("mean_completion_length needs at least one completion")
    return float(np.mean(np.asarray(completion_tokens, dtype=np.float64)))
