"""The settings of the news-summary demo (:mod:`sb3_textrl.demo`), in a module without torch: ``sb3-textrl demo
--help`` shows their defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DemoConfig:
    """Settings of the demo (the defaults run in a few minutes on 2 CPU cores)."""

    lm: str | None = None  # LM name or path; None: the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None  # the env's tokenizer; None: the LM's
    dataset: str | None = None  # JSONL/CSV of article/summary pairs; None: the built-in generated news
    reward_model: str | None = None  # a directory written by `sb3-textrl train-rm`: PPO on the learned reward
    n_envs: int = 16  # parallel episodes per rollout (16 = 4 articles x k=4; chosen on validation articles)
    samples_per_prompt: int = 4  # k summaries of each article per rollout, each judged against the others (RLOO)
    n_steps: int = 32  # tokens per env per rollout (= max_new_tokens: one summary per env per rollout)
    updates: int = 20  # PPO iterations (rollout + training); the validation gain came within 20 (docs/results.md, demo)
    n_epochs: int = 2  # passes over each rollout
    learning_rate: float = 3e-3  # LoRA in the top 4 blocks; chosen on validation articles
    normalize_advantage: bool = False  # PPO's per-minibatch advantage scaling off: groups weigh by their reward spread
    kl_coef: float = 0.05  # β of the KL penalty to the untuned model
    temperature: float = 0.7  # of the rollouts' sampling (and of the log-probs PPO trains, and of the sampled evaluation)
    trainable_layers: int | None = 4  # LoRA in the top 4 blocks only, trained from the rollout's cached activations
    max_prompt_tokens: int = 320
    n_eval: int = 64  # held-out articles scored before and after, with bootstrap intervals (64: see n_sampled_eval)
    # Sampled summaries per held-out article scored before and after: the policy's own mean reward, the headline (0:
    # greedy only). 64 articles x 2 gave the intervals that can see the ~+0.025 gains of the validation runs.
    n_sampled_eval: int = 2
    n_samples: int = 4  # of those, shown before and after
    eval_data_seed: int = 1000  # seed of the held-out generated articles (training uses data_seed 0)
    eval_every: int = 20  # rollouts between evaluations on the held-out articles (and one after the last update)
    mixed_precision: str = "auto"  # "bf16", "no", or "auto": bf16 where the CPU/GPU computes it fast
    output_dir: str = "runs/news_demo"
    seed: int = 0
    device: str = "auto"
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # further NewsSummary-v0 arguments (e.g. system_prompt)
    policy_kwargs: dict[str, Any] = field(default_factory=dict)  # TransformerLMPolicy arguments over the demo's
    ppo_kwargs: dict[str, Any] = field(default_factory=dict)  # PPO arguments over the demo's (e.g. normalize_advantage)
