"""AMT (attention-driven masking and throwing), on MAE and on SimMIM: masking.amt's ratios and
refresh schedule, the attention store's hooks, and thrown patches in no encoder, decoder or loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mimscale.errors import ConfigError
from mimscale.hooks.amt_refresh import NORMALIZE_MODES, AMTRefresh
from mimscale.masking.amt import WEIGHTS, AMTMasking
from mimscale.masking.amt_ops import MAP_CROPS
from mimscale.masking.base import Masker, plan_sizes
from mimscale.masking.coarse import CoarseMasking
from mimscale.methods.base import Method
from mimscale.methods.mae import reconstruction_flops
from mimscale.methods.simmim import KEY as UNIT_KEY
from mimscale.methods.simmim import check_simmim, simmim_flops, unit_count, unit_grid
from mimscale.objectives.simmim import SimMIMObjective


@dataclass
class AMTConfig:
    # amt and amt_simmim both read these keys (one AMT, one refresh schedule, whichever the base).
    # The defaults are the paper's MAE setting; its SimMIM setting is r = 0.44, t = 0.26, which
    # amt_simmim's presets set (amt_simmim_vit_base.yaml).
    mask_ratio: float = 0.45  # r: first rL of the attention-weighted order are masked
    throw_ratio: float = 0.40  # t: the next tL are thrown (in no encoder, decoder or loss)
    # When to refresh the attention store: epochs ("40") or a share of the run ("10%").
    # Before the first refresh: random masking at masking.mask_ratio.
    first_refresh: str = "40"
    refresh_every: str = "40"
    refresh_batch: int = 0  # images per attention forward; 0: 4 x the micro batch
    # mean_then_minmax: the paper's Algorithm 1 (heads' CLS attention averaged, then scaled to
    # [0, 1]); minmax_then_mean: each head scaled first (up to 0.49 apart per patch)
    normalize: Literal[tuple(NORMALIZE_MODES)] = "mean_then_minmax"
    # How the stored map follows the image's crop: box, the paper's (the crop box's area of the map,
    # flipped with the image); released, the authors' released code (its top-left 2 x 2 or 3 x 3 map
    # cells stretched over the crop, masking/amt_ops.py), for reproducing results that may come from it
    map_crop: Literal[tuple(MAP_CROPS)] = "box"
    # attention: the stored maps weight the order (AMT); uniform: every patch weighs the same, so
    # the same r masked and t thrown are drawn uniformly at random (throwing without attention, an
    # ablation: the schedule, the warm-up and the refresh are unchanged, the maps are ignored)
    weights: Literal[tuple(WEIGHTS)] = "attention"


def _when(key: str, text: str, allow_zero: bool) -> None:
    """A refresh time: a number of epochs or a percentage of the run."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) if s.endswith("%") else float(s)
    except ValueError:
        raise ConfigError(f"config key '{key}' = {text!r}: expected epochs (e.g. 40 or 0.5) or a share of the run (e.g. 10%)") from None
    if v < 0 or (v == 0 and not allow_zero) or (s.endswith("%") and v > 100):
        raise ConfigError(f"config key '{key}' = {text!r} must be {'>= 0' if allow_zero else '> 0'} (percentages at most 100%)")


def check_amt(cfg, selected: bool) -> None:
    """masking.amt (read by amt, amt_simmim and AutoMAE's stored extractor): checked for every run."""
    a = cfg.masking.amt
    for key, v in (("masking.amt.mask_ratio", a.mask_ratio), ("masking.amt.throw_ratio", a.throw_ratio)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config key '{key}' = {v} must be in [0, 1)")
    if a.mask_ratio <= 0 or a.mask_ratio + a.throw_ratio >= 1.0:
        raise ConfigError(f"config keys 'masking.amt.mask_ratio' + 'masking.amt.throw_ratio' = {a.mask_ratio} + {a.throw_ratio} "
                          "must leave some patches masked and some visible (mask_ratio > 0, sum < 1)")
    _when("masking.amt.first_refresh", a.first_refresh, allow_zero=True)
    _when("masking.amt.refresh_every", a.refresh_every, allow_zero=False)
    if a.refresh_batch < 0:
        raise ConfigError(f"config key 'masking.amt.refresh_batch' = {a.refresh_batch} must be >= 0 (0: 4 x micro batch)")


def check_amt_simmim(cfg, selected: bool) -> None:
    """When amt_simmim runs: SimMIM's unit checks, and AMT's plan over the units keeps some
    visible and some masked."""
    if not selected:
        return
    check_simmim(cfg, selected=True)
    units = unit_count(cfg)
    a = cfg.masking.amt
    try:
        plan_sizes(units, a.mask_ratio, a.throw_ratio)
    except ValueError:
        raise ConfigError(f"config keys 'masking.amt.mask_ratio' + 'masking.amt.throw_ratio' = {a.mask_ratio} + "
                          f"{a.throw_ratio} and '{UNIT_KEY}' = {cfg.masking.simmim.mask_patch_size}: AMT's plan over {units} "
                          "units leaves none visible or none masked") from None


def amt_masker(cfg, encoder) -> Masker:
    a = cfg.masking.amt
    return AMTMasking(encoder.num_patches, a.mask_ratio, a.throw_ratio, warmup_ratio=cfg.masking.mask_ratio, map_crop=a.map_crop,
                       weights=a.weights)


def amt_simmim_masker(cfg, encoder) -> Masker:
    """AMT planned on SimMIM's unit grid, as the AMT authors' SimMIM code (each unit's weight is
    the mean of the attention map over it; whole units are masked, thrown or visible); random
    unit masking at masking.mask_ratio until the first refresh (plain SimMIM)."""
    g, k = unit_grid(cfg, encoder)
    a = cfg.masking.amt
    return CoarseMasking(AMTMasking(g * g, a.mask_ratio, a.throw_ratio, warmup_ratio=cfg.masking.mask_ratio, map_crop=a.map_crop,
                       weights=a.weights),
                         encoder.grid, k)


AMT = Method("amt", preset="amt_vit_base.yaml", section=("amt", AMTConfig), check=check_amt, uses_store=lambda cfg: True,
             flops=reconstruction_flops, masker=amt_masker, hooks=lambda cfg, ctx: AMTRefresh(ctx))
# AMT on SimMIM: masking.amt's ratios and refresh schedule (presets: r 0.44, t 0.26), thrown units in
# neither the encoder nor the loss
AMT_SIMMIM = Method("amt_simmim", preset="amt_simmim_vit_base.yaml", check=check_amt_simmim, flops=simmim_flops,
                    needs_decoder=False, uses_store=lambda cfg: True, masker=amt_simmim_masker,
                    objective=lambda cfg, enc, dec: SimMIMObjective(enc), hooks=lambda cfg, ctx: AMTRefresh(ctx))
