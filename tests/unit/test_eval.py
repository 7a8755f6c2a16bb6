"""mimscale.eval: linear probe, weighted kNN, linear CKA and the per-block occlusion analysis,
feature extraction and its cache, and the CLI (in process; the 2-rank launch is in
tests/integration/test_eval.py)."""
from __future__ import annotations

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

from mimscale.eval.__main__ import main
from mimscale.eval.cka import cka_by_block, drop_masks, health_check, linear_cka, plot, summarize, walk_blocks
from mimscale.eval.features import (
    Checkpoint,
    OptionError,
    cached_split,
    eval_splits,
    extract_features,
    normalize,
    open_checkpoint,
    open_split,
    split_features,
)
from mimscale.eval.knn import knn_classify
from mimscale.eval.probe import linear_probe
from mimscale.weights import build_encoder

REPO = Path(__file__).resolve().parents[2]
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
    x = normalize(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
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
    x = normalize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
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
