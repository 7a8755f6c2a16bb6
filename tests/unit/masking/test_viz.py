"""masking/viz.py: the mask grid's panels (original | masked input | reconstruction | + visible
pasted | weights when the method has them), its markers and its saved PNG."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mimscale.masking.base import MaskPlan
from mimscale.masking.viz import MASKED_RGB, Reconstruction, grid_panels, hatch, save_plan_grid

B, S, P = 2, 16, 8  # 2 x 2 patches of 8 px
PLAN = MaskPlan(visible=torch.tensor([[0], [3]]), masked=torch.tensor([[1, 2], [0, 1]]), thrown=torch.tensor([[3], [2]]), num_patches=4)
IMAGES = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
WEIGHTS = torch.tensor([[0.0, 1.0, 0.5, 0.2]] * B)


def _recon() -> Reconstruction:
    """A prediction of constant 200 at the visible and masked patches (never thrown ones)."""
    pixels = torch.full((B, 3, S, S), 200.0)
    predicted = torch.ones(B, 4, dtype=torch.bool)
    predicted[0, 3] = predicted[1, 2] = False
    return Reconstruction(pixels=pixels, predicted=predicted)


def _patch(panel: np.ndarray, k: int) -> np.ndarray:
    r, c = divmod(k, S // P)
    return panel[r * P:(r + 1) * P, c * P:(c + 1) * P]


def _panels(grid: np.ndarray, row: int, count: int) -> list[np.ndarray]:
    band = grid[row * S:(row + 1) * S]
    return [band[:, k * S:(k + 1) * S] for k in range(count)]


def test_four_panels_with_a_reconstruction_and_a_fifth_only_with_weights():
    titles, grid = grid_panels(IMAGES, PLAN, None, P, _recon())
    assert titles == ["original", "masked input", "reconstruction", "+ visible pasted"]
    assert grid.shape == (B * S, 4 * S, 3) and grid.dtype == np.uint8
    titles, grid = grid_panels(IMAGES, PLAN, WEIGHTS, P, _recon())
    assert titles[-1] == "mask weights" and grid.shape == (B * S, 5 * S, 3)
    weights = _panels(grid, 0, 5)[4].astype(int)
    assert _patch(weights, 1).sum() > _patch(weights, 0).sum()  # weight 1.0 brighter than 0.0
    # no pixel prediction (C-MAE): the image and the masked input only
    titles, grid = grid_panels(IMAGES, PLAN, None, P, None)
    assert titles == ["original", "masked input"] and grid.shape == (B * S, 2 * S, 3)


def test_pasted_panel_is_the_original_on_visible_patches_and_the_prediction_elsewhere():
    _, grid = grid_panels(IMAGES, PLAN, None, P, _recon())
    for row in range(B):
        original, masked_in, recon, pasted = _panels(grid, row, 4)
        assert np.array_equal(original, IMAGES[row].permute(1, 2, 0).numpy())
        vis = int(PLAN.visible[row, 0])
        assert np.array_equal(_patch(pasted, vis), _patch(original, vis))  # exactly the image's pixels
        assert np.array_equal(_patch(masked_in, vis), _patch(original, vis))
        assert np.all(_patch(recon, vis) == 200)  # the reconstruction panel shows the prediction there
        for k in PLAN.masked[row].tolist():
            assert np.all(_patch(pasted, k) == 200) and np.all(_patch(recon, k) == 200)
            assert np.all(_patch(masked_in, k) == MASKED_RGB)  # masked: grey in the encoder's input


def test_thrown_patches_carry_the_hatch_in_every_panel_but_the_original():
    _, grid = grid_panels(IMAGES, PLAN, None, P, _recon())
    marker = hatch(S, S)
    for row in range(B):
        thrown = int(PLAN.thrown[row, 0])
        r, c = divmod(thrown, S // P)
        expect = marker[r * P:(r + 1) * P, c * P:(c + 1) * P]
        for panel in _panels(grid, row, 4)[1:]:
            assert np.array_equal(_patch(panel, thrown), expect)
    assert len({tuple(v) for v in marker.reshape(-1, 3)}) == 2  # two colours: a hatch, not a flat fill


def test_saved_grid_has_titles_a_legend_and_gaps(tmp_path):
    path = save_plan_grid(tmp_path / "g" / "step1.png", IMAGES, PLAN, WEIGHTS, P, _recon(), rows=2)
    zoom = 128 // S
    with Image.open(path) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert w == 5 * S * zoom + 4 * 2  # five panels, 2 px apart
    assert h > 2 * S * zoom + 2  # the header above the rows
    header = pixels[: h - (2 * S * zoom + 2)]
    assert (header < 128).any()  # text was drawn
    assert not list(tmp_path.glob("g/*.tmp.png"))
