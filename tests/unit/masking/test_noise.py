"""mimscale/masking/noise.py: masks keyed by position in the global batch, not by rank."""
from __future__ import annotations

import pytest
import torch

from mimscale.masking import noise
from mimscale.masking.amt import AMTMasking
from mimscale.masking.automae import AutoMAEMasking
from mimscale.masking.blockwise import BlockwiseMasking
from mimscale.masking.random import RandomMasking
from tests.conftest import tiny_model


def _split(G: int, micro: int, seed: int = 3, step: int = 7) -> list[noise.SampleNoise]:
    return [noise.SampleNoise(seed, step, off, G) for off in range(0, G, micro)]


def test_rows_of_a_micro_batch_are_its_rows_of_the_global_draw():
    whole = noise.SampleNoise(3, 7, 0, 16).rand(16, 5)
    for micro in (1, 4, 8):
        parts = [n.rand(micro, 5) for n in _split(16, micro)]
        assert torch.equal(torch.cat(parts), whole)
    # successive draws differ, and so do steps and seeds
    n = noise.SampleNoise(3, 7, 0, 16)
    a, b = n.rand(16, 5), n.rand(16, 5)
    assert not torch.equal(a, b)
    assert not torch.equal(noise.SampleNoise(3, 8, 0, 16).rand(16, 5), whole)
    assert not torch.equal(noise.SampleNoise(4, 7, 0, 16).rand(16, 5), whole)
    with pytest.raises(ValueError, match="exceed the global batch"):
        noise.SampleNoise(3, 7, 12, 16).rand(8, 5)


def test_unkeyed_noise_is_torchs_global_generator():
    torch.manual_seed(0)
    a = noise.of({}).rand(4, 6)
    torch.manual_seed(0)
    assert torch.equal(a, torch.rand(4, 6)) and not noise.of(None).keyed


def test_gumbel_softmax_matches_the_textbook_sample():
    logits = torch.randn(3, 10)
    u = torch.rand(3, 10)
    g = -torch.log(-torch.log(u))
    torch.testing.assert_close(noise.gumbel_softmax(logits, u), torch.softmax(logits + g, dim=-1))
    assert torch.allclose(noise.gumbel_softmax(logits, u, dim=1).sum(1), torch.ones(3))


def _maskers(L: int = 16):
    g = int(L ** 0.5)
    return {
        "random": (RandomMasking(L, 0.75), {}),
        "blockwise": (BlockwiseMasking(g, 0.4), {}),
        # AMT with stored maps: the Gumbel noise over the aligned weights
        "amt": (AMTMasking(L, 0.45, 0.40), {"attn": torch.rand(8, L).half(), "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 8),
                                            "flip": torch.zeros(8, dtype=torch.bool)}),
    }


@pytest.mark.parametrize("name", ["random", "blockwise", "amt"])
def test_a_sample_gets_the_same_mask_however_the_global_batch_is_split(name):
    masker, meta = _maskers()[name]
    images = torch.zeros(8, 3, 32, 32)
    whole = masker(images, {**meta, "noise": noise.SampleNoise(0, 5, 0, 8)})
    for micro in (2, 4):
        plans = [masker(images[o:o + micro], {**{k: v[o:o + micro] for k, v in meta.items()}, "noise": noise.SampleNoise(0, 5, o, 8)})
                 for o in range(0, 8, micro)]
        for field in ("visible", "masked", "thrown"):
            assert torch.equal(torch.cat([getattr(p, field) for p in plans]), getattr(whole, field)), (name, micro, field)


def test_automae_draws_are_keyed_too():
    torch.manual_seed(0)
    m = tiny_model("automae").masker
    assert isinstance(m, AutoMAEMasking)
    images = torch.randn(8, 3, 32, 32)
    whole = m(images, {"noise": noise.SampleNoise(1, 2, 0, 8)})
    halves = [m(images[o:o + 4], {"noise": noise.SampleNoise(1, 2, o, 8)}) for o in (0, 4)]
    assert torch.equal(torch.cat([p.masked for p in halves]), whole.masked)
    torch.testing.assert_close(torch.cat([p.token_scale for p in halves]), whole.token_scale)
