"""R-MAE and C-MAE: random masking's visible and masked sets as two complementary views. R-MAE
reconstructs each view from the other; C-MAE adds a contrastive term against an EMA target."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from mimscale.errors import ConfigError
from mimscale.hooks.ema import EMAHooks
from mimscale.masking.random import RandomMasking
from mimscale.methods.base import Method, block_flops, build_encoder, encoder_spec, patch_embed_flops
from mimscale.methods.mae import reconstruction_flops
from mimscale.objectives.cmae import POOLS, VIEWS, CMAEObjective
from mimscale.objectives.rmae import RMAEObjective


@dataclass
class RMAEConfig:
    lam: float = 1.0  # weight of the auto-encoding (constraint) term on the second view


@dataclass
class CMAEConfig:
    temperature: float = 0.2  # InfoNCE softmax temperature (the paper's)
    momentum: float = 0.996  # EMA of the target encoder, projector and mask token, per optimizer step
    proj_hidden: int = 2048  # projector and predictor: 2-layer MLPs with GELU (the paper's appendix)
    proj_dim: int = 768
    color_jitter: bool = True  # SimSiam's colour augmentation, drawn per view
    # independent: T2's mask drawn on its own (complementary masks identify the pair by position
    # alone, see objectives/cmae.py); complementary: T2 = not T1 (the paper's Eq. 6)
    views: Literal[VIEWS] = "independent"
    mask_token: bool = True  # masked positions enter the encoder as a learned token (the paper's default)
    pool: Literal[POOLS] = "cls"  # the view's code: the CLS token (MoCo v3) or the mean patch token


def rmae_flops(cfg, visible: int, masked: int) -> float:
    """Each view through encoder and decoder; the second also decodes its own tokens."""
    _, patch = encoder_spec(cfg)
    second = reconstruction_flops(cfg, masked, visible)
    return reconstruction_flops(cfg, visible, masked) + second + 3.0 * 2.0 * masked * cfg.model.decoder_dim * patch * patch * 3


def cmae_flops(cfg, visible: int, masked: int) -> float:
    """Two online views (forward + backward) and two target views (forward), each on all L tokens
    (V without mask tokens); projector and predictor on one code per view."""
    spec, patch = encoder_spec(cfg)
    L = visible + masked
    c = cfg.masking.cmae
    tokens = L if c.mask_token else visible
    enc = patch_embed_flops(cfg.model.img_size, patch, spec.dim) + spec.depth * block_flops(1 + tokens, spec.dim, spec.mlp_ratio)
    heads = 2.0 * (spec.dim * c.proj_hidden + c.proj_hidden * c.proj_dim)  # projector
    online = enc + heads + 2.0 * 2 * c.proj_hidden * c.proj_dim  # + predictor
    return 2 * (3.0 * online + enc + heads)


def check_rmae(cfg, selected: bool) -> None:
    if cfg.masking.rmae.lam < 0:
        raise ConfigError(f"config key 'masking.rmae.lam' = {cfg.masking.rmae.lam} must be >= 0")


def check_cmae(cfg, selected: bool) -> None:
    c = cfg.masking.cmae
    if c.temperature <= 0:
        raise ConfigError(f"config key 'masking.cmae.temperature' = {c.temperature} must be > 0")
    if not 0.0 <= c.momentum < 1.0:
        raise ConfigError(f"config key 'masking.cmae.momentum' = {c.momentum} must be in [0, 1)")
    for key, v in (("masking.cmae.proj_hidden", c.proj_hidden), ("masking.cmae.proj_dim", c.proj_dim)):
        if v <= 0:
            raise ConfigError(f"config key '{key}' = {v} must be > 0")


def cmae_objective(cfg, encoder) -> nn.Module:
    c = cfg.masking.cmae
    return CMAEObjective(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.color_jitter, views=c.views,
                         mask_token=c.mask_token, pool=c.pool, mask_ratio=cfg.masking.mask_ratio,
                         make_encoder=lambda: build_encoder(cfg))


ENTRIES = (
    Method("rmae", section=("rmae", RMAEConfig), check=check_rmae, flops=rmae_flops,
           masker=lambda cfg, enc: RandomMasking(enc.num_patches, cfg.masking.mask_ratio),
           objective=lambda cfg, enc, dec: RMAEObjective(enc, dec, lam=cfg.masking.rmae.lam, norm_pix=cfg.model.norm_pix_loss)),
    Method("cmae", section=("cmae", CMAEConfig), check=check_cmae, flops=cmae_flops, needs_decoder=False,
           masker=lambda cfg, enc: RandomMasking(enc.num_patches, cfg.masking.mask_ratio),
           objective=lambda cfg, enc, dec: cmae_objective(cfg, enc),
           hooks=lambda cfg, ctx: EMAHooks(ctx.engine.module.objective.ema_pairs(), cfg.masking.cmae.momentum)),
)
