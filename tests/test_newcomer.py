"""The newcomer path (issue #14): what a TRL or SB3 user reaches for first works as they expect."""

import subprocess
import sys


def test_human_reward_is_importable_from_the_package_like_the_learned_reward():
    # It was reachable only as sb3_textrl.rewards.human.HumanReward, while LearnedRewardModel sat at the top.
    code = (
        "import sys, sb3_textrl\n"
        "from sb3_textrl import HumanReward, LearnedRewardModel\n"
        "from sb3_textrl.rewards.human import HumanReward as Original\n"
        "assert HumanReward is Original and 'HumanReward' in sb3_textrl.__all__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
