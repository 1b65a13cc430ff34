"""sb3-contrib's MaskablePPO with MaskableTransformerLMPolicy and MaskableTextRolloutBuffer on masked text envs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch as th
from helpers import register_toy_task, toy_vec_env
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl import (
    MaskableTextRolloutBuffer,
    MaskableTransformerLMPolicy,
    TextRolloutBuffer,
    TransformerLMPolicy,
    register_text_task,
)
from sb3_textrl.common.segments import flat_steps
from sb3_textrl.envs.news_data import generate_news_examples
from sb3_textrl.models import tiny_gpt2, train_small_tokenizer

EOS = 50256  # GPT-2's <|endoftext|>, the toy tasks' stop token
MAX_PROMPT = 16  # register_toy_task's max_prompt_tokens


def position_mask(prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
    """Token i is allowed at position t when i % 3 == t % 3 (and EOS always): a mask that changes every step."""
    mask = np.zeros(50257, dtype=bool)
    mask[len(generated_ids) % 3 :: 3] = True
    mask[EOS] = True
    return mask


def maskable_ppo(env: VecEnv | str, lm: str, grouped: bool = True, seed: int = 0, **kwargs) -> MaskablePPO:
    policy_kwargs = dict(lm=lm) | kwargs.pop("policy_kwargs", {})
    buffer_class = MaskableTextRolloutBuffer if grouped else MaskableDictRolloutBuffer  # explicit: see test_default_buffer
    defaults = dict(n_steps=10, batch_size=16, n_epochs=1, seed=seed, device="cpu", rollout_buffer_class=buffer_class)
    return MaskablePPO(MaskableTransformerLMPolicy, env, policy_kwargs=policy_kwargs, **(defaults | kwargs))


def collect_one_rollout(model: MaskablePPO) -> None:
    """Fill the rollout buffer once without training (MaskablePPO.learn would update the policy after it)."""
    _, callback = model._setup_learn(model.n_steps * model.n_envs, callback=None)
    callback.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)


@pytest.fixture
def position_task(tiny_lm):
    return register_toy_task("MaskPosition-v0", tiny_lm, max_new_tokens=6, action_mask=position_mask)


@pytest.fixture
def article_task(tiny_lm):
    return register_toy_task("MaskArticle-v0", tiny_lm, max_new_tokens=6, action_mask="article")


class MaskAudit(BaseCallback):
    """Checks every rollout step: the sampled token is in the env's mask, and obeys the position rule it encodes."""

    def __init__(self):
        super().__init__()
        self.steps = self.episodes = self.masked_out = 0

    def _on_step(self) -> bool:
        actions, masks = self.locals["actions"].reshape(-1), self.locals["action_masks"]
        n_generated = self.locals["obs_tensor"]["attention_mask"][:, MAX_PROMPT:].sum(dim=1).numpy()
        assert masks[np.arange(len(actions)), actions].all()
        assert ((actions % 3 == n_generated % 3) | (actions == EOS)).all(), (actions, n_generated)
        self.steps += len(actions)
        for info in self.locals["infos"]:
            if "masked_out_tokens" in info:
                self.episodes += 1
                self.masked_out += info["masked_out_tokens"]
        return True


def test_every_generated_token_lies_in_the_mask(position_task, tiny_lm):
    model = maskable_ppo(toy_vec_env(position_task, n_envs=4), tiny_lm, n_steps=30, batch_size=60)
    audit = MaskAudit()
    model.learn(240, callback=audit)  # two rollouts, with an update between them
    assert audit.steps == 240 and audit.episodes >= 30
    assert audit.masked_out == 0


def test_predict_with_masks_stays_in_the_article_mask_and_plain_ppo_does_not(article_task, tiny_lm):
    def masked_out_tokens(model, masked: bool, n_episodes: int = 12) -> tuple[int, int]:
        env = toy_vec_env(article_task, n_envs=4, seed=1)
        obs, total, episodes = env.reset(), 0, 0
        while episodes < n_episodes:
            kwargs = dict(action_masks=get_action_masks(env)) if masked else {}
            actions, _ = model.predict(obs, deterministic=False, **kwargs)
            obs, _, dones, infos = env.step(actions)
            for done, info in zip(dones, infos):
                if done:
                    episodes += 1
                    total += info["masked_out_tokens"]
        return total, episodes

    masked = maskable_ppo(toy_vec_env(article_task, n_envs=2), tiny_lm)
    assert masked_out_tokens(masked, masked=True)[0] == 0
    # The same env without the policy's masking: a random tiny LM leaves the article's few hundred tokens at once.
    plain = PPO(TransformerLMPolicy, toy_vec_env(article_task, n_envs=2), policy_kwargs=dict(lm=tiny_lm), device="cpu")
    assert masked_out_tokens(plain, masked=False)[0] > 20


def test_masked_log_probs_equal_in_rollout_and_training(position_task, tiny_lm):
    model = maskable_ppo(toy_vec_env(position_task, n_envs=3), tiny_lm, n_steps=12, policy_kwargs=dict(temperature=0.7))
    collect_one_rollout(model)
    policy, checked = model.policy, 0
    for batch in model.rollout_buffer.get(16):
        assert batch.action_masks.shape == (len(batch.actions), 50257) and batch.action_masks.dtype == th.bool
        with th.no_grad():
            _, log_prob, entropy = policy.evaluate_actions(batch.observations, batch.actions, action_masks=batch.action_masks)
            _, unmasked_log_prob, unmasked_entropy = policy.evaluate_actions(batch.observations, batch.actions)
        th.testing.assert_close(log_prob, batch.old_log_prob, atol=1e-5, rtol=0)
        # The masks matter: without them the same actions are ~ln 3 less likely and the entropy is higher.
        assert (batch.old_log_prob - unmasked_log_prob).min() > 0.5
        assert (unmasked_entropy > entropy + 0.5).all()
        checked += len(batch.actions)
    assert checked == 36


def test_untuned_policy_has_zero_kl_to_the_masked_reference(position_task, tiny_lm):
    model = maskable_ppo(toy_vec_env(position_task, n_envs=3), tiny_lm, n_steps=12)
    collect_one_rollout(model)
    buffer = model.rollout_buffer
    # LoRA starts as the identity: the masked policy is the masked reference (up to the KV cache's float32 residue).
    np.testing.assert_allclose(buffer.ref_log_probs, buffer.log_probs, atol=1e-5, rtol=0)
    assert abs(buffer.metrics["kl_to_ref"]) < 1e-4
    # Against the unmasked reference the "KL" would be the log of the mass the mask removes (~ln 3 per token).
    segments = list(range(len(buffer.segments)))
    chunk = [buffer.segments[i] for i in segments]
    actions = th.as_tensor(flat_steps(buffer.actions, chunk))
    unmasked = model.policy.reference_log_probs(buffer.segment_batch(chunk), actions).numpy()
    assert (flat_steps(buffer.log_probs, chunk) - unmasked).mean() > 0.5


class TeeBuffer(MaskableTextRolloutBuffer):
    """Also keeps every step's full observation and mask as MaskablePPO handed them over (for the exactness check)."""

    def reset(self) -> None:
        super().reset()
        self.steps: list[tuple[dict[str, np.ndarray], np.ndarray]] = []

    def add(self, obs, *args, action_masks=None, **kwargs) -> None:
        self.steps.append(({k: v.copy() for k, v in obs.items()}, np.asarray(action_masks).copy()))
        super().add(obs, *args, action_masks=action_masks, **kwargs)


def test_grouped_buffer_is_exact_with_masks(position_task, tiny_lm):
    model = maskable_ppo(toy_vec_env(position_task, n_envs=3), tiny_lm, n_steps=14, rollout_buffer_class=TeeBuffer)
    model.learn(42)  # a rollout and an update: the policy is no longer the reference
    collect_one_rollout(model)
    buffer, policy = model.rollout_buffer, model.policy
    n_steps, n_envs = buffer.buffer_size, buffer.n_envs
    grouped = {name: np.zeros((n_steps, n_envs), dtype=np.float32) for name in ("value", "log_prob", "entropy")}
    with th.no_grad():
        for chunk in buffer._pack(list(range(len(buffer.segments))), 16):
            batch = buffer._get_samples(chunk)
            value, log_prob, entropy = policy.evaluate_actions(batch.observations, batch.actions, batch.action_masks)
            for name, result in zip(grouped, (value.flatten(), log_prob, entropy)):
                buffer._scatter(grouped[name], chunk, result.numpy())
        # Reference: one forward per step on the observations and masks MaskablePPO handed to add().
        obs = {k: th.as_tensor(np.concatenate([o[k] for o, _ in buffer.steps])) for k in ("input_ids", "attention_mask")}
        masks = th.as_tensor(np.concatenate([m for _, m in buffer.steps]))
        actions = th.as_tensor(buffer.actions.reshape(-1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the per-step path warns that it is slow
            per_step = policy.evaluate_actions(obs, actions, action_masks=masks)
    for name, result in zip(grouped, per_step):
        np.testing.assert_allclose(grouped[name], result.numpy().reshape(n_steps, n_envs), atol=2e-5, err_msg=name)
    np.testing.assert_allclose(grouped["log_prob"], buffer.log_probs, atol=2e-5)  # and equal to the rollout's
    assert buffer.size_in_bytes()["packed_masks"] == n_steps * n_envs * (50257 + 7) // 8


def test_save_load_with_make_vec_env_and_callbacks(article_task, tiny_lm, tmp_path):
    model = maskable_ppo(toy_vec_env(article_task, n_envs=2), tiny_lm, policy_kwargs=dict(top_k=50, kl_coef=0.1))
    model.learn(40, callback=CheckpointCallback(save_freq=10, save_path=str(tmp_path / "ckpt")))
    assert len(list((tmp_path / "ckpt").glob("*.zip"))) == 2
    model.save(tmp_path / "masked")
    loaded = MaskablePPO.load(tmp_path / "masked", env=toy_vec_env(article_task, n_envs=2), device="cpu")
    assert type(loaded.policy) is MaskableTransformerLMPolicy
    assert loaded.policy.top_k == 50 and loaded.policy.kl_coef == 0.1 and loaded.policy.lm_name == tiny_lm
    original, restored = model.policy.state_dict(), loaded.policy.state_dict()
    assert all(th.equal(original[k], restored[k]) for k in original)
    env = toy_vec_env(article_task, n_envs=2, seed=5)
    obs, masks = env.reset(), get_action_masks(env)
    first, _ = model.predict(obs, action_masks=masks, deterministic=True)
    second, _ = loaded.predict(obs, action_masks=masks, deterministic=True)
    np.testing.assert_array_equal(first, second)
    assert masks[np.arange(2), first].all()
    loaded.learn(20)  # and it trains on


def test_policy_and_buffer_errors(position_task, tiny_lm):
    with pytest.raises(ValueError, match="MaskableActorCriticPolicy"):
        MaskablePPO(TransformerLMPolicy, toy_vec_env(position_task, n_envs=1), policy_kwargs=dict(lm=tiny_lm), device="cpu")
    model = maskable_ppo(toy_vec_env(position_task, n_envs=2), tiny_lm)
    obs = model.env.reset()
    with pytest.raises(ValueError, match=r"action_masks has shape \(2, 10\), expected \(2, 50257\)"):
        model.predict(obs, action_masks=np.ones((2, 10), dtype=bool))
    with pytest.raises(ValueError, match="allows no token"):
        model.predict(obs, action_masks=np.zeros((2, 50257), dtype=bool))
    # TextRolloutBuffer (no masks) is refused by MaskablePPO's rollout loop.
    plain_buffer = maskable_ppo(toy_vec_env(position_task, n_envs=1), tiny_lm, rollout_buffer_class=TextRolloutBuffer)
    with pytest.raises(AssertionError, match="doesn't support action masking"):
        plain_buffer.learn(10)


def test_per_step_maskable_buffer_works_and_warns(position_task, tiny_lm):
    # sb3-contrib's MaskableDictRolloutBuffer passed explicitly: warned about when MaskablePPO is built.
    with pytest.warns(UserWarning, match="MaskableTextRolloutBuffer"):
        model = maskable_ppo(toy_vec_env(position_task, n_envs=2), tiny_lm, grouped=False, n_steps=6, batch_size=6)
    assert type(model.rollout_buffer) is MaskableDictRolloutBuffer
    model.learn(12, callback=MaskAudit())


def the_count(prompts, completions, references) -> list[float]:
    """Share of the 4 completion words that are 'the'."""
    return [min(text.lower().split().count("the"), 4) / 4 for text in completions]


def test_mask_that_makes_the_reward_easy_to_reach_learns_faster(tmp_path):
    """Seeded: the same MaskablePPO, with and without a mask that keeps only the prompt's own tokens."""
    tokenizer = train_small_tokenizer([r["article"] for r in generate_news_examples(200)], vocab_size=400)
    lm = tmp_path / "lm"
    tiny_gpt2(len(tokenizer), eos_token_id=0).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    vocab = len(tokenizer)

    def prompt_tokens(prompt_ids: np.ndarray, generated_ids: np.ndarray) -> np.ndarray:
        mask = np.zeros(vocab, dtype=bool)
        mask[prompt_ids] = True
        return mask

    prompts = ["the mayor said the city and the council", "the police said the man and the woman"]
    results = {}
    for name, action_mask in (("masked", prompt_tokens), ("unmasked", None)):
        task = f"TheCount{name.title()}-v0"
        register_text_task(task, prompts=prompts, reward=the_count, tokenizer=str(lm), max_new_tokens=4,
                           max_prompt_tokens=16, action_mask=action_mask)
        model = maskable_ppo(toy_vec_env(task, n_envs=16, seed=0), str(lm), n_steps=8, batch_size=64, n_epochs=4,
                             learning_rate=1e-3, gamma=1.0, ent_coef=0.0, policy_kwargs=dict(use_lora=False, kl_coef=0.0))
        eval_env = toy_vec_env(task, n_envs=8, seed=100)

        def mean_sampled_reward(model=model, eval_env=eval_env) -> float:
            obs, rewards = eval_env.reset(), []
            while len(rewards) < 48:
                actions, _ = model.predict(obs, action_masks=get_action_masks(eval_env))
                obs, reward, dones, _ = eval_env.step(actions)
                rewards.extend(reward[dones])
            return float(np.mean(rewards))

        before = mean_sampled_reward()
        model.learn(16 * 8 * 12)
        results[name] = (before, mean_sampled_reward())
    (masked_before, masked_after), (unmasked_before, unmasked_after) = results["masked"], results["unmasked"]
    # Seeded run: masked 0.04 -> 0.97, unmasked 0.005 -> 0.01 (one token in ~400 is " the" without the mask).
    assert unmasked_before < 0.05 and masked_before < 0.2, results  # neither starts near the goal
    assert masked_after > masked_before + 0.5, results  # PPO climbs the reward under the mask
    assert masked_after > unmasked_after + 0.5, results  # and far faster than without it



def test_generate_samples_decodes_a_maskable_model_under_the_env_masks(position_task, tiny_lm):
    from sb3_textrl.evaluation import generate_samples

    def out_of_mask(samples) -> int:
        count = 0
        for sample in samples:
            ids, mask = sample.observation["input_ids"], sample.observation["attention_mask"]
            generated = ids[MAX_PROMPT:][mask[MAX_PROMPT:] == 1]
            count += sum(int(not position_mask(None, generated[:t])[token]) for t, token in enumerate(generated))
        return count

    model = maskable_ppo(toy_vec_env(position_task, n_envs=2), tiny_lm)
    samples = generate_samples(model, toy_vec_env(position_task, n_envs=2, seed=3), list(range(5)) * 2, deterministic=False)
    assert len(samples) == 10 and sum(s.completion_tokens for s in samples) >= 10
    assert out_of_mask(samples) == 0
    # Control: the same LM under plain PPO (no masks) samples outside the position mask.
    plain = PPO(TransformerLMPolicy, toy_vec_env(position_task, n_envs=2), policy_kwargs=dict(lm=tiny_lm), device="cpu")
    assert out_of_mask(generate_samples(plain, toy_vec_env(position_task, n_envs=2, seed=3), list(range(5)) * 2, False)) > 3
