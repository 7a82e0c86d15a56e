import math

import pytest
import torch

from grpo_dist.advantages import ADVANTAGES, compute_advantages
from grpo_dist.config import AlgoConfig

NAN = math.nan


def adv(rewards, group_size, **cfg):
    return compute_advantages(torch.tensor(rewards, dtype=torch.float32), group_size, AlgoConfig(**cfg)).tolist()


def test_registry_names_match_config_literal():
    assert set(ADVANTAGES) == {"grpo", "rloo", "softmax"}


def test_seed_worked_example_unbiased_std():
    # Seeds 001/004: rewards [1,0,0,1] and [0,0,1,1]: mean 0.5, unbiased std 0.5774 -> +-0.8660.
    a = adv([1, 0, 0, 1, 0, 0, 1, 1], 4)
    expect = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.86588
    assert a == pytest.approx([expect, -expect, -expect, expect, -expect, -expect, expect, expect], abs=1e-6)
    assert expect == pytest.approx(0.8660, abs=2e-4)


def test_grpo_batch_std_and_none():
    r = [1, 0, 0, 0, 3, 3, 3, 5]
    # batch: each group's mean, the std of all 8 rewards.
    std_all = torch.tensor(r, dtype=torch.float64).std().item()  # unbiased
    a = adv(r, 4, scale_rewards="batch")
    means = [0.25] * 4 + [3.5] * 4
    assert a == pytest.approx([(x - m) / (std_all + 1e-4) for x, m in zip(r, means)], abs=1e-6)
    # none (Dr. GRPO): centered only.
    assert adv(r, 4, scale_rewards="none") == pytest.approx([x - m for x, m in zip(r, means)], abs=1e-6)


def test_zero_variance_group_gives_zero():
    assert adv([1, 1, 1, 1, 0, 0, 0, 0], 4) == [0.0] * 8


def test_rloo_leave_one_out():
    # r = [1, 0, 0, 1]: r_0 - mean(0, 0, 1) = 1 - 1/3.
    assert adv([1, 0, 0, 1], 4, advantage="rloo") == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-6)
    assert adv([3, 1, 2], 3, advantage="rloo") == pytest.approx([1.5, -1.5, 0.0], abs=1e-6)


def test_softmax_weights_as_is():
    # softmax([1, 0, 0]) = e/(e+2), 1/(e+2), 1/(e+2); temperature 0.5 doubles the logits.
    e = math.e
    assert adv([1, 0, 0], 3, advantage="softmax") == pytest.approx([e / (e + 2), 1 / (e + 2), 1 / (e + 2)], abs=1e-6)
    e2 = math.exp(2)
    a = adv([1, 0, 0], 3, advantage="softmax", softmax_temperature=0.5)
    assert a == pytest.approx([e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)], abs=1e-6)
    assert sum(adv([0.3, 2.0, -1.0, 0.0, 5.0, 5.0], 3, advantage="softmax")) == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "softmax"])
def test_nan_rows_are_missing(estimator):
    # Group 0: one NaN -> statistics over [1, 0, 1]; group 1: a single usable reward -> all 0.
    a = adv([1, NAN, 0, 1, NAN, 2, NAN, NAN], 4, advantage=estimator)
    ref = adv([1, 0, 1], 3, advantage=estimator)
    assert a[1] == 0.0 and a[4:] == [0.0] * 4
    assert [a[0], a[2], a[3]] == pytest.approx(ref, abs=1e-6)


def test_all_nan_and_inf():
    assert adv([NAN] * 4, 2) == [0.0] * 4
    assert adv([1, math.inf, 0, 1], 4) == pytest.approx(adv([1, 0, 1], 3)[:1] + [0.0] + adv([1, 0, 1], 3)[1:], abs=1e-6)


def test_batch_std_ignores_unusable_groups():
    # Group 1 has one usable reward; its 100 must not inflate the batch std.
    a = adv([1, 0, 100, NAN], 2, scale_rewards="batch")
    std = torch.tensor([1.0, 0.0]).std().item()
    assert a == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0], abs=1e-6)


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size=3"):
        adv([1, 0, 0, 1], 3)


def test_output_is_float32():
    out = compute_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2, AlgoConfig())
    assert out.dtype == torch.float32 and out.device == torch.device("cpu")
