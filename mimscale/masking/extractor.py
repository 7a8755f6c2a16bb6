"""AutoMAE's frozen extractor: any pretrained timm ViT, run as timm runs it, up to the last
block's CLS attention.

The network is timm's own ``VisionTransformer`` (a model name such as ``vit_small_patch16_224``
for a DINO-S checkpoint, or the encoder's architecture for an MAE/mimscale one), loaded strictly
from local weights (no download), so its position embedding is the checkpoint's own: learned
(DINO, iBOT, supervised) or MAE's sin-cos as stored. Its size may differ from the encoder's; its
patch size may not. An input of another size is resized to the extractor's (bilinear,
antialiased) and its map resized back to the encoder's grid.

Under ZeRO-3 the extractor is a frozen submodule like any other: its blocks are called as
modules (DeepSpeed gathers each module's weights in its forward hooks), and the tensors timm's
top module reads directly (cls_token, pos_embed, reg_token) are buffers here, never partitioned.
"""
from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from mimscale.errors import ConfigError
from mimscale.models.registry import EncoderSpec
from mimscale.models.vit import cls_attention_map, sincos_pos_embed_2d

KEY = "masking.automae.extractor_checkpoint"
ATTENTION = {"raw": "heads", "stretched": "heads_stretched"}  # masking.automae.attention -> cls_attention_map mode
UNUSED = ("norm.", "fc_norm.", "head.", "head_drop.")  # after the last block: no part of its attention
TOP_TENSORS = ("cls_token", "reg_token", "pos_embed")


def timm_vit(name: str, spec: EncoderSpec, patch_size: int, img_size: int) -> VisionTransformer:
    """An untrained timm ViT without a classifier: ``name`` (a timm model name) at ``img_size``
    (0: the name's own), or, with no name, the architecture of ``spec`` (mimscale's encoder)."""
    if name:
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": img_size} if img_size else {}))
        except RuntimeError as e:  # timm's "Unknown model"
            raise ConfigError(f"config key 'masking.automae.extractor_model' = {name!r}: {e}") from None
        if not isinstance(net, VisionTransformer):
            raise ConfigError(f"config key 'masking.automae.extractor_model' = {name!r} is a {type(net).__name__}, "
                              "not a timm VisionTransformer")
        return net
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=spec.dim, depth=spec.depth,
                             num_heads=spec.heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, num_classes=0)


def load_strict(net: VisionTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` (timm keys, fp32) into ``net``: every tensor the attention map depends on
    must be there with its shape. A missing pos_embed is MAE's sin-cos (mimscale checkpoints keep
    it fixed, not saved); one of another grid is resampled by timm's own checkpoint filter."""
    state = dict(state)
    if "pos_embed" not in state and net.pos_embed is not None and not net.no_embed_class and net.num_prefix_tokens == 1:
        state["pos_embed"] = sincos_pos_embed_2d(net.embed_dim, net.patch_embed.grid_size[0])[None]
    what = (f"config key '{KEY}' = {source!r} does not fit the extractor {type(net).__name__} (embed_dim "
            f"{net.embed_dim}, depth {len(net.blocks)})")
    hint = "set masking.automae.extractor_model to the checkpoint's timm model name"
    try:
        result = net.load_state_dict(checkpoint_filter_fn(state, net), strict=False)
    except RuntimeError as e:  # shapes that differ
        wrong = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ConfigError(f"{what}: {'; '.join(wrong[:2]) or e} ({hint})") from None
    missing = [k for k in result.missing_keys if not k.startswith(UNUSED)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(UNUSED)]
    if missing or unexpected:
        raise ConfigError(f"{what}: missing {missing[:4]}, unexpected {unexpected[:4]} ({hint})")


class FrozenExtractor(nn.Module):
    """images [B, 3, S, S] normalized -> maps [B, H, g, g] float32 (H: the extractor's heads, g:
    the encoder's grid); ``attention`` raw: per head the CLS query's softmax over the patch keys,
    rows summing to 1; stretched: each head min-max scaled to [0, 1]."""

    def __init__(self, net: VisionTransformer, grid: int, attention: str = "raw"):
        super().__init__()
        if attention not in ATTENTION:
            raise ConfigError(f"config key 'masking.automae.attention' = {attention!r}: allowed values: {', '.join(ATTENTION)}")
        for name in TOP_TENSORS:  # read by timm's _pos_embed outside any submodule call: buffers, not parameters
            t = getattr(net, name, None)
            if isinstance(t, nn.Parameter):
                delattr(net, name)
                net.register_buffer(name, t.detach().clone())
        self.net = net.requires_grad_(False).eval()
        self.grid = grid
        self.heads = net.blocks[-1].attn.num_heads
        self.in_size = tuple(net.patch_embed.img_size)
        self.mode = ATTENTION[attention]

    def train(self, mode: bool = True) -> "FrozenExtractor":
        super().train(mode)
        self.net.eval()  # frozen: no dropout or drop-path, whatever the model's mode
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = images.to(net.patch_embed.proj.weight.dtype)
        if tuple(x.shape[-2:]) != self.in_size:
            x = F.interpolate(x, size=self.in_size, mode="bilinear", antialias=True, align_corners=False)
        x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))  # [B, prefix + L', D]
        for blk in net.blocks[:-1]:
            x = blk(x)
        a = cls_attention_map(net.blocks[-1], x, net.num_prefix_tokens, self.mode)  # [B, H, L']
        gh, gw = net.patch_embed.grid_size
        maps = a.view(a.shape[0], self.heads, gh, gw)
        if (gh, gw) != (self.grid, self.grid):
            maps = F.interpolate(maps, size=(self.grid, self.grid), mode="bilinear", antialias=True, align_corners=False)
            if self.mode == "heads":  # resampling moves the sums off 1: a distribution over the encoder's patches again
                maps = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        return maps


def build(state: dict[str, torch.Tensor], *, source: str, name: str, spec: EncoderSpec, patch_size: int, img_size: int,
          grid: int, encoder_patch: int, attention: str = "raw", ext_img_size: Optional[int] = None) -> FrozenExtractor:
    """The frozen extractor for ``state`` from ``source``: timm model ``name`` (or ``spec``'s
    architecture at patch_size / img_size) at ``ext_img_size`` (None/0: its own), checked against the encoder's patch size."""
    net = timm_vit(name, spec, patch_size, ext_img_size or (0 if name else img_size))
    patch = net.patch_embed.patch_size[0]
    if patch != encoder_patch:
        raise ConfigError(f"config key 'masking.automae.extractor_model' = {name!r}: its patch size {patch} must equal "
                          f"the encoder's ({encoder_patch}), so its attention map covers the same patches")
    load_strict(net, state, source)
    return FrozenExtractor(net, grid, attention)
