"""MAE: random masking, the asymmetric encoder/decoder, the pixel loss; and MAE's FLOP model,
which the methods that reshape only the plan (AMT, AutoMAE, block-wise) share."""
from __future__ import annotations

from mimscale.masking.random import RandomMasking
from mimscale.methods.base import Method, block_flops, encoder_spec, patch_embed_flops


def mim_flops_per_image(*, enc_dim: int, enc_depth: int, img_size: int, patch: int, visible: int, masked: int,
                        dec_dim: int, dec_depth: int, mlp_ratio: float = 4.0, dec_mlp_ratio: float = 4.0, train: bool = True) -> float:
    """FLOPs per image of one MIM step: patch embedding (over all L patches), encoder on
    1 + V tokens, decoder on 1 + V + M tokens, pixel head on M tokens. Thrown patches cost
    nothing past the patch embedding. ``train``: forward + backward = 3 x forward. ``mlp_ratio``
    is the encoder's (ViT-g: 48/11), ``dec_mlp_ratio`` the decoder's (MAE's: 4)."""
    pix = patch * patch * 3
    fwd = patch_embed_flops(img_size, patch, enc_dim)
    fwd += enc_depth * block_flops(1 + visible, enc_dim, mlp_ratio)
    fwd += 2.0 * (1 + visible) * enc_dim * dec_dim
    fwd += dec_depth * block_flops(1 + visible + masked, dec_dim, dec_mlp_ratio)
    fwd += 2.0 * masked * dec_dim * pix
    return 3.0 * fwd if train else fwd


def reconstruction_flops(cfg, visible: int, masked: int) -> float:
    """MAE's training step at plan sizes (visible, masked): encoder on the visible tokens, decoder
    on visible + masked."""
    spec, patch = encoder_spec(cfg)
    m = cfg.model
    return mim_flops_per_image(enc_dim=spec.dim, enc_depth=spec.depth, img_size=m.img_size, patch=patch, visible=visible,
                               masked=masked, dec_dim=m.decoder_dim, dec_depth=m.decoder_depth, mlp_ratio=spec.mlp_ratio)


ENTRIES = (
    Method("random", alias="mae", preset="mae_vit_base.yaml", flops=reconstruction_flops,
           masker=lambda cfg, enc: RandomMasking(enc.num_patches, cfg.masking.mask_ratio)),
)
