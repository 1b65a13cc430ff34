"""The metric names have one home, and completion length one definition."""

import pytest

from sb3_textrl import plotting
from sb3_textrl.common import metric_keys as keys


def test_mean_completion_length_counts_generated_tokens_and_refuses_no_completion():
    assert keys.mean_completion_length([3, 4, 8]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least one completion"):
        keys.mean_completion_length([])


def test_plot_groups_read_only_keys_that_are_written():
    written = {
        section + name
        for section in (keys.ROLLOUT, keys.EVAL)
        for name in (keys.TASK_REWARD, keys.KL_TO_REF, keys.KL_COEF, keys.COMPLETION_LEN)
    } | {keys.SB3_EPISODE_REWARD, keys.SB3_APPROX_KL, *keys.SB3_LOSSES}
    for group, metrics in plotting.METRIC_GROUPS.items():
        for metric in metrics:
            assert metric.endswith("*") or metric in written, (group, metric)
    # the length panel no longer mixes two definitions (eval/length_tokens counted without the stop token)
    assert plotting.METRIC_GROUPS["completion_len"] == (keys.ROLLOUT + keys.COMPLETION_LEN, keys.EVAL + keys.COMPLETION_LEN)
