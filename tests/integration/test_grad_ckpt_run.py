"""A run with model.grad_ckpt reports MFU on the model's FLOPs and, apart, the hardware's (HFU)
with the recomputed forwards; and where each step's time went."""
from __future__ import annotations

import json

from mimscale import methods
from mimscale.config import load_config
from tests.integration.launch import TINY, TINY_SETS, run, write_ds_config


def test_a_checkpointed_run_logs_mfu_hfu_and_the_step_split(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", stage=1, micro=4, accum=1)
    out = tmp_path / "run"
    sets = ["train.steps=3", "model.grad_ckpt=1"]
    r = run(ds, out, sets, ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    cfg = load_config(TINY, [*TINY_SETS, *sets])
    # the plan sizes are the preset's: the recomputation follows them
    visible, masked, _ = methods.build_model(cfg).masker.initial_sizes()
    assert abs(last["gflop_recompute_per_img"] * 1e9 - methods.recompute_flops(cfg, visible, masked)) < 1.0
    assert last["hfu"] > last["mfu"] > 0 and last["gflop_per_img"] > 0
    assert all(last[f"time/{k}_s"] >= 0 for k in ("data", "forward", "backward", "optimizer", "ckpt"))
    assert last["time/forward_s"] > 0 and last["time/backward_s"] > 0
    assert "HFU" in (out / "train.log").read_text() and "s/step: data" in (out / "train.log").read_text()
