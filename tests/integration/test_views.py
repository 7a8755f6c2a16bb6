"""R-MAE and C-MAE under ZeRO 1/2/3 on 2 CPU ranks (tests/integration/views_zero.py, run by the
zero_checks launch): the engine's gradients equal plain torch's, C-MAE's target takes no gradient
and follows its EMA exactly."""
from __future__ import annotations

import pytest

from tests.integration.launch import ZERO_STAGES


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_rmae_cmae_gradients_and_ema_under_zero(zero_checks, stage):
    d = zero_checks[str(stage)]["views"]
    assert sorted(d) == ["cmae", "rmae"]
    for method, res in d.items():
        assert len(res["diff"]) > 100, method  # every trainable parameter
        for name, diff in res["diff"].items():
            assert diff <= 1e-5 * max(1.0, res["scale"][name]), (method, name, diff, res["scale"][name])
    assert d["rmae"]["terms"] == ["loss_ae", "loss_dist"]
    # the shared decoder learns from both views: it has gradients
    assert any(n.startswith("decoder.") and d["rmae"]["scale"][n] > 0 for n in d["rmae"]["diff"])
    c = d["cmae"]
    assert c["terms"] == ["loss_nce"]
    assert c["n_target"] > 100 and c["target_trainable"] == [] and c["target_in_optimizer"] == 0
    assert not any(n.startswith("objective.target_") for n in c["diff"])  # no gradient ever reaches the target
    assert c["target_moved"] > 1e-4 and c["ema_error"] <= 1e-6  # it moved, exactly by the EMA rule
