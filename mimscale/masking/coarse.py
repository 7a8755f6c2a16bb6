"""Coarse masking units: any masker run on a grid of k x k-patch units, its plan expanded to patches.

SimMIM masks 32 x 32-pixel squares of a ViT-B/16 (k = 2: each unit is 2 x 2 patches, a 7 x 7 unit
grid at 224 px); the patch tokens stay 16 px. ``CoarseMasking(inner, grid, k)`` asks ``inner`` (a
``Masker`` built for ``(grid / k)^2`` units: random, AMT, ...) for a plan over units and turns each
unit index into its k*k patch indices:

    inner plan   visible [B, Vu], masked [B, Mu], thrown [B, Tu]   unit indices in 0..Lu-1, Lu = (grid/k)^2
    this plan    visible [B, Vu*k*k], masked [B, Mu*k*k], thrown [B, Tu*k*k]   patch indices in 0..L-1, L = grid^2

Units tile the patch grid exactly, so disjoint and complete unit sets give disjoint and complete
patch sets, with the same counts for every sample. A unit's patches are listed together, row-major
inside the unit. Unit u covers patch rows (u // gu) * k .. + k - 1 and columns (u % gu) * k .. + k - 1
(gu = grid / k), the same row-major layout as the patch grid, so an inner masker that reads
per-position data (AMT's attention maps, aligned onto its own unit grid by ``align_maps``) sees units
where they are in the image.
"""
from __future__ import annotations

from typing import Optional

import torch

from mimscale.masking.base import Masker, MaskPlan


def unit_patches(grid: int, k: int) -> torch.Tensor:
    """[Lu, k*k] int64: the patch indices (row-major on the ``grid`` x ``grid`` patch grid) of each
    unit of the (grid/k) x (grid/k) unit grid, row-major inside the unit."""
    if k < 1 or grid % k:
        raise ValueError(f"mask units of {k} x {k} patches must tile the {grid} x {grid} patch grid")
    gu = grid // k
    u = torch.arange(gu * gu)
    top, left = (u // gu) * k, (u % gu) * k  # [Lu] the unit's first patch row and column
    dy, dx = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")  # [k, k] offsets inside a unit
    rows = top[:, None] + dy.reshape(1, -1)  # [Lu, k*k]
    cols = left[:, None] + dx.reshape(1, -1)
    return rows * grid + cols


class CoarseMasking(Masker):
    def __init__(self, inner: Masker, grid: int, k: int):
        """inner: a Masker over ``(grid // k) ** 2`` units; grid: patches per image side; k: patches
        per unit side (the mask unit is k * patch_size pixels)."""
        super().__init__()
        gu = grid // k if k >= 1 else 0
        if gu * k != grid or inner.num_patches != gu * gu:
            raise ValueError(f"inner masker has {inner.num_patches} units; a {grid} x {grid} patch grid in "
                             f"{k} x {k}-patch units has {gu * gu if gu * k == grid else 'no whole number of'} units")
        self.inner = inner
        self.grid, self.k = grid, k
        self.num_patches = grid * grid
        self.num_units = gu * gu
        table = unit_patches(grid, k)  # [Lu, k*k]
        self.register_buffer("table", table, persistent=False)
        unit_of = torch.empty(self.num_patches, dtype=torch.long)
        unit_of[table.reshape(-1)] = torch.arange(self.num_units).repeat_interleave(k * k)
        self.register_buffer("unit_of", unit_of, persistent=False)  # [L] the unit each patch belongs to

    def initial_sizes(self) -> tuple[int, int, int]:
        n = self.k * self.k
        v, m, t = self.inner.initial_sizes()
        return v * n, m * n, t * n

    def expand(self, units: torch.Tensor) -> torch.Tensor:
        """units [B, n] int64 unit indices -> [B, n*k*k] patch indices (each unit's k*k together)."""
        B, n = units.shape
        return self.table[units].reshape(B, n * self.k * self.k)

    def to_patches(self, per_unit: torch.Tensor) -> torch.Tensor:
        """[B, Lu] per-unit values -> [B, L] (every patch takes its unit's value)."""
        return per_unit[:, self.unit_of]

    @property
    def last_weights(self) -> Optional[torch.Tensor]:
        """The inner masker's per-unit weights of the last batch (AMT's aligned attention), as
        [B, L] per patch for the mask grids; None when it has none."""
        w = getattr(self.inner, "last_weights", None)
        return None if w is None else self.to_patches(w)

    def forward(self, images: torch.Tensor, meta: dict) -> MaskPlan:
        p = self.inner(images, meta)
        return MaskPlan(
            visible=self.expand(p.visible),
            masked=self.expand(p.masked),
            thrown=self.expand(p.thrown),
            num_patches=self.num_patches,
            token_scale=None if p.token_scale is None else self.to_patches(p.token_scale),
            aux_loss=p.aux_loss,
            aux_terms=p.aux_terms,
        )
