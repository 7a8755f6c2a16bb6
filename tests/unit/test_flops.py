"""mimscale/flops.py: analytic FLOPs against a hand count and the MAE paper's numbers."""
from mimscale.flops import block_flops, mim_flops_per_image


def test_block_flops_hand_count():
    # N=10 tokens, D=8: qkv 2*10*8*24 + proj 2*10*8*8 + mlp 2*(2*10*8*32) + attn 2*(2*10*10*8)
    hand = 2 * 10 * 8 * 24 + 2 * 10 * 8 * 8 + 2 * 2 * 10 * 8 * 32 + 2 * 2 * 10 * 10 * 8
    assert block_flops(10, 8) == hand



def test_mae_vit_base_flops_match_paper_numbers():
    f = mim_flops_per_image(768, 12, 224, 16, 49, 147, 512, 8)
    assert 57e9 < f < 61e9  # METHODS.md: ~59 GFLOP per training image
    enc_fwd = 12 * block_flops(50, 768)
    assert 4.2e9 < enc_fwd / 2 < 4.4e9  # ~4.3 GMAC
    # throwing shrinks it: r=0.45, t=0.40 keeps 30 visible and 88 masked -> ~36 GFLOP
    assert 34e9 < mim_flops_per_image(768, 12, 224, 16, 30, 88, 512, 8) < 38e9
