"""masking.amt.weights: uniform, AMT's masking and throwing with every patch weighing the same (the
ablation of what the attention maps add): the plan ignores the maps, keeps r / t, and throws
every patch equally often; attention stays the default."""
from __future__ import annotations

import pytest
import torch

from mimscale.config import load_config
from mimscale.errors import ConfigError
from mimscale.masking.amt import AMTMasking


def _meta(maps: torch.Tensor) -> dict:
    B = maps.shape[0]
    return {"attn": maps.half(), "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * B), "flip": torch.zeros(B, dtype=torch.bool),
            "index": torch.arange(B)}


def _plan(masker: AMTMasking, maps: torch.Tensor, seed: int):
    torch.manual_seed(seed)  # the same Gumbel uniforms for every call with this seed
    return masker(torch.zeros(maps.shape[0], 3, 32, 32), _meta(maps))


def test_uniform_weights_ignore_the_maps_where_attention_follows_them():
    hot = torch.zeros(64, 16)
    hot[:, :4] = 1.0  # four hot patches, the rest cold
    cold = 1.0 - hot
    uniform, attention = AMTMasking(16, 0.5, 0.25, weights="uniform"), AMTMasking(16, 0.5, 0.25)
    assert attention.weights == "attention"
    a, b = _plan(uniform, hot, 0), _plan(uniform, cold, 0)
    assert torch.equal(a.masked, b.masked) and torch.equal(a.thrown, b.thrown)
    assert (a.visible.shape[1], a.masked.shape[1], a.thrown.shape[1]) == (4, 8, 4)  # r and t unchanged
    assert torch.equal(uniform.last_weights, torch.ones(64, 16))
    # attention: the hot patches are masked first, so the two maps give different plans
    h, c = _plan(attention, hot, 0), _plan(attention, cold, 0)
    assert not torch.equal(h.masked, c.masked)
    assert bool((h.masked.sort(dim=1).values[:, :4] == torch.arange(4)).all())


def test_uniform_throws_every_patch_equally_often():
    hot = torch.zeros(4000, 16)
    hot[:, 0] = 1.0
    plan = _plan(AMTMasking(16, 0.5, 0.25, weights="uniform"), hot, 1)
    counts = torch.bincount(plan.thrown.flatten(), minlength=16).float() / 4000  # expected 4 / 16 = 0.25 each
    assert float((counts - 0.25).abs().max()) < 0.04


def test_config_key_default_and_bad_value():
    assert load_config(None, ["masking.method=amt"]).masking.amt.weights == "attention"
    assert load_config(None, ["masking.method=amt", "masking.amt.weights=uniform"]).masking.amt.weights == "uniform"
    with pytest.raises(ConfigError, match="masking.amt.weights.*allowed values: attention, uniform"):
        load_config(None, ["masking.amt.weights=random"])
    with pytest.raises(ValueError, match="allowed values: attention, uniform"):
        AMTMasking(16, weights="flat")
