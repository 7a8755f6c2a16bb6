"""What every method family file builds on: the ``Method`` entry, the encoder a config names, and
the transformer arithmetic the families' FLOP models are made of.

A family file (mae.py, amt.py, ...) imports this module and the parts it assembles (maskers,
objectives, hooks, models), never the registry (``mimscale/methods/__init__.py``), which imports
the families.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from mimscale.hooks.base import LoopHooks
from mimscale.masking.base import Masker
from mimscale.models.registry import ENCODERS, EncoderSpec
from mimscale.models.vit import ViTEncoder


@dataclass(frozen=True)
class Method:
    """One masking method. ``cfg`` is the run's Config; ``encoder`` a ViTEncoder.

    masker(cfg, encoder) -> Masker             which patches are visible / masked / thrown
    flops(cfg, visible, masked) -> float        training FLOPs per image at those plan sizes
    objective(cfg, encoder, decoder) -> Module  a loss other than MAE's pixel loss (None: MAE's)
    hooks(cfg, ctx) -> LoopHooks                what the method needs from the loop (None: nothing)
    section: (name, dataclass)                  its keys under ``masking.<name>``
    check(cfg, selected)                        raises ConfigError naming the key; runs for every
                                                entry (so a preset's unused sections stay valid),
                                                ``selected`` when this entry is the run's method
    needs_decoder                               False: no pixel decoder is built (it would hold
                                                parameters that never get a gradient)
    uses_store(cfg)                             the masker reads AMT's attention maps (meta ``attn``)
    partitioned_build(cfg)                      under ZeRO-3 the model can be built inside
                                                deepspeed.zero.Init (False: a part copies or
                                                reparametrizes weights after they were built)
    preset                                      the ViT-B preset bench uses (None: not benchmarked)
    alias                                       another name bench and the docs use (random: mae)
    """

    name: str
    masker: Callable[..., Masker]
    flops: Callable[..., float]
    objective: Optional[Callable[..., nn.Module]] = None
    hooks: Optional[Callable[..., LoopHooks]] = None
    section: Optional[tuple[str, type]] = None
    check: Optional[Callable[..., None]] = None
    needs_decoder: bool = True
    uses_store: Callable[..., bool] = lambda cfg: False
    partitioned_build: Callable[..., bool] = lambda cfg: True
    preset: Optional[str] = None
    alias: Optional[str] = None


def encoder_spec(cfg) -> tuple[EncoderSpec, int]:
    """(the encoder's spec, its patch size) for ``cfg.model``."""
    spec = ENCODERS[cfg.model.name]
    return spec, cfg.model.patch_size or spec.patch_size


def build_encoder(cfg) -> ViTEncoder:
    """The run's encoder from ``cfg.model`` (the one constructor call: the model's and any copy's)."""
    m = cfg.model
    return ViTEncoder(ENCODERS[m.name], img_size=m.img_size, patch_size=m.patch_size, grad_ckpt=m.grad_ckpt, drop_path=m.drop_path,
                      layer_scale=m.layer_scale, pos_embed=m.pos_embed)


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one transformer block on ``tokens`` tokens (multiply-add = 2 FLOPs):
    qkv 3ND^2 + proj ND^2 + MLP 2rND^2 MACs, plus QK^T and AV at N^2 D MACs each."""
    n, d = tokens, dim
    return 2.0 * n * d * d * (4 + 2 * mlp_ratio) + 4.0 * n * n * d


def block_recompute_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of re-running one checkpointed block in the backward (models/vit.run_blocks:
    torch's non-reentrant checkpoint with early stop): ``block_flops`` less the MLP's second linear
    (2 r N D^2), whose output no backward formula reads, so the re-run stops at its input."""
    return block_flops(tokens, dim, mlp_ratio) - 2.0 * tokens * mlp_ratio * dim * dim


def patch_embed_flops(img_size: int, patch: int, dim: int) -> float:
    """Forward FLOPs of the patch embedding over all L patches (thrown ones included)."""
    return 2.0 * (img_size // patch) ** 2 * patch * patch * 3 * dim
