"""NaN and infinity in the KL and sampling settings are refused where they are given (issue #15, point 4).

Before, ``kl_coef=nan`` and ``kl_target=nan`` switched the KL penalty off without a word (every comparison with NaN
is False), and ``kl_coef=inf`` gave NaN rewards and a torch crash during the first update."""

import math

import pytest
from helpers import toy_ppo

from sb3_textrl.common.kl import KLController


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kl_coef=math.nan), "kl_coef must be >= 0 and finite"),
        (dict(kl_coef=math.inf), "kl_coef must be >= 0 and finite"),
        (dict(kl_coef=0.1, kl_target=math.nan), "kl_target must be > 0 and finite"),
        (dict(kl_coef=0.1, kl_target=math.inf), "kl_target must be > 0 and finite"),
        (dict(kl_coef=0.1, kl_target=1.0, horizon=math.nan), "horizon must be > 0 and finite"),
    ],
)
def test_kl_controller_refuses_nan_and_infinity(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KLController(**kwargs)


@pytest.mark.parametrize(
    "policy_kwargs, match",
    [
        (dict(kl_coef=math.nan), "kl_coef must be >= 0 and finite"),
        (dict(kl_target=math.nan), "kl_target must be > 0 and finite"),
        (dict(temperature=math.nan), "temperature must be > 0 and finite"),
        (dict(temperature=math.inf), "temperature must be > 0 and finite"),
        (dict(top_k=math.nan), "top_k must be >= 1"),
        (dict(top_p=math.nan), r"top_p must be in \(0, 1\]"),
    ],
)
def test_the_policy_refuses_them_when_ppo_is_built(ragged_task, tiny_lm, policy_kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy_ppo(ragged_task, tiny_lm, policy_kwargs=policy_kwargs)
