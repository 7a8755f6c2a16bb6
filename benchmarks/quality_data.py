"""The quality benchmark's data: an ImageFolder root (or a .tar.gz of one) cut into balanced subsets.

Writes symlink trees under ``dst`` (nothing is copied or re-encoded):
    pretrain/<class>/...       the images pretrained on (labels unused)
    probe/train/<class>/...    linear-probe / kNN training images (drawn from train/, as usual)
    probe/val/<class>/...      evaluation images (from val/, or test/ when there is no val/)
Subsets take the same number of images from every class, drawn with ``seed``.
"""
from __future__ import annotations

import random
import shutil
import tarfile
from pathlib import Path

from PIL import Image

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def find_root(path: Path) -> Path:
    """The directory holding train/ and val/ or test/ (the path itself or one level down)."""
    for cand in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if (cand / "train").is_dir() and ((cand / "val").is_dir() or (cand / "test").is_dir()):
            return cand
    raise FileNotFoundError(f"--data {path}: no train/ with val/ or test/ beside it (ImageFolder layout expected)")


def extract(tar: Path, dst: Path) -> Path:
    done = dst / ".extracted"
    if not done.is_file() or done.read_text() != str(tar.resolve()):
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        with tarfile.open(tar) as t:
            t.extractall(dst, filter="data")  # refuses absolute paths and links out of dst
        done.write_text(str(tar.resolve()))
    return find_root(dst)


def listing(split: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in split.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{split} has no class folders")
    return {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in EXTS) for c in classes}


def balanced(files: dict[str, list[Path]], total: int, rng: random.Random) -> dict[str, list[Path]]:
    per = max(1, total // len(files))
    return {c: rng.sample(fs, min(per, len(fs))) for c, fs in files.items()}


def link_tree(picked: dict[str, list[Path]], dst: Path) -> int:
    n = 0
    for c, fs in picked.items():
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in fs:
            (dst / c / f.name).symlink_to(f.resolve())
            n += 1
    return n


def model_size(files: list[Path], img_size: int | None, patch_size: int | None) -> tuple[int, int]:
    """Input size from the images (median short side, 32..224, a multiple of 16 from 48 up) and a
    patch size giving an 8 x 8 grid up to 64 px and 16 px patches beyond."""
    if img_size is None:
        sides = sorted(min(Image.open(f).size) for f in files[:64])
        side = max(32, min(224, sides[len(sides) // 2]))
        img_size = side if side <= 32 else side - side % 16
    if patch_size is None:
        patch_size = img_size // 8 if img_size <= 64 else 16
    if img_size % patch_size:
        raise ValueError(f"--img-size {img_size} is not a multiple of --patch-size {patch_size}")
    return img_size, patch_size


def prepare(src: Path, dst: Path, mode: dict, img_size: int | None, patch_size: int | None, seed: int) -> dict:
    if not src.exists():
        raise FileNotFoundError(f"--data {src} does not exist")
    root = extract(src, dst / "extracted") if src.is_file() else find_root(src)
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    train, val = listing(root / "train"), listing(val_dir)
    if sorted(train) != sorted(val):
        raise ValueError(f"{root / 'train'} and {val_dir} have different class folders")
    rng = random.Random(seed)
    for sub in ("pretrain", "probe"):
        if (dst / sub).exists():
            shutil.rmtree(dst / sub)
    counts = {
        "pretrain": link_tree(balanced(train, mode["pretrain_images"], rng), dst / "pretrain"),
        "probe_train": link_tree(balanced(train, mode["probe_train"], rng), dst / "probe" / "train"),
        "probe_val": link_tree(balanced(val, mode["probe_val"], rng), dst / "probe" / "val"),
        "classes": len(train),
    }
    size, patch = model_size([f for fs in train.values() for f in fs[:8]], img_size, patch_size)
    return {"pretrain": dst / "pretrain", "probe": dst / "probe", "img_size": size, "patch_size": patch,
            "counts": counts, "root": root}
