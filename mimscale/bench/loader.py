"""Loader throughput: ``python -m mimscale.bench loader --source pil|folder|wds|ffcv --path P``.

``pil`` is the reference the public MAE code uses: torchvision ImageFolder, PIL decode of the
whole image, RandomResizedCrop(size, scale=(0.2, 1), bicubic), RandomHorizontalFlip, ToTensor,
Normalize, in a DataLoader with the same workers. The others are mimscale's loaders under the
loader contract (uint8 crops + boxes + flips + ids; normalization happens on the device).

Timing starts after ``--warmup`` batches (worker start-up, numba compilation) and covers
``--batches`` batches; img_per_s = batch x batches / seconds.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torchvision import datasets, transforms

from mimscale.config import DataConfig
from mimscale.data.streams import build_source, open_stream


def pil_transforms(size: int) -> tuple:
    """The public MAE code's training transform, as its two halves: (RandomResizedCrop, flip +
    ToTensor + Normalize); bench_decode.py times them apart."""
    crop = transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC)
    rest = transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    return crop, rest


def pil_reference(path: str, size: int, batch: int, workers: int):
    root = Path(path)
    root = root / "train" if (root / "train").is_dir() else root
    ds = datasets.ImageFolder(str(root), transform=transforms.Compose(pil_transforms(size)))
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)  # endless, like the others
    return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                                       prefetch_factor=4 if workers else None)


def mimscale_loader(source: str, path: str, size: int, batch: int, workers: int, shuffle_buffer: int):
    cfg = DataConfig(source=source, path=path, num_workers=workers, shuffle_buffer=shuffle_buffer)
    src = build_source(cfg)
    return open_stream(cfg, src, img_size=size, micro_batch=batch, rank=0, world_size=1, seed=0)


def bench_loader(args) -> dict:
    if args.source == "pil":
        loader = pil_reference(args.path, args.size, args.batch, args.workers)
    else:
        loader = mimscale_loader(args.source, args.path, args.size, args.batch, args.workers, args.shuffle_buffer)
    t_start = time.perf_counter()
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    warm_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        b = next(it)
        n += len(b[0] if isinstance(b, (list, tuple)) else b["image"])
    secs = time.perf_counter() - t0
    del it
    return {
        "bench": "loader", "source": args.source, "path": args.path, "workers": args.workers, "batch": args.batch,
        "size": args.size, "batches": args.batches, "images": n, "seconds": secs, "img_per_s": n / secs,
        "warmup_s": warm_s,
    }


def add_parser(sub) -> None:
    s = sub.add_parser("loader", help="time a data loader (images/s)")
    s.add_argument("--source", required=True, choices=("pil", "folder", "wds", "ffcv"))
    s.add_argument("--path", required=True, help="pil/folder: ImageNet root or class folders; wds: shard dir; ffcv: .beton")
    s.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (ffcv: numba threads)")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--batches", type=int, default=20)
    s.add_argument("--warmup", type=int, default=2, help="batches before timing starts")
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--shuffle-buffer", type=int, default=2000, help="wds: samples per shuffle group")
    s.add_argument("--json", action="store_true", help="print only the JSON result")

