"""SB3 callbacks for text tasks: generated samples in the logs, and periodic evaluation on held-out prompts.

Both are plain :class:`~stable_baselines3.common.callbacks.BaseCallback` subclasses: they write through the
algorithm's SB3 logger (any formats), and compose with ``CheckpointCallback`` and ``CallbackList``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, EventCallback
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.checkpoints import save_model
from sb3_textrl.common import metric_keys as keys
from sb3_textrl.common.kl import mean_episode_kl
from sb3_textrl.envs.batched import make_text_vec_env
from sb3_textrl.evaluation import Sample, SampleSets, generate_sample_sets, generate_samples, has_reference, kl_to_reference
from sb3_textrl.evaluation.samples import preserved_random_state
from sb3_textrl.policies import TransformerLMPolicy
from sb3_textrl.rewards.rouge import RougeReward

# Logger exclusions that leave only the tensorboard format: SB3's TensorBoardOutputFormat writes str values as text.
TENSORBOARD_ONLY = ("stdout", "log", "json", "csv")
EVAL_ROUGE_METRICS = keys.ROUGE_METRICS


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _head(text: str, max_chars: int) -> str:
    """The start of ``text`` on one line, cut to ``max_chars``."""
    text = _one_line(text)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _tail(text: str, max_chars: int) -> str:
    """The end of ``text`` on one line: a completion continues a prompt's last words, so those are the ones to show."""
    text = _one_line(text)
    return text if len(text) <= max_chars else "…" + text[-(max_chars - 1) :]


def samples_markdown(samples: Sequence[dict[str, Any]], max_chars: int = 200) -> str:
    """
    A markdown table of generated samples (tensorboard renders text summaries as markdown).

    :param samples: dicts with ``prompt``, ``completion`` and ``task_reward`` (a text env's final ``info``)
    :param max_chars: longest prompt tail / completion shown
    :return: the table, one row per sample
    """

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| prompt (end) | completion | task reward |", "|---|---|---|"]
    for sample in samples:
        prompt, completion = _tail(sample["prompt"], max_chars), _head(sample["completion"], max_chars)
        rows.append(f"| {cell(prompt)} | {cell(completion)} | {float(sample['task_reward']):.3f} |")
    return "\n".join(rows)


def _print_samples(title: str, samples: Sequence[dict[str, Any]], max_chars: int) -> None:
    print(title)
    for sample in samples:
        print(f"  prompt    : {_tail(sample['prompt'], max_chars)}")
        print(f"  completion: {_head(sample['completion'], max_chars)!r}")
        print(f"  reward    : {float(sample['task_reward']):.3f}")


def _sample_dict(sample: Sample) -> dict[str, Any]:
    return dict(
        prompt_index=sample.prompt_index,
        prompt=sample.prompt,
        completion=sample.completion,
        reference=sample.reference,
        task_reward=sample.reward,
        completion_tokens=sample.completion_tokens,
    )


class TextSampleCallback(BaseCallback):
    """
    Every ``every_n_rollouts`` rollouts, show a few of the prompt/completion/reward triples that the rollout produced:
    printed to stdout, as tensorboard text (``samples/text``) when the logger has the tensorboard format, and
    appended as a markdown table to ``samples.md`` in the logger's folder when it has one.

    :param every_n_rollouts: log the samples of every n-th rollout
    :param n_samples: episodes shown per logged rollout (the first ones that finish in it)
    :param max_chars: longest prompt tail / completion shown
    :param filename: name of the markdown file in the logger's folder; None writes no file
    :param verbose: 0: no printing; 1: print the samples
    """

    def __init__(
        self,
        every_n_rollouts: int = 1,
        n_samples: int = 3,
        max_chars: int = 200,
        filename: str | None = "samples.md",
        verbose: int = 1,
    ):
        super().__init__(verbose=verbose)
        if every_n_rollouts < 1:
            raise ValueError(f"every_n_rollouts must be >= 1, got {every_n_rollouts}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.every_n_rollouts = every_n_rollouts
        self.n_samples = n_samples
        self.max_chars = max_chars
        self.filename = filename
        self.n_rollouts = 0
        self.samples: list[dict[str, Any]] = []  # the current rollout's samples

    def _logging_this_rollout(self) -> bool:
        return (self.n_rollouts + 1) % self.every_n_rollouts == 0

    def _on_rollout_start(self) -> None:
        self.samples = []

    def _on_step(self) -> bool:
        if len(self.samples) >= self.n_samples or not self._logging_this_rollout():
            return True
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            # A text env's last step carries the decoded completion; other envs' infos are ignored.
            if done and "completion" in info and len(self.samples) < self.n_samples:
                self.samples.append({key: info.get(key) for key in ("prompt", "completion", "reference", "task_reward")})
        return True

    def _on_rollout_end(self) -> None:
        logging = self._logging_this_rollout()
        self.n_rollouts += 1
        if not logging or not self.samples:
            return
        title = f"Text samples at {self.num_timesteps} timesteps (rollout {self.n_rollouts}):"
        if self.verbose >= 1:
            _print_samples(title, self.samples, self.max_chars)
        table = samples_markdown(self.samples, self.max_chars)
        self.logger.record("samples/text", table, exclude=TENSORBOARD_ONLY)
        folder = self.logger.get_dir()
        if folder is not None and self.filename is not None:
            with open(os.path.join(folder, self.filename), "a", encoding="utf-8") as file:
                file.write(f"## {title}\n\n{table}\n\n")


def _eval_vec_env(eval_env: VecEnv | str, n_envs: int, env_kwargs: dict[str, Any] | None) -> VecEnv:
    """The eval VecEnv: ``eval_env`` itself, or ``n_envs`` envs of the registered task ``eval_env``."""
    if isinstance(eval_env, str):
        if eval_env not in gym.registry:
            raise ValueError(
                f"eval_env {eval_env!r} is not a registered env id; register the task first "
                "(sb3_textrl.register_text_task) or pass a VecEnv"
            )
        return make_text_vec_env(eval_env, n_envs=n_envs, env_kwargs=env_kwargs)
    if not isinstance(eval_env, VecEnv):
        raise TypeError(
            f"eval_env must be a VecEnv or a task id, got {type(eval_env).__name__}; wrap a single env with "
            "stable_baselines3.common.env_util.make_vec_env or DummyVecEnv([lambda: env])"
        )
    return eval_env


def _eval_prompt_indices(eval_env: VecEnv, prompt_indices: Sequence[int] | None) -> list[int]:
    """The eval env's prompts to complete (all of them for None), checked against the number it has."""
    try:
        n_prompts = len(eval_env.get_attr("prompts", [0])[0])
    except AttributeError as error:
        raise ValueError(
            "TextEvalCallback evaluates on a text task (TextGenerationEnv): make the eval env like the training env, "
            f"e.g. make_vec_env(task_id, env_kwargs=...); this env has no prompts ({error})"
        ) from error
    indices = list(range(n_prompts)) if prompt_indices is None else [int(i) for i in prompt_indices]
    bad = [i for i in indices if not 0 <= i < n_prompts]
    if bad or not indices:
        raise ValueError(
            f"prompt_indices must be a non-empty list of indices in [0, {n_prompts}) (the eval env's prompts); "
            f"got {'none' if not indices else bad[:5]}"
        )
    return indices


class TextEvalCallback(EventCallback):
    """
    Periodic evaluation on held-out prompts, logged under ``eval/``; saves the best model.

    Every ``eval_freq_rollouts`` rollouts (at the rollout's end, before the PPO update, like SB3's rollout metrics
    of the same row; after the last rollout, the evaluation at the end replaces it) and once more when training
    ends, it completes the chosen prompts of a separate eval env and records ``eval/task_reward``,
    ``eval/completion_len``, ``eval/kl_to_ref`` (mean per completion, as ``rollout/kl_to_ref``) and, when every
    prompt has a reference, ``eval/rouge1``, ``eval/rouge2`` and ``eval/rougeL`` (F-measure). The evaluation
    restores the policy's training mode and the global RNGs, so PPO's run continues exactly as without it (the
    policy's KV cache checks the tokens it holds).

    The final evaluation is dumped to the logger right away (with ``time/total_timesteps``), since no later
    ``dump`` would write it. Like SB3's ``EvalCallback``, it exposes ``best_mean_reward``/``last_mean_reward`` (of
    ``metric``) so ``StopTrainingOnRewardThreshold`` and ``StopTrainingOnNoModelImprovement`` work as
    ``callback_on_new_best``/``callback_after_eval``; a stop request ends training at the next step.

    :param eval_env: a VecEnv of the task, or a registered text-task id to build one (``n_eval_envs`` envs)
    :param prompt_indices: which of the eval env's prompts to complete; None: all of them
    :param eval_freq_rollouts: evaluate every n-th rollout
    :param eval_at_end: evaluate once more after the last PPO update
    :param eval_at_start: also evaluate before the first rollout: the starting point of the curve, and the model
        ``best_model_save_path`` keeps if no update beats it
    :param best_model_save_path: folder for ``best_model.zip`` (saved when ``metric`` improves); None saves nothing
    :param log_path: folder for ``evaluations.jsonl`` (metrics and samples of every evaluation); None writes nothing
    :param deterministic: greedy decoding (True) or sampling from the policy
    :param n_sampled: also sample this many completions of each prompt (with ``deterministic``) and record their mean
        task reward as ``eval/sampled_task_reward``: the policy's own expected reward, which PPO's updates move
        before they move the greedy completions. The greedy and sampled completions of a prompt share one prefill.
    :param sampling_seed: seed of those draws at every evaluation (torch's state is restored after), so successive
        evaluations compare the policies on the same random numbers
    :param metric: the ``eval/`` metric that picks the best model (higher is better)
    :param kl_to_ref: also record ``eval/kl_to_ref`` (one teacher-forced forward of the policy and one of the reference
        per evaluation, no generation); skipped for a policy without a reference model
    :param n_eval_envs: number of envs when ``eval_env`` is a task id
    :param eval_env_kwargs: keyword arguments of the task's env when ``eval_env`` is a task id
    :param callback_on_new_best: called when ``metric`` improves
    :param callback_after_eval: called after every evaluation
    :param verbose: 0: silent; 1: print the metrics; 2: also print the samples
    """

    def __init__(
        self,
        eval_env: VecEnv | str,
        prompt_indices: Sequence[int] | None = None,
        eval_freq_rollouts: int = 1,
        eval_at_end: bool = True,
        eval_at_start: bool = False,
        best_model_save_path: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        deterministic: bool = True,
        n_sampled: int = 0,
        sampling_seed: int = 0,
        metric: str = "task_reward",
        kl_to_ref: bool = True,
        n_eval_envs: int = 4,
        eval_env_kwargs: dict[str, Any] | None = None,
        callback_on_new_best: BaseCallback | None = None,
        callback_after_eval: BaseCallback | None = None,
        verbose: int = 1,
    ):
        super().__init__(callback_on_new_best, verbose=verbose)
        if eval_freq_rollouts < 1:
            raise ValueError(f"eval_freq_rollouts must be >= 1, got {eval_freq_rollouts}")
        if n_sampled < 0:
            raise ValueError(f"n_sampled must be >= 0, got {n_sampled}")
        if n_sampled and not deterministic:
            raise ValueError("n_sampled adds sampled completions to greedy ones: use it with deterministic=True")
        known = (keys.TASK_REWARD, *EVAL_ROUGE_METRICS) + ((keys.SAMPLED_TASK_REWARD,) if n_sampled else ())
        if metric.removeprefix(keys.EVAL) not in known:
            raise ValueError(f"metric must be one of {', '.join(known)} (higher is better), got {metric!r}")
        self.eval_env = _eval_vec_env(eval_env, n_eval_envs, eval_env_kwargs)
        self.prompt_indices = _eval_prompt_indices(self.eval_env, prompt_indices)
        self.eval_freq_rollouts = eval_freq_rollouts
        self.eval_at_end = eval_at_end
        self.eval_at_start = eval_at_start
        self.best_model_save_path = None if best_model_save_path is None else Path(best_model_save_path)
        self.log_path = None if log_path is None else Path(log_path)
        self.deterministic = deterministic
        self.n_sampled = n_sampled
        self.sampling_seed = sampling_seed
        self.metric = metric.removeprefix(keys.EVAL)
        self.kl_to_ref = kl_to_ref
        self.callback_after_eval = callback_after_eval
        if callback_after_eval is not None:
            callback_after_eval.parent = self
        self.n_rollouts = 0
        self.best_mean_reward = -np.inf  # best value of `metric` so far (SB3's EvalCallback name)
        self.last_mean_reward = -np.inf  # value of `metric` at the last evaluation
        self.last_metrics: dict[str, float] = {}
        self.last_samples: list[Sample] = []
        self.last_sample_sets: SampleSets | None = None  # with n_sampled: the last evaluation's greedy and sampled
        self._continue_training = True
        self._updates_at_last_eval: int | None = None

    def _init_callback(self) -> None:
        self._check_spaces()
        if self.best_model_save_path is not None:
            self.best_model_save_path.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None:
            self.log_path.mkdir(parents=True, exist_ok=True)
        if self.callback_after_eval is not None:
            self.callback_after_eval.init_callback(self.model)

    def _check_spaces(self) -> None:
        train_space, eval_space = self.model.observation_space, self.eval_env.observation_space
        fix = (
            "Build the eval env like the training env (same tokenizer, max_prompt_tokens and max_new_tokens), e.g. "
            "make_vec_env(task_id, env_kwargs=...) with the training env's env_kwargs."
        )
        if not isinstance(eval_space, gym.spaces.Dict) or "input_ids" not in eval_space.spaces:
            raise ValueError(f"TextEvalCallback needs a text env (TextGenerationEnv) to evaluate on, got {eval_space}. {fix}")
        train_shape = train_space["input_ids"].shape  # type: ignore[index]
        eval_shape = eval_space["input_ids"].shape
        if eval_shape != train_shape:
            assert eval_shape is not None and train_shape is not None  # Box spaces always have a shape
            raise ValueError(
                f"The eval env's observations have width {eval_shape[0]} (max_prompt_tokens + "
                f"max_new_tokens), the training env's {train_shape[0]}. {fix}"
            )
        train_hash = getattr(train_space, "tokenizer_hash", "")
        eval_hash = getattr(eval_space, "tokenizer_hash", "")
        if train_hash and eval_hash and train_hash != eval_hash:
            raise ValueError(
                f"The eval env's tokenizer ({getattr(eval_space, 'tokenizer_name', '?')}) is not the training env's "
                f"({getattr(train_space, 'tokenizer_name', '?')}). {fix}"
            )

    def _on_step(self) -> bool:
        # on_rollout_end cannot stop training; a stop asked for by a child callback takes effect here.
        return self._continue_training

    def _on_training_start(self) -> None:
        if self.eval_at_start and self.n_rollouts == 0:
            self.evaluate()

    def _on_rollout_end(self) -> None:
        self.n_rollouts += 1
        if self.n_rollouts % self.eval_freq_rollouts == 0 and not self._final_evaluation_follows():
            self.evaluate()

    def _final_evaluation_follows(self) -> bool:
        # After the last rollout one more PPO update runs and then _on_training_end evaluates: an evaluation here
        # would score a policy that is about to change, and cost as much as the one that counts.
        total = getattr(self.model, "_total_timesteps", None)
        return self.eval_at_end and total is not None and self.num_timesteps >= total

    def _on_training_end(self) -> None:
        updates = getattr(self.model, "_n_updates", None)
        if not self.eval_at_end or (updates is not None and updates == self._updates_at_last_eval):
            return  # the policy has not changed since the last evaluation
        self.evaluate()
        record_train_metrics = getattr(getattr(self.model, "rollout_buffer", None), "record_train_metrics", None)
        if record_train_metrics is not None:  # TextRolloutBuffer: the last update's train/explained_variance
            record_train_metrics(self.logger)
        # learn() dumps the logs before each update; after the last one nothing would write this evaluation.
        self.logger.record(keys.TOTAL_TIMESTEPS, self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    def evaluate(self) -> dict[str, float]:
        """
        Evaluate the current policy now, record the metrics under ``eval/`` and save the model if it is the best.

        :return: the metrics (without the ``eval/`` prefix)
        """
        policy = self.model.policy
        was_training = policy.training
        sets = None
        with preserved_random_state():
            if self.n_sampled:
                sets = generate_sample_sets(
                    self.model, self.eval_env, self.prompt_indices, self.n_sampled, seed=self.sampling_seed
                )
                samples = sets.greedy
            else:
                samples = generate_samples(self.model, self.eval_env, self.prompt_indices, self.deterministic)
        metrics = self._metrics(samples, sets)
        if self.kl_to_ref and isinstance(policy, TransformerLMPolicy) and has_reference(policy):
            kl = mean_episode_kl(kl_to_reference(policy, samples))  # the statistic of rollout/kl_to_ref
            if kl is not None:
                metrics[keys.KL_TO_REF] = kl
        policy.set_training_mode(was_training)
        self._updates_at_last_eval = getattr(self.model, "_n_updates", None)

        self.last_samples, self.last_metrics, self.last_sample_sets = samples, metrics, sets
        for key, value in metrics.items():
            self.logger.record(keys.EVAL + key, value)
        table = samples_markdown([_sample_dict(s) for s in samples])
        self.logger.record(keys.EVAL + keys.SAMPLES, table, exclude=TENSORBOARD_ONLY)
        if self.verbose >= 1:
            shown = ", ".join(f"{key}={value:.4g}" for key, value in metrics.items())
            print(f"Eval at {self.num_timesteps} timesteps on {len(samples)} prompts: {shown}")
        if self.verbose >= 2:
            _print_samples("Eval samples:", [_sample_dict(s) for s in samples], max_chars=200)
        if self.log_path is not None:
            record = dict(timesteps=self.num_timesteps, metrics=metrics, samples=[_sample_dict(s) for s in samples])
            with open(self.log_path / "evaluations.jsonl", "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")

        self.last_mean_reward = metrics[self.metric]
        if self.last_mean_reward > self.best_mean_reward:
            self.best_mean_reward = self.last_mean_reward
            if self.best_model_save_path is not None:
                save_model(self.model, self.best_model_save_path / "best_model")  # atomic: never half a best model
                if self.verbose >= 1:
                    print(f"New best eval/{self.metric} = {self.best_mean_reward:.4g}: saved {self.best_model_save_path}")
            if self.callback is not None:
                self._continue_training &= self._on_event()
        if self.callback_after_eval is not None:
            self._continue_training &= self.callback_after_eval.on_step()
        return metrics

    def _metrics(self, samples: list[Sample], sets: SampleSets | None) -> dict[str, float]:
        metrics = {
            keys.TASK_REWARD: float(np.mean([s.reward for s in samples])),
            keys.COMPLETION_LEN: keys.mean_completion_length([s.completion_tokens for s in samples]),
        }
        if sets is not None:
            metrics[keys.SAMPLED_TASK_REWARD] = float(np.mean(sets.sampled_rewards()))
        references = [s.reference for s in samples]
        if all(ref is not None for ref in references):
            completions = [s.completion for s in samples]
            prompts = [s.prompt for s in samples]
            for name in EVAL_ROUGE_METRICS:
                metrics[name] = float(np.mean(RougeReward(name).score(prompts, completions, references)))
        if self.metric not in metrics:
            raise ValueError(
                f"TextEvalCallback(metric={self.metric!r}) needs a reference for every eval prompt; this eval env's "
                "prompts have none. Use metric='task_reward' or give the eval task references."
            )
        return metrics
