"""ZeRO-3 builds the model inside deepspeed.zero.Init: no rank ever holds the whole model."""
from __future__ import annotations

from pathlib import Path

from tests.integration.launch import run_script_json

SCRIPT = str(Path(__file__).with_name("zero_init_check.py"))


def test_each_rank_holds_half_the_parameters_at_every_point_of_the_build(tmp_path):
    """MAE, C-MAE (an online and a target encoder) and AutoMAE with its EMA extractor."""
    by_method = run_script_json(SCRIPT, 3, tmp_path / "zero_init.json")
    assert sorted(by_method) == ["automae_ema", "cmae", "mae"]
    for method, ranks in by_method.items():
        assert [r["rank"] for r in ranks] == [0, 1], method
        _check_halved(ranks)


def _check_halved(ranks: list[dict]) -> None:
    for r in ranks:
        whole = r["whole_bytes"]
        assert whole > 400e6  # a ViT-Base encoder and decoder in fp32
        assert abs(r["bytes"] - whole / 2) <= 1e-3 * whole  # after the build: this rank's shards
        # at every point of the build: the shards so far plus the one module being built (< 1%)
        assert r["peak_partitioned"] <= 0.51 * whole, r
        assert r["peak_whole"] == whole  # the same model built whole: every byte on every rank
        assert r["max_diff"] == 0.0, (r["worst"], r["max_diff"])  # the same weights: gathered shards equal the whole build's
