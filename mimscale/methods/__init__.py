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
from mimscale.methods.base import Method, block_recompute_flops, encoder_spec
from mimscale.models.decoder import MAEDecoder
from mimscale.models.mim import MIMModel
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder, checkpointed_count

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


# The block passes of a training step that record a graph, per image, as (encoder tokens of each
# pass, decoder tokens of each pass); keyed by a family's FLOP model, whose token layout they
# mirror (every method on that FLOP model runs those passes). Passes without grad (C-MAE's EMA
# target, AutoMAE's extractors, AMT's refresh) never checkpoint and are absent.
_TRAINED_PASSES = {
    mae.reconstruction_flops: lambda cfg, v, m: ([1 + v], [1 + v + m]),  # encoder on CLS + V, decoder on CLS + V + M
    simmim.simmim_flops: lambda cfg, v, m: ([1 + v + m], []),  # mask tokens in the encoder, no decoder
    rmae_cmae.rmae_flops: lambda cfg, v, m: ([1 + v, 1 + m], [1 + v + m, 1 + v + m]),  # each view: encoder, decoder
    rmae_cmae.cmae_flops: lambda cfg, v, m: ([1 + (v + m if cfg.masking.cmae.mask_token else v)] * 2, []),  # two online views
}


def recompute_flops(cfg, visible: int, masked: int) -> float:
    """Forward FLOPs per image that activation checkpointing (``model.grad_ckpt``) adds to a
    training step at plan sizes (visible, masked): every checkpointed encoder / decoder block runs
    its forward once more in the backward (up to its last linear: ``block_recompute_flops``), in
    each pass with grad. 0 when off.

    The log's MFU stays on ``flops`` (the model's FLOPs); the hardware's FLOPs per image are
    ``flops + recompute_flops`` (HFU). Blocks only: the patch embedding, the norms and heads outside
    the blocks are not recomputed."""
    k = cfg.model.grad_ckpt
    if k <= 0:
        return 0.0
    method = of(cfg)
    passes = _TRAINED_PASSES.get(method.flops)
    if passes is None:
        raise ValueError(f"method {method.name!r}: its FLOP model has no block passes for recompute_flops; add them to "
                         "mimscale.methods._TRAINED_PASSES")
    spec, _ = encoder_spec(cfg)
    enc_tokens, dec_tokens = passes(cfg, visible, masked)
    enc = checkpointed_count(spec.depth, k) * sum(block_recompute_flops(n, spec.dim, spec.mlp_ratio) for n in enc_tokens)
    # the decoder's blocks have MAEDecoder's MLP ratio 4 (build_model passes none), whatever the encoder's (ViT-g: 48/11)
    dec = checkpointed_count(cfg.model.decoder_depth, k) * sum(block_recompute_flops(n, cfg.model.decoder_dim, 4.0) for n in dec_tokens)
    return float(enc + dec)


def build_hooks(cfg, ctx: LoopContext) -> LoopHooks:
    """The method's loop hooks; ``LoopHooks()`` (which does nothing) when it has none."""
    m = of(cfg)
    return (m.hooks(cfg, ctx) if m.hooks is not None else None) or LoopHooks()


def build_model(cfg) -> MIMModel:
    """Encoder, decoder (if the method needs one), masker and objective from a Config."""
    method = of(cfg)
    spec = ENCODERS[cfg.model.name]
    m = cfg.model
    encoder = ViTEncoder(spec, img_size=m.img_size, patch_size=m.patch_size, grad_ckpt=m.grad_ckpt, drop_path=m.drop_path,
                         layer_scale=m.layer_scale, pos_embed=m.pos_embed)
    decoder = MAEDecoder(spec.dim, encoder.grid, encoder.patch_size, dim=m.decoder_dim, depth=m.decoder_depth,
                         heads=m.decoder_heads, grad_ckpt=m.grad_ckpt) if method.needs_decoder else None
    masker = method.masker(cfg, encoder)
    objective = method.objective(cfg, encoder, decoder) if method.objective is not None else None
    return MIMModel(encoder, decoder, masker, norm_pix=m.norm_pix_loss, objective=objective)
