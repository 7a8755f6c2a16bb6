"""Frozen-encoder features of an evaluation set: which encoder, which data, extraction, cache.

    feats = split_features("runs/x", "/data/cifar10", pool="cls")   # every rank calls it
    feats.train_f [N_train, D] float32, feats.train_y [N_train] int64, feats.val_f, feats.val_y

- **Encoder.** ``--checkpoint`` is anything ``mimscale.checkpoint.weights.load_encoder`` reads (a
  checkpoint directory of any ZeRO stage, an export directory or file), or
  ``random:<model>[:img_size[:patch_size]]``: an untrained encoder seeded by ``seed`` (the
  random-init baseline). The encoder is only built when some features are not cached.
- **Data.** ``folder``: an ImageFolder root with ``train/`` and ``val/`` (or ``test/``), listed by
  ``mimscale.data.imagenet.list_split`` so the val labels follow train's class order (or
  ``synsets.txt``) and a flat ImageNet ``val/`` with its CSV works too. ``wds``: a shard folder
  with ``train-manifest.json`` and ``val-`` (or ``test-``) ``manifest.json``. ``ffcv``: two .beton
  files. Every split is read by ``mimscale.data.full_pass`` with the evaluation transform
  (``mimscale.data.eval_transform``): the short side resized to round(S / crop_pct) (bicubic,
  crop_pct 0.875 by default) and the S x S center kept, no flip, each sample exactly once across ranks.
- **Features.** ``encoder(x)`` [B, 1 + L, D] (after the final norm) on inputs normalized as in
  training, pooled to [B, D]: the CLS token (``cls``) or the mean of the patch tokens (``mean``).
  Both pools come out of the same forward, so both are cached at once.
- **Cache.** One file per (checkpoint identity, data identity, split, pool, img_size, transform) in the cache
  folder (default ``<checkpoint>/eval_cache``, or a per-user temp folder for ``random:``). A rerun
  on the same checkpoint and data loads it and builds no encoder.
- **Ranks.** Under the deepspeed launcher each rank extracts its share and writes it to the cache
  folder (which must therefore be visible to every rank: shared storage across nodes); rank 0
  merges the shares in global-index order. Only rank 0 gets the features back.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from mimscale.checkpoint.weights import build_encoder, load_encoder, locate, model_section
from mimscale.config import DataConfig
from mimscale.data.eval_transform import CROP_PCT, check_crop_pct
from mimscale.data.imagenet import LayoutError, list_split
from mimscale.data.normalize import normalize_uint8
from mimscale.data.sources import FfcvFile
from mimscale.data.streams import open_full_pass
from mimscale.data.wds_loader import ShardIndex
from mimscale.models.registry import ENCODERS
from mimscale.runtime import dist

POOLS = ("cls", "mean")
SOURCES = ("folder", "wds", "ffcv")
VAL_SPLITS = ("val", "test")  # the first one present is the evaluation split
CACHE_FORMAT = 2  # bump when what a cache file holds changes (2: the eval transform, not squashed images)


class OptionError(ValueError):
    """A bad evaluation argument; ``option`` is the CLI option it came from (e.g. ``--data``)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


def log(msg: str) -> None:
    print(f"[mimscale.eval] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- encoder
@dataclass
class Checkpoint:
    """What to evaluate, resolved without building the encoder (cheap; the cache key needs it)."""

    spec: str  # as given
    model: dict  # {name, img_size, patch_size}
    identity: str  # changes whenever the weights can have changed
    default_cache: Path
    seed: Optional[int] = None  # random: only

    def load(self):
        """The encoder in fp32 and eval mode."""
        if self.seed is None:
            return load_encoder(self.spec)[0]
        with torch.random.fork_rng(devices=[]):  # the same weights on every rank, no global side effect
            torch.manual_seed(self.seed)
            encoder = build_encoder(self.model)
        return encoder.float().eval()


def open_checkpoint(spec: str, seed: int = 0) -> Checkpoint:
    """``spec``: a checkpoint / export path, or ``random:<model>[:img_size[:patch_size]]``."""
    if spec.startswith("random:"):
        parts = spec.split(":")[1:]
        if not 1 <= len(parts) <= 3 or parts[0] not in ENCODERS:
            raise OptionError("--checkpoint", f"{spec!r}: expected random:<model>[:img_size[:patch_size]] with <model> one of "
                                              f"{', '.join(ENCODERS)}")
        try:
            img = int(parts[1]) if len(parts) > 1 else 224
            patch = int(parts[2]) if len(parts) > 2 else ENCODERS[parts[0]].patch_size
        except ValueError:
            raise OptionError("--checkpoint", f"{spec!r}: img_size and patch_size must be integers") from None
        if img <= 0 or patch <= 0 or img % patch:
            raise OptionError("--checkpoint", f"{spec!r}: img_size {img} must be a positive multiple of patch_size {patch}")
        model = {"name": parts[0], "img_size": img, "patch_size": patch}
        cache = Path(tempfile.gettempdir()) / f"mimscale-eval-cache-{os.getuid()}"
        return Checkpoint(spec, model, f"random:{parts[0]}:{img}:{patch}:seed{seed}", cache, seed)
    try:
        src = locate(spec)
        model = model_section(src)
    except (FileNotFoundError, ValueError) as e:
        raise OptionError("--checkpoint", str(e)) from None
    st = src.stamp.stat()  # a tag is final once its marker exists (written last); a file is its own stamp
    identity = f"{src.path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{json.dumps(model, sort_keys=True)}"
    p = Path(spec)
    return Checkpoint(spec, model, identity, (p if p.is_dir() else p.parent) / "eval_cache")


# ---------------------------------------------------------------------------------------- data
class ListedImages:
    """A ``mimscale.data.imagenet`` listing as a full-pass source (len, read, name, label). File names
    live in one bytes array, not a list of str, so forked DataLoader workers share its pages."""

    def __init__(self, listing):
        self.root = listing.split_dir
        self._files = np.array([f.encode() for f in listing.files], dtype=np.bytes_)
        self.labels = listing.labels

    def __len__(self) -> int:
        return len(self._files)

    def name(self, index: int) -> str:
        return str(self.root / self._files[index].decode())

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def read(self, index: int) -> bytes:
        with open(self.name(index), "rb") as f:
            return f.read()


@dataclass
class SplitData:
    """One split ready for ``open_full_pass``: its data config, source, and an identity for the cache."""

    cfg: object  # mimscale.config.DataConfig
    source: object
    split: str  # train | val | test
    identity: str
    classes: Optional[list[str]] = None  # class names in label order, where the format keeps them


def _data_cfg(source: str, path, split: str, num_workers: int):
    return DataConfig(source=source, path=str(path), split=split, num_workers=num_workers)


def open_split(data, split: str, source: str = "folder", num_workers: int = 2) -> SplitData:
    """``data``: the ImageFolder root (folder), shard folder (wds) or .beton file (ffcv)."""
    if source not in SOURCES:
        raise OptionError("--source", f"{source!r}: allowed values: {', '.join(SOURCES)}")
    path = Path(data)
    if source == "folder":
        try:
            listing = list_split(path, split)
            listing.require_labels("evaluation")
        except (LayoutError, OSError) as e:
            raise OptionError("--data", str(e)) from None
        ident = f"folder|{listing.split_dir.resolve()}|{len(listing)}|{listing.fingerprint()}"
        return SplitData(_data_cfg(source, path, split, num_workers), ListedImages(listing), split, ident, listing.classes)
    if source == "wds":
        manifest = path / f"{split}-manifest.json"
        try:
            index = ShardIndex.load(path, split)
        except (FileNotFoundError, ValueError) as e:
            raise OptionError("--data", str(e)) from None
        if index.unlabelled:
            raise OptionError("--data", f"evaluation needs labelled images, and the shards in {path} were written from an unlabelled "
                                        f"folder ({index.unlabelled}): write them from class folders or a flat folder with a ground-truth CSV")
        ident = f"wds|{manifest.resolve()}|{manifest.stat().st_mtime_ns}|{len(index)}"
        return SplitData(_data_cfg(source, path, split, num_workers), index, split, ident, index.classes or None)

    option = "--train-data" if split == "train" else "--val-data"
    try:
        beton = FfcvFile.open(path)
    except (FileNotFoundError, ValueError) as e:
        raise OptionError(option, str(e)) from None
    if beton.unlabelled():
        raise OptionError(option, f"evaluation needs labelled images, and every label in {path} is -1 (written from an unlabelled folder): "
                                  "write it from class folders or a flat folder with a ground-truth CSV")
    ident = f"ffcv|{path.resolve()}|{path.stat().st_mtime_ns}|{len(beton)}"
    return SplitData(_data_cfg(source, path, split, num_workers), beton, split, ident)


def eval_splits(data=None, source: str = "folder", train_data=None, val_data=None, num_workers: int = 2) -> tuple[SplitData, SplitData]:
    """(train, val-or-test) of an evaluation set; see the module docstring for the layouts."""
    if source not in SOURCES:
        raise OptionError("--source", f"{source!r}: allowed values: {', '.join(SOURCES)}")
    if source == "ffcv":
        if data is not None:  # a folder holding train.beton and val.beton (or test.beton)
            train_data = train_data or Path(data) / "train.beton"
            val_data = val_data or next((Path(data) / f"{s}.beton" for s in VAL_SPLITS if (Path(data) / f"{s}.beton").is_file()),
                                        Path(data) / "val.beton")
        if train_data is None or val_data is None:
            raise OptionError("--train-data" if train_data is None else "--val-data",
                              "--source ffcv needs --train-data and --val-data (.beton files), or --data <folder with train.beton, val.beton>")
        return open_split(train_data, "train", source, num_workers), open_split(val_data, "val", source, num_workers)
    if train_data is not None or val_data is not None:
        raise OptionError("--train-data" if train_data is not None else "--val-data", "only with --source ffcv (use --data)")
    if data is None:
        raise OptionError("--data", "required")
    root = Path(data)
    if not root.is_dir():
        raise OptionError("--data", f"{root} is not a folder")
    marker = (lambda s: root / s) if source == "folder" else (lambda s: root / f"{s}-manifest.json")
    if not marker("train").exists():
        raise OptionError("--data", f"{root} has no {marker('train').name}" + ("/ folder" if source == "folder" else "")
                          + " (the split the probe or kNN is fitted on)")
    val = next((s for s in VAL_SPLITS if marker(s).exists()), None)
    if val is None:
        names = " or ".join(marker(s).name + ("/" if source == "folder" else "") for s in VAL_SPLITS)
        raise OptionError("--data", f"{root} has no {names} (the split accuracy is measured on)")
    return open_split(root, "train", source, num_workers), open_split(root, val, source, num_workers)


# ---------------------------------------------------------------------------------- extraction
def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """tokens [B, 1 + L, D] -> [B, D]: the CLS token, or the mean of the L patch tokens."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise OptionError("--pool", f"{pool!r}: allowed values: {', '.join(POOLS)}")


@torch.no_grad()  # not inference_mode: a probe later trains on these tensors
def extract_share(encoder, split: SplitData, img_size: int, batch: int = 128, rank: int = 0, world: int = 1, seed: int = 0,
                  device=None, pools=POOLS, crop_pct: float = CROP_PCT) -> dict:
    """This rank's share of one full pass (images [B, 3, S, S] through the evaluation transform)
    -> {"index" [n] int64, "label" [n] int64, "skipped": int, <pool>: [n, D] float32 for each pool}
    (CPU tensors, in the order the pass produced them)."""
    device = torch.device(device or "cpu")
    encoder = encoder.to(device)
    dtype = encoder.patch_embed.proj.weight.dtype
    out = {"index": [], "label": [], **{p: [] for p in pools}}
    skipped = 0
    for b in open_full_pass(split.cfg, split.source, img_size=img_size, batch_size=batch,
                            rank=rank, world_size=world, seed=seed, crop_pct=check_crop_pct(crop_pct)):
        skipped += int(b.get("skipped", 0))
        if not len(b["index"]):
            continue
        tokens = encoder(normalize_uint8(b["image"].to(device, non_blocking=True)).to(dtype))  # [B, 1 + L, D]
        for p in pools:
            out[p].append(pool_tokens(tokens, p).float().cpu())
        out["index"].append(b["index"].long())
        out["label"].append(b["label"].long())
    empty = {"index": torch.zeros(0, dtype=torch.int64), "label": torch.zeros(0, dtype=torch.int64),
             **{p: torch.zeros(0, encoder.embed_dim) for p in pools}}  # a rank whose share is empty
    res = {k: torch.cat(v) if v else empty[k] for k, v in out.items()}
    res["skipped"] = skipped
    return res


def _in_index_order(parts: list[dict], pools) -> dict:
    """Concatenate rank shares and sort by global index; each sample must appear once."""
    index = torch.cat([p["index"] for p in parts])
    order = torch.argsort(index)
    index = index[order]
    if len(index) > 1 and bool((index[1:] == index[:-1]).any()):
        raise RuntimeError("a sample was extracted twice: the full pass's shares overlap")
    res = {"index": index, "label": torch.cat([p["label"] for p in parts])[order]}
    for p in pools:
        res[p] = torch.cat([q[p] for q in parts])[order]
    res["skipped"] = sum(int(p["skipped"]) for p in parts)
    return res


def extract_features(encoder, data, split: str = "train", *, pool: str = "cls", source: str = "folder", batch: int = 128,
                     num_workers: int = 2, device=None, seed: int = 0, crop_pct: float = CROP_PCT) -> tuple[torch.Tensor, torch.Tensor]:
    """In-process extraction, no cache: (feats [N, D] float32, labels [N] int64) in global-index
    order. ``data``: an ImageFolder root / shard folder / .beton (with ``split``), or a SplitData.
    Images go through the evaluation transform to ``encoder.img_size`` (``crop_pct``)."""
    if pool not in POOLS:
        raise OptionError("--pool", f"{pool!r}: allowed values: {', '.join(POOLS)}")
    sd = data if isinstance(data, SplitData) else open_split(data, split, source, num_workers)
    share = extract_share(encoder, sd, encoder.img_size, batch, 0, 1, seed, device, pools=(pool,), crop_pct=crop_pct)
    res = _in_index_order([share], (pool,))
    return res[pool], res["label"]


# --------------------------------------------------------------------------- cache, all ranks
def transform_identity(crop_pct: float) -> str:
    """The evaluation transform as the cache records it: features of another transform are not reused."""
    return f"resize-short-bicubic+center-crop|crop_pct={check_crop_pct(crop_pct):g}"


def cache_file(cache_dir: Path, ckpt: Checkpoint, split: SplitData, pool: str, crop_pct: float = CROP_PCT) -> tuple[Path, dict]:
    """(file, identity) of one cache entry; the identity is stored in the file and checked on load."""
    ident = {"format": CACHE_FORMAT, "checkpoint": ckpt.identity, "data": split.identity, "split": split.split,
             "pool": pool, "img_size": ckpt.model["img_size"], "transform": transform_identity(crop_pct)}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{split.split}-{pool}-{digest}.pt", ident


def _load_entry(path: Path, ident: dict) -> Optional[dict]:
    entry = torch.load(path, map_location="cpu", weights_only=True)
    return entry if entry.get("identity") == ident else None


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers never see half a file


def cached_split(ckpt: Checkpoint, split: SplitData, pool: str, cache_dir, get_encoder: Callable, *, batch: int = 128,
                 rank: int = 0, world: int = 1, device=None, seed: int = 0, crop_pct: float = CROP_PCT) -> Optional[dict]:
    """{"feats" [N, D] float32, "labels" [N] int64, "index" [N], "skipped"} on rank 0, None on the
    others. Every rank must call it (the ranks meet at barriers when there is something to extract).
    ``get_encoder()`` is called (once per split at most) only when the entry is not cached."""
    cache_dir = Path(cache_dir)
    path, ident = cache_file(cache_dir, ckpt, split, pool, crop_pct)
    dist.barrier()  # no rank checks the cache while another is still writing this invocation's entries
    if path.is_file():  # every rank takes the same branch: the file was complete before the barrier
        if rank != 0:
            return None
        entry = _load_entry(path, ident)
        if entry is None:
            raise RuntimeError(f"{path} holds features of something else (its stored identity differs): delete it")
        log(f"{split.split} features from the cache {path}")
        return entry
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError("--cache", f"cannot create {cache_dir} ({e.strerror}): pass a writable --cache folder") from None
    encoder = get_encoder()
    share = extract_share(encoder, split, ckpt.model["img_size"], batch, rank, world, seed, device, crop_pct=crop_pct)
    digest = path.stem.split("-", 2)[-1]  # in the part names: parts of different jobs never mix

    def part(r: int) -> Path:
        return cache_dir / f".{split.split}-{digest}.part{r}of{world}.pt"

    if rank != 0:  # rank 0 keeps its own share in memory
        _atomic_save(share, part(rank))
    dist.barrier()
    if rank != 0:
        dist.barrier()
        return None
    parts = [share] + [torch.load(part(r), weights_only=True) for r in range(1, world)]
    merged = _in_index_order(parts, POOLS)
    result = None
    for p in POOLS:  # both pools came out of the same forward: cache both
        p_path, p_ident = cache_file(cache_dir, ckpt, split, p, crop_pct)
        entry = {"identity": p_ident, "feats": merged[p], "labels": merged["label"], "index": merged["index"],
                 "skipped": merged["skipped"]}
        _atomic_save(entry, p_path)
        result = entry if p == pool else result
    for r in range(1, world):
        part(r).unlink(missing_ok=True)
    dist.barrier()
    log(f"{split.split}: extracted {len(merged['index'])} samples on {world} rank(s) -> {path}")
    return result


@dataclass
class EvalFeatures:
    """Both splits' features (rank 0) and what they came from."""

    train_f: torch.Tensor  # [N_train, D] float32
    train_y: torch.Tensor  # [N_train] int64
    val_f: torch.Tensor  # [N_val, D] float32
    val_y: torch.Tensor  # [N_val] int64
    classes: int
    val_split: str  # val | test
    checkpoint: str
    model: dict
    pool: str
    skipped: int = 0
    crop_pct: float = CROP_PCT  # the evaluation transform's (mimscale.data.eval_transform)
    class_names: Optional[list[str]] = field(default=None, repr=False)


def split_features(checkpoint, data=None, *, pool: str = "cls", source: str = "folder", train_data=None, val_data=None,
                   cache=None, batch: int = 128, num_workers: int = 2, seed: int = 0, device=None,
                   splits: Optional[tuple[SplitData, SplitData]] = None, crop_pct: float = CROP_PCT) -> Optional[EvalFeatures]:
    """Features of the train and val (or test) splits, from the cache or extracted (see the module
    docstring). ``checkpoint``: a spec string or an ``open_checkpoint`` result; ``splits``: an
    ``eval_splits`` result (else built from data/source/train_data/val_data). Call it on every rank
    of a launched job (process group initialized when there is more than one); returns the
    features on rank 0 and None on the others. ``crop_pct``: the evaluation transform's
    (``mimscale.data.eval_transform``), part of the cache identity."""
    try:
        crop_pct = check_crop_pct(crop_pct)
    except ValueError as e:
        raise OptionError("--crop-pct", str(e)) from None
    if pool not in POOLS:
        raise OptionError("--pool", f"{pool!r}: allowed values: {', '.join(POOLS)}")
    if batch < 1:
        raise OptionError("--batch", f"{batch}: must be >= 1")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint, seed)
    train, val = splits or eval_splits(data, source, train_data, val_data, num_workers)
    rank, world = dist.rank(), dist.world_size()
    if world > 1:
        import deepspeed.comm as ds_comm

        if not ds_comm.is_initialized():  # the barriers below would pass silently and the ranks race
            raise RuntimeError(f"WORLD_SIZE={world}: call mimscale.runtime.dist.init_distributed() before split_features")
    cache_dir = Path(cache) if cache else ckpt.default_cache
    encoder = []  # built at most once, and only on a cache miss

    def get_encoder():
        if not encoder:
            encoder.append(ckpt.load())
        return encoder[0]

    kw = dict(batch=batch, rank=rank, world=world, device=device, seed=seed, crop_pct=crop_pct)
    tr = cached_split(ckpt, train, pool, cache_dir, get_encoder, **kw)
    va = cached_split(ckpt, val, pool, cache_dir, get_encoder, **kw)
    if rank != 0:
        return None
    names = train.classes
    if names is not None:
        classes = len(names)
    else:  # ffcv keeps no class list: the labels present say how many there are at least
        classes = int(torch.cat([tr["labels"], va["labels"], torch.tensor([-1])]).max()) + 1
    return EvalFeatures(tr["feats"], tr["labels"], va["feats"], va["labels"], classes, val.split, ckpt.spec, ckpt.model, pool,
                        tr["skipped"] + va["skipped"], crop_pct, names)
