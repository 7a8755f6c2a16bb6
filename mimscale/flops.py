"""Analytic FLOPs of the asymmetric encoder/decoder, and the peak FLOP/s MFU is measured against.

Pure formulas and device facts, importing nothing of mimscale: a method's own FLOP model (its
registry entry, ``mimscale/methods.py``) is built from these, and ``metrics.py`` asks the registry.
"""
from __future__ import annotations

import time

import torch


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one transformer block on ``tokens`` tokens (multiply-add = 2 FLOPs):
    qkv 3ND^2 + proj ND^2 + MLP 2rND^2 MACs, plus QK^T and AV at N^2 D MACs each."""
    n, d = tokens, dim
    return 2.0 * n * d * d * (4 + 2 * mlp_ratio) + 4.0 * n * n * d


def mim_flops_per_image(enc_dim: int, enc_depth: int, img_size: int, patch: int, visible: int, masked: int,
                        dec_dim: int, dec_depth: int, mlp_ratio: float = 4.0, train: bool = True) -> float:
    """FLOPs per image of one MIM step: patch embedding (over all L patches), encoder on
    1 + V tokens, decoder on 1 + V + M tokens, pixel head on M tokens. Thrown patches cost
    nothing past the patch embedding. ``train``: forward + backward = 3 x forward."""
    L = (img_size // patch) ** 2
    pix = patch * patch * 3
    fwd = 2.0 * L * pix * enc_dim
    fwd += enc_depth * block_flops(1 + visible, enc_dim, mlp_ratio)
    fwd += 2.0 * (1 + visible) * enc_dim * dec_dim
    fwd += dec_depth * block_flops(1 + visible + masked, dec_dim, mlp_ratio)
    fwd += 2.0 * masked * dec_dim * pix
    return 3.0 * fwd if train else fwd


def simmim_flops_per_image(enc_dim: int, enc_depth: int, img_size: int, patch: int, visible: int, masked: int,
                           mlp_ratio: float = 4.0, train: bool = True) -> float:
    """FLOPs per image of one SimMIM step: patch embedding (over all L patches), encoder on
    1 + V + M tokens (masked patches enter as mask tokens; thrown ones (AMT) not at all), and the
    linear head (D -> p*p*3) on every one of the V + M output tokens. No decoder."""
    L = (img_size // patch) ** 2
    pix = patch * patch * 3
    fwd = 2.0 * L * pix * enc_dim
    fwd += enc_depth * block_flops(1 + visible + masked, enc_dim, mlp_ratio)
    fwd += 2.0 * (visible + masked) * enc_dim * pix
    return 3.0 * fwd if train else fwd


# Dense bf16 tensor-core peaks, FLOP/s per GPU (vendor data sheets, without sparsity), matched
# as substrings of torch.cuda.get_device_name() in this order: the first match wins, so a more
# specific name comes before one it contains ("H100 PCIe" before "H100", "L40S" before "L40").
# NVL parts (two boards sold as one) are left out: their per-board figure is not the data sheet's.
GPU_PEAK_BF16 = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("A100", 312e12),  # 40 GB and 80 GB, SXM and PCIe
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("B200", 2250e12),
)


def cpu_matmul_peak(threads: int | None = None, n: int = 2048, reps: int = 3) -> float:
    """fp32 FLOP/s of a square matmul on this process's threads: the best of ``reps`` after a
    warm-up. The CPU "peak" MFU is measured against."""
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)  # its own stream: the training RNG state stays untouched
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s for one rank or None when unknown, where the number came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16:
            if key in name and "NVL" not in name:
                return value, f"table:{key} bf16 dense"
        return None, f"unknown GPU {name!r}: no MFU (add it to metrics.GPU_PEAK_BF16)"
    return cpu_matmul_peak(), f"cpu fp32 matmul probe, {torch.get_num_threads()} threads"
