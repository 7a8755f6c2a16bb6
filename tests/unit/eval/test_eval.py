"""mimscale.eval: linear probe, weighted kNN, linear CKA and the per-block occlusion analysis,
feature extraction and its cache, and the CLI (in process; the 2-rank launch is in
tests/integration/test_eval.py)."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.checkpoint.weights import build_encoder
from mimscale.data.eval_transform import CROP_PCT, center_crop
from mimscale.data.normalize import normalize_uint8
from mimscale.data.streams import open_full_pass
from mimscale.eval.__main__ import build_parser, main
from mimscale.eval.cka import cka_by_block, drop_masks, health_check, linear_cka, plot, summarize, walk_blocks
from mimscale.eval.features import (
    Checkpoint,
    OptionError,
    cache_file,
    cached_split,
    eval_splits,
    extract_features,
    open_checkpoint,
    open_split,
    split_features,
)
from mimscale.eval.knn import knn_classify
from mimscale.eval.probe import RECIPES, linear_probe, probe_head, resolve_recipe
from mimscale.optim import build_lars

REPO = Path(__file__).resolve().parents[3]
RANDOM = "random:vit_tiny:32:8"  # 16 patches: a fraction of a second per batch on a CPU core


# ---------------------------------------------------------------- data
def class_image(c: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Four clearly different kinds of 32x32 images, each sample jittered in colour and noise:
    0 solid red, 1 solid green, 2 blue vertical stripes, 3 yellow/black checkerboard."""
    a = np.zeros((size, size, 3), np.float32)
    if c == 0:
        a[...] = (200, 40, 40)
    elif c == 1:
        a[...] = (40, 190, 60)
    elif c == 2:
        a[:, ::4] = (40, 60, 220)
        a[:, 1::4] = (40, 60, 220)
    else:
        yy, xx = np.mgrid[:size, :size]
        a[((yy // 8 + xx // 8) % 2) == 0] = (230, 220, 40)
    a = a * rng.uniform(0.8, 1.1) + rng.normal(0, 8, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def write_folder(root: Path, per_class: dict[str, int], classes: int = 4, seed: int = 0) -> Path:
    """ImageFolder <root>/<split>/c<k>/<i>.(jpg|png): JPEG for train, PNG for the others."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(class_image(c, rng))
                if split == "train":
                    img.save(d / f"{i:03d}.jpg", quality=92)
                else:
                    img.save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imagefolder"), {"train": 12, "val": 6})


def clusters(n: int, classes: int, dim: int, seed: int, spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres (centres from seed 0, samples from ``seed``)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def tiny_encoder(seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder({"name": "vit_tiny", "img_size": 32, "patch_size": 8}).eval()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([*argv, "--threads", "1"])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- probe and kNN on features
def test_probe_and_knn_separate_synthetic_clusters():
    tf, ty = clusters(400, 8, 32, seed=1)
    vf, vy = clusters(200, 8, 32, seed=2)
    p = linear_probe(tf, ty, vf, vy, 8, epochs=20, seed=0)
    k = knn_classify(tf, ty, vf, vy, 8)
    assert p["probe_top1"] > 0.95 and p["probe_top5"] >= p["probe_top1"]
    assert k["knn_top1"] > 0.95 and k["knn_top5"] >= k["knn_top1"]
    assert (p["n_train"], p["n_val"], k["k"], k["temperature"]) == (400, 200, 20, 0.07)


def test_probe_is_deterministic_under_its_seed_and_reports_top5_only_beyond_5_classes():
    tf, ty = clusters(100, 4, 16, seed=1, spread=3.0)  # overlapping: the result depends on the run
    vf, vy = clusters(60, 4, 16, seed=2, spread=3.0)
    a = linear_probe(tf, ty, vf, vy, 4, epochs=3, batch=16, seed=5)
    b = linear_probe(tf, ty, vf, vy, 4, epochs=3, batch=16, seed=5)
    assert a == b and "probe_top5" not in a
    # 97 = 6 x 16 + 1: the lone last sample (no batch statistics) is folded into the previous batch
    linear_probe(tf[:97], ty[:97], vf, vy, 4, epochs=1, batch=16)


def _knn_reference(tf, ty, vf, vy, classes, k, T):
    """DINO's formulation on the whole similarity matrix."""
    s = torch.nn.functional.normalize(vf, dim=1) @ torch.nn.functional.normalize(tf, dim=1).T
    top, idx = s.topk(k, dim=1)
    votes = torch.zeros(len(vf), classes).scatter_add_(1, ty[idx], (top / T).exp())
    return (votes.argmax(1) == vy).float().mean().item()


def test_knn_in_small_chunks_equals_the_whole_similarity_matrix():
    tf, ty = clusters(90, 6, 8, seed=3, spread=4.0)
    vf, vy = clusters(40, 6, 8, seed=4, spread=4.0)
    chunked = knn_classify(tf, ty, vf, vy, 6, k=7, T=0.1, val_chunk=7, train_chunk=11)
    whole = knn_classify(tf, ty, vf, vy, 6, k=7, T=0.1)
    assert chunked == whole
    assert chunked["knn_top1"] == pytest.approx(_knn_reference(tf, ty, vf, vy, 6, 7, 0.1))
    assert knn_classify(tf[:5], ty[:5], vf, vy, 6, k=20)["k"] == 5  # k capped at N_train


def test_probe_and_knn_reject_bad_inputs_by_name():
    tf, ty = clusters(20, 2, 4, seed=1)
    with pytest.raises(ValueError, match="labels span"):
        linear_probe(tf, ty + 5, tf, ty, 2)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(tf, ty, tf, ty, 2, epochs=0)
    with pytest.raises(ValueError, match="D=3"):
        knn_classify(tf, ty, tf[:, :3], ty, 2)
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(tf, ty, tf, ty, 2, k=0)


# ---------------------------------------------------------------- linear CKA
def _cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The definition, in numpy: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


@pytest.mark.parametrize("n,d1,d2", [(200, 16, 24), (30, 64, 48)])  # feature form, Gram form
def test_linear_cka_matches_its_definition_and_invariances(n, d1, d2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)  # float64: the transforms below add no rounding
    y = x @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, d2, generator=g, dtype=torch.float64)
    assert linear_cka(x, y) == pytest.approx(_cka_reference(x.numpy(), y.numpy()), rel=1e-10)
    assert linear_cka(x.float(), y.float()) == pytest.approx(linear_cka(x, y), rel=1e-5)  # float32 inputs, float64 math
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(d2, d2, generator=g, dtype=torch.float64))  # [D2, D2] orthogonal
    base = linear_cka(x, y)
    assert linear_cka(x, y @ q) == pytest.approx(base, rel=1e-9)  # orthogonal transform
    assert linear_cka(x * 7.5, y) == pytest.approx(base, rel=1e-9)  # isotropic scaling
    assert linear_cka(x, y * 1e-3 + 4.0) == pytest.approx(base, rel=1e-9)  # and a shift (centering)


def test_linear_cka_of_independent_features_is_low_and_of_constants_nan():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    assert linear_cka(x, y) < 0.1
    assert math.isnan(linear_cka(x, torch.ones(500, 3)))
    with pytest.raises(ValueError, match="same N"):
        linear_cka(x, y[:10])


# ---------------------------------------------------------------- per-block occlusion CKA
def test_block_walk_is_the_encoders_own_forward():
    enc = tiny_encoder()
    x = normalize_uint8(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    visible = drop_masks(3, enc.num_patches, 0.5, seed=0)  # [3, 8]
    with torch.no_grad():
        states, final = walk_blocks(enc, x, visible)
        assert len(states) == len(enc.blocks) and states[0].shape == (3, 1 + 8, 192)
        assert torch.equal(final, enc(x, visible))
        assert torch.allclose(enc.norm(states[-1]), final, atol=1e-6)  # the last captured state is the last block's
        for i in range(len(states) - 1):  # consecutive blocks, in order
            assert torch.allclose(enc.blocks[i + 1](states[i]), states[i + 1], atol=1e-5)
    assert not any(b._forward_hooks for b in enc.blocks)  # the hooks are gone


def test_drop_masks_are_seeded_per_ratio():
    m = drop_masks(5, 16, 0.3, seed=2)
    assert m.shape == (5, 16 - 5)  # round(0.3 * 16) = 5 dropped
    assert all(torch.equal(r, r.unique()) for r in m)  # ascending, distinct
    assert torch.equal(m, drop_masks(5, 16, 0.3, seed=2)) and not torch.equal(m, drop_masks(5, 16, 0.3, seed=3))
    assert drop_masks(5, 16, 0.99, seed=0).shape == (5, 1)  # always at least one patch
    assert torch.equal(drop_masks(2, 16, 0.0, seed=0), torch.arange(16).expand(2, -1))


@pytest.mark.parametrize("tokens", ["kept", "cls"])
def test_cka_by_block_is_one_without_occlusion(tokens):
    enc = tiny_encoder()
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    res = cka_by_block(enc, images, ratios=(0.0, 0.5), seed=0, tokens=tokens, batch=4)
    assert list(res) == [0.0, 0.5] and len(res[0.0]) == len(enc.blocks)
    assert res[0.0] == pytest.approx([1.0] * len(enc.blocks), abs=1e-9)
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in res[0.5]) and min(res[0.5]) < 1 - 1e-6
    # a ratio's result does not depend on which other ratios are measured, nor on the batch size
    assert cka_by_block(enc, images, ratios=(0.5,), seed=0, tokens=tokens, batch=10)[0.5] == pytest.approx(res[0.5], abs=1e-9)
    table = summarize(res)
    assert table.splitlines()[0].split()[:2] == ["ratio", "b1"] and len(table.splitlines()) == 3


def test_more_occlusion_lowers_deep_cka_and_health_check_reports_last_and_mean():
    enc = tiny_encoder()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([class_image(i % 4, rng) for i in range(24)])).permute(0, 3, 1, 2).contiguous()
    res = cka_by_block(enc, images, ratios=(0.1, 0.9), seed=0, tokens="cls")
    assert res[0.9][-1] < res[0.1][-1]
    hc = health_check(enc, images, ratios=(0.25, 0.75), seed=1)
    assert sorted(hc) == ["cka/r0.25/last", "cka/r0.25/mean", "cka/r0.75/last", "cka/r0.75/mean"]
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in hc.values())
    per_block = cka_by_block(enc, images, ratios=(0.75,), seed=1)[0.75]
    assert hc["cka/r0.75/last"] == per_block[-1] and hc["cka/r0.75/mean"] == pytest.approx(np.mean(per_block))


def test_cka_by_block_rejects_bad_arguments():
    enc = tiny_encoder()
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"ratios \[1.0\]"):
        cka_by_block(enc, images, ratios=(0.5, 1.0))
    with pytest.raises(ValueError, match="takes 32 x 32"):
        cka_by_block(enc, torch.zeros(4, 3, 48, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        cka_by_block(enc, images.float())


def test_plot_writes_a_png(tmp_path):
    plot({0.1: [0.9, 0.95], 0.5: [0.7, 0.6]}, tmp_path / "cka.png", title="t")
    assert (tmp_path / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- features and cache
def test_extract_features_pools_the_normalized_eval_crops_in_index_order(folder):
    enc = tiny_encoder()
    feats, labels = extract_features(enc, folder, "val", pool="mean", batch=5, num_workers=0)
    assert feats.shape == (24, 192) and feats.dtype == torch.float32
    assert labels.tolist() == [c for c in range(4) for _ in range(6)]
    # the eval transform at S = 32: short side to round(32 / 0.875) = 37 (bicubic), center 32 x 32 at (2, 2)
    pil = Image.open(folder / "val" / "c2" / "003.png").convert("RGB").resize((37, 37), Image.BICUBIC).crop((2, 2, 34, 34))
    img = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    with torch.no_grad():
        ref = enc(((img.float() - mean) / std)[None])[0, 1:].mean(0)
    assert torch.allclose(feats[2 * 6 + 3], ref, atol=1e-5)
    cls, _ = extract_features(enc, folder, "val", pool="cls", num_workers=0)
    with torch.no_grad():
        assert torch.allclose(cls[2 * 6 + 3], enc(((img.float() - mean) / std)[None])[0, 0], atol=1e-5)


def test_cache_is_reused_without_building_the_encoder(folder, tmp_path):
    ckpt = open_checkpoint(RANDOM, seed=3)
    split = open_split(folder, "val", num_workers=0)
    built, forwards = [], []

    def get_encoder():
        enc = ckpt.load()
        enc.register_forward_hook(lambda *a: forwards.append(1))
        built.append(enc)
        return enc

    first = cached_split(ckpt, split, "cls", tmp_path, get_encoder, batch=8)
    assert len(built) == 1 and len(forwards) == 3  # 24 images in batches of 8
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("val-") for f in files)  # cls and mean, from one pass
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = cached_split(ckpt, split, "cls", tmp_path, get_encoder, batch=8)
    mean = cached_split(ckpt, split, "mean", tmp_path, get_encoder, batch=8)
    assert len(built) == 1 and len(forwards) == 3  # nothing recomputed, for either pool
    assert torch.equal(again["feats"], first["feats"]) and torch.equal(again["labels"], first["labels"])
    assert mean["feats"].shape == first["feats"].shape and not torch.equal(mean["feats"], first["feats"])
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    # another seed is another encoder: another entry
    cached_split(open_checkpoint(RANDOM, seed=4), split, "cls", tmp_path, open_checkpoint(RANDOM, seed=4).load, batch=8)
    assert len(list(tmp_path.iterdir())) == 4


def test_the_eval_transform_is_part_of_the_cache_identity(folder, tmp_path):
    """Features of another crop_pct, or of the old squashed images (cache format 1), are not reused."""
    ckpt = open_checkpoint(RANDOM)
    split = open_split(folder, "val", num_workers=0)
    default, ident = cache_file(tmp_path, ckpt, split, "cls")
    assert ident["format"] == 2 and ident["transform"] == "resize-short-bicubic+center-crop|crop_pct=0.875"
    assert cache_file(tmp_path, ckpt, split, "cls", 0.875) == (default, ident)
    other, other_ident = cache_file(tmp_path, ckpt, split, "cls", 1.0)
    assert other != default and other_ident["transform"].endswith("crop_pct=1")
    a = split_features(ckpt, folder, cache=tmp_path, num_workers=0, batch=32)
    b = split_features(ckpt, folder, cache=tmp_path, num_workers=0, batch=32, crop_pct=1.0)
    assert (a.crop_pct, b.crop_pct) == (0.875, 1.0) and not torch.equal(a.val_f, b.val_f)
    assert len(list(tmp_path.glob("val-*.pt"))) == 4  # two transforms x two pools
    with pytest.raises(OptionError, match="--crop-pct"):
        split_features(ckpt, folder, cache=tmp_path, num_workers=0, crop_pct=0.0)


def test_checkpoint_identity_follows_the_weights(tmp_path):
    from safetensors.torch import save_file

    enc = tiny_encoder()
    export = tmp_path / "export"
    export.mkdir()
    (export / "mimscale.json").write_text(json.dumps({"mimscale": {"model": {"name": "vit_tiny", "img_size": 32, "patch_size": 8}}}))
    save_file(enc.state_dict(), str(export / "model.safetensors"))
    a = open_checkpoint(str(export))
    assert a.default_cache == export / "eval_cache" and a.model["img_size"] == 32
    loaded = a.load()
    x = normalize_uint8(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.equal(loaded(x), enc(x))
    os.utime(export / "model.safetensors", ns=(1, 1))  # rewritten weights: a new identity
    assert open_checkpoint(str(export)).identity != a.identity


def test_random_checkpoints_are_seeded_and_checked():
    a, b = open_checkpoint(RANDOM, seed=1), open_checkpoint(RANDOM, seed=1)
    assert isinstance(a, Checkpoint) and a.model == {"name": "vit_tiny", "img_size": 32, "patch_size": 8}
    assert all(torch.equal(p, q) for p, q in zip(a.load().parameters(), b.load().parameters()))
    assert not torch.equal(a.load().cls_token, open_checkpoint(RANDOM, seed=2).load().cls_token)
    assert open_checkpoint("random:vit_small").model == {"name": "vit_small", "img_size": 224, "patch_size": 16}
    for bad in ("random:vit_nope", "random:vit_tiny:33:8", "random:vit_tiny:x"):
        with pytest.raises(OptionError, match="--checkpoint"):
            open_checkpoint(bad)


def test_eval_splits_take_test_when_there_is_no_val_and_name_missing_splits(tmp_path):
    root = write_folder(tmp_path / "a", {"train": 2, "test": 1}, classes=2)
    train, val = eval_splits(root, num_workers=0)
    assert (train.split, val.split, len(val.source), val.classes) == ("train", "test", 2, ["c0", "c1"])
    with pytest.raises(OptionError, match=r"--data: .* no val/ or test/"):
        eval_splits(write_folder(tmp_path / "b", {"train": 1}, classes=2))
    with pytest.raises(OptionError, match=r"--data: .* no train/"):
        eval_splits(write_folder(tmp_path / "c", {"val": 1}, classes=2))
    with pytest.raises(OptionError, match="--val-data"):
        eval_splits(root, source="folder", val_data="x.beton")


def test_val_labels_follow_the_train_class_order(tmp_path):
    """A val split missing a class keeps train's indices (c2 stays 2), not its own sorted order."""
    root = write_folder(tmp_path, {"train": 1}, classes=3)
    write_folder(tmp_path / "tmp", {"val": 1}, classes=3)
    (tmp_path / "val").mkdir()
    for c in ("c0", "c2"):
        (tmp_path / "tmp" / "val" / c).rename(tmp_path / "val" / c)
    _, val = eval_splits(root, num_workers=0)
    assert [val.source.label(i) for i in range(len(val.source))] == [0, 2]


def test_wds_shards_give_the_folder_features_and_labels(folder, tmp_path):
    """data_prep.wds keeps JPEG bytes as they are: the same decoded pixels, the same global indices."""
    from data_prep.wds import write_shards

    for split in ("train", "val"):
        write_shards(folder, split, tmp_path / "wds", shard_size=10, workers=1, progress=False)
    ckpt = open_checkpoint(RANDOM)
    enc = ckpt.load()
    a = split_features(ckpt, folder, cache=tmp_path / "c1", num_workers=0, splits=eval_splits(folder, num_workers=0))
    b = split_features(ckpt, cache=tmp_path / "c2", splits=eval_splits(tmp_path / "wds", "wds", num_workers=2))
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.val_y, b.val_y) and b.classes == 4
    assert torch.allclose(a.train_f, b.train_f, atol=1e-5)  # train/ holds JPEGs, stored as they are
    assert extract_features(enc, tmp_path / "wds", "train", source="wds", num_workers=0)[0].shape == (48, 192)


# ---------------------------------------------------------------- the CLI
def test_cli_probe_and_knn_end_to_end_then_from_the_cache(folder, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    common = ["--checkpoint", RANDOM, "--data", str(folder), "--workers", "0", "--cache", str(cache), "--json"]
    code, out, err = run_cli(capsys, "probe", *common)
    assert code == 0, err
    probe = json.loads(out)
    assert probe["probe_top1"] > 0.95 and (probe["n_train"], probe["n_val"], probe["classes"]) == (48, 24, 4)
    assert probe["pool"] == "cls" and probe["checkpoint"] == RANDOM and "probe_top5" not in probe
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}

    def no_encoder(self):
        raise AssertionError("the encoder was built although every feature was cached")

    monkeypatch.setattr(Checkpoint, "load", no_encoder)
    code, out, err = run_cli(capsys, "knn", *common)
    assert code == 0, err
    assert json.loads(out)["knn_top1"] > 0.95 and "from the cache" in err
    code, out, err = run_cli(capsys, "probe", *common, "--pool", "mean")  # cached by the first pass too
    assert code == 0 and json.loads(out)["probe_top1"] > 0.95
    assert mtimes == {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    code, out, _ = run_cli(capsys, "knn", *common[:-1])  # the human table
    assert code == 0 and "top1" in out and "knn" in out.splitlines()[0]


def test_cli_cka_prints_a_table_and_json(folder, tmp_path, capsys):
    code, out, err = run_cli(capsys, "cka", "--checkpoint", RANDOM, "--data", str(folder), "--images", "12", "--ratios",
                             "0.25,0.75", "--plot", str(tmp_path / "p.png"), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert list(res["cka"]) == ["0.25", "0.75"] and len(res["cka"]["0.25"]) == 12 and res["images"] == 12
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,option", [
    (["probe", "--checkpoint", RANDOM, "--data", "{root}/nothing"], "--data"),
    (["knn", "--checkpoint", RANDOM, "--data", "{only_train}"], "--data"),
    (["probe", "--checkpoint", "random:vit_nope", "--data", "{folder}"], "--checkpoint"),
    (["probe", "--checkpoint", "{root}/no_such_run", "--data", "{folder}"], "--checkpoint"),
    (["probe", "--checkpoint", RANDOM, "--data", "{folder}", "--pool", "max"], "--pool"),
    (["knn", "--checkpoint", RANDOM, "--data", "{folder}", "--k", "0"], "--k"),
    (["cka", "--checkpoint", RANDOM, "--data", "{folder}", "--ratios", "0.5,1.2"], "--ratios"),
    (["cka", "--checkpoint", RANDOM, "--data", "{folder}", "--ratios", "0.5,x"], "--ratios"),
    (["cka", "--checkpoint", RANDOM, "--data", "{folder}", "--split", "nosplit"], "--data"),
])
def test_cli_bad_arguments_exit_2_naming_the_option(argv, option, folder, tmp_path, capsys):
    only_train = write_folder(tmp_path / "only_train", {"train": 1}, classes=2)
    argv = [a.format(root=tmp_path, folder=folder, only_train=only_train) for a in argv]
    try:
        code = main(argv + ["--threads", "1"])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code == 2
    assert option in capsys.readouterr().err


def test_cli_runs_as_a_script_too(tmp_path):
    """``deepspeed mimscale/eval/__main__.py`` runs the file as a script: its folder must not
    shadow packages, and mimscale must import from the repository."""
    r = subprocess.run([sys.executable, "mimscale/eval/__main__.py", "probe", "--checkpoint", "random:vit_nope", "--data", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "--checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_split_features_returns_both_splits_and_class_count(folder, tmp_path):
    f = split_features(RANDOM, folder, cache=tmp_path, num_workers=0, batch=16)
    assert f.train_f.shape == (48, 192) and f.val_f.shape == (24, 192) and f.classes == 4 and f.val_split == "val"
    assert f.class_names == ["c0", "c1", "c2", "c3"] and f.checkpoint == RANDOM


# ---------------------------------------------------------------- one eval transform on every source
ODD_SIZES = [(48, 40), (40, 56), (61, 97), (33, 33), (100, 36)]  # (W, H): landscape, portrait, square, very wide


def write_odd_folder(root: Path, per_class: int = 3, classes: int = 2) -> tuple[Path, dict[int, np.ndarray]]:
    """<root>/train/c<k>/<i>.jpg of non-square sizes -> (root, {global index: decoded RGB pixels})."""
    rng = np.random.default_rng(7)
    pixels, index = {}, 0
    for c in range(classes):
        (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = ODD_SIZES[index % len(ODD_SIZES)]
            path = root / "train" / f"c{c}" / f"{i:03d}.jpg"
            Image.fromarray(class_image(c + 2, rng, 128)).resize((w, h), Image.BICUBIC).save(path, quality=95)
            pixels[index] = np.array(Image.open(path).convert("RGB"))
            index += 1
    return root, pixels


def _full_pass(split, size=32, crop_pct=CROP_PCT, rank=0, world=1) -> dict[int, tuple[np.ndarray, int]]:
    """{global index: (image [S, S, 3] uint8, label)} of one full pass of this rank."""
    out = {}
    for b in open_full_pass(split.cfg, split.source, img_size=size, batch_size=4, rank=rank, world_size=world, seed=0, crop_pct=crop_pct):
        for img, i, y in zip(b["image"], b["index"].tolist(), b["label"].tolist()):
            assert i not in out
            out[i] = (img.permute(1, 2, 0).numpy(), y)
    return out


def test_folder_and_wds_passes_give_the_eval_transform_of_each_image(tmp_path):
    from data_prep.wds import write_shards

    root, pixels = write_odd_folder(tmp_path / "odd")
    write_shards(root, "train", tmp_path / "wds", shard_size=2, workers=1, progress=False)
    folder = _full_pass(open_split(root, "train", "folder", num_workers=0))
    wds = _full_pass(open_split(tmp_path / "wds", "train", "wds", num_workers=0))
    assert sorted(folder) == sorted(wds) == list(range(6))
    for i, arr in pixels.items():
        expected = center_crop(arr, 32).image  # the decoded file through the one transform
        assert np.array_equal(folder[i][0], expected), i
        assert np.array_equal(wds[i][0], expected), i  # the shards keep the JPEG bytes as they are
        assert folder[i][1] == wds[i][1] == i // 3
    # AMT's pass (crop_pct None) still squashes the whole image: a different picture of a non-square image
    whole = _full_pass(open_split(root, "train", "folder", num_workers=0), crop_pct=None)
    assert not np.array_equal(whole[0][0], folder[0][0])


def test_ffcv_eval_pass_reads_the_stored_pixels_through_the_eval_transform(tmp_path):
    """.beton positions -> the index field's global indices; raw-mode pixels give exactly the folder's
    crops, JPEG mode those of FFCV's re-encode (its stored bytes); two ranks cover each sample once."""
    pytest.importorskip("ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    root, pixels = write_odd_folder(tmp_path / "odd")
    folder = _full_pass(open_split(root, "train", "folder", num_workers=0))

    class Samples:
        def __len__(self):
            return len(pixels)

        def __getitem__(self, pos):
            return pixels[pos], pos // 3, pos + 10  # global index != position

    for mode in ("raw", "jpg"):
        beton = tmp_path / f"{mode}.beton"
        fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=95), "label": IntField(), "index": IntField()}
        DatasetWriter(str(beton), fields, num_workers=1).from_indexed_dataset(Samples())
        split = open_split(beton, "train", "ffcv", num_workers=0)
        got = {}
        for rank in range(2):
            part = _full_pass(split, rank=rank, world=2)
            assert not set(part) & set(got)
            got.update(part)
        assert sorted(got) == [p + 10 for p in range(6)]
        for pos in range(6):
            image, label = got[pos + 10]
            assert label == pos // 3
            if mode == "raw":
                assert np.array_equal(image, folder[pos][0]), pos
            else:  # FFCV re-encoded the pixels: its stored JPEG is this sample's image, through the same transform
                stored = np.array(Image.open(io.BytesIO(split.source.read(pos))).convert("RGB"))
                assert stored.shape == pixels[pos].shape and np.abs(stored.astype(int) - pixels[pos]).mean() < 8, pos
                assert np.array_equal(image, center_crop(split.source.read(pos), 32).image), pos


# ---------------------------------------------------------------- probe recipes and kNN defaults
def test_mae_recipe_is_maes_linear_probing_protocol():
    r = RECIPES["mae"]
    assert (r.optimizer, r.epochs, r.batch, r.base_lr, r.warmup_epochs, r.weight_decay) == ("lars", 90, 16384, 0.1, 10, 0.0)
    big = resolve_recipe("mae", 1_281_167)
    assert (big["batch"], big["lr"], big["epochs"], big["warmup_epochs"]) == (16384, pytest.approx(6.4), 90, 10)
    small = resolve_recipe("mae", 1000)  # the batch is clamped to the set, and the lr follows it
    assert small["batch"] == 1000 and small["lr"] == pytest.approx(0.1 * 1000 / 256)
    assert resolve_recipe("mae", 5000, batch=512)["lr"] == pytest.approx(0.2)
    assert resolve_recipe("mae", 5000, batch=512, base_lr=1.0)["lr"] == pytest.approx(2.0)
    explicit = resolve_recipe("mae", 5000, batch=512, lr=3.0)
    assert explicit["lr"] == 3.0 and explicit["base_lr"] is None
    fast = resolve_recipe("fast", 5000)
    assert (fast["optimizer"], fast["batch"], fast["lr"], fast["epochs"], fast["warmup_epochs"]) == ("adamw", 256, 1e-3, 50, 0)
    for kw, name in ((dict(weight_decay=0.05), "weight_decay"), (dict(epochs=5), "warmup_epochs"), (dict(batch=0), "batch")):
        with pytest.raises(ValueError, match=name):
            resolve_recipe("mae", 100, **kw)
    with pytest.raises(ValueError, match="base_lr"):
        resolve_recipe("fast", 100, base_lr=0.1)
    with pytest.raises(ValueError, match="recipe"):
        resolve_recipe("dino", 100)


def test_probe_head_is_a_batchnorm_without_affine_then_a_small_linear():
    head = probe_head(768, 1000, torch.Generator().manual_seed(0))
    bn, fc = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert list(bn.parameters()) == [] and bn.weight is None and bn.bias is None
    assert fc.weight.shape == (1000, 768) and fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.equal(fc.bias, torch.zeros(1000))


def test_lars_adapts_matrices_by_their_trust_ratio_and_steps_biases_plainly():
    """||W|| = 6, ||g_W|| = 1: W moves by lr * 0.001 * 6 * g_W; the bias by lr * g_b (SGD); then momentum 0.9."""
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.fill_(3.0)
        lin.bias.fill_(1.0)
    opt = build_lars(lin, lr=2.0)
    assert [g["always_adapt"] for g in opt.param_groups] == [True, False]
    assert all(g["weight_decay"] == 0 and g["momentum"] == 0.9 for g in opt.param_groups)
    for step, (w_expected, b_expected) in enumerate(((3.0 - 2.0 * 0.006 * 0.5, 1.0 - 2.0 * 0.25),
                                                     (None, None))):
        lin.weight.grad = torch.full((2, 2), 0.5)
        lin.bias.grad = torch.full((2,), 0.25)
        w_before, b_before = lin.weight.detach().clone(), lin.bias.detach().clone()
        opt.step()
        if step == 0:
            assert torch.allclose(lin.weight, torch.full((2, 2), w_expected))
            assert torch.allclose(lin.bias, torch.full((2,), b_expected))
            first_w, first_b = w_before - lin.weight.detach(), b_before - lin.bias.detach()
        else:  # the momentum buffer: 0.9 x the last adapted step + this one (trust ratio of the moved W)
            trust = 0.001 * w_before.norm() / 1.0
            assert torch.allclose(w_before - lin.weight.detach(), 0.9 * first_w + 2.0 * trust * 0.5, atol=1e-7)
            assert torch.allclose(b_before - lin.bias.detach(), 0.9 * first_b + 2.0 * 0.25)


def test_mae_recipe_learns_a_separable_problem_at_maes_imagenet_lr():
    """lr 6.4 (MAE's at batch 16384) at batch 64: separable clusters are learned; at a vanishing lr the
    head stays at chance (this head init is not already right by luck)."""
    tf, ty = clusters(1024, 8, 32, seed=1)
    vf, vy = clusters(256, 8, 32, seed=2)
    kw = dict(recipe="mae", epochs=20, batch=64, warmup_epochs=2, seed=2)
    learned = linear_probe(tf, ty, vf, vy, 8, base_lr=25.6, **kw)
    assert learned["probe_top1"] > 0.95 and learned["lr"] == pytest.approx(6.4)
    assert (learned["recipe"], learned["optimizer"], learned["batch"], learned["epochs"]) == ("mae", "lars", 64, 20)
    assert linear_probe(tf, ty, vf, vy, 8, lr=1e-9, **kw)["probe_top1"] < 0.4


def test_knn_defaults_are_dinos():
    import inspect

    params = inspect.signature(knn_classify).parameters
    assert (params["k"].default, params["T"].default) == (20, 0.07)
    args = build_parser().parse_args(["knn", "--checkpoint", RANDOM, "--data", "x"])
    assert (args.k, args.temperature, args.crop_pct) == (20, 0.07, 0.875)
    probe = build_parser().parse_args(["probe", "--checkpoint", RANDOM, "--data", "x"])
    assert (probe.recipe, probe.crop_pct, probe.epochs, probe.lr, probe.probe_batch) == ("fast", 0.875, None, None, None)


def test_cli_probe_mae_recipe_and_crop_pct(folder, tmp_path, capsys):
    """docs/evaluation.md's ``--recipe mae`` and ``--crop-pct`` options, end to end; bad settings exit 2 naming them."""
    common = ["--checkpoint", RANDOM, "--data", str(folder), "--workers", "0", "--cache", str(tmp_path), "--json"]
    code, out, err = run_cli(capsys, "probe", *common, "--recipe", "mae", "--crop-pct", "1.0")
    assert code == 0, err
    res = json.loads(out)
    assert (res["recipe"], res["optimizer"], res["epochs"], res["warmup_epochs"], res["crop_pct"]) == ("mae", "lars", 90, 10, 1.0)
    assert res["batch"] == 48 and res["lr"] == pytest.approx(0.1 * 48 / 256)  # 16384 clamped to the 48 training images
    code, out, err = run_cli(capsys, "knn", *common, "--crop-pct", "1.0")
    assert code == 0 and "from the cache" in err and json.loads(out)["crop_pct"] == 1.0
    code, _, err = run_cli(capsys, "probe", *common, "--blr", "0.1")
    assert code == 2 and "--recipe fast" in err and "base_lr" in err
    with pytest.raises(SystemExit) as e:
        main(["probe", *common, "--crop-pct", "1.5"])
    assert e.value.code == 2 and "--crop-pct" in capsys.readouterr().err
