"""SimMIM: mask tokens in the encoder, a linear head, L1 on masked pixels, random masking of
``masking.simmim.mask_patch_size`` units. AMT on SimMIM (methods/amt.py) reads the same unit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mimscale.errors import ConfigError
from mimscale.masking.base import Masker, plan_sizes
from mimscale.masking.coarse import CoarseMasking
from mimscale.masking.random import RandomMasking
from mimscale.methods.base import Method, block_flops, encoder_spec, patch_embed_flops
from mimscale.objectives.simmim import SimMIMObjective


@dataclass
class SimMIMConfig:
    # Side of SimMIM's square mask unit in pixels (the paper's 32: 2 x 2 patches of a ViT-B/16). A
    # multiple of the patch size that divides model.img_size (a /14 model: 28, 2 x 2 patches of 14,
    # 8 x 8 units at 224 px); simmim masks masking.mask_ratio of the units at random, amt_simmim
    # plans AMT on this unit grid.
    mask_patch_size: int = 32


KEY = "masking.simmim.mask_patch_size"


def simmim_flops_per_image(*, enc_dim: int, enc_depth: int, img_size: int, patch: int, visible: int, masked: int,
                           mlp_ratio: float = 4.0, train: bool = True) -> float:
    """FLOPs per image of one SimMIM step: patch embedding (over all L patches), encoder on
    1 + V + M tokens (masked patches enter as mask tokens; thrown ones (AMT) not at all), and the
    linear head (D -> p*p*3) on every one of the V + M output tokens. No decoder."""
    fwd = patch_embed_flops(img_size, patch, enc_dim)
    fwd += enc_depth * block_flops(1 + visible + masked, enc_dim, mlp_ratio)
    fwd += 2.0 * (visible + masked) * enc_dim * patch * patch * 3
    return 3.0 * fwd if train else fwd


def simmim_flops(cfg, visible: int, masked: int) -> float:
    """SimMIM's (and AMT on it) training step at plan sizes (visible, masked)."""
    spec, patch = encoder_spec(cfg)
    return simmim_flops_per_image(enc_dim=spec.dim, enc_depth=spec.depth, img_size=cfg.model.img_size, patch=patch,
                                  visible=visible, masked=masked, mlp_ratio=spec.mlp_ratio)


def valid_units(img: int, patch: int, mask_ratio: float) -> list[int]:
    """Every mask unit side (pixels, ascending) that tiles an ``img``-px image in whole ``patch``-px
    patches and whose random masking at ``mask_ratio`` keeps some units visible and some masked."""
    out = []
    for unit in range(patch, img + 1, patch):
        if img % unit:
            continue
        try:
            plan_sizes((img // unit) ** 2, mask_ratio)
        except ValueError:
            continue
        out.append(unit)
    return out


def nearest_unit(mps: int, img: int, patch: int, mask_ratio: float) -> Optional[int]:
    """The valid unit (``valid_units``) closest to ``mps``, the smaller on a tie (None: none is valid):
    28 for SimMIM's 32 on a /14 model at 224 px (2 x 2 patches, as 32 is on a /16 one)."""
    units = valid_units(img, patch, mask_ratio)
    return min(units, key=lambda u: (abs(u - mps), u)) if units else None


def unit_count(cfg) -> int:
    """Mask units in the image, after checking the unit tiles it in whole patches (ConfigError
    naming the key and the nearest valid unit otherwise)."""
    mps = cfg.masking.simmim.mask_patch_size
    _, patch = encoder_spec(cfg)
    img = cfg.model.img_size
    if mps % patch or img % mps:
        best = nearest_unit(mps, img, patch, cfg.masking.mask_ratio)
        hint = (f" (e.g. {best}: {best // patch} x {best // patch} patches of {patch} px, {img // best} x {img // best} units)"
                if best else "")
        raise ConfigError(f"config key '{KEY}' = {mps} must be a multiple of the patch size {patch} and divide "
                          f"model.img_size {img}{hint}")
    units = (img // mps) ** 2
    try:
        plan_sizes(units, cfg.masking.mask_ratio)
    except ValueError:
        raise ConfigError(f"config keys 'masking.mask_ratio' = {cfg.masking.mask_ratio} and '{KEY}' = {mps}: "
                          f"random masking of {units} units leaves none visible or none masked (a smaller unit gives more units)") from None
    return units


def check_simmim(cfg, selected: bool) -> None:
    """A positive unit always; when simmim runs, one that tiles the image and unit-grid plans that
    keep some units visible and some masked (another method leaves the unit unused)."""
    mps = cfg.masking.simmim.mask_patch_size
    if mps <= 0:
        raise ConfigError(f"config key '{KEY}' = {mps} must be > 0")
    if selected:
        unit_count(cfg)


def unit_grid(cfg, encoder) -> tuple[int, int]:
    """(unit grid side, patches per unit side) of SimMIM's masking.simmim.mask_patch_size units."""
    k = cfg.masking.simmim.mask_patch_size // encoder.patch_size
    return encoder.grid // k, k


def simmim_masker(cfg, encoder) -> Masker:
    """SimMIM's random masking of masking.mask_ratio of the units (as its MaskGenerator)."""
    g, k = unit_grid(cfg, encoder)
    return CoarseMasking(RandomMasking(g * g, cfg.masking.mask_ratio), encoder.grid, k)


ENTRIES = (
    Method("simmim", preset="simmim_vit_base.yaml", section=("simmim", SimMIMConfig), check=check_simmim,
           flops=simmim_flops, needs_decoder=False, masker=simmim_masker,
           objective=lambda cfg, enc, dec: SimMIMObjective(enc)),
)
