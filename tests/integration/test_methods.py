"""A method added through the registry alone trains end to end: block-wise masking (docs/architecture.md's
example) and AMT on SimMIM (a new base, a unit-grid masker and AMT's refresh) through pretrain.py,
one process, loss falling and the plan's sizes reported."""
import json
import math

import pytest

from mimscale import methods
from mimscale.methods.simmim import simmim_flops_per_image
from tests.integration.launch import run, summary, write_ds_config


@pytest.mark.slow  # make test-all; every registry entry builds and trains a step in tests/unit/methods/test_methods.py
def test_blockwise_trains_through_pretrain(tmp_path):
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=8, accum=1)
    out = tmp_path / "run"
    r = run(ds, out, ["masking.method=blockwise", "masking.mask_ratio=0.5", "masking.blockwise.min_block=2",
                      "train.steps=12", "train.base_lr=0.003", "resume=never"], ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = summary(out)
    assert s["masking"] == "blockwise" and s["steps"] == 12
    assert s["mask_fractions"] == {"visible": 0.5, "masked": 0.5, "thrown": 0.0}
    losses = [e["loss"] for e in s["loss_history"]]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:2]) / 2, losses


@pytest.mark.slow  # make test-all; SimMIM and AMT-SimMIM step through the registry in tests/unit/methods/test_methods.py and test_simmim.py
def test_amt_simmim_trains_through_pretrain_refreshing_on_the_unit_grid(tmp_path):
    """One launch for both SimMIM methods: amt_simmim is plain SimMIM (random 16-px units, mask
    tokens, linear head, L1) until its refresh at step 2, then AMT's plan on the 2 x 2 unit grid
    with a unit thrown; the FLOPs per image follow the plan (encoder on kept tokens, the head)."""
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=8, accum=1)
    out = tmp_path / "run"
    r = run(ds, out, [methods.select("amt_simmim"), "masking.simmim.mask_patch_size=16", "masking.mask_ratio=0.5",
                      "masking.amt.mask_ratio=0.5", "masking.amt.throw_ratio=0.25", "masking.amt.first_refresh=25%",
                      "masking.amt.refresh_every=100%", "train.steps=8", "train.base_lr=0.03", "train.beta2=0.999",
                      "data.synthetic_count=64", "resume=never"], ranks=1)  # 64 images: a short refresh
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = summary(out)
    assert s["masking"] == "amt_simmim" and s["steps"] == 8
    assert [(x["generation"], x["step"], x["samples"]) for x in s["amt_refreshes"]] == [(1, 2, 64)]
    assert s["mask_fractions"] == {"visible": 0.25, "masked": 0.5, "thrown": 0.25}  # 1, 2 and 1 of 4 units
    flops = {m["step"]: m["gflop_per_img"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    tiny = dict(enc_dim=192, enc_depth=12, img_size=32, patch=8)  # vit_tiny at 32 px: 16 patches
    assert flops[2] == pytest.approx(simmim_flops_per_image(visible=8, masked=8, **tiny) / 1e9)  # SimMIM: all 16 in
    assert flops[3] == pytest.approx(simmim_flops_per_image(visible=4, masked=8, **tiny) / 1e9)  # 4 thrown patches out
    losses = [e["loss"] for e in s["loss_history"]]
    assert all(math.isfinite(v) for v in losses) and min(losses[-3:]) < losses[0], losses
