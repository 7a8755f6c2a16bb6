"""mimscale.eval for real: a 2-rank deepspeed launch of the probe (each rank extracts its share,
rank 0 merges by global index and fits) against the same run in one process, the cka CLI, and the
trainer's CKA health check on an encoder partitioned by ZeRO-3."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mimscale.eval.__main__ import main
from tests.integration.launch import free_port, run_group
from tests.unit.eval.test_eval import RANDOM, write_folder


def _entries(cache: Path, split: str) -> dict[str, dict]:
    return {p.name.split("-")[1]: torch.load(p, weights_only=True) for p in cache.glob(f"{split}-*.pt")}


def test_two_rank_probe_equals_one_process(tmp_path, capsys):
    data = write_folder(tmp_path / "data", {"train": 10, "val": 5})  # 40 + 20 images, 4 classes
    args = ["probe", "--checkpoint", RANDOM, "--data", str(data), "--workers", "1", "--batch", "8", "--seed", "3", "--json"]
    launcher = str(Path(sys.executable).parent / "deepspeed")
    r = run_group([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mimscale.eval", *args,
                   "--cache", str(tmp_path / "c2")], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "extracted 40 samples on 2 rank(s)" in r.stderr and "extracted 20 samples on 2 rank(s)" in r.stderr
    launched = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
    assert not list((tmp_path / "c2").glob(".*part*"))  # the rank shares were merged and removed

    code = main([*args, "--cache", str(tmp_path / "c1"), "--threads", "1"])
    single = json.loads(capsys.readouterr().out)
    assert code == 0
    for split, n in (("train", 40), ("val", 20)):
        two, one = _entries(tmp_path / "c2", split), _entries(tmp_path / "c1", split)
        assert sorted(two) == sorted(one) == ["cls", "mean"]
        for pool in two:
            assert two[pool]["index"].tolist() == list(range(n))  # every sample once, in global-index order
            assert torch.equal(two[pool]["labels"], one[pool]["labels"])
            assert torch.allclose(two[pool]["feats"], one[pool]["feats"], atol=1e-5)
    assert launched["probe_top1"] == single["probe_top1"] > 0.95
    assert launched["probe_train_top1"] == single["probe_train_top1"]
    assert (launched["n_train"], launched["n_val"]) == (single["n_train"], single["n_val"]) == (40, 20)


def test_cka_cli_writes_a_plot_and_a_table(tmp_path, capsys):
    data = write_folder(tmp_path / "data", {"train": 1, "val": 4})
    png = tmp_path / "out" / "cka.png"
    code = main(["cka", "--checkpoint", RANDOM, "--data", str(data), "--images", "16", "--plot", str(png), "--threads", "1"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    header = out[1].split()
    assert header[0] == "ratio" and header[1:13] == [f"b{i}" for i in range(1, 13)] and header[-1] == "mean"
    rows = [line.split() for line in out[2:]]
    assert [float(r[0]) for r in rows] == [round(0.1 * i, 1) for i in range(1, 10)]
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[1:])


# One process is a world of one, but ZeRO-3 still partitions: every parameter (cls_token included)
# is an empty placeholder until a module's forward hooks gather it.
ZERO3_HEALTH_CHECK = """
import json, torch, deepspeed
from mimscale.runtime import dist
from mimscale.eval.cka import health_check
from mimscale.checkpoint.weights import build_encoder
dist.init_distributed()
model = {"name": "vit_tiny", "img_size": 32, "patch_size": 8}
torch.manual_seed(0)
plain = build_encoder(model).eval()
torch.manual_seed(0)
enc = build_encoder(model)
cfg = json.load(open("ds_configs/cpu_fp32_zero3.json"))
engine, *_ = deepspeed.initialize(model=enc, optimizer=torch.optim.AdamW(enc.parameters()), config=cfg)
images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
print("RESULT", json.dumps({"partitioned": engine.module.cls_token.numel() == 0,
                            "zero3": health_check(engine.module, images), "plain": health_check(plain, images)}))
dist.shutdown()
"""


@pytest.mark.slow  # make test-all: the module it drives has unit tests in the default suite
def test_health_check_under_zero3_equals_the_plain_encoder():
    r = run_group([sys.executable, "-c", ZERO3_HEALTH_CHECK], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert res["partitioned"]  # the check really ran on placeholders
    assert sorted(res["zero3"]) == sorted(res["plain"]) and len(res["plain"]) == 6
    for key, value in res["plain"].items():
        assert abs(res["zero3"][key] - value) < 1e-6, key
