"""The news-summary demo: the embedded SmolLM2 summarises generated news articles before and after a few PPO updates."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import time
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.buffers import TextRolloutBuffer
from sb3_textrl.callbacks import TextEvalCallback, TextSampleCallback
from sb3_textrl.checkpoints import TextCheckpointCallback, save_model
from sb3_textrl.common.atomic import atomic_file
from sb3_textrl.demo_config import DemoConfig
from sb3_textrl.envs.batched import make_text_vec_env
from sb3_textrl.envs.groups import make_group_vec_env
from sb3_textrl.evaluation import Sample, SampleSets, generate_sample_sets
from sb3_textrl.metrics.bootstrap import PairedDifference, format_interval, mean_interval, paired_bootstrap
from sb3_textrl.plotting import plot_runs
from sb3_textrl.policies import TransformerLMPolicy, fast_mixed_precision
from sb3_textrl.rewards.base import reward_name


def _print_samples(title: str, samples: list[Sample]) -> None:
    print(f"\n=== {title} ===")
    for sample in samples:
        article = sample.prompt.split("\n\n", 1)[-1]
        print(f"- article {sample.prompt_index}: {textwrap.shorten(article, 150)}")
        print(f"  summary  : {sample.completion.strip()!r}")
        print(f"  reference: {textwrap.shorten(sample.reference or '', 150)}")
        print(f"  reward: {sample.reward:.3f}")


def demo_envs(config: DemoConfig) -> tuple[VecEnv, VecEnv, list[int]]:
    """
    The demo's grouped training envs, its eval env and the held-out prompt indices of the eval env.

    :param config: demo settings
    """
    env_kwargs: dict[str, Any] = dict(
        tokenizer=config.lm if config.tokenizer is None else config.tokenizer,
        max_new_tokens=config.n_steps,
        max_prompt_tokens=config.max_prompt_tokens,
    )
    clashes = sorted(set(config.env_kwargs) & (set(env_kwargs) | {"dataset", "reward"}))
    if clashes:
        raise ValueError(
            f"env_kwargs {clashes}: the demo sets these from its own settings (tokenizer, n_steps = max_new_tokens, "
            "max_prompt_tokens, dataset, reward_model); set those instead"
        )
    env_kwargs |= config.env_kwargs
    if config.dataset is not None:
        env_kwargs["dataset"] = config.dataset
    if config.reward_model is not None:
        from sb3_textrl.rewards.learned import LearnedRewardModel

        env_kwargs["reward"] = LearnedRewardModel(config.reward_model, device=config.device)
    # k envs per article: each summary's advantage is its reward minus the mean of its siblings' (RLOO), so the
    # update learns what makes a summary better, not which articles are easy.
    env = make_group_vec_env(
        "NewsSummary-v0",
        n_envs=config.n_envs,
        samples_per_prompt=config.samples_per_prompt,
        seed=config.seed,
        env_kwargs=env_kwargs,
    )
    # Held-out articles: the built-in generator with another seed (or the dataset's last rows).
    eval_kwargs = env_kwargs | ({"data_seed": config.eval_data_seed} if config.dataset is None else {})
    # Up to 32 articles decoded per batch (the fast path's batch); the summaries depend on it only by float rounding.
    eval_env = make_text_vec_env("NewsSummary-v0", n_envs=min(config.n_eval, 32), seed=config.seed + 1, env_kwargs=eval_kwargs)
    n_eval_prompts = len(eval_env.get_attr("prompts", [0])[0])
    if n_eval_prompts < config.n_eval:
        raise ValueError(f"the eval data has {n_eval_prompts} articles, fewer than n_eval={config.n_eval}; lower n_eval")
    return env, eval_env, list(range(n_eval_prompts - config.n_eval, n_eval_prompts))


def demo_model(config: DemoConfig, env: VecEnv) -> PPO:
    """
    Stock SB3 PPO with the LM policy, RLOO advantages and no critic: the demo's model.

    :param config: demo settings (``policy_kwargs`` and ``ppo_kwargs`` override the demo's own choices)
    :param env: the training VecEnv (:func:`demo_envs`)
    """
    precision = fast_mixed_precision(config.device) if config.mixed_precision == "auto" else config.mixed_precision
    policy_kwargs: dict[str, Any] = dict(
        lm=config.lm,
        kl_coef=config.kl_coef,
        critic=False,
        trainable_layers=config.trainable_layers,
        mixed_precision=precision,
        temperature=config.temperature,
    )
    ppo_kwargs: dict[str, Any] = dict(
        rollout_buffer_class=TextRolloutBuffer,
        rollout_buffer_kwargs=dict(advantage="rloo"),
        n_steps=config.n_steps,
        batch_size=config.n_steps * config.n_envs // 2,
        n_epochs=config.n_epochs,
        learning_rate=config.learning_rate,
        normalize_advantage=config.normalize_advantage,
        gamma=1.0,  # the reward comes at the end of the summary; do not discount it
        seed=config.seed,
        device=config.device,
        verbose=1,
    )
    if "policy_kwargs" in config.ppo_kwargs:
        raise ValueError("ppo_kwargs['policy_kwargs']: give the policy's arguments as DemoConfig.policy_kwargs instead")
    ppo_kwargs |= config.ppo_kwargs
    return PPO(TransformerLMPolicy, env, policy_kwargs=policy_kwargs | config.policy_kwargs, **ppo_kwargs)


def _summary(
    config: DemoConfig, before: list[Sample], after: list[Sample], gain: PairedDifference, train_seconds: float, env: VecEnv
) -> dict[str, Any]:
    """Mean rewards before and after with bootstrap intervals, and their paired difference ``gain``."""
    rewards_before, rewards_after = [s.reward for s in before], [s.reward for s in after]
    return {
        "reward_before": gain.mean_a,
        "reward_after": gain.mean_b,
        "reward_before_ci": mean_interval(rewards_before, seed=config.seed)[1:],
        "reward_after_ci": mean_interval(rewards_after, seed=config.seed)[1:],
        "gain": gain.to_dict(),
        "n_eval": len(before),
        "train_seconds": train_seconds,
        "reward": reward_name(env.get_attr("reward_fn", [0])[0]),
    }


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """
    Train the embedded LM with PPO on NewsSummary-v0 for a few updates and show summaries before and after.

    Writes the model (``model.zip``), checkpoints and SB3's csv/stdout logs under ``config.output_dir``.

    :param config: demo settings
    :return: mean reward of the held-out samples before and after, the training time and the reward's name
    """
    config = config or DemoConfig()
    if config.n_samples > config.n_eval:
        raise ValueError(f"n_samples={config.n_samples} shows more articles than n_eval={config.n_eval} evaluates; lower it")
    out = Path(config.output_dir)
    env, eval_env, held_out = demo_envs(config)
    model = demo_model(config, env)
    model.set_logger(configure(str(out / "logs"), ["stdout", "csv"]))

    # Greedy and sampled summaries of the held-out articles, each article prefilled once; the draws are seeded alike
    # before and after (and torch's random state restored), so training does not depend on them.
    before_sets = generate_sample_sets(model, eval_env, held_out, config.n_sampled_eval, seed=config.seed)
    before = before_sets.greedy
    _print_samples("Before PPO (greedy)", before[: config.n_samples])
    start = time.perf_counter()
    # Samples of every rollout in the log (and logs/samples.md); greedy ROUGE and the sampled mean reward on the
    # held-out articles under eval/.
    evaluation = TextEvalCallback(
        eval_env, prompt_indices=held_out, eval_freq_rollouts=config.eval_every, log_path=out / "logs",
        n_sampled=config.n_sampled_eval, sampling_seed=config.seed, verbose=1,
    )
    callbacks = CallbackList(
        [
            TextSampleCallback(every_n_rollouts=1, n_samples=2),
            evaluation,
            TextCheckpointCallback(save_freq=config.n_steps * 2, save_path=str(out / "checkpoints"), name_prefix="ppo"),
        ]
    )
    model.learn(total_timesteps=config.updates * config.n_steps * config.n_envs, callback=callbacks, progress_bar=True)
    train_seconds = time.perf_counter() - start
    # The callback's last evaluation ran after the final update, on the same articles: those are the "after" samples.
    after = evaluation.last_samples
    after_sets = evaluation.last_sample_sets or SampleSets(after, [])
    _print_samples(f"After {config.updates} PPO updates (greedy)", after[: config.n_samples])
    save_model(model, out / "model")
    sampled_before, sampled_after = before_sets.sampled_rewards(), after_sets.sampled_rewards()

    gain = paired_bootstrap([s.reward for s in before], [s.reward for s in after], seed=config.seed)
    result = _summary(config, before, after, gain, train_seconds, env)
    greedy_line = (
        f"greedy: {format_interval(result['reward_before'], *result['reward_before_ci'])} before, "
        f"{format_interval(result['reward_after'], *result['reward_after_ci'])} after; paired difference {gain}."
    )
    if config.n_sampled_eval:
        # The policy's own mean reward (sampled at config.temperature, the distribution PPO trains): what its updates
        # move first; greedy summaries change later and less (docs/results.md, the demo).
        sampled_gain = paired_bootstrap(sampled_before, sampled_after, seed=config.seed)
        result["sampled"] = {
            "n_per_article": config.n_sampled_eval,
            "temperature": config.temperature,
            "reward_before_ci": mean_interval(sampled_before, seed=config.seed)[1:],
            "reward_after_ci": mean_interval(sampled_after, seed=config.seed)[1:],
            "gain": sampled_gain.to_dict(),
        }
        headline, headline_gain, measure = (
            f"Mean reward of the policy on {len(held_out)} held-out articles (sampled at temperature "
            f"{config.temperature}, {config.n_sampled_eval} summaries per article; 95 % bootstrap intervals): "
            f"{format_interval(sampled_gain.mean_a, *result['sampled']['reward_before_ci'])} before, "
            f"{format_interval(sampled_gain.mean_b, *result['sampled']['reward_after_ci'])} after {config.updates} "
            f"updates; paired difference {sampled_gain}. The same articles {greedy_line}"
        ), sampled_gain, "sampled"
    else:
        headline, headline_gain, measure = (
            f"Mean reward on {len(held_out)} held-out articles (95 % bootstrap intervals), {greedy_line}", gain, "greedy"
        )
    if headline_gain.low > 0:
        verdict = f"The {measure} gain's interval excludes 0: the policy improved on articles it never saw."
    elif headline_gain.high < 0:
        verdict = f"The {measure} gain's interval lies below 0: the policy got worse (docs/results.md: the demo's settings)."
    else:
        verdict = f"The {measure} gain's interval includes 0: no significant change on these articles."
    result["settings"] = dataclasses.asdict(config)
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    plots = plot_runs([out / "logs"], out / "plots")
    print(
        f"\n{headline} ({train_seconds:.0f} s of training and evaluation). {verdict}\n"
        f"Model saved to {out / 'model.zip'}; numbers in {out / 'summary.json'}; logs in {out / 'logs'}, "
        f"{len(plots)} plots of them in {out / 'plots'}."
    )
    return result
