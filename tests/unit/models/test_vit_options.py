"""The encoder's recipe options (model.drop_path, model.layer_scale, model.pos_embed): off by
default and then MAE's encoder exactly; each one does what it says when on."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimscale import methods
from mimscale.config import load_config
from mimscale.errors import ConfigError
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder, drop_path_rates, sincos_pos_embed_2d
from mimscale.optim import param_groups

SPEC = ENCODERS["vit_tiny"]


def _enc(seed: int = 0, **kw) -> ViTEncoder:
    torch.manual_seed(seed)
    return ViTEncoder(SPEC, img_size=32, patch_size=8, **kw)


def test_defaults_are_maes_encoder_exactly():
    """Default options build the same modules, weights and outputs as the explicit 'off' values, and
    as timm's VisionTransformer holding the same weights with the fixed sin-cos positions."""
    a, b = _enc(), _enc(drop_path=0.0, layer_scale=None, pos_embed="sincos")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert "pos_embed" not in a.state_dict() and not isinstance(a.pos_embed, nn.Parameter)
    for blk in a.blocks:
        assert all(isinstance(getattr(blk, n), nn.Identity) for n in ("ls1", "ls2", "drop_path1", "drop_path2"))
    x = torch.randn(2, 3, 32, 32)
    a.train()
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=SPEC.dim, depth=SPEC.depth, num_heads=SPEC.heads,
                            num_classes=0, global_pool="token").eval()
    ref.load_state_dict({**a.state_dict(), "pos_embed": sincos_pos_embed_2d(SPEC.dim, 4)[None]})
    with torch.no_grad():
        assert torch.equal(a(x), a(x))  # training mode, nothing random
        assert torch.allclose(a(x), ref.forward_features(x), atol=1e-5, rtol=0)


def test_drop_path_zero_is_off_and_a_rate_is_stochastic_depth():
    assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    x = torch.randn(4, 3, 32, 32)
    off, zero, on = _enc(), _enc(drop_path=0.0), _enc(drop_path=0.5)
    on.load_state_dict(off.state_dict())
    assert isinstance(on.blocks[0].drop_path1, nn.Identity)  # rate 0 at the first block
    assert on.blocks[-1].drop_path1.drop_prob == pytest.approx(0.5)
    with torch.no_grad():
        torch.manual_seed(3)
        assert torch.equal(zero.train()(x), off.train()(x))
        # in eval, drop path is the identity: the same function as without it
        assert torch.allclose(on.eval()(x), off.eval()(x), atol=0, rtol=0)
        on.train()
        torch.manual_seed(1)
        y1 = on(x)
        torch.manual_seed(2)
        y2 = on(x)
        assert not torch.allclose(y1, y2)  # a different set of dropped residual branches


def test_layer_scale_init_value_and_mlp_branch_only():
    enc = _enc(layer_scale=0.1)
    for blk in enc.blocks:
        assert isinstance(blk.ls1, nn.Identity)  # the attention branch is not scaled
        assert isinstance(blk.ls2.gamma, nn.Parameter) and torch.equal(blk.ls2.gamma.detach(), torch.full((SPEC.dim,), 0.1))
    assert [k for k in enc.state_dict() if k.endswith("gamma")] == [f"blocks.{i}.ls2.gamma" for i in range(SPEC.depth)]
    # a gain of 1 is the unscaled block; 0.1 scales the MLP branch's output, so the function changes
    x = torch.randn(2, 3, 32, 32)
    plain, one = _enc(), _enc(layer_scale=1.0)
    one.load_state_dict({**plain.state_dict(), **{k: v for k, v in one.state_dict().items() if k.endswith("gamma")}})
    with torch.no_grad():
        assert torch.allclose(one(x), plain(x), atol=1e-6)
        blk = enc.blocks[0]
        h = torch.randn(2, 5, SPEC.dim)
        want = h + blk.attn(blk.norm1(h))
        want = want + 0.1 * blk.mlp(blk.norm2(want))
        assert torch.allclose(blk(h), want, atol=1e-6)
    with pytest.raises(ValueError, match="layer_scale must be > 0"):
        _enc(layer_scale=0.0)


def test_learned_pos_embed_is_a_trained_parameter():
    enc = _enc(pos_embed="learned").train()
    assert isinstance(enc.pos_embed, nn.Parameter) and enc.pos_embed.requires_grad
    assert enc.pos_embed.shape == (1, 1 + 16, SPEC.dim) and "pos_embed" in enc.state_dict()
    assert 0.005 < float(enc.pos_embed.detach().std()) < 0.03  # trunc-normal std 0.02, not the sin-cos
    enc(torch.randn(2, 3, 32, 32), visible=torch.tensor([[0, 3, 5], [1, 2, 15]])).square().mean().backward()
    g = enc.pos_embed.grad
    assert g is not None and float(g[0, 0].abs().sum()) > 0  # the CLS row
    seen = {0, 1, 2, 3, 4, 6, 16}  # 1 + the visible patches of either sample
    rows = {i for i in range(17) if float(g[0, i].abs().sum()) > 0}
    assert rows == seen
    # no weight decay on it, as on the sin-cos one's place in MAE's recipe
    groups = {g["name"]: g["params"] for g in param_groups(enc, 0.05)}
    assert any(p is enc.pos_embed for p in groups["no_decay"])
    with pytest.raises(ValueError, match="allowed values: sincos, learned"):
        _enc(pos_embed="rope")


def test_config_keys_reach_the_model_and_bad_values_name_the_key():
    cfg = load_config(None, ["model.name=vit_tiny", "model.img_size=32", "model.patch_size=8", "model.drop_path=0.1",
                             "model.layer_scale=0.1", "model.pos_embed=learned"])
    enc = methods.build_model(cfg).encoder
    assert enc.pos_embed_kind == "learned" and enc.layer_scale == 0.1
    assert enc.blocks[-1].drop_path2.drop_prob == pytest.approx(0.1)
    default = methods.build_model(load_config(None, ["model.name=vit_tiny", "model.img_size=32", "model.patch_size=8"])).encoder
    assert (default.pos_embed_kind, default.layer_scale, default.drop_path) == ("sincos", None, 0.0)
    for key, value, needle in (("model.drop_path", 1.0, r"model\.drop_path.*\[0, 1\)"),
                               ("model.layer_scale", -0.1, r"model\.layer_scale.*> 0"),
                               ("model.pos_embed", "rope", r"model\.pos_embed.*allowed values: sincos, learned")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [f"{key}={value}"])
