"""Shared test setup.

Markers: ``slow`` tests run in ``make test-all``; ``make test`` (CI) deselects them with ``-m "not slow"``.

The tiny model the single-process method tests build: ViT-Tiny at 32 px with 8 px patches (a 4 x 4
grid, L = 16), a one-block 64-wide decoder and small C-MAE heads. Import the helpers
(``from tests.conftest import tiny_model, make_batch``) or take the fixtures:

    tiny_config(method, *sets)   the resolved config (method: a registry name or alias, or None)
    tiny_model(method, *sets)    that config's model, built after torch.manual_seed(0)
    make_batch(n, size, ...)     uint8 images and the crop metadata a model's forward takes
    tiny_batch (fixture)         make_batch(): 4 whole, unflipped 32 px images, fresh per test
"""
from __future__ import annotations

import pytest
import torch

from mimscale import methods
from mimscale.config import load_config

TINY = ["model.name=vit_tiny", "model.img_size=32", "model.patch_size=8", "model.decoder_dim=64", "model.decoder_depth=1",
        "model.decoder_heads=4", "masking.cmae.proj_hidden=64", "masking.cmae.proj_dim=32"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long end-to-end runs (deselect with -m 'not slow')")


def tiny_sets(method: str | None = None, *sets: str) -> list[str]:
    """The ``--set`` overrides of the tiny model, the method's selection, then ``sets``."""
    return [*TINY, *([methods.select(method)] if method else []), *sets]


def tiny_config(method: str | None = None, *sets: str):
    return load_config(None, tiny_sets(method, *sets))


def tiny_model(method: str | None = None, *sets: str):
    cfg = tiny_config(method, *sets)
    torch.manual_seed(0)
    return methods.build_model(cfg)


def make_batch(n: int = 4, size: int = 32, box=(0.0, 0.0, 1.0, 1.0), flip=None, seed: int = 1):
    """``n`` random uint8 images (generator seeded with ``seed``) and their metadata: the same crop
    ``box`` (x0, y0, x1, y1 as fractions of the whole image) for each, ``flip`` per image (default
    none), and indices 0..n-1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    flips = torch.zeros(n, dtype=torch.bool) if flip is None else torch.tensor(flip, dtype=torch.bool)
    return images, {"box": torch.tensor([list(box)]).repeat(n, 1), "flip": flips, "index": torch.arange(n)}


@pytest.fixture
def tiny_batch():
    return make_batch()
