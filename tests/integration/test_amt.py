"""AMT end to end on 2 CPU ranks: refreshes cover every sample exactly once, masking and throwing
after the first refresh, resume keeps the store and repeats the uninterrupted run, the mask grid
reaches MLflow, and ZeRO-3's gathered attention pass gives ZeRO-1/2's maps (the zero_checks
launch; AMT's ZeRO-1 and ZeRO-3 training, refreshes included, is pinned by tests/golden)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.launch import ZERO_STAGES, losses, run, summary, write_ds_config

STEPS = 12
N = 128  # synthetic samples; 2 ranks x micro 4 x accumulation 2: 8 steps an epoch
L = 16  # 32 px images, patch 8
# refreshes before steps 4 and 8 (every half epoch); each rank's 64 whole images in 4 attention batches
AMT = ["masking.method=amt", "masking.amt.first_refresh=0.5", "masking.amt.refresh_every=0.5",
       "masking.amt.refresh_batch=16", f"data.synthetic_count={N}", f"train.steps={STEPS}"]


def _rows(out: Path, generation: int) -> np.ndarray:
    return np.fromfile(out / "amt" / f"maps-{generation:04d}.f16", dtype=np.float16).reshape(N, L + 1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """An uninterrupted ZeRO-3 run with MLflow, and one stopped at step 6 then resumed."""
    root = tmp_path_factory.mktemp("amt")
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    ds = write_ds_config(root / "z3.json", 3)
    ref = root / "ref"
    r = run(ds, ref, AMT + ["resume=never", "tracking.enabled=true", "tracking.mask_grid_every=6"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = root / "run"
    r = run(ds, out, AMT + ["train.stop_after=6"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = summary(out)
    gen1 = _sha(out / "amt" / "maps-0001.f16")
    r = run(ds, out, AMT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # DeepSpeed's CPU all-reduce workspaces (69 MB each in /dev/shm) do not outlive the runs
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before
    return {"ref": ref, "out": out, "first": first, "gen1": gen1, "log": r.stdout + r.stderr}


# The three ZeRO-3 launches of the fixture (~130 s) run in make test-all. make test keeps AMT's
# ZeRO-1/3 training with refreshes (tests/golden, exact), the ZeRO-3 attention pass (below) and the
# store and refresh units (tests/unit/masking/test_amt.py).
@pytest.mark.slow
def test_refreshes_cover_every_sample_once_and_switch_to_throwing(zero3):
    s = summary(zero3["ref"])
    assert [(r["generation"], r["step"], r["samples"], r["skipped"]) for r in s["amt_refreshes"]] == [(1, 4, N, 0), (2, 8, N, 0)]
    assert all(r["seconds"] > 0 and r["pct_of_epoch"] > 0 for r in s["amt_refreshes"])
    rows = _rows(zero3["ref"], 2)
    # N rows written in total, and every one of the N rows carries this generation: each exactly once
    assert np.all(rows[:, -1] == 2)
    maps = rows[:, :-1].astype(np.float32)
    assert np.all(np.isfinite(maps)) and maps.min() >= 0 and maps.max() <= 1
    assert np.all(maps.max(1) > maps.min(1))  # a real map per sample, not a constant
    assert s["mask_fractions"] == {"visible": 3 / L, "masked": 7 / L, "thrown": 6 / L}
    assert s["amt_generation"] == 2
    # the FLOPs counted per image follow the plan: MAE's (4 visible + 12 masked) until the first
    # refresh, the throwing plan's (3 + 7) after it
    flops = {m["step"]: m["gflop_per_img"] for m in map(json.loads, (zero3["ref"] / "metrics.jsonl").read_text().splitlines())}
    assert len({flops[k] for k in range(1, 5)}) == 1 and len({flops[k] for k in range(5, STEPS + 1)}) == 1
    from mimscale.methods.mae import mim_flops_per_image

    tiny = dict(enc_dim=192, enc_depth=12, img_size=32, patch=8, dec_dim=128, dec_depth=2)  # vit_tiny, the mae tiny preset
    assert flops[4] == pytest.approx(mim_flops_per_image(visible=4, masked=12, **tiny) / 1e9)
    assert flops[5] == pytest.approx(mim_flops_per_image(visible=3, masked=7, **tiny) / 1e9)
    # store generations no checkpoint needs are gone (only step 12's, generation 2, is kept)
    assert sorted(p.name for p in (zero3["ref"] / "amt").iterdir()) == ["maps-0002.f16", "maps-0002.json"]


@pytest.mark.slow
def test_mask_grid_reaches_mlflow(zero3):
    grids = sorted(p.name for p in (zero3["ref"] / "mask_grids").iterdir())
    assert grids == ["step00000006.png", "step00000012.png"]
    logged = list((zero3["ref"] / "mlartifacts").rglob("mask_grids/step00000012.png"))
    assert len(logged) == 1
    from PIL import Image

    img = Image.open(logged[0])
    # the micro batch of 4 x (original | masked input | reconstruction | + visible pasted | weights), 32 px
    # enlarged 4x, 2 px apart, under the titles: ZeRO-3's reconstruction forward ran on both ranks
    assert img.size[0] == 5 * 128 + 4 * 2 and img.size[1] > 4 * 128 + 3 * 2


@pytest.mark.slow
def test_resume_keeps_the_store_and_matches_uninterrupted(zero3):
    out, first = zero3["out"], zero3["first"]
    assert [r["generation"] for r in first["amt_refreshes"]] == [1] and first["steps"] == 6
    second = summary(out)
    assert second["resumed_from"].endswith("step00000006")
    # generation 1 came back from disk (the same record, the same bytes), generation 2 was new
    assert second["amt_refreshes"][0] == first["amt_refreshes"][0]
    assert [r["generation"] for r in second["amt_refreshes"]] == [1, 2]
    assert _sha(out / "amt" / "maps-0001.f16") == zero3["gen1"]  # kept: the step-6 checkpoint refers to it
    assert "AMT refresh 1 " not in zero3["log"]
    ref, resumed = losses(summary(zero3["ref"])), losses(second)
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step, loss in resumed.items():
        assert abs(loss - ref[step]) <= 1e-6, (step, loss, ref[step])
    assert np.array_equal(_rows(out, 2), _rows(zero3["ref"], 2))


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_attention_pass_under_each_zero_stage_gives_the_plain_encoders_maps(zero_checks, stage):
    """The refresh's CLS-attention forward through the engine's encoder (under ZeRO-3 on partitioned
    parameters that its module hooks gather) equals the plain encoder's on the same weights; a
    whole ZeRO-3 refresh writing every row is the fixture's run above."""
    a = zero_checks[str(stage)]["amt"]
    assert a["shape"] == [6, L] and a["partitioned"] == (stage == 3)
    assert 0 <= a["min"] and a["max"] <= 1 and a["spread"] > 0  # real maps, not constants
    assert a["diff"] <= 1e-6, a
