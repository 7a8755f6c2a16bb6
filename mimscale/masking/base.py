"""MaskPlan: the only thing the model knows about masking.

A plan splits each sample's L patch indices into three disjoint sets:
  visible [B, V]  patches the encoder sees,
  masked  [B, M]  patches the decoder reconstructs (the loss is taken on these only),
  thrown  [B, T]  patches that appear nowhere: not in the encoder, decoder or loss (AMT);
with V + M + T = L and the same V, M, T for every sample of a batch (so tensors stay dense).
A masking method is an ``nn.Module`` whose forward turns a batch into a plan; it runs on the
device inside the engine's forward, so its parameters (if any) are sharded and trained like the
rest of the model.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass
class MaskPlan:
    visible: torch.Tensor  # [B, V] int64 patch indices in 0..L-1
    masked: torch.Tensor  # [B, M] int64
    thrown: torch.Tensor  # [B, T] int64 (T may be 0)
    num_patches: int  # L
    # Optional [B, L] per-patch multiplier applied to patch tokens before they are gathered. Methods
    # that learn the mask (AutoMAE) pass s with values 1 in the forward but a gradient path to s.
    token_scale: Optional[torch.Tensor] = None
    # Optional loss a method adds to the reconstruction loss (AutoMAE's adversarial terms, already
    # routed so each term's gradient reaches only its own parameters), and its detached parts.
    aux_loss: Optional[torch.Tensor] = None
    aux_terms: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.visible.shape[0]

    def fractions(self) -> dict[str, float]:
        L = float(self.num_patches)
        return {
            "visible": self.visible.shape[1] / L,
            "masked": self.masked.shape[1] / L,
            "thrown": self.thrown.shape[1] / L,
        }

    @staticmethod
    def from_order(order: torch.Tensor, num_visible: int, num_masked: int) -> "MaskPlan":
        """Split a per-sample ordering of patches [B, L]: first ``num_visible`` visible, next
        ``num_masked`` masked, the rest thrown."""
        B, L = order.shape
        if num_visible < 1 or num_masked < 1 or num_visible + num_masked > L:
            raise ValueError(f"bad plan sizes: visible {num_visible}, masked {num_masked} of {L}")
        return MaskPlan(
            visible=order[:, :num_visible],
            masked=order[:, num_visible : num_visible + num_masked],
            thrown=order[:, num_visible + num_masked :],
            num_patches=L,
        )


class Masker(nn.Module, metaclass=abc.ABCMeta):
    """Protocol of a masking method: ``forward(images, meta) -> MaskPlan``.

    images: [B, 3, H, W] normalized float images on the device.
    meta:   the rest of the batch on the device: ``box`` [B, 4], ``flip`` [B], ``index`` [B].
    """

    num_patches: int

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, meta: dict) -> MaskPlan:
        """Return the plan for this batch (see the class docstring for shapes)."""

    @abc.abstractmethod
    def initial_sizes(self) -> tuple[int, int, int]:
        """(visible, masked, thrown) of the plans at the start of training (for FLOP counts
        before the first batch; the trainer follows the actual plans after that)."""


def plan_sizes(num_patches: int, mask_ratio: float, throw_ratio: float = 0.0) -> tuple[int, int, int]:
    """(visible, masked, thrown) counts; masked = round(r L), thrown = round(t L), visible the rest."""
    masked = int(round(num_patches * mask_ratio))
    thrown = int(round(num_patches * throw_ratio))
    visible = num_patches - masked - thrown
    if visible < 1 or masked < 1:
        raise ValueError(f"mask ratio {mask_ratio} and throw ratio {throw_ratio} leave no visible or masked patch")
    return visible, masked, thrown
