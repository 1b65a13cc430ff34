"""The β controller of the KL penalty."""

from __future__ import annotations

import pytest

from sb3_textrl import KLController


def test_fixed_coefficient_never_moves():
    controller = KLController(kl_coef=0.1)
    assert controller.update(mean_episode_kl=50.0, n_tokens=10_000) == pytest.approx(0.1)
    assert controller.enabled


def test_adaptive_coefficient_follows_the_proportional_rule():
    controller = KLController(kl_coef=0.1, kl_target=6.0, horizon=10_000)
    # KL twice the target: error clipped to +0.2, beta *= 1 + 0.2 * 1000 / 10000
    assert controller.update(12.0, 1000) == pytest.approx(0.1 * 1.02)
    # KL at 3/4 of the target: error -0.25 clipped to -0.2
    assert controller.update(4.5, 1000) == pytest.approx(0.1 * 1.02 * 0.98)
    # KL 10 % above target: error 0.1 unclipped
    assert controller.update(6.6, 5000) == pytest.approx(0.1 * 1.02 * 0.98 * 1.05)


def test_zero_coefficient_disables_the_penalty():
    assert not KLController(kl_coef=0.0).enabled


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kl_coef=-1.0), "kl_coef must be >= 0"),
        (dict(kl_coef=0.1, kl_target=0.0), "kl_target must be > 0"),
        (dict(kl_coef=0.0, kl_target=1.0), "needs kl_coef > 0"),
        (dict(kl_coef=0.1, horizon=0), "horizon must be > 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KLController(**kwargs)


def test_target_kl_is_the_deprecated_name_of_kl_target():
    with pytest.warns(DeprecationWarning, match="'kl_target'"):
        controller = KLController(kl_coef=0.1, target_kl=3.0)
    assert controller.kl_target == 3.0 and controller.adaptive
    with pytest.warns(DeprecationWarning, match="use kl_target"):
        assert controller.target_kl == 3.0
    with pytest.raises(TypeError, match="both 'target_kl' and 'kl_target'"):
        KLController(kl_coef=0.1, target_kl=3.0, kl_target=3.0)
