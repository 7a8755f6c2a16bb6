"""MaskPlan and MAE random masking."""
import pytest
import torch

from mimscale.masking.base import MaskPlan, plan_sizes
from mimscale.masking.random import RandomMasking


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_random_plan_sizes_disjoint_and_complete(ratio):
    m = RandomMasking(196, ratio)
    plan = m(torch.zeros(8, 3, 224, 224), {})
    M = int(round(196 * ratio))
    assert plan.masked.shape == (8, M) and plan.visible.shape == (8, 196 - M) and plan.thrown.shape == (8, 0)
    allidx = torch.cat([plan.visible, plan.masked], 1).sort(1).values
    assert torch.equal(allidx, torch.arange(196).expand(8, -1))
    f = plan.fractions()
    assert abs(f["masked"] - M / 196) < 1e-9 and f["thrown"] == 0


def test_random_masking_is_uniform_over_patches():
    """Each patch is masked with probability r: over n samples the count is Binomial(n, r);
    every patch's count must lie within 5 standard deviations (fixed seed)."""
    torch.manual_seed(0)
    L, r, n = 49, 0.75, 4000
    m = RandomMasking(L, r)
    counts = torch.zeros(L)
    for _ in range(n // 500):
        plan = m(torch.zeros(500, 3, 8, 8), {})
        counts += torch.zeros(500, L).scatter_(1, plan.masked, 1.0).sum(0)
    p = plan.masked.shape[1] / L
    sd = (n * p * (1 - p)) ** 0.5
    assert torch.all((counts - n * p).abs() < 5 * sd)
    # and the masks differ between samples
    assert not torch.equal(plan.masked[0].sort().values, plan.masked[1].sort().values)


def test_plan_from_order_and_sizes():
    order = torch.arange(10).expand(2, -1)
    plan = MaskPlan.from_order(order, 2, 5)
    assert plan.visible.tolist()[0] == [0, 1] and plan.masked.shape[1] == 5 and plan.thrown.tolist()[0] == [7, 8, 9]
    assert plan_sizes(196, 0.45, 0.40) == (30, 88, 78)
    with pytest.raises(ValueError):
        plan_sizes(10, 0.6, 0.4)
    with pytest.raises(ValueError):
        MaskPlan.from_order(order, 0, 5)
