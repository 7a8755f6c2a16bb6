"""pretrain.py as a single process: config errors before any model, NaN stops with the step named."""
from __future__ import annotations

import json

import pytest

from tests.integration.launch import run, summary, write_ds_config


def test_bad_config_key_fails_fast_naming_key(tmp_path):
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=4, accum=1)
    r = run(ds, tmp_path / "out", ["masking.method=blocky"], ranks=1, timeout=120)
    assert r.returncode == 2
    assert "masking.method" in r.stderr and "allowed values: random" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing was built or written
    r = run(ds, tmp_path / "out", ["train.stepz=3"], ranks=1, timeout=120)
    assert r.returncode == 2 and "unknown config key 'train.stepz'" in r.stderr and "steps" in r.stderr


def test_ds_config_with_optimizer_is_rejected(tmp_path):
    ds = write_ds_config(tmp_path / "bad.json", 1, optimizer={"type": "Adam", "params": {"lr": 1e-3}})
    r = run(ds, tmp_path / "out", [], ranks=1, timeout=120)
    assert r.returncode == 2 and "defines 'optimizer'" in r.stderr and "Remove it" in r.stderr


def test_nonfinite_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    """An absurd learning rate blows the loss up within a few steps; the run must stop with exit
    code 3, name the first bad step, and leave only checkpoints from before it."""
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=4, accum=1)
    out = tmp_path / "out"
    r = run(ds, out, ["train.steps=30", "train.warmup_steps=0", "train.base_lr=1e12", "train.log_every=2",
                      "train.ckpt_every=2", "model.norm_pix_loss=false"], ranks=1, timeout=240)
    assert r.returncode == 3, r.stderr[-3000:]
    msg = [line for line in r.stderr.splitlines() if "non-finite loss at step" in line]
    assert msg, r.stderr[-3000:]
    bad_step = int(msg[0].split("non-finite loss at step ")[1].split()[0])
    assert 1 <= bad_step <= 30
    ckpts = sorted((out / "checkpoints").glob("step*/COMPLETE"))
    steps = [int(p.parent.name[4:]) for p in ckpts]
    assert all(s < bad_step for s in steps)
    assert not (out / "summary.json").exists() or json.loads((out / "summary.json").read_text())["steps"] < bad_step


@pytest.mark.slow  # two single-process runs (~60 s); make test-all runs it
def test_compiled_module_trains_like_eager(tmp_path):
    """train.compile goes through DeepSpeed's engine.compile; with the aot_eager backend (graph
    capture without code generation, cheap on CPU) the per-step losses match eager mode."""
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=4, accum=1)
    base = ["train.steps=4", "resume=never"]
    r = run(ds, tmp_path / "eager", base, ranks=1, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(ds, tmp_path / "compiled", base + ["train.compile=true", "train.compile_backend=aot_eager"], ranks=1, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    eager = [e["loss"] for e in summary(tmp_path / "eager")["loss_history"]]
    compiled = [e["loss"] for e in summary(tmp_path / "compiled")["loss_history"]]
    assert len(eager) == 4 and all(abs(a - b) <= 1e-5 for a, b in zip(eager, compiled)), (eager, compiled)
