"""The one image normalizer: ImageNet mean/std, from pixels to model inputs and back.

Loaders hand out uint8 pixels (loader.py's contract); the model normalizes them on the device:

    x = (pixels - mean * scale) / (std * scale)     [B, 3, H, W] float32
    pixels = x * (std * scale) + (mean * scale)     (denormalize; C-MAE jitters colours in [0, 1])

``scale`` is the pixel unit: 255 for uint8 pixels (training, AMT's refresh, evaluation), 1 for
floats in [0, 1] (C-MAE's colour-jittered views). mean, std are [1, 3, 1, 1] float32 built as
``tensor(IMAGENET_MEAN) * scale``; the arithmetic above, in this order, is what the stored loss
curves were made with, so it must not be rearranged (e.g. into one multiply-add).

``Normalizer`` keeps mean and std as device-resident buffers (moved by ``.to(device)``, no
host-to-device copy per step). They are non-persistent (never in a state_dict or checkpoint),
and an engine that casts a module's floating buffers to bf16 casts them too: the math then runs
in float32 on the cast values, as it always has.
"""
from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_stats(scale: int = 255, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each [1, 3, 1, 1] float32 in pixel units of ``scale`` (x 1 is exact)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * scale
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * scale
    return mean, std


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, H, W] (uint8, or float in mean/std's units) -> float32 (pixels - mean) / std."""
    return (pixels.float() - mean.float()) / std.float()


def denormalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x [B, 3, H, W] float32 normalized -> x * std + mean, in mean/std's pixel units."""
    return x * std.float() + mean.float()


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 model input, for callers without a Normalizer module (eval):
    the statistics are built on ``images``' device at each call."""
    mean, std = imagenet_stats(255, images.device)
    return normalize(images, mean, std)


class Normalizer(nn.Module):
    """mean, std (``imagenet_stats(scale)``) as non-persistent buffers. Call ``normalize`` /
    ``denormalize`` as methods: this module has no parameters and is not a step of the model's
    forward, so it stays out of module hooks (ZeRO-3's parameter fetch trace)."""

    def __init__(self, scale: int = 255):
        super().__init__()
        mean, std = imagenet_stats(scale)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> float32 normalized [B, 3, H, W]."""
        return normalize(pixels, self.mean, self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """normalized float32 [B, 3, H, W] -> pixels [B, 3, H, W] float32 in units of ``scale``."""
        return denormalize(x, self.mean, self.std)

    forward = normalize
