"""The trainer's mask-grid step (Trainer._log_mask_grid) on a real tiny model, without an engine:
every rank runs the reconstruction (a collective forward under ZeRO-3), rank 0 alone writes the
grid, with the reconstruction panels, and the weights panel only when the masker has weights."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from mimscale import trainer
from mimscale.tracking.tracker import Tracker
from tests.conftest import make_batch, tiny_config, tiny_model

ROWS = 2
PANEL = 128  # the tiny model's 32 px images, zoomed x4


def _trainer(tmp_path, method: str, *sets: str, attn: bool = False):
    """A stand-in for the Trainer: what _log_mask_grid reads, around a model after one training forward."""
    model = tiny_model(method, *sets)
    images, meta = make_batch(4)
    if attn:
        meta["attn"] = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)).half()
    model(images, meta)
    me = SimpleNamespace(engine=SimpleNamespace(module=model), cfg=tiny_config(method, *sets, f"tracking.mask_grid_rows={ROWS}"),
                         out=tmp_path, state=SimpleNamespace(step=7), tracker=Tracker.disabled())
    return me, images


def _panels(path) -> int:
    with Image.open(path) as im:
        w = im.size[0]
    assert (w + 2) % (PANEL + 2) == 0, w
    return (w + 2) // (PANEL + 2)


def test_rank0_writes_the_reconstruction_grid(tmp_path):
    me, images = _trainer(tmp_path, "mae")
    trainer.Trainer._log_mask_grid(me, images)
    path = tmp_path / "mask_grids" / "step00000007.png"
    assert _panels(path) == 4  # MAE: no weights panel
    with Image.open(path) as im:
        assert im.size[1] > ROWS * PANEL  # two rows under the header


def test_amt_grid_adds_the_weights_panel(tmp_path):
    me, images = _trainer(tmp_path, "amt", "masking.mask_ratio=0.5", "masking.amt.throw_ratio=0.25", attn=True)
    trainer.Trainer._log_mask_grid(me, images)
    path = tmp_path / "mask_grids" / "step00000007.png"
    assert _panels(path) == 5
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert (np.abs(pixels.astype(int) - [20, 30, 90]).sum(-1) == 0).any()  # thrown patches hatched (THROWN_RGB)


def test_other_ranks_run_the_reconstruction_and_write_nothing(tmp_path, monkeypatch):
    me, images = _trainer(tmp_path, "mae")
    calls = []
    real = trainer.reconstruct
    monkeypatch.setattr(trainer, "reconstruct", lambda model, imgs, plan: calls.append(imgs.shape[0]) or real(model, imgs, plan))
    monkeypatch.setattr(trainer.dist, "is_rank0", lambda: False)
    trainer.Trainer._log_mask_grid(me, images)
    assert calls == [ROWS]  # the forward ran, on the grid's rows only
    assert not (tmp_path / "mask_grids").exists()
