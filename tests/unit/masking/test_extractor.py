"""AutoMAE's inputs as the paper has them: the frozen extractor is timm's own ViT (its attention
equals timm's on the same image, its learned position embedding kept), the generator gets raw
softmax rows, and the token scale multiplies the embedded tokens (position included)."""
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mimscale import methods
from mimscale.config import load_config
from mimscale.errors import ConfigError
from mimscale.masking import extractor as frozen_extractor
from mimscale.masking.automae import AutoMAEMasking
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder, cls_attention_map
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[3]


def timm_cls_rows(net, images: torch.Tensor) -> torch.Tensor:
    """timm's own forward, its last block's attention matrix captured (the unfused path): the CLS
    row over the patch keys, renormalized over them -> [B, H, L]."""
    attn = net.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        net.forward_features(images)
    handle.remove()
    row = seen[0][:, :, 0, net.num_prefix_tokens:]  # [B, H, L]: softmax over every key, CLS's own included
    return row / row.sum(-1, keepdim=True)


def _save(net, path):
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("name,mae_like", [("vit_base_patch16_224", True), ("vit_small_patch16_224", False)],
                         ids=["MAE-B-shaped", "DINO-S-shaped"])
def test_extractor_attention_equals_timms_own(name, mae_like, tmp_path):
    """An MAE-B checkpoint (sin-cos position embedding stored, 12 heads) and a DINO-S one (learned
    position embedding, 6 heads) for a ViT-B/16 encoder: the maps are timm's attention to 1e-5."""
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0).eval()
    if mae_like:
        with torch.no_grad():
            net.pos_embed.copy_(frozen_extractor.sincos_pos_embed_2d(net.embed_dim, 14)[None])
    else:
        with torch.no_grad():
            net.pos_embed.normal_(std=0.5)  # learned: far from any sin-cos
    path = _save(net, tmp_path / "w.safetensors")
    state = {k: v.float() for k, v in timm.models.load_state_dict(str(path)).items()}
    spec = ENCODERS["vit_base"]
    ext = frozen_extractor.build(state, source=str(path), name=name, spec=spec, patch_size=16, img_size=224, grid=14, encoder_patch=16)
    images = torch.randn(2, 3, 224, 224)
    maps = ext(images)
    heads = 12 if mae_like else 6
    assert maps.shape == (2, heads, 14, 14) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.flatten(2), timm_cls_rows(net, images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, heads), atol=1e-5, rtol=0)  # raw rows sum to 1
    if not mae_like:  # the learned position embedding is the checkpoint's: a sin-cos one gives other maps
        with torch.no_grad():
            net.pos_embed.copy_(frozen_extractor.sincos_pos_embed_2d(net.embed_dim, 14)[None])
        assert (timm_cls_rows(net, images) - maps.flatten(2)).abs().max() > 1e-3


def test_a_mimscale_checkpoint_without_pos_embed_gets_its_sincos(tmp_path):
    """mimscale's encoders keep the sin-cos fixed (not saved): the extractor is that encoder."""
    torch.manual_seed(0)
    enc = ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8).eval()
    path = _save(enc, tmp_path / "enc.safetensors")
    state = {k: v.float() for k, v in timm.models.load_state_dict(str(path)).items()}
    assert "pos_embed" not in state
    ext = frozen_extractor.build(state, source=str(path), name="", spec=ENCODERS["vit_tiny"], patch_size=8, img_size=32, grid=4,
                                 encoder_patch=8)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ext(x).flatten(2), enc(x, cls_attention="heads"), atol=1e-6, rtol=1e-5)


def test_another_size_extractor_through_the_config(tmp_path):
    """A ViT-S/8 for a ViT-Tiny/8 encoder, built from the config keys; at another input size its
    map is resized to the encoder's grid and stays a distribution per head."""
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=7, img_size=32)
    path = _save(net, tmp_path / "dino_s8.safetensors")
    sets = ["masking.automae.extractor=frozen", f"masking.automae.extractor_checkpoint={path}",
            "masking.automae.extractor_model=vit_small_patch8_224"]
    model = tiny_model("automae", *sets, "masking.automae.extractor_img_size=32")  # 32 px, patch 8: grid 4 = the encoder's
    masker = model.masker
    assert isinstance(masker, AutoMAEMasking) and masker.generator.conv1.in_channels == 6
    assert not any(p.requires_grad for p in masker.frozen.parameters())
    x = torch.randn(2, 3, 32, 32)
    maps = masker.extract(x, {})
    torch.testing.assert_close(maps.flatten(2), timm_cls_rows(net.eval(), x), atol=1e-5, rtol=1e-5)
    bigger = tiny_model("automae", *sets, "masking.automae.extractor_img_size=64").masker.extract(x, {})  # its grid 8 -> 4
    assert bigger.shape == (2, 6, 4, 4)
    torch.testing.assert_close(bigger.sum((-2, -1)), torch.ones(2, 6), atol=1e-5, rtol=0)
    loss, _ = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), {"box": torch.tensor([[0.0, 0, 1, 1]] * 2),
                                                                               "flip": torch.zeros(2, dtype=torch.bool)})
    loss.backward()
    assert masker.generator.conv1.weight.grad.abs().sum() > 0


def test_mismatched_extractors_are_named(tmp_path):
    torch.manual_seed(0)
    s16 = _save(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32), tmp_path / "s16.safetensors")
    with pytest.raises(ConfigError, match=r"extractor_model' = 'vit_small_patch16_224': its patch size 16 must equal the encoder's \(8\)"):
        tiny_model("automae", "masking.automae.extractor=frozen", f"masking.automae.extractor_checkpoint={s16}",
                   "masking.automae.extractor_model=vit_small_patch16_224")
    s8 = _save(timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, img_size=32), tmp_path / "s8.safetensors")
    with pytest.raises(ConfigError, match=r"extractor_checkpoint' = .*does not fit the extractor.*set masking.automae.extractor_model"):
        tiny_model("automae", "masking.automae.extractor=frozen", f"masking.automae.extractor_checkpoint={s8}")  # ViT-S weights, ViT-Tiny model
    with pytest.raises(ConfigError, match="extractor_model' = 'resnet50'.*not a timm VisionTransformer"):
        tiny_model("automae", "masking.automae.extractor=frozen", f"masking.automae.extractor_checkpoint={s8}",
                   "masking.automae.extractor_model=resnet50")
    with pytest.raises(ConfigError, match="masking.automae.attention"):
        tiny_model("automae", "masking.automae.attention=minmax")


def test_online_generator_input_is_raw_softmax_rows_or_stretched():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    raw = tiny_model("automae").masker.extract(x, {})  # [B, H, g, g]
    assert raw.shape == (2, 3, 4, 4)
    torch.testing.assert_close(raw.sum((-2, -1)), torch.ones(2, 3), atol=1e-5, rtol=0)
    stretched = tiny_model("automae", "masking.automae.attention=stretched").masker.extract(x, {}).flatten(2)
    torch.testing.assert_close(stretched.amin(-1), torch.zeros(2, 3))
    torch.testing.assert_close(stretched.amax(-1), torch.ones(2, 3))


def test_token_scale_multiplies_the_embedded_tokens():
    """x' = s (patch + pos): the paper scales the tokens after the position embedding is added."""
    torch.manual_seed(0)
    enc = ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    s = torch.rand(2, 16) + 0.5
    tokens = (enc.patch_embed(x) + enc.pos_embed[:, 1:]) * s.unsqueeze(-1)
    h = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), tokens], dim=1)
    for blk in enc.blocks:
        h = blk(h)
    torch.testing.assert_close(enc(x, token_scale=s), enc.norm(h))


def test_amt_map_follows_algorithm_1_and_the_old_order_is_an_option():
    """AMT: the heads' CLS attention (softmax over every key) averaged, then min-max; the
    per-head-first order is kept as masking.amt.normalize=minmax_then_mean."""
    torch.manual_seed(0)
    enc = ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8).eval()
    net.load_state_dict({**enc.state_dict(), "pos_embed": enc.pos_embed.clone()}, strict=False)
    full = timm_cls_rows(net, x)  # renormalized over patches: a per-head constant factor off the full row
    attn = net.blocks[-1].attn
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        net.forward_features(x)
        handle.remove()
        a = seen[0][:, :, 0, 1:].mean(1)  # Algorithm 1: average the heads' rows (CLS column dropped)
        want = (a - a.amin(-1, keepdim=True)) / (a.amax(-1, keepdim=True) - a.amin(-1, keepdim=True))
        got = enc(x, cls_attention=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        per_head = enc(x, cls_attention="amt_per_head")
        f = (full - full.amin(-1, keepdim=True)) / (full.amax(-1, keepdim=True) - full.amin(-1, keepdim=True))
        torch.testing.assert_close(per_head, f.mean(1), atol=1e-5, rtol=1e-5)
    assert (got - per_head).abs().max() > 1e-3  # the two orders differ
    with pytest.raises(ValueError, match="allowed values: amt, amt_per_head, heads, heads_stretched"):
        cls_attention_map(enc.blocks[-1], torch.randn(1, 17, 192), 1, "nope")


@pytest.mark.parametrize("preset,heads", [("automae_vit_base.yaml", 12), ("automae_dino_s_vit_base.yaml", 6)])
def test_the_papers_extractor_presets_build(preset, heads, tmp_path):
    """The two main settings of the paper, each with a checkpoint of its shape (random weights
    standing in for MAE-800's and DINO-S's): a ViT-B/16 encoder's masker, maps [B, H, 14, 14]."""
    cfg = load_config(REPO / "mimscale" / "configs" / preset)
    a = cfg.masking.automae
    torch.manual_seed(0)
    path = _save(timm.create_model(a.extractor_model, pretrained=False, num_classes=0), tmp_path / "w.safetensors")
    cfg = load_config(REPO / "mimscale" / "configs" / preset, [f"masking.automae.extractor_checkpoint={path}"])
    encoder = ViTEncoder(ENCODERS[cfg.model.name], img_size=cfg.model.img_size)
    masker = methods.get("automae").masker(cfg, encoder)
    maps = masker.extract(torch.randn(1, 3, 224, 224), {})
    assert maps.shape == (1, heads, 14, 14) and masker.generator.conv1.in_channels == heads
