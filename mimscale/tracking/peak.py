"""The peak FLOP/s MFU is measured against: a table of GPUs' dense bf16 peaks, or a timed fp32
matmul on a CPU. One function, ``peak_flops``, answers for the training log and the bench."""
from __future__ import annotations

import time

import torch

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


def cpu_matmul_peak(n: int = 2048, reps: int = 3) -> float:
    """fp32 FLOP/s of a square matmul on this process's threads: the best of ``reps`` after a
    warm-up. The CPU "peak" MFU is measured against."""
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


def peak_flops(device: torch.device, at_least: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s for one rank or None when unknown, where the number came from).

    On a CPU the probe is timed now; ``at_least`` (an earlier probe's result) keeps the higher of
    the two, since a probe measured low (a noisy neighbour) would flatter the MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16:
            if key in name and "NVL" not in name:
                return value, f"table:{key} bf16 dense"
        return None, f"unknown GPU {name!r}: no MFU (add it to mimscale.tracking.peak.GPU_PEAK_BF16)"
    return max(cpu_matmul_peak(), at_least or 0.0), f"cpu fp32 matmul probe, {torch.get_num_threads()} threads"
