"""Training objectives other than MAE's pixel reconstruction, by ``masking.method``.

A method is a masker (which patches go where: ``mimscale.masking``) plus, optionally, an
objective (what is computed from the plan). MAE, AMT and AutoMAE use MIMModel's own
reconstruction path; R-MAE and C-MAE read the plan as two complementary views:
    rmae  shared decoder, distance between the views' decodings + auto-encoding (objectives/rmae.py)
    cmae  token-wise InfoNCE between online and EMA-target encodings (objectives/cmae.py)
An objective is a submodule of MIMModel, so its parameters are partitioned and trained by the
same engine and optimizer step, under every ZeRO stage.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

VIEW_METHODS = ("rmae", "cmae")


def build_objective(cfg, encoder: nn.Module, decoder: Optional[nn.Module]) -> Optional[nn.Module]:
    m = cfg.masking
    if m.method == "rmae":
        from mimscale.objectives.rmae import RMAEObjective

        return RMAEObjective(encoder, decoder, lam=m.rmae.lam, norm_pix=cfg.model.norm_pix_loss)
    if m.method == "cmae":
        from mimscale.objectives.cmae import CMAEObjective

        c = m.cmae
        return CMAEObjective(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.color_jitter)
    return None


def needs_decoder(cfg) -> bool:
    """C-MAE has no pixel decoder (an unused one would hold parameters that never get a gradient)."""
    return cfg.masking.method != "cmae"
