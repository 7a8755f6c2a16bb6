"""AutoMAE on 2 CPU ranks: one-backward gradient routing inside the DeepSpeed engine under ZeRO
1/2/3 (tests/integration/automae_grads.py, run by the zero_checks launch), and a ZeRO-3 run with the
EMA extractor and throwing that resumes exactly from a mid-run checkpoint (generator,
discriminator with its spectral-norm vectors, and EMA extractor all restored)."""
from __future__ import annotations

import pytest

from tests.integration.launch import ZERO_STAGES, losses, run, summary, write_ds_config

STEPS = 8
SETS = ["masking.method=automae", "masking.automae.extractor=ema", "masking.automae.ema_decay=0.9",
        "masking.automae.throw_ratio=0.125", f"train.steps={STEPS}"]


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_one_backward_routes_each_term_to_its_own_parameters_under_zero(zero_checks, stage):
    d = zero_checks[str(stage)]["automae"]
    assert len(d["diff"]) > 100  # every trainable parameter: encoder, decoder, generator, discriminator
    for name, diff in d["diff"].items():
        assert diff <= 1e-5 * max(1.0, d["scale"][name]), (name, diff, d["scale"][name])
    assert any(n.startswith("masker.discriminator.") and d["scale"][n] > 0 for n in d["diff"])
    assert any(n.startswith("masker.generator.") and d["scale"][n] > 0 for n in d["diff"])
    if stage == 3:
        assert d["d_persistent"] and all(d["d_persistent"].values())


@pytest.mark.slow  # make test-all: the module it drives has unit tests in the default suite
def test_ema_throwing_run_resumes_exactly_zero3(tmp_path):
    """The reference saves at step 4 on its way to step 8; a second run resumes from that mid-run
    checkpoint (resume=<tag>, an output_dir of its own) and repeats steps 5..8 exactly.
    (train.stop_after, then resume=auto in the same output_dir: tests/integration/test_amt.py.)"""
    ds = write_ds_config(tmp_path / "z3.json", 3)
    ref, out = tmp_path / "ref", tmp_path / "run"
    r = run(ds, ref, SETS + ["resume=never", "train.ckpt_every=4"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = summary(ref)
    assert s["mask_fractions"] == {"visible": 2 / 16, "masked": 12 / 16, "thrown": 2 / 16}
    for k in ("loss_rec", "loss_g", "loss_d", "d_real", "d_fake"):
        assert isinstance(s[k], float), k
    assert s["loss_d"] > 0 and s["loss_g"] >= 0
    tag = ref / "checkpoints" / "step00000004"
    assert (tag / "COMPLETE").is_file() and s["checkpoint"].endswith(f"step{STEPS:08d}")
    r = run(ds, out, SETS + ["train.ckpt_every=4", f"resume={tag}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    second = summary(out)
    assert second["resumed_from"] == str(tag) and second["steps"] == STEPS
    expected, resumed = losses(s), losses(second)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step, loss in resumed.items():  # G, D (and its power-iteration vectors), EMA all came back
        assert abs(loss - expected[step]) <= 1e-6, (step, loss, expected[step])
