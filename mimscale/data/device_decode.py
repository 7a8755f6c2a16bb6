"""JPEG decoding on the training device (``data.decode: nvjpeg``): workers read bytes, the device decodes.

MAE is cheap per image, so a GPU node's CPUs cannot decode as fast as its GPUs train. With
``data.decode: nvjpeg`` the loader workers do everything *but* the decode: they read a file's
bytes, parse its JPEG header for the image size (no pixel is decoded) and draw the crop box and
flip from it with the very rules and seeds of the CPU decoder (crop.py's ``plan_crop``), so
sample ids, boxes, flips, exact resume and global-batch dealing are the same whichever decoder
runs (AMT/AutoMAE keep their alignment). The training process then decodes the whole batch with
``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG, batched, on a CUDA device; libjpeg-turbo
on a CPU device, which is how the tests run this module) and crops, resizes and flips each image
there.

A batch in this mode carries, instead of ``image`` (the rest of the loader contract is unchanged):
  jpeg          [N] uint8         every sample's JPEG bytes, concatenated (one buffer: one shared-
                                  memory segment per batch between processes, not one per image)
  jpeg_offsets  [B + 1] int64     sample i's bytes are jpeg[offsets[i]:offsets[i + 1]] (empty: a
                                  row the worker cropped itself, see ``cropped``)
  jpeg_region   [B, 4] int64      (x0, y0, x1, y1): the crop in original pixels (CropPlan.region)
  jpeg_reduce   [B] int64         8 / M of the CPU decoder's M/8 IDCT-scale decode of that crop
  jpeg_dims     [B, 2] int64      (height, width) from the header: a decode of another size is bad
  cropped       [K, 3, S, S] uint8  rows the worker decoded on the CPU (files that are not plain
                                  baseline/progressive YCbCr/RGB/gray JPEGs with an end marker: CMYK,
                                  PNG-in-.JPEG, truncated; crop.py's usual fallbacks, same box rule)
  cropped_at    [K] int64         their rows
  jpeg_names    list[str]         each sample's file (folder) or shard:key (WebDataset), for errors

Bad files: one that the header parse or the worker's CPU fallback rejects is skipped in the
worker exactly as with ``data.decode: cpu`` (the next index fills its slot, counted in
``skipped``). One that only the device decode rejects (corrupt entropy data, a size that
disagrees with its header) cannot be refilled from the data any more, and a batch keeps its size
(global batches are dealt by size): its row becomes a copy of the next good row of the batch
(image, box, flip, index, label together, so per-sample side information stays aligned), it is
counted in ``skipped`` and named in a warning. A batch with no decodable row, or more than
``data.max_bad_in_a_row`` device-rejected files in a row, is an error naming the files.

Crop pixels: the CPU decoder decodes a crop at the smallest IDCT scale M/8 that keeps it >= S
pixels (libjpeg averages each 8 x 8 block down inside the IDCT), then resizes with OpenCV: bicubic
up to 1.5x shrink, area averaging beyond (crop.py). Here, from the full-size decode: an 8/M box
average, then torch's bicubic (align_corners=False, a = -0.75, no antialias: OpenCV's INTER_CUBIC
kernel) up to 1.5x and its antialiased bicubic beyond, in float32, rounded. Over the 1000 sample
ImageNet JPEGs at S = 224 the two decoders' crops of the same boxes differ by a mean 1.28 levels
(0-255) per pixel (99th percentile of images 2.3, worst 3.8) from the default CPU crops
(data.jpeg_idct fast), and by 0.16 from accurate-IDCT CPU crops: the gap is almost all libjpeg's
fast integer IDCT against the accurate one torchvision's libjpeg (and nvJPEG) use. Without the box
average, or with torch's area mode for large shrinks, it is larger (S = 64: 2.5 instead of 0.8).
tests/unit/data/test_device_decode.py bounds it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
import torchvision.io as tvio

from mimscale.data.crop import Crop, crop_bytes, plan_crop
from mimscale.errors import ConfigError

DECODERS = ("cpu", "nvjpeg")
# crop.py's _resize switches from bicubic to area averaging beyond this shrink factor
AREA_BEYOND = 1.5
_COLORSPACES = ("YCbCr", "RGB", "Gray")


@dataclass
class Planned:
    """A JPEG left for the device: its bytes and where its crop lies (the worker's share)."""

    data: np.ndarray  # [n] uint8 the file's bytes
    region: tuple[int, int, int, int]  # (x0, y0, x1, y1) original pixels
    dims: tuple[int, int]  # (height, width) from the header
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) / (W, H), as a Crop's
    flip: bool
    reduce: int = 1  # 8 / M: the CPU decoder decodes this crop at scale M/8
    converted: bool = False


def _has_eoi(data: bytes) -> bool:
    """An end-of-image marker in the last 64 bytes (as the region decoder's strict check): a file
    cut short goes to the CPU fallback, which refuses it as ``data.decode: cpu`` does."""
    return b"\xff\xd9" in data[-64:]


def plan_bytes(data: bytes, rng: np.random.Generator, size: int, scale=(0.2, 1.0), hflip: float = 0.5,
               fast_idct: bool = True) -> Union[Planned, Crop]:
    """The worker's share of a sample: a ``Planned`` JPEG for the device when its header says
    it is one the device decodes, else the CPU decoder's ``Crop`` (crop_bytes, with the same
    untouched ``rng``: the same box rule and fallbacks; raises UnreadableImage like it)."""
    if data[:2] == b"\xff\xd8" and _has_eoi(data):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None
        if colorspace in _COLORSPACES and width > 0 and height > 0:
            plan = plan_crop(rng, width, height, size, scale, hflip)
            return Planned(np.frombuffer(data, np.uint8), plan.region(width, height), (height, width), plan.box, plan.flip,
                           8 // plan.m)
    return crop_bytes(data, rng, size, scale, hflip, fast_idct)


def pack(items: list[Union[Planned, Crop]], names: list[str]) -> dict:
    """A batch's image fields (module docstring) from its samples in row order."""
    sizes = [len(it.data) if isinstance(it, Planned) else 0 for it in items]
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    jpeg = np.empty(int(offsets[-1]), np.uint8)
    region = np.zeros((len(items), 4), np.int64)
    dims = np.zeros((len(items), 2), np.int64)
    reduce = np.ones(len(items), np.int64)
    cropped, cropped_at = [], []
    for i, it in enumerate(items):
        if isinstance(it, Planned):
            jpeg[offsets[i]:offsets[i + 1]] = it.data
            region[i], dims[i], reduce[i] = it.region, it.dims, it.reduce
        else:
            cropped.append(torch.from_numpy(it.image))
            cropped_at.append(i)
    size = cropped[0].shape[0] if cropped else 0
    return {
        "jpeg": torch.from_numpy(jpeg),
        "jpeg_offsets": torch.from_numpy(offsets),
        "jpeg_region": torch.from_numpy(region),
        "jpeg_dims": torch.from_numpy(dims),
        "jpeg_reduce": torch.from_numpy(reduce),
        # HWC crops stacked, viewed as [K, 3, S, S] channels_last (as loader.stack_images)
        "cropped": (torch.stack(cropped) if cropped else torch.zeros(0, size, size, 3, dtype=torch.uint8)).permute(0, 3, 1, 2),
        "cropped_at": torch.tensor(cropped_at, dtype=torch.int64),
        "box": torch.tensor([it.box for it in items], dtype=torch.float32).view(-1, 4),
        "flip": torch.tensor([it.flip for it in items], dtype=torch.bool),
        "converted": torch.tensor(sum(int(it.converted) for it in items), dtype=torch.int64),
        "jpeg_names": list(names),
    }


def collate(samples: list[dict]) -> dict:
    """loader.collate's counterpart for ``data.decode: nvjpeg`` (CropDataset's samples carry
    ``item``, a Planned or a Crop, and ``name`` instead of image/box/flip/converted)."""
    return {
        **pack([s["item"] for s in samples], [s["name"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "skipped": torch.tensor(sum(s["skipped"] for s in samples), dtype=torch.int64),
    }


def resize_region(image: torch.Tensor, size: int, flip: bool, reduce: int = 1) -> torch.Tensor:
    """image [3, h, w] uint8 (a crop view) -> [3, size, size] uint8, mirrored when ``flip``, as
    crop.py builds a crop: a ``reduce`` x ``reduce`` box average first where the CPU decoder
    decodes at scale 1/``reduce`` (libjpeg's scaled IDCT averages 8 x 8 blocks down), then bicubic
    (no antialias: OpenCV's INTER_CUBIC) up to AREA_BEYOND x shrink, antialiased bicubic beyond
    (where OpenCV averages areas; torch's own area mode is adaptive pooling, further from OpenCV's
    at fractional factors)."""
    x = image.unsqueeze(0).float()
    if reduce > 1:  # ceil_mode: a partial last block is averaged over its own pixels, as libjpeg's edge
        x = F.avg_pool2d(x, reduce, reduce, ceil_mode=True)
    antialias = min(x.shape[2], x.shape[3]) / size > AREA_BEYOND
    out = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=antialias)
    out = out[0].round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(-1) if flip else out


def _decode_list(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """Each JPEG decoded to [3, H, W] uint8 on ``device`` (RGB, gray expanded), or the exception
    that refused it. One batched call; when it fails (one bad file fails the batch), each file
    alone to find which."""
    try:
        return list(tvio.decode_jpeg(datas, mode=tvio.ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list = []
        for d in datas:
            try:
                out.append(tvio.decode_jpeg(d, mode=tvio.ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                out.append(e)
        return out


def _decode(datas: list[torch.Tensor], device: torch.device, side: Optional["torch.cuda.Stream"]) -> list[torch.Tensor | Exception]:
    """``_decode_list`` on a CPU device; on a CUDA device with the ``side`` stream current.

    Why the side stream: torchvision's CUDA decoder allocates its outputs on the caller's stream
    but writes them from a stream of its own that does not wait for the caller's (pytorch/vision
    PR 9606), so a block the training stream freed while its kernels still read it (last step's
    activations: the CPU runs ahead) could be overwritten. Allocated on ``side`` instead, the
    outputs never reuse the training stream's blocks; the training stream then waits for ``side``,
    and each output is marked as used by it (record_stream), so a later decode does not reuse its
    block before the crops read from it have run."""
    if not datas:
        return []
    if side is None:
        return _decode_list(datas, device)
    current = torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        out = _decode_list(datas, device)
    current.wait_stream(side)
    for img in out:
        if isinstance(img, torch.Tensor):
            img.record_stream(current)
    return out


class DeviceDecoder:
    """Decodes the batches of ``data.decode: nvjpeg`` on ``device`` (the trainer's to_device)."""

    def __init__(self, size: int, device: torch.device, max_bad_in_a_row: int = 64):
        self.size = size
        self.device = torch.device(device)
        self.max_bad = max_bad_in_a_row
        self.bad_in_a_row = 0  # device-rejected files in a row, across batches
        self.bad = 0  # device-rejected files so far (also counted in the batches' skipped)
        self._warned = 0
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # see _decode

    def __call__(self, batch: dict) -> torch.Tensor:
        """batch (module docstring) -> images [B, 3, S, S] uint8 on the device (channels_last).
        Rows whose file the device rejects are replaced in ``batch`` itself (box, flip, index,
        label) and counted into batch["skipped"]."""
        offsets = batch["jpeg_offsets"].tolist()
        b, s = len(offsets) - 1, self.size
        cropped_at = set(batch["cropped_at"].tolist())
        rows = [i for i in range(b) if i not in cropped_at]
        jpeg = batch["jpeg"]
        results = _decode([jpeg[offsets[i]:offsets[i + 1]] for i in rows], self.device, self.side)
        out = torch.empty(b, s, s, 3, dtype=torch.uint8, device=self.device).permute(0, 3, 1, 2)
        if cropped_at:
            out[batch["cropped_at"].to(self.device)] = batch["cropped"].to(self.device, non_blocking=True)
        regions, dims, flips = batch["jpeg_region"].tolist(), batch["jpeg_dims"].tolist(), batch["flip"].tolist()
        reduce = batch["jpeg_reduce"].tolist()
        bad: dict[int, str] = {}
        for i, img in zip(rows, results):
            if isinstance(img, Exception):
                bad[i] = f"{type(img).__name__}: {(str(img).strip().splitlines() or [''])[0][-200:]}"
                continue
            if list(img.shape[1:]) != dims[i]:
                bad[i] = f"decoded {img.shape[2]} x {img.shape[1]}, its header says {dims[i][1]} x {dims[i][0]}"
                continue
            x0, y0, x1, y1 = regions[i]
            out[i] = resize_region(img[:, y0:y1, x0:x1], s, flips[i], reduce[i])
        self._account(batch, bad, b, out)
        return out

    def _account(self, batch: dict, bad: dict[int, str], b: int, out: torch.Tensor) -> None:
        """Replace each device-rejected row by the next good row (cyclically), count and name them."""
        names = batch.get("jpeg_names") or [f"row {i}" for i in range(b)]
        if not bad:
            self.bad_in_a_row = 0
            return
        self.bad += len(bad)
        good = [i for i in range(b) if i not in bad]
        run, worst = self.bad_in_a_row, 0
        for i in range(b):
            run = run + 1 if i in bad else 0
            worst = max(worst, run)
        self.bad_in_a_row = run
        listed = "; ".join(f"{names[i]} ({why})" for i, why in bad.items())
        if not good or worst > self.max_bad:
            raise RuntimeError(f"data.decode=nvjpeg: {len(bad)} of {b} files of a batch cannot be decoded on {self.device} "
                               f"({worst} in a row, data.max_bad_in_a_row = {self.max_bad}): {listed}")
        if self._warned < 10:
            print(f"[mimscale.data] skipping undecodable on {self.device}: {listed}; its row repeats the batch's next good sample",
                  file=sys.stderr)
            self._warned += 1
        for i in bad:
            j = next((k for k in good if k > i), good[0])
            out[i] = out[j]
            for key in ("box", "flip", "index", "label"):
                batch[key][i] = batch[key][j]
        batch["skipped"] = batch["skipped"] + len(bad)


def check_available(decode: str, source: str, device: torch.device) -> None:
    """ConfigError (naming data.decode and what is missing) when ``decode`` cannot run here.

    ``nvjpeg`` needs JPEG bytes (data.source folder or wds) and torchvision's ``decode_jpeg``
    on ``device``. On a CUDA device a one-pixel JPEG is decoded there: that is what fails on a
    torchvision built without nvJPEG or without its CUDA libraries. On a CPU device the same code
    decodes with libjpeg-turbo (how the tests run it; it saves no CPU time, see the docs)."""
    if decode == "cpu":
        return
    if decode not in DECODERS:
        raise ConfigError(f"config key 'data.decode' = {decode!r} is not allowed; allowed values: {', '.join(DECODERS)}")
    if source not in ("folder", "wds"):
        raise ConfigError(f"config key 'data.decode' = nvjpeg decodes JPEG files: data.source must be folder or wds, not {source!r} "
                          "(ffcv decodes in its own pipeline, synthetic has no files)")
    if getattr(tvio, "decode_jpeg", None) is None:
        raise ConfigError("config key 'data.decode' = nvjpeg needs torchvision.io.decode_jpeg, which this torchvision lacks "
                          "(torchvision >= 0.19 decodes lists of JPEGs on a device); or set data.decode=cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'data.decode' = nvjpeg decodes on the training device {device}, but torch sees no CUDA device "
                          "(torch.cuda.is_available() is False); run on a GPU, or set data.decode=cpu")
    probe = torch.frombuffer(bytearray(simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8), colorspace="RGB")), dtype=torch.uint8)
    try:
        tvio.decode_jpeg([probe], mode=tvio.ImageReadMode.RGB, device=device)
    except Exception as e:  # torchvision raises RuntimeError, a missing CUDA library other types
        lib = "nvJPEG (torchvision built with CUDA and its nvjpeg library)" if device.type == "cuda" else "its JPEG decoder"
        raise ConfigError(f"config key 'data.decode' = nvjpeg: torchvision cannot decode a JPEG on {device} ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:200]}); it needs {lib}, or set data.decode=cpu") from None
