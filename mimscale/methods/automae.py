"""AutoMAE: a Gumbel-softmax mask generator trained against a discriminator and with the MAE in one
backward; its attention input from the online encoder, an EMA copy, a frozen pretrained ViT, or
AMT's stored maps (on masking.amt's refresh schedule)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from torch import nn

from mimscale.checkpoint.weights import extractor_state
from mimscale.errors import ConfigError
from mimscale.hooks.amt_refresh import AMTRefresh
from mimscale.hooks.base import LoopContext, LoopHooks
from mimscale.hooks.ema import EMAHooks
from mimscale.masking import extractor as frozen_extractor
from mimscale.masking.automae import EXTRACTORS, AutoMAEMasking
from mimscale.masking.base import Masker
from mimscale.masking.extractor import ATTENTION
from mimscale.methods.base import Method, build_encoder
from mimscale.methods.mae import reconstruction_flops
from mimscale.models.registry import ENCODERS

Extractor = Literal[EXTRACTORS]


@dataclass
class AutoMAEConfig:
    extractor: Extractor = "online"  # online | ema | frozen | stored (AMT's store, on masking.amt's schedule)
    # frozen: a local weights file (.safetensors/.pt; timm's or mimscale's keys), a mimscale
    # checkpoint or export; never downloaded
    extractor_checkpoint: str = ""
    # frozen: the checkpoint's timm model name (e.g. vit_small_patch16_224 for DINO-S); empty: the
    # architecture of the checkpoint's own model section, else of model.name
    extractor_model: str = ""
    extractor_img_size: int = 0  # frozen: the extractor's input size; 0: the timm model's own (else the encoder's)
    attention: Literal[tuple(ATTENTION)] = "raw"  # raw: softmax rows (the paper's); stretched: per-head min-max
    ema_decay: float = 0.999  # ema: per optimizer step
    lam: float = 0.2  # weight of the generator's adversarial loss
    throw_ratio: float = 0.0  # > 0: the generator's order also picks thrown patches (as AMT)


def check_automae(cfg, selected: bool) -> None:
    u = cfg.masking.automae
    if selected:
        if u.extractor == "frozen" and not u.extractor_checkpoint:
            raise ConfigError("config key 'masking.automae.extractor_checkpoint' must name a checkpoint when "
                              "masking.automae.extractor is 'frozen'")
        if not 0.0 <= u.throw_ratio < 1.0 or cfg.masking.mask_ratio + u.throw_ratio >= 1.0:
            raise ConfigError(f"config keys 'masking.mask_ratio' + 'masking.automae.throw_ratio' = {cfg.masking.mask_ratio} + "
                              f"{u.throw_ratio} must leave some patches visible (throw_ratio in [0, 1), sum < 1)")
    if not 0.0 <= u.ema_decay < 1.0:
        raise ConfigError(f"config key 'masking.automae.ema_decay' = {u.ema_decay} must be in [0, 1)")
    if u.lam < 0:
        raise ConfigError(f"config key 'masking.automae.lam' = {u.lam} must be >= 0")
    if u.extractor_img_size < 0:
        raise ConfigError(f"config key 'masking.automae.extractor_img_size' = {u.extractor_img_size} must be >= 0 (0: the model's own)")


def frozen_extractor_for(cfg, encoder) -> nn.Module:
    """AutoMAE's frozen extractor: a timm ViT with the checkpoint's weights (masking/extractor.py).
    Without a timm name its architecture is the checkpoint's own model section, else model.name's."""
    a = cfg.masking.automae
    state, section = extractor_state(a.extractor_checkpoint)
    section = section or {"name": cfg.model.name, "img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size}
    spec = ENCODERS[section["name"]]
    return frozen_extractor.build(state, source=a.extractor_checkpoint, name=a.extractor_model, spec=spec,
                                  patch_size=section["patch_size"] or spec.patch_size, img_size=section["img_size"],
                                  grid=encoder.grid, encoder_patch=encoder.patch_size, attention=a.attention,
                                  ext_img_size=a.extractor_img_size)


def automae_masker(cfg, encoder) -> Masker:
    m, a = cfg.masking, cfg.masking.automae
    frozen = frozen_extractor_for(cfg, encoder) if a.extractor == "frozen" else None
    return AutoMAEMasking(encoder, mask_ratio=m.mask_ratio, throw_ratio=a.throw_ratio, lam=a.lam, extractor=a.extractor, frozen=frozen, attention=a.attention,
                          make_encoder=lambda: build_encoder(cfg))


def automae_hooks(cfg, ctx: LoopContext) -> Optional[LoopHooks]:
    a = cfg.masking.automae
    if a.extractor == "stored":
        return AMTRefresh(ctx)
    if a.extractor == "ema":
        module = ctx.engine.module
        return EMAHooks(list(zip(module.encoder.parameters(), module.masker.ema.parameters())), a.ema_decay)
    return None


ENTRIES = (
    Method("automae", preset="automae_vit_base.yaml", section=("automae", AutoMAEConfig), check=check_automae,
           flops=reconstruction_flops, masker=automae_masker, hooks=automae_hooks,
           uses_store=lambda cfg: cfg.masking.automae.extractor == "stored",
           # the frozen extractor loads its checkpoint into a whole network when it is built
           partitioned_build=lambda cfg: cfg.masking.automae.extractor != "frozen"),
)
