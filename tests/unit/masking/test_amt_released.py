"""masking.amt.map_crop: released, the AMT authors' released map cropping, against a deliberately
simple per-sample reference, on crops that do and do not reach the bottom/right edge, with and
without flips; and box staying the default."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from mimscale.config import load_config
from mimscale.errors import ConfigError
from mimscale.masking.amt import AMTMasking
from mimscale.masking.amt_ops import align_maps, align_maps_released

# the reference's image (PIL's size is (W, H)): every box below is a whole number of its pixels
IMAGE_W, IMAGE_H = 400, 300


def reference_released(amap: torch.Tensor, box: list[float], flip: bool, grid: int, size: int) -> list[list[float]]:
    """One sample, written the released transform's way: amap [g, g]; box (x0, y0, x1, y1)
    fractions of an IMAGE_W x IMAGE_H image, turned back into RandomResizedCrop's pixel crop
    (i, j, h, w). The released maskRandomResizedCrop slices ``mask[i // H : (i + h) // H + 2,
    j // W : (j + w) // W + 2]`` and resizes it with ``torchvision F.resize(mask.unsqueeze(0),
    size)`` (its default interpolation), clamps to [0, 1]; the flip is ``F.hflip``; the weights per
    patch are the mean of its pixels (the released sum over a patch, divided by its pixel count)."""
    x0, y0, x1, y1 = box
    i, j = round(y0 * IMAGE_H), round(x0 * IMAGE_W)
    h, w = round(y1 * IMAGE_H) - i, round(x1 * IMAGE_W) - j
    cells = amap[i // IMAGE_H: (i + h) // IMAGE_H + 2, j // IMAGE_W: (j + w) // IMAGE_W + 2]
    pixels = TF.resize(cells.float().unsqueeze(0), [size, size]).clamp(min=0, max=1)
    if flip:
        pixels = TF.hflip(pixels)
    rows = pixels[0].tolist()
    p = size // grid
    out = []
    for r in range(grid):
        for c in range(grid):
            total = 0.0
            for y in range(r * p, (r + 1) * p):
                for x in range(c * p, (c + 1) * p):
                    total += rows[y][x]
            out.append(total / (p * p))
    return out


# (x0, y0, x1, y1): inside the image; reaching the bottom edge; the right edge; both (the whole
# image); a thin crop at the left; one reaching the bottom-right corner from the middle
BOXES = [
    [0.10, 0.20, 0.60, 0.70],
    [0.25, 0.40, 0.75, 1.00],
    [0.30, 0.05, 1.00, 0.55],
    [0.00, 0.00, 1.00, 1.00],
    [0.00, 0.10, 0.35, 0.95],
    [0.45, 0.50, 1.00, 1.00],
]
CELLS = [(2, 2), (3, 2), (2, 3), (3, 3), (2, 2), (3, 3)]  # (rows, columns) each box reads


def _maps(n: int, g: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(n, g, g, generator=gen)
    lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
    return (m - lo) / (hi - lo)  # min-max normalised, as the store's maps


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("g,grid,size", [(14, 14, 224), (14, 7, 224), (8, 4, 32)])
def test_released_matches_the_plain_reference(flip, g, grid, size):
    maps = _maps(len(BOXES), g)
    boxes = torch.tensor(BOXES)
    flips = torch.full((len(BOXES),), flip)
    got = align_maps_released(maps, boxes, flips, grid, size)
    assert got.shape == (len(BOXES), grid * grid) and got.dtype == torch.float32
    for i, box in enumerate(BOXES):
        want = torch.tensor(reference_released(maps[i], box, flip, grid, size))
        assert torch.allclose(got[i], want, atol=1e-5), (box, flip, float((got[i] - want).abs().max()))


def test_mixed_flips_and_edges_in_one_batch():
    maps = _maps(len(BOXES), 14, seed=3)
    flips = torch.tensor([i % 2 == 0 for i in range(len(BOXES))])
    got = align_maps_released(maps, torch.tensor(BOXES), flips, 14, 224)
    for i, box in enumerate(BOXES):
        assert torch.allclose(got[i], torch.tensor(reference_released(maps[i], box, bool(flips[i]), 14, 224)), atol=1e-5)


@pytest.mark.parametrize("i", range(len(BOXES)))
def test_each_box_reads_only_its_top_left_cells(i):
    """A map that is 1 on the cells a box reads and 0 elsewhere comes back all ones (clamped); one
    that is 1 only outside them comes back all zeros: the crop's position plays no other part."""
    g, (rows, cols) = 14, CELLS[i]
    inside = torch.zeros(1, g, g)
    inside[0, :rows, :cols] = 1.0
    box = torch.tensor([BOXES[i]])
    w = align_maps_released(inside, box, torch.tensor([False]), 7, 224)
    assert torch.allclose(w, torch.ones_like(w))
    w_out = align_maps_released(1.0 - inside, box, torch.tensor([False]), 7, 224)
    assert float(w_out.abs().max()) == 0.0


def test_released_ignores_the_crop_where_box_follows_it():
    """The failure mode the paper's rule fixes: a hot spot under the crop (bottom-right) is seen by
    box and not by released, which reads the top-left cells whatever the crop."""
    g = 14
    m = torch.zeros(1, g, g)
    m[0, 10, 10] = 1.0
    box, flip = torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.tensor([False])
    assert float(align_maps(m, box, flip, 7).max()) > 0.1
    assert float(align_maps_released(m, box, flip, 7, 224).abs().max()) == 0.0


def test_masker_map_crop_option_and_default():
    torch.manual_seed(0)
    maps = _maps(4, 4).reshape(4, 16)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.2, 0.0, 1.0, 0.8], [0.0, 0.0, 1.0, 1.0]])
    meta = {"attn": maps.half(), "box": boxes, "flip": torch.tensor([False, True, False, True]), "index": torch.arange(4)}
    images = torch.zeros(4, 3, 32, 32)
    default, released = AMTMasking(16, 0.45, 0.40), AMTMasking(16, 0.45, 0.40, map_crop="released")
    assert default.map_crop == "box"
    default(images, meta)
    released(images, meta)
    m = maps.half().float().view(4, 4, 4)
    assert torch.equal(default.last_weights, align_maps(m, boxes, meta["flip"], 4))
    assert torch.equal(released.last_weights, align_maps_released(m, boxes, meta["flip"], 4, 32))
    with pytest.raises(ValueError, match="allowed values: box, released"):
        AMTMasking(16, map_crop="area")


def test_config_key_and_presets():
    cfg = load_config(None, ["masking.method=amt", "masking.amt.map_crop=released"])
    assert cfg.masking.amt.map_crop == "released"
    assert load_config(None, ["masking.method=amt"]).masking.amt.map_crop == "box"
    with pytest.raises(ConfigError, match="masking.amt.map_crop.*allowed values: box, released"):
        load_config(None, ["masking.amt.map_crop=area"])


def test_released_preset_is_the_released_code_as_a_whole():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "mimscale" / "configs"
    rel, paper = load_config(root / "amt_vit_base_released.yaml"), load_config(root / "amt_vit_base.yaml")
    a = rel.masking.amt
    assert (a.map_crop, a.normalize, a.mask_ratio, a.throw_ratio) == ("released", "minmax_then_mean", 0.75, 0.0)
    assert rel.model.norm_pix_loss is False and rel.masking.method == "amt"
    # everything else as the paper's preset
    assert (rel.train, rel.data, rel.model.name) == (paper.train, paper.data, paper.model.name)
    assert (a.first_refresh, a.refresh_every) == (paper.masking.amt.first_refresh, paper.masking.amt.refresh_every)
