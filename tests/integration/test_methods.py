"""A method added through the registry alone trains end to end: block-wise masking (the README's
example) through pretrain.py, one process, loss falling and the plan's sizes reported."""
import pytest

from tests.integration.launch import run, summary, write_ds_config


@pytest.mark.slow  # make test-all; every registry entry builds and trains a step in tests/unit/test_methods.py
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
