"""Loader throughput: ``python -m mimscale.bench loader --source pil|folder|wds|ffcv --path P [--decode cpu|nvjpeg]``.

``pil`` is the reference the public MAE code uses: torchvision ImageFolder, PIL decode of the
whole image, RandomResizedCrop(size, scale=(0.2, 1), bicubic), RandomHorizontalFlip, ToTensor,
Normalize, in a DataLoader with the same workers. The others are mimscale's loaders under the
loader contract (uint8 crops + boxes + flips + ids; normalization happens on the device).

``--decode nvjpeg`` (folder, wds): the workers read bytes and plan crops, and this process decodes
each batch on ``--device`` (mimscale/data/device_decode.py), as the trainer does; ``--device cuda``
(the default where there is one) also copies the CPU decoder's batches there, from pinned memory,
so both decoders deliver the same thing: uint8 crops on the device.

Timing starts after ``--warmup`` batches (worker start-up, numba compilation) and covers
``--batches`` batches; img_per_s = batch x batches / seconds. cores_used = CPU seconds (user +
system) of this process and its worker processes over the timed batches / wall seconds: the cores
a decoder needs to deliver img_per_s (a GPU's own work is not in it; the CPU threads that drive it
are). main_cores: this process's share of it (FFCV's decode threads run in this process).
"""
from __future__ import annotations

import time
from pathlib import Path

import psutil
import torch
from torchvision import datasets, transforms

from mimscale.config import DataConfig
from mimscale.data.device_decode import DeviceDecoder, check_available
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


def mimscale_loader(source: str, path: str, size: int, batch: int, workers: int, shuffle_buffer: int, decode: str = "cpu",
                    pin_memory: bool = False):
    cfg = DataConfig(source=source, path=path, num_workers=workers, shuffle_buffer=shuffle_buffer, decode=decode)
    src = build_source(cfg)
    return open_stream(cfg, src, img_size=size, micro_batch=batch, rank=0, world_size=1, seed=0, pin_memory=pin_memory)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process and its live child processes (DataLoader workers), of this
    process alone): user + system time."""
    own = time.process_time()  # this process at the OS clock's resolution (psutil's: 10 ms ticks)
    total = own
    for child in psutil.Process().children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:  # gone between the listing and the read
            pass
    return total, own


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_loader(args) -> dict:
    device = _device(args.device)
    cuda = device.type == "cuda"
    decoder = None
    if args.decode == "nvjpeg":
        check_available(args.decode, args.source, device)  # ConfigError naming data.decode and what is missing
        decoder = DeviceDecoder(args.size, device)
    if args.source == "pil":
        loader = pil_reference(args.path, args.size, args.batch, args.workers)
    else:
        loader = mimscale_loader(args.source, args.path, args.size, args.batch, args.workers, args.shuffle_buffer, args.decode, cuda)

    def deliver(b) -> int:
        """The batch's images on the device (decoded there with --decode nvjpeg); their count."""
        if isinstance(b, (list, tuple)):
            images = b[0]
        elif decoder is not None:
            images = decoder(b)
        else:
            images = b["image"]
        if cuda:
            images = images.to(device, non_blocking=True)
        return len(images)

    t_start = time.perf_counter()
    it = iter(loader)
    for _ in range(args.warmup):
        deliver(next(it))
    if cuda:
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t_start
    cpu0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        n += deliver(next(it))
    if cuda:
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    cpu1, own1 = cpu_seconds()
    del it
    return {
        "bench": "loader", "source": args.source, "path": args.path, "decode": args.decode,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "workers": args.workers, "batch": args.batch,
        "size": args.size, "batches": args.batches, "images": n, "seconds": secs, "img_per_s": n / secs,
        "cores_used": (cpu1 - cpu0) / secs, "main_cores": (own1 - own0) / secs,
        "img_per_s_per_core": n / (cpu1 - cpu0) if cpu1 > cpu0 else None, "warmup_s": warm_s,
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
    s.add_argument("--decode", default="cpu", choices=("cpu", "nvjpeg"),
                   help="folder, wds: data.decode (nvjpeg: workers read bytes, --device decodes the batch)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where batches are delivered (and decoded with --decode nvjpeg); auto: cuda when there is one")
    s.add_argument("--json", action="store_true", help="print only the JSON result")

