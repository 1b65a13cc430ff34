"""Your own text task in a few lines: upbeat continuations of review openings, a metric reward, PPO, before/after.

    python examples/custom_task.py            # the embedded SmolLM2-135M-Instruct (a few minutes on 2 CPU cores)
    python examples/custom_task.py --tiny     # a tiny GPT-2 built from a config, seconds (what CI runs)

The task continues the opening of a review ("The hotel room was ..."); the reward is a metric computed on the
completion alone: the share of its words found in a small positive lexicon minus the share found in a negative
one, in [-1, 1]. Two tasks are registered from the same function, one on the training openings and one on
held-out openings, so the before/after evaluation uses prompts PPO never saw. Outputs in --output-dir: the PPO
model, its csv log with samples (``TextSampleCallback``) and ``before_after.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure

from sb3_textrl import TextRolloutBuffer, TransformerLMPolicy, evaluate, make_text_vec_env, register_text_task
from sb3_textrl.callbacks import TextSampleCallback
from sb3_textrl.common.options import parse_dataclass_options
from sb3_textrl.models import save_tiny_gpt2_lm

OPENINGS = [
    "The hotel room was", "Our waiter tonight was", "The new phone feels", "This novel is", "The concert last night was",
    "The pizza we ordered was", "My experience with the airline was", "The museum tour was", "The camping trip turned out",
    "The laptop's battery is", "The coffee at this place is", "The movie's ending was", "The customer service team was",
    "The city park is", "The train journey was", "The yoga class felt", "The hiking trail was", "The bakery's bread is",
    "The online course was", "The dentist appointment was", "The bike repair shop was", "The theme park rides were",
    "The cooking class was", "The guided city walk was",
]
POSITIVE = {
    "good", "great", "excellent", "amazing", "wonderful", "lovely", "fantastic", "perfect", "best", "happy", "enjoyed",
    "friendly", "delicious", "beautiful", "clean", "comfortable", "helpful", "fun", "love", "loved", "nice", "recommend",
    "pleasant", "fresh", "superb", "brilliant", "impressive", "awesome", "glad", "easy",
}
NEGATIVE = {
    "bad", "terrible", "awful", "horrible", "worst", "poor", "rude", "dirty", "boring", "disappointing", "disappointed",
    "slow", "broken", "cold", "noisy", "expensive", "hate", "hated", "sad", "annoying", "uncomfortable", "bland", "never",
    "problem", "problems", "waste", "mess", "late", "unfortunately", "not",
}


def positivity(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
    """Reward: (positive words - negative words) / words of each completion, in [-1, 1]; 0 for no words."""
    scores = []
    for text in completions:
        words = re.findall(r"[a-z']+", text.lower())
        balance = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        scores.append(balance / len(words) if words else 0.0)
    return scores


@dataclass
class Options:
    """Everything the example can be told (``--help`` lists the same)."""

    output_dir: str = "runs/custom_task"
    lm: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    n_held_out: int = 8  # openings kept for the before/after evaluation
    ppo_updates: int = 10
    n_envs: int = 4
    max_new_tokens: int = 16
    n_epochs: int = 4
    learning_rate: float = 3e-4
    kl_coef: float = 0.05
    tiny: bool = False
    seed: int = 0
    device: str = "auto"


def parse_options() -> Options:
    return parse_dataclass_options(Options, __doc__)


def tiny_lm(out: Path) -> str:
    return save_tiny_gpt2_lm(out / "tiny_lm")


def main(options: Options) -> dict[str, Any]:
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if options.tiny:
        options.lm = tiny_lm(out)
    train_openings, held_out = OPENINGS[options.n_held_out :], OPENINGS[: options.n_held_out]

    # The whole task definition: prompts, a reward, the tokenizer (the LM's) and a completion budget. The openings are
    # text to continue, not requests: chat_template=False gives them to the LM as they are, not as chat messages.
    for task_id, openings in (("UpbeatReview-v0", train_openings), ("UpbeatReviewHeldOut-v0", held_out)):
        register_text_task(task_id, prompts=openings, reward=positivity, tokenizer=options.lm,
                           max_new_tokens=options.max_new_tokens, max_prompt_tokens=16, chat_template=False)

    def score(model: PPO | str | None, label: str) -> dict[str, float]:
        # Sampled decoding (the distribution PPO trains), 4 samples of every held-out opening.
        result = evaluate(model, task="UpbeatReviewHeldOut-v0", n=None, decoding="sample", baselines=(),
                          prompt_indices=list(range(len(held_out))) * 4, n_envs=options.n_envs, seed=options.seed,
                          device=options.device, output_dir=out / f"eval_{label}", progress_bar=False)
        (metrics,) = result.metrics.values()
        return {k: metrics[k] for k in ("task_reward", "kl_to_ref", "completion_len", "distinct1")}

    before = score(options.lm, "before")
    env = make_text_vec_env("UpbeatReview-v0", n_envs=options.n_envs, seed=options.seed)
    model = PPO(
        TransformerLMPolicy, env, rollout_buffer_class=TextRolloutBuffer, n_steps=options.max_new_tokens,
        batch_size=options.n_envs * options.max_new_tokens, n_epochs=options.n_epochs,
        learning_rate=options.learning_rate, policy_kwargs=dict(lm=options.lm, kl_coef=options.kl_coef),
        seed=options.seed, device=options.device,
    )
    model.set_logger(configure(str(out / "ppo_logs"), ["stdout", "csv"]))
    model.learn(options.ppo_updates * options.n_envs * options.max_new_tokens,
                callback=TextSampleCallback(every_n_rollouts=max(options.ppo_updates // 2, 1), n_samples=2))
    model.save(out / "ppo_model")
    after = score(model, "after")

    summary = {"options": asdict(options), "held_out_openings": held_out, "before": before, "after": after}
    (out / "before_after.json").write_text(json.dumps(summary, indent=2))
    print(f"\nheld-out positivity (sampled): {before['task_reward']:.3f} before -> {after['task_reward']:.3f} after "
          f"PPO; KL to the reference {after['kl_to_ref']:.2f} nats per completion")
    return summary


if __name__ == "__main__":
    main(parse_options())
