"""The quality benchmark end to end on real CIFAR-10 JPEGs (a small extracted subset): every
method pretrains, is probed, kNN-classified and CKA-measured, and the JSON has every field."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.integration.launch import REPO, env

CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
METHODS = ("random_init", "mae", "amt", "automae", "rmae", "cmae", "simmim", "amt_simmim")


def extract_subset(dst: Path, per_class: dict[str, int]) -> Path:
    """The first N images of each class of train/ and test/ (by archive order) into dst."""
    seen: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR) as t:
        members = []
        for m in t:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            if split in per_class and seen.get((split, cls), 0) < per_class[split]:
                seen[(split, cls)] = seen.get((split, cls), 0) + 1
                members.append(m)
        t.extractall(dst, members=members, filter="data")
    roots = {p.parent for p in dst.rglob("train")}
    return roots.pop()


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.is_file(), reason=f"{CIFAR} not present (shared/ beside the repository)")
def test_quick_quality_benchmark_runs_every_method(tmp_path):
    data = extract_subset(tmp_path / "cifar", {"train": 10, "test": 4})
    out = tmp_path / "q"
    # --quick's 6 steps of batch 32 per method on few images, and 8 px patches on CIFAR's 32 px
    # (the input size still follows the images): a 4 x 4 grid, a quarter of the default's tokens
    cmd = [sys.executable, "-m", "benchmarks.quality", "--data", str(data), "--methods", ",".join(METHODS), "--quick",
           "--pretrain-images", "64", "--probe-train", "40", "--probe-val", "20", "--patch-size", "8",
           "--out", str(out), "--json"]
    r = subprocess.run(cmd, cwd=REPO, env={**env(), "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(res) == list(METHODS)
    for m, row in res.items():
        for key in ("probe_top1", "knn_top1", "cka_at_0.5"):
            assert 0.0 <= row[key] <= 1.0, (m, key, row[key])
        assert (row["pretrain_img_per_s"] is None) == (m == "random_init")
        if m != "random_init":
            assert row["pretrain_img_per_s"] > 0 and row["pretrain_steps"] == 6
    assert res["amt"]["mask_fractions"]["thrown"] > 0.3 and res["amt"]["refresh_s"] > 0  # AMT refreshed and threw
    # 16-px units of 2 x 2 patches: 4 units; SimMIM masks 2 of them, AMT on SimMIM masks 2 and throws 1
    assert res["simmim"]["mask_fractions"] == {"visible": 0.5, "masked": 0.5, "thrown": 0.0}
    assert res["amt_simmim"]["mask_fractions"] == {"visible": 0.25, "masked": 0.5, "thrown": 0.25}
    assert res["amt_simmim"]["refresh_s"] > 0
    assert res["mae"]["mask_fractions"] == {"visible": 0.25, "masked": 0.75, "thrown": 0.0}
    assert json.loads((out / "quality.json").read_text()) == res
    assert "probe top-1" in r.stdout and (out / "mae" / "eval" / "cka.png").is_file()
