"""ViT encoder that runs on any subset of patch tokens per sample.

Built from timm's layers (PatchEmbed, Block with fused scaled-dot-product attention) so its
weights map one-to-one onto ``timm.models.vision_transformer.VisionTransformer``.
Position embeddings (``model.pos_embed``): ``sincos``, MAE's fixed 2-D sin-cos, a buffer that
checkpoints do not hold (rebuilt from the config); ``learned``, a trained absolute embedding
[1, 1 + L, D] (SimMIM's and the AMT authors' SimMIM runs), a parameter, timm's own layout.
Recipe options of the blocks (all off by default, which is MAE's encoder): stochastic depth
(``model.drop_path``: the rate rises linearly from 0 at the first block to it at the last, as
timm and SimMIM schedule it) and layer scale on the MLP branch only (``model.layer_scale``: a
learned per-channel gain initialised to that value, the AMT authors' SimMIM ViT).

Activation checkpointing (``model.grad_ckpt`` = k, see ``run_blocks``): in a training forward with
grad, every k-th block keeps only its input and recomputes its internals in the backward.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimscale.models.partitioned import gathered
from mimscale.models.registry import EncoderSpec


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, [1 + grid*grid, dim] (row 0 = CLS, all zeros).

    Half the channels encode the column (x) and half the row (y); each half is sin|cos of the
    coordinate times ``1 / 10000^(2i/(dim/2))``, as in MAE. Patches are in row-major order.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    # numpy, not torch: under ZeRO-3's zero.Init torch's tensor constructors (arange, zeros, ...)
    # make floating tensors in the engine's dtype (a float32 sin-cos is 2e-7 off, a bf16 one worse)
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # [D/4]
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def enc(pos: np.ndarray) -> np.ndarray:  # [N] -> [N, D/2]
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([enc(xs), enc(ys)], axis=1)  # [grid*grid, D]
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    # on the default device: meta inside `with torch.device("meta")` (the planner, the export's reference)
    return torch.from_numpy(emb.astype(np.float32)).to(torch.get_default_device())


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], idx [B, K] -> [B, K, D] (per-sample token selection)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def checkpointed(index: int, every: int) -> bool:
    """Whether block ``index`` (0-based) is recomputed under ``model.grad_ckpt`` = ``every``:
    0 = none; k >= 1 = the blocks with index % k == 0 (k = 1: all; k = 2: 0, 2, 4, ...; k >= depth:
    the first only), i.e. ceil(depth / k) of them (``checkpointed_count``)."""
    return every > 0 and index % every == 0


def checkpointed_count(depth: int, every: int) -> int:
    """How many of ``depth`` blocks ``checkpointed`` picks: ceil(depth / every), 0 when off."""
    return -(-depth // every) if every > 0 and depth > 0 else 0


def check_grad_ckpt(every: int) -> int:
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"grad_ckpt must be an integer >= 0 (0: off, k: every k-th block), got {every!r}")
    return every


def run_blocks(blocks, x: torch.Tensor, every: int, training: bool) -> torch.Tensor:
    """x [B, N, D] through ``blocks`` in order -> [B, N, D].

    With ``every`` > 0, in a training forward that records a graph, the blocks ``checkpointed``
    picks run under non-reentrant ``torch.utils.checkpoint``: autograd saves only the block's input
    x [B, N, D] and re-runs the block in the backward, trading one more forward of it for its
    internal activations (norms, qkv, attention output, MLP hidden: about (6 + 2 * mlp_ratio) N D values).
    Non-reentrant, because it nests inside one graph with the rest of the step (AutoMAE's token
    scales and discriminator, C-MAE's two views, R-MAE's two passes share one backward), accepts
    inputs without grad, and re-runs the block through its ``__call__``: ZeRO-3's module hooks
    gather the partitioned weights again for the recomputation (its backward hooks release them).
    ``early_stop``: the re-run ends as soon as the last tensor the backward needs exists (the input
    of the MLP's fc2), so fc2's matmul is not recomputed and the re-run's forward post-hooks do not
    fire (pre-hooks do); methods.recompute_flops counts exactly this work. The RNG state is saved
    and restored around the re-run (checkpoint's ``preserve_rng_state``), so dropout / drop path,
    if a block had them, would draw the same masks twice. Eval and ``no_grad`` passes (AMT's
    refresh, the extractors, C-MAE's EMA target, CKA, export) never checkpoint: nothing would be
    recomputed."""
    recompute = every > 0 and training and torch.is_grad_enabled()
    for i, blk in enumerate(blocks):
        if recompute and checkpointed(i, every):
            x = checkpoint(blk, x, use_reentrant=False, early_stop=True)
        else:
            x = blk(x)
    return x


def init_mae_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears with zero bias, unit LayerNorms (each module's weights
    gathered first when zero.Init partitioned them: models/partitioned.py)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            with gathered(m.parameters(recurse=False)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            with gathered(m.parameters(recurse=False)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


POS_EMBEDS = ("sincos", "learned")


def check_block_options(drop_path: float, layer_scale: Optional[float], pos_embed: str) -> None:
    """The recipe options' ranges (config.validate names the keys; this guards direct callers)."""
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    if layer_scale is not None and not layer_scale > 0:
        raise ValueError(f"layer_scale must be > 0 (or None: off), got {layer_scale!r}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed {pos_embed!r}: allowed values: {', '.join(POS_EMBEDS)}")


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block stochastic depth: linear from 0 (first block) to ``rate`` (last), timm's schedule."""
    return [rate * i / (depth - 1) if depth > 1 else rate for i in range(depth)]


class ViTEncoder(nn.Module):
    def __init__(self, spec: EncoderSpec, img_size: int = 224, patch_size: Optional[int] = None, grad_ckpt: int = 0,
                 drop_path: float = 0.0, layer_scale: Optional[float] = None, pos_embed: str = "sincos"):
        super().__init__()
        check_block_options(drop_path, layer_scale, pos_embed)
        self.spec = spec
        # model.grad_ckpt: 0 off, k: blocks with index % k == 0 recomputed in the backward (run_blocks).
        # A plain attribute, not a buffer: it changes memory and time, never the weights or the result.
        self.grad_ckpt = check_grad_ckpt(grad_ckpt)
        self.patch_size = patch_size or spec.patch_size
        self.img_size = img_size
        self.embed_dim = spec.dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=self.patch_size, in_chans=3, embed_dim=spec.dim)
        self.grid = img_size // self.patch_size
        self.num_patches = self.grid * self.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed_kind = pos_embed
        self.drop_path = drop_path
        self.layer_scale = layer_scale
        if pos_embed == "learned":  # [1, 1 + L, D], row 0 the CLS token's (timm's layout); init in _init_weights
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, spec.dim))
        else:  # fixed, so not saved: rebuilt from the config on load
            self.register_buffer("pos_embed", sincos_pos_embed_2d(spec.dim, self.grid)[None], persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        rates = drop_path_rates(drop_path, spec.depth)
        self.blocks = nn.ModuleList(
            Block(spec.dim, spec.heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, norm_layer=norm, init_values=layer_scale,
                  drop_path=rates[i]) for i in range(spec.depth)
        )
        if layer_scale is not None:
            # The AMT authors' SimMIM ViT scales the MLP branch only: timm's Block scales both, so the
            # attention branch's gain is removed (its state dict then lacks ls1.gamma; the export
            # writes ones there so timm's VisionTransformer(init_values=...) loads it strictly).
            for blk in self.blocks:
                blk.ls1 = nn.Identity()
        self.norm = norm(spec.dim)
        self._init_weights()

    def _init_weights(self) -> None:
        init_mae_weights(self)
        with gathered(self.patch_embed.proj.parameters(recurse=False)):
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear over flattened patches
        nn.init.normal_(self.cls_token, std=0.02)  # this module's own: partitioned only when its __init__ returns
        if self.pos_embed_kind == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)  # SimMIM's and timm's init of a learned position embedding

    def forward(
        self,
        images: torch.Tensor,
        visible: Optional[torch.Tensor] = None,
        token_scale: Optional[torch.Tensor] = None,
        cls_attention: bool | str = False,
        hidden: Optional[torch.Tensor] = None,
        mask_token: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """images [B, 3, H, W]; visible [B, V] patch indices (None = all L patches);
        token_scale [B, L] optional multiplier on patch tokens (see MaskPlan);
        hidden [B, K] patch indices whose tokens are replaced by ``mask_token`` [D] before the
        position embedding is added (C-MAE's masked views keep all L positions; MAE drops them).
        Returns [B, 1 + V, D]: the CLS token followed by the visible tokens in ``visible`` order;
        with ``cls_attention`` True (AMT's map) or a mode of ``cls_attention_map``: [B, L] or [B, H, L] float32.

        The attention map is a mode of forward, not a method of its own, so that it runs inside
        this module's call: under ZeRO-3 DeepSpeed gathers a module's parameters in its forward
        hooks, and ``cls_token`` belongs to this module."""
        x = self.patch_embed(images)  # [B, L, D]
        if hidden is not None:
            fill = mask_token.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], hidden.shape[1], -1)
            x = x.scatter(1, hidden.unsqueeze(-1).expand(-1, -1, x.shape[-1]), fill)
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        if token_scale is not None:  # AutoMAE scales the embedded tokens, position included (its paper)
            x = x * token_scale.unsqueeze(-1).to(x.dtype)
        if visible is not None:
            x = gather_tokens(x, visible)  # [B, V, D]
        cls = (self.cls_token + self.pos_embed[:, :1].to(self.cls_token.dtype)).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        if cls_attention:
            return self._cls_attention(x, "amt" if cls_attention is True else cls_attention)
        x = run_blocks(self.blocks, x, self.grad_ckpt, self.training)  # [B, 1 + K, D], K tokens kept
        return self.norm(x)

    def _cls_attention(self, x: torch.Tensor, mode: str = "amt") -> torch.Tensor:
        """The last block's attention of the CLS query over the patch keys, from tokens x [B, 1 + L, D]
        (``cls_attention_map``); the last block's value path and MLP are skipped. Its callers run it
        under no_grad (nothing checkpoints then); with grad the blocks before the last checkpoint as
        in forward."""
        x = run_blocks(self.blocks[:-1], x, self.grad_ckpt, self.training)  # [B, 1 + L, D]
        return cls_attention_map(self.blocks[-1], x, 1, mode)


ATTENTION_MODES = ("amt", "amt_per_head", "heads", "heads_stretched")


def cls_attention_logits(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ``Block``'s attention logits of the first (CLS) query over every key, from its input
    tokens x [B, N, D] -> [B, H, N] float32. Only the CLS row q_cls . K^T is formed, not N x N;
    the block's modules are called (norm1, qkv, q/k norms), so ZeRO-3 gathers their weights."""
    attn = block.attn
    h = block.norm1(x)
    B, N, D = h.shape
    heads = attn.num_heads
    qkv = attn.qkv(h)  # [B, N, 3D]
    q = qkv[:, :1, :D].reshape(B, 1, heads, D // heads).transpose(1, 2)  # [B, H, 1, hd]: the CLS query
    k = qkv[:, :, D:2 * D].reshape(B, N, heads, D // heads).transpose(1, 2)  # [B, H, N, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    return (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scale  # [B, H, N]


def _minmax(a: torch.Tensor) -> torch.Tensor:
    """Stretch each row of a [..., L] to [0, 1] over its last dimension."""
    lo, hi = a.amin(dim=-1, keepdim=True), a.amax(dim=-1, keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def cls_attention_map(block: nn.Module, x: torch.Tensor, prefix: int = 1, mode: str = "amt") -> torch.Tensor:
    """Per-patch weights from a last block's CLS attention; x [B, prefix + L, D], ``prefix`` the
    CLS (and register) tokens before the L patches.

    amt              AMT's Algorithm 1: the softmax over all keys (as the attention computes it),
                     the CLS row's patch part averaged over heads, then min-max over patches ->
                     [B, L] in [0, 1]
    amt_per_head     min-max each head first, then average (mimscale's order before; an option)
    heads            AutoMAE's generator input: per head, the softmax of the CLS query over the
                     patch keys alone (the paper's q_cls K_patches^T), rows summing to 1 -> [B, H, L]
    heads_stretched  the same, each head min-max stretched to [0, 1] (an option)
    """
    logits = cls_attention_logits(block, x)  # [B, H, prefix + L]
    if mode == "amt":
        return _minmax(logits.softmax(dim=-1)[..., prefix:].mean(dim=1))
    if mode == "amt_per_head":
        return _minmax(logits.softmax(dim=-1)[..., prefix:]).mean(dim=1)
    a = logits[..., prefix:].softmax(dim=-1)  # [B, H, L]
    if mode == "heads":
        return a
    if mode == "heads_stretched":
        return _minmax(a)
    raise ValueError(f"attention mode {mode!r}: allowed values: {', '.join(ATTENTION_MODES)}")
