"""SimMIM's presets carry its authors' recipe (and AMT on SimMIM the AMT authors' warm-up); the
tiny CPU presets, which the quick runs use, keep today's recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from mimscale import methods
from mimscale.config import load_config
from mimscale.masking.base import plan_sizes
from mimscale.methods.simmim import unit_count

CONFIGS = Path(__file__).resolve().parents[3] / "mimscale" / "configs"


@pytest.mark.parametrize("name", ["simmim_vit_base", "simmim_vit_huge", "amt_simmim_vit_base"])
def test_simmim_presets_have_the_authors_recipe(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    m, t = cfg.model, cfg.train
    assert (m.drop_path, m.layer_scale, m.pos_embed, t.clip_grad) == (0.1, 0.1, "learned", 5.0)
    # SimMIM's min lr 5e-6 per 512 images, scaled like its lr to the preset's batch
    assert t.min_lr == pytest.approx(5e-6 * t.global_batch / 512)
    assert t.base_lr * t.global_batch / 256 == pytest.approx(1e-4 * t.global_batch / 512)


def test_amt_simmim_warms_up_at_the_authors_ratio():
    cfg = load_config(CONFIGS / "amt_simmim_vit_base.yaml")
    units = unit_count(cfg)
    assert units == 49 and cfg.masking.mask_ratio == 0.44
    assert plan_sizes(units, cfg.masking.mask_ratio) == (27, 22, 0)  # 22 of 49 units masked before the first refresh
    masker = methods.build_model(load_config(CONFIGS / "amt_simmim_vit_base.yaml", ["model.name=vit_tiny"])).masker
    assert masker.initial_sizes() == (27 * 4, 22 * 4, 0)


@pytest.mark.parametrize("name", ["simmim_vit_tiny_cpu", "amt_simmim_vit_tiny_cpu"])
def test_tiny_presets_keep_todays_recipe(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.model.drop_path, cfg.model.layer_scale, cfg.model.pos_embed, cfg.train.clip_grad) == (0.0, None, "sincos", None)
    assert cfg.masking.mask_ratio == 0.6
