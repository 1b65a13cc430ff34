"""The newcomer path (issue #14): what a TRL or SB3 user reaches for first works as they expect."""

import subprocess
import sys

import pytest
from helpers import toy_ppo, toy_vec_env


def test_human_reward_is_importable_from_the_package_like_the_learned_reward():
    # It was reachable only as sb3_textrl.rewards.human.HumanReward, while LearnedRewardModel sat at the top.
    code = (
        "import sys, sb3_textrl\n"
        "from sb3_textrl import HumanReward, LearnedRewardModel\n"
        "from sb3_textrl.rewards.human import HumanReward as Original\n"
        "assert HumanReward is Original and 'HumanReward' in sb3_textrl.__all__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_large_held_out_split_has_a_narrow_interval_and_no_warning():
    from sb3_textrl.metrics.bootstrap import proportion_interval

    low, high = proportion_interval(98, 100)  # Wilson's interval, as published tables give it
    assert (round(low, 3), round(high, 3)) == (0.930, 0.994)
    assert proportion_interval(0, 1) == pytest.approx((0.0, 0.7935), abs=1e-4)
    with pytest.raises(ValueError, match="successes <= n"):
        proportion_interval(3, 2)


def test_lora_config_takes_a_peft_lora_config_object_as_trl_users_pass_it(ragged_task, tiny_lm, tmp_path):
    # Before: PPO(..., policy_kwargs=dict(lora_config=LoraConfig(...))) raised TypeError (dict(LoraConfig)).
    from peft import LoraConfig
    from stable_baselines3 import PPO

    config = LoraConfig(r=8, lora_alpha=4, target_modules=["c_attn"])  # r=8 is peft's default: still honoured
    model = toy_ppo(ragged_task, tiny_lm, batch_size=10, policy_kwargs=dict(lora_config=config))
    lora_a = {name: p for name, p in model.policy.named_parameters() if "lora_A" in name}
    assert lora_a and all("c_attn" in name and p.shape[0] == 8 for name, p in lora_a.items())
    assert model.policy.lora_config == {"r": 8, "lora_alpha": 4, "lora_dropout": 0.0, "bias": "none",
                                        "target_modules": ["c_attn"]}
    model.learn(10 * 3)
    model.save(tmp_path / "model")
    loaded = PPO.load(tmp_path / "model", env=toy_vec_env(ragged_task), device="cpu")  # the saved config is a plain dict
    assert loaded.policy.lora_config == model.policy.lora_config

    with pytest.raises(ValueError, match="inference_mode=True"):
        toy_ppo(ragged_task, tiny_lm, policy_kwargs=dict(lora_config=LoraConfig(inference_mode=True)))
    with pytest.raises(TypeError, match="dict of peft.LoraConfig arguments or a peft.LoraConfig, got str"):
        toy_ppo(ragged_task, tiny_lm, policy_kwargs=dict(lora_config="r=8"))
