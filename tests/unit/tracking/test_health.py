"""The in-training CKA health check (mimscale/health.py), without a launch."""
from __future__ import annotations

import torch

from mimscale.config import load_config
from mimscale.data.streams import build_source
from mimscale.methods import build_model
from mimscale.tracking.health import CKAHealth, fixed_images

SETS = ["model.name=vit_tiny", "model.img_size=32", "model.patch_size=8", "data.source=synthetic",
        "data.synthetic_size=40", "tracking.cka_images=6", "tracking.cka_every_epochs=0.5"]


def test_fixed_images_are_the_same_every_time_and_checks_follow_the_schedule():
    cfg = load_config(None, SETS + ["data.synthetic_count=64"])
    source = build_source(cfg.data, cfg.train.seed)
    a = fixed_images(cfg.data, source, 32, 6, seed=0)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, fixed_images(cfg.data, source, 32, 6, seed=0))
    assert not torch.equal(a, fixed_images(cfg.data, source, 32, 6, seed=1))
    health = CKAHealth(cfg, source, steps_per_epoch=10)  # every 0.5 epochs: every 5 steps
    assert [s for s in range(1, 21) if health.due(s)] == [5, 10, 15, 20]
    torch.manual_seed(0)
    vals = health.run(build_model(cfg).encoder)
    assert set(vals) == {f"cka/r{r}/{w}" for r in ("0.25", "0.50", "0.75") for w in ("last", "mean")}
    assert all(0 < v <= 1 + 1e-6 for v in vals.values()) and health.last == vals


def test_a_failing_check_warns_and_turns_itself_off_instead_of_ending_the_run(capsys):
    cfg = load_config(None, SETS + ["data.synthetic_count=1"])  # one image: CKA cannot be measured
    health = CKAHealth(cfg, build_source(cfg.data, cfg.train.seed), steps_per_epoch=10)
    assert health.due(5)
    assert health.run(build_model(cfg).encoder) == {}
    assert not health.due(5) and not health.due(10)
    printed = capsys.readouterr()
    assert "CKA health check off" in printed.out + printed.err
