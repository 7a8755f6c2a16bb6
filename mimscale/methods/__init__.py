"""THE method registry: every masking method is one ``Method`` entry of a family file in this
package, and nothing else in mimscale names a method. config (the ``masking.method`` choices and
each method's section), the model builder, the loop (hooks), FLOPs, bench and eval all ask here.

Families: mae.py (MAE), amt.py (AMT, AMT on SimMIM), automae.py, rmae_cmae.py, simmim.py,
blockwise.py; each holds its config section, checks, builders and FLOP model, and imports
base.py, never this module. Adding a method = its masker (masking/), optionally an objective or
hooks, and its entry in a family file listed below (see docs: "Adding a method").
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from mimscale.errors import ConfigError
from mimscale.hooks.base import LoopContext, LoopHooks
from mimscale.methods import amt, automae, blockwise, mae, rmae_cmae, simmim
from mimscale.methods.base import Method
from mimscale.models.decoder import MAEDecoder
from mimscale.models.mim import MIMModel
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder

METHODS: dict[str, Method] = {m.name: m for m in (
    *mae.ENTRIES, amt.AMT, *automae.ENTRIES, *rmae_cmae.ENTRIES, *blockwise.ENTRIES, *simmim.ENTRIES, amt.AMT_SIMMIM,
)}

MethodName = Literal[tuple(METHODS)]


def of(cfg) -> Method:
    """The entry of the run's method (``masking.method``): the one place that key is read."""
    return get(cfg.masking.method)


def select(name: str) -> str:
    """The ``--set`` override that selects method ``name`` (or its alias)."""
    return f"masking.method={get(name).name}"


def get(name: str) -> Method:
    """The entry for ``masking.method`` = ``name`` (or its alias)."""
    for m in METHODS.values():
        if name in (m.name, m.alias):
            return m
    allowed = ", ".join(n for m in METHODS.values() for n in (m.name, m.alias) if n)
    raise ConfigError(f"config key 'masking.method' = {name!r} is not allowed; allowed values: {allowed}")


def sections() -> list[tuple[str, type]]:
    """Every method's config section (name, dataclass), in registry order."""
    return [m.section for m in METHODS.values() if m.section is not None]


def section_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """The sections as dataclass fields (for config.MaskingConfig)."""
    return [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in sections()]


def check_all(cfg) -> None:
    """Every entry's check (a preset's unused sections stay valid); the run's own with ``selected``."""
    chosen = of(cfg)
    for m in METHODS.values():
        if m.check is not None:
            m.check(cfg, m is chosen)


def flops(cfg, visible: int, masked: int) -> float:
    """Training FLOPs per image of ``cfg``'s method at plan sizes (visible, masked): THE FLOP model
    the log's MFU, the bench and the reports use."""
    return of(cfg).flops(cfg, visible, masked)


def build_hooks(cfg, ctx: LoopContext) -> LoopHooks:
    """The method's loop hooks; ``LoopHooks()`` (which does nothing) when it has none."""
    m = of(cfg)
    return (m.hooks(cfg, ctx) if m.hooks is not None else None) or LoopHooks()


def build_model(cfg) -> MIMModel:
    """Encoder, decoder (if the method needs one), masker and objective from a Config."""
    method = of(cfg)
    spec = ENCODERS[cfg.model.name]
    encoder = ViTEncoder(spec, img_size=cfg.model.img_size, patch_size=cfg.model.patch_size)
    m = cfg.model
    decoder = MAEDecoder(spec.dim, encoder.grid, encoder.patch_size, dim=m.decoder_dim, depth=m.decoder_depth,
                         heads=m.decoder_heads) if method.needs_decoder else None
    masker = method.masker(cfg, encoder)
    objective = method.objective(cfg, encoder, decoder) if method.objective is not None else None
    return MIMModel(encoder, decoder, masker, norm_pix=m.norm_pix_loss, objective=objective)
