"""mimscale/methods FLOP models: the block formula against a hand count, MAE's step against the
MAE paper's numbers, and the registry's ``flops`` giving each family's own model."""
from mimscale import methods
from mimscale.methods.base import block_flops
from mimscale.methods.mae import mim_flops_per_image
from tests.conftest import tiny_config

VIT_B = dict(enc_dim=768, enc_depth=12, img_size=224, patch=16, dec_dim=512, dec_depth=8)


def test_block_flops_hand_count():
    # N=10 tokens, D=8: qkv 2*10*8*24 + proj 2*10*8*8 + mlp 2*(2*10*8*32) + attn 2*(2*10*10*8)
    hand = 2 * 10 * 8 * 24 + 2 * 10 * 8 * 8 + 2 * 2 * 10 * 8 * 32 + 2 * 2 * 10 * 10 * 8
    assert block_flops(10, 8) == hand


def test_mae_vit_base_flops_match_paper_numbers():
    f = mim_flops_per_image(visible=49, masked=147, **VIT_B)
    assert 57e9 < f < 61e9  # METHODS.md: ~59 GFLOP per training image
    enc_fwd = 12 * block_flops(50, 768)
    assert 4.2e9 < enc_fwd / 2 < 4.4e9  # ~4.3 GMAC
    # throwing shrinks it: r=0.45, t=0.40 keeps 30 visible and 88 masked -> ~36 GFLOP
    assert 34e9 < mim_flops_per_image(visible=30, masked=88, **VIT_B) < 38e9


def test_the_registry_answers_with_each_familys_model():
    mae = tiny_config("mae")
    tiny = dict(enc_dim=192, enc_depth=12, img_size=32, patch=8, dec_dim=64, dec_depth=1)
    assert methods.flops(mae, 4, 12) == mim_flops_per_image(visible=4, masked=12, **tiny)
    assert methods.flops(tiny_config("amt"), 4, 12) == methods.flops(mae, 4, 12)  # AMT reshapes only the plan
    assert methods.flops(tiny_config("rmae"), 4, 12) > 2 * methods.flops(mae, 4, 12)  # two views
    assert methods.flops(tiny_config("simmim", "masking.simmim.mask_patch_size=16"), 4, 12) != methods.flops(mae, 4, 12)
