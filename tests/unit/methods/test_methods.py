"""mimscale/methods.py: the method registry. Every entry builds a model that trains, config knows
every entry's name and section, and block-wise masking (docs/architecture.md's example method) behaves."""
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

from mimscale import methods
from mimscale.config import load_config
from mimscale.errors import ConfigError
from mimscale.hooks.amt_refresh import AMTRefresh
from mimscale.hooks.base import LoopContext, LoopHooks
from mimscale.hooks.ema import EMAHooks
from mimscale.masking.blockwise import BlockwiseMasking
from mimscale.methods import METHODS

TINY = ["model.name=vit_tiny", "model.img_size=32", "model.patch_size=8", "model.decoder_dim=64", "model.decoder_depth=1",
        "model.decoder_heads=4", "masking.cmae.proj_hidden=64", "masking.cmae.proj_dim=32"]
# Entries whose defaults do not fit TINY's 4 x 4 patch grid: SimMIM's 32-px units would be one unit;
# 16-px units are 2 x 2 patches (4 units), where AMT's ratios must leave a unit of each kind.
ENTRY_SETS = {
    "simmim": ["masking.simmim.mask_patch_size=16"],
    "amt_simmim": ["masking.simmim.mask_patch_size=16", "masking.mask_ratio=0.5", "masking.amt.mask_ratio=0.5",
                   "masking.amt.throw_ratio=0.25"],
}


def _cfg(method, *sets):
    return load_config(None, TINY + [methods.select(method), *ENTRY_SETS.get(method, []), *sets])


def _batch(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    meta = {"box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1), "flip": torch.zeros(n, dtype=torch.bool),
            "index": torch.arange(n)}
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), meta


@pytest.mark.parametrize("name", list(METHODS))
def test_every_entry_builds_a_model_whose_loss_trains_its_parameters(name):
    cfg = _cfg(name)
    torch.manual_seed(0)
    model = methods.build_model(cfg)
    assert (model.decoder is not None) == METHODS[name].needs_decoder
    images, meta = _batch()
    if METHODS[name].uses_store(cfg):  # stored attention maps: AMT's masking-and-throwing plan, not its warm-up
        meta["attn"] = torch.rand(images.shape[0], model.encoder.num_patches, generator=torch.Generator().manual_seed(1)).half()
    loss, terms = model(images, meta)
    assert torch.isfinite(loss) and all(not t.requires_grad for t in terms.values())
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    plan = model.last_plan
    assert plan.visible.shape[1] + plan.masked.shape[1] + plan.thrown.shape[1] == model.encoder.num_patches
    assert (plan.thrown.shape[1] > 0) == (name in ("amt", "amt_simmim"))
    v, m, t = model.masker.initial_sizes()
    assert v + m + t == model.encoder.num_patches
    assert methods.flops(cfg, v, m) > 0


def test_config_takes_its_choices_and_sections_from_the_registry():
    cfg = load_config(None, TINY)
    for name, cls in methods.sections():
        assert type(getattr(cfg.masking, name)) is cls
    with pytest.raises(ConfigError, match="'masking.method' = 'nope' is not allowed; allowed values: random, amt, automae"):
        load_config(None, ["masking.method=nope"])
    with pytest.raises(ConfigError, match="masking.automae.extractor"):
        load_config(None, ["masking.automae.extractor=nope"])
    assert methods.get("mae") is METHODS["random"] and methods.select("mae") == "masking.method=random"
    with pytest.raises(ConfigError, match="allowed values: random, mae, amt"):
        methods.get("nope")


def test_each_section_checks_its_own_keys():
    with pytest.raises(ConfigError, match="masking.blockwise.min_block"):
        load_config(None, ["masking.blockwise.min_block=0"])
    with pytest.raises(ConfigError, match="masking.amt.first_refresh"):
        load_config(None, ["masking.amt.first_refresh=soon"])
    assert all(fields(cls) for _, cls in methods.sections())


def _ctx(cfg, model) -> LoopContext:
    return LoopContext(cfg=cfg, engine=SimpleNamespace(module=model), micro_batch=4, zero_stage=1, source=range(64),
                       out=None, rank=0, world=1, device=torch.device("cpu"), total_steps=100, steps_per_epoch=10,
                       num_patches=model.encoder.num_patches, log_metrics=lambda m, s: None, mean_step_seconds=lambda: None)


@pytest.mark.parametrize("name, sets, kind", [
    ("random", [], LoopHooks), ("blockwise", [], LoopHooks), ("amt", [], AMTRefresh), ("cmae", [], EMAHooks),
    ("automae", ["masking.automae.extractor=online"], LoopHooks), ("automae", ["masking.automae.extractor=ema"], EMAHooks),
    ("automae", ["masking.automae.extractor=stored"], AMTRefresh), ("simmim", [], LoopHooks), ("amt_simmim", [], AMTRefresh),
])
def test_hooks_come_from_the_entry_and_default_to_doing_nothing(name, sets, kind):
    cfg = _cfg(name, *sets)
    model = methods.build_model(cfg)
    hooks = methods.build_hooks(cfg, _ctx(cfg, model))
    assert type(hooks) is kind
    assert METHODS[name].uses_store(cfg) == (kind is AMTRefresh)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_blockwise_plan_is_exact_disjoint_and_complete(ratio):
    m = BlockwiseMasking(grid=8, mask_ratio=ratio, min_block=4)
    plan = m(torch.zeros(16, 3, 32, 32), {})
    V, M, T = m.initial_sizes()
    assert plan.visible.shape == (16, V) and plan.masked.shape == (16, M) and T == 0
    both = torch.cat([plan.visible, plan.masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(64).expand(16, -1))


def test_blockwise_masks_whole_blocks():
    """One square block of exactly M patches: the masked set is a 4 x 4 square of the grid."""
    m = BlockwiseMasking(grid=8, mask_ratio=0.25, min_block=16, max_aspect=1.0)  # M = 16, blocks of 16 = 4 x 4
    plan = m(torch.zeros(32, 3, 32, 32), {})
    rows, cols = plan.masked // 8, plan.masked % 8
    assert torch.equal(rows.max(1).values - rows.min(1).values, torch.full((32,), 3))
    assert torch.equal(cols.max(1).values - cols.min(1).values, torch.full((32,), 3))


def test_blockwise_masks_are_more_clustered_than_random():
    """Masked patches have more masked 4-neighbours than under uniform random masking."""
    def neighbours(masked):
        grid = torch.zeros(masked.shape[0], 8, 8)
        grid.view(masked.shape[0], -1).scatter_(1, masked, 1.0)
        pairs = (grid[:, 1:] * grid[:, :-1]).sum() + (grid[:, :, 1:] * grid[:, :, :-1]).sum()
        return float(pairs)
    torch.manual_seed(0)
    block = BlockwiseMasking(grid=8, mask_ratio=0.4)(torch.zeros(64, 3, 32, 32), {})
    rand = torch.rand(64, 64).argsort(1)[:, : block.masked.shape[1]]
    assert neighbours(block.masked) > 1.3 * neighbours(rand)
