"""Small builders shared by the tests."""

from __future__ import annotations

from collections.abc import Sequence

from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl import TextReward, TextRolloutBuffer, TransformerLMPolicy, register_text_task

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a small village,",
    "Breaking news: the city council",
    "My favourite recipe starts with",
    "In the year 2050 people will",
]


def shout(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
    """Share of upper-case letters in each completion (0 for a completion without letters)."""
    scores = []
    for text in completions:
        letters = [c for c in text if c.isalpha()]
        scores.append(sum(c.isupper() for c in letters) / len(letters) if letters else 0.0)
    return scores


def register_toy_task(task_id: str, tokenizer: str, max_new_tokens: int = 6, **kwargs) -> str:
    register_text_task(task_id, prompts=PROMPTS, reward=shout, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                       max_prompt_tokens=16, **kwargs)
    return task_id


def ragged_stop_ids(fraction: int = 8) -> list[int]:
    """Every ``fraction``-th token id stops a completion, so envs end their episodes at different steps."""
    return list(range(0, 50257, fraction))


def toy_vec_env(task_id: str, n_envs: int = 3, seed: int = 0, **env_kwargs) -> VecEnv:
    return make_vec_env(task_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)


def toy_ppo(env: VecEnv | str, lm: str, grouped: bool = True, seed: int = 0, **kwargs) -> PPO:
    """A small PPO of TransformerLMPolicy: ``grouped`` (TextRolloutBuffer) or SB3's per-step DictRolloutBuffer."""
    policy_kwargs = dict(lm=lm) | kwargs.pop("policy_kwargs", {})
    # Passed explicitly either way: PPO(TransformerLMPolicy, env) alone also gets TextRolloutBuffer (test_default_buffer).
    buffer_class = TextRolloutBuffer if grouped else DictRolloutBuffer
    defaults = dict(n_steps=10, batch_size=16, n_epochs=1, seed=seed, device="cpu", rollout_buffer_class=buffer_class)
    return PPO(TransformerLMPolicy, env, policy_kwargs=policy_kwargs, **(defaults | kwargs))


class CountingReward(TextReward):
    """:func:`shout`, recording the completions of every call (one list per call), to count and inspect the calls."""

    name = "shout"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def score(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[float]:
        self.calls.append(list(completions))
        return shout(prompts, completions, references)


def greedy_episode(model, env, obs) -> list[int]:
    """The tokens ``model`` picks greedily in ``env`` from ``obs`` until the episode ends (one env, not a VecEnv)."""
    tokens, done = [], False
    while not done:
        action = int(model.predict(obs, deterministic=True)[0])
        tokens.append(action)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    return tokens


def outputs_and_grads(policy, obs, actions):
    """evaluate_actions and the gradients of (log-probs + values + entropy) summed, the gradients then cleared."""
    policy.optimizer.zero_grad()
    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    (log_prob.sum() + values.sum() + entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad and p.grad is not None}
    policy.optimizer.zero_grad()
    return values.detach(), log_prob.detach(), entropy.detach(), grads
