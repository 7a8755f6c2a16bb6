"""AMT building blocks: map alignment with the crop box/flip, Gumbel-top-k sampling, plan sizes."""
from __future__ import annotations

import math

import pytest
import torch

from mimscale.masking.amt_ops import align_maps, amt_plan, gumbel_topk_order
from mimscale.masking.base import plan_sizes


def _hot_map(g: int, row: int, col: int) -> torch.Tensor:
    m = torch.zeros(1, g, g)
    m[0, row, col] = 1.0
    return m


@pytest.mark.parametrize("flip", [False, True])
def test_hot_spot_lights_up_the_expected_crop_patch(flip):
    g, grid = 14, 4
    # the crop covers map columns 8..11 and rows 0..3: hot cell (2, 10) is crop cell (2, 2)
    box = torch.tensor([[8 / g, 0.0, 12 / g, 4 / g]])
    w = align_maps(_hot_map(g, 2, 10), box, torch.tensor([flip]), grid).reshape(grid, grid)
    r, c = divmod(int(w.argmax()), grid)
    assert (r, c) == (2, 1 if flip else 2)
    assert w.max() > 0.5 and w.sum() == pytest.approx(1.0, abs=0.05)  # one map cell = one crop cell here


def test_crop_far_from_the_hot_spot_sees_none_of_it():
    # a bottom-right crop must not read the top-left of the map (the authors' code's failure mode)
    w = align_maps(_hot_map(14, 1, 1), torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.tensor([False]), 7)
    assert float(w.abs().max()) < 1e-6


def test_full_box_reproduces_the_map_and_zoom_interpolates():
    g = 8
    m = torch.arange(g * g, dtype=torch.float32).reshape(1, g, g)
    full = align_maps(m, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([False]), g).reshape(g, g)
    # the map is read as a field sampled at cell centres: interior cells come back exactly, border
    # cells within a quarter cell's change (bilinear samples clamp at the image edge)
    assert torch.allclose(full[1:-1, 1:-1], m[0, 1:-1, 1:-1], atol=1e-4)
    assert torch.allclose(full, m[0], atol=0.25 * (g + 1))
    # a 2x zoom on the left half: each map cell spans 2x2 crop patches; x increases by 1 per map cell
    half = align_maps(m, torch.tensor([[0.0, 0.0, 0.5, 1.0]]), torch.tensor([False]), g).reshape(g, g)
    assert float(half[2, 3] - half[2, 2]) == pytest.approx(0.5, abs=1e-4)


def test_gumbel_first_pick_frequencies_match_weights():
    torch.manual_seed(0)
    w = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 0.5])
    n = 40000
    order = gumbel_topk_order(w.expand(n, -1).contiguous(), torch.Generator().manual_seed(1))
    freq = torch.bincount(order[:, 0], minlength=len(w)).float() / n
    p = w / w.sum()
    tol = 5 * torch.sqrt(p * (1 - p) / n)  # 5 standard errors of a binomial proportion
    assert torch.all((freq - p).abs() < tol), (freq, p)
    # the second pick follows sampling without replacement: P(second = j) = sum_i p_i p_j / (1 - p_i)
    second = torch.bincount(order[:, 1], minlength=len(w)).float() / n
    exp2 = torch.stack([sum(p[i] * p[j] / (1 - p[i]) for i in range(len(w)) if i != j) for j in range(len(w))])
    assert torch.all((second - exp2).abs() < 5 * torch.sqrt(exp2 * (1 - exp2) / n))


@pytest.mark.parametrize("L", [16, 49, 196])
@pytest.mark.parametrize("r,t", [(0.45, 0.40), (0.44, 0.26), (0.75, 0.0), (0.3, 0.5), (0.1, 0.1)])
def test_plan_sizes_exact_and_a_partition(L, r, t):
    weights = torch.rand(3, L)
    plan = amt_plan(weights, r, t, torch.Generator().manual_seed(0))
    v, m, th = plan_sizes(L, r, t)
    assert plan.visible.shape == (3, v) and plan.masked.shape == (3, m) and plan.thrown.shape == (3, th)
    allidx = torch.cat([plan.visible, plan.masked, plan.thrown], dim=1).sort(dim=1).values
    assert torch.equal(allidx, torch.arange(L).expand(3, L))


def test_highly_attended_patches_are_masked_and_least_attended_stay_visible():
    L = 49
    w = torch.full((200, L), 1e-3)
    w[:, 7] = 100.0  # overwhelmingly attended: masked first
    plan = amt_plan(w, 0.45, 0.40, torch.Generator().manual_seed(0))
    assert bool((plan.masked == 7).any(dim=1).all())
    assert math.isclose(plan.fractions()["thrown"], round(0.40 * L) / L)
