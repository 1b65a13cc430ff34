"""The newcomer path (issue #14): what a TRL or SB3 user reaches for first works as they expect."""

import subprocess
import sys

import pytest


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
