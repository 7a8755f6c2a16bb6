"""The large-model presets: MAE ViT-L/16 and ViT-H/14 (the MAE paper's recipe), MAE ViT-g/14 for
ZeRO-3 (derived from MAE-H), AMT and AutoMAE on ViT-L/16 (derived from MAE-L: both papers train
ViT-B only), SimMIM on ViT-H/14 with a 28-px unit (SimMIM's 32 px is no multiple of 14).

Each preset is built at its real width (the registry's dim, depth, heads, MLP) with a tiny image on
the meta device, so nothing is allocated (ViT-H is 630M parameters, ViT-g 1.01B, ViT-2B 1.89B):
encoder shape, decoder, the masker's plan sizes and the FLOP model against MAE's / SimMIM's formulas
with the sizes written out here. Then the full-size values against the papers.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import timm
import torch

from mimscale import methods
from mimscale.config import load_config
from mimscale.errors import ConfigError
from mimscale.masking.base import plan_sizes
from mimscale.methods import automae as automae_family
from mimscale.methods.mae import mim_flops_per_image
from mimscale.methods.simmim import nearest_unit, simmim_flops_per_image, unit_count, valid_units
from mimscale.models.registry import ENCODERS, EncoderSpec
from mimscale.models.vit import ViTEncoder

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "mimscale" / "configs"

# Written out, not read from the registry: (dim, depth, heads, patch, MLP hidden width).
SIZES = {
    "vit_large": (1024, 24, 16, 16, 4096),  # ViT-L/16 (ViT, MAE)
    "vit_huge": (1280, 32, 16, 14, 5120),  # ViT-H/14 (ViT, MAE)
    "vit_giant": (1408, 40, 16, 14, 6144),  # ViT-g/14 (Zhai et al. 2022, Table 2)
    "vit_2b": (2560, 24, 32, 14, 10240),
}

# preset: (encoder, tiny image (4 x 4 patches; SimMIM: 2 x 2 units of 28 px), initial plan (visible, masked, thrown))
PRESETS = {
    "mae_vit_large": ("vit_large", 64, (4, 12, 0)),
    "mae_vit_huge": ("vit_huge", 56, (4, 12, 0)),
    "mae_vit_giant": ("vit_giant", 56, (4, 12, 0)),
    "amt_vit_large": ("vit_large", 64, (4, 12, 0)),  # random masking at 0.75 until AMT's first refresh
    "automae_vit_large": ("vit_large", 64, (4, 12, 0)),
    "simmim_vit_huge": ("vit_huge", 56, (8, 8, 0)),  # 2 of 4 units masked (round(0.6 x 4)), 4 patches each
}
MAE_FAMILY = ("mae_vit_large", "mae_vit_huge", "mae_vit_giant", "amt_vit_large", "automae_vit_large")


def preset_cfg(name: str, *sets: str):
    return load_config(CONFIGS / f"{name}.yaml", list(sets))


def tiny_cfg(name: str, *sets: str):
    _, img, _ = PRESETS[name]
    return preset_cfg(name, f"model.img_size={img}", "data.source=synthetic", *sets)


def meta_extractor(monkeypatch, cfg) -> None:
    """AutoMAE's frozen extractor from a meta-device state of the preset's timm model (standing in
    for the MAE-800 ViT-B/16 file, which a test does not have): its real build path, nothing read."""
    with torch.device("meta"):
        state = timm.create_model(cfg.masking.automae.extractor_model, pretrained=False, num_classes=0).state_dict()
    monkeypatch.setattr(automae_family, "extractor_state", lambda path: (state, None))


def build_on_meta(cfg, monkeypatch):
    if cfg.masking.method == "automae" and cfg.masking.automae.extractor == "frozen":
        meta_extractor(monkeypatch, cfg)
    with torch.device("meta"):
        return methods.build_model(cfg)


def block(n: int, d: int, hidden: int) -> float:
    """One transformer block's forward FLOPs on n tokens, the MLP by its hidden width: qkv + proj
    4 n d^2, MLP 2 n d h multiply-adds, QK^T and AV n^2 d each; 2 FLOPs a multiply-add."""
    return 2.0 * (4 * n * d * d + 2 * n * d * hidden) + 4.0 * n * n * d


def expected_flops(cfg, visible: int, masked: int) -> float:
    """The method's training FLOPs per image from MAE's / SimMIM's formula, with SIZES' numbers."""
    dim, depth, _, patch, hidden = SIZES[cfg.model.name]
    common = dict(enc_dim=dim, enc_depth=depth, img_size=cfg.model.img_size, patch=patch, visible=visible, masked=masked,
                  mlp_ratio=hidden / dim)
    if cfg.masking.method == "simmim":
        return simmim_flops_per_image(**common)
    m = cfg.model
    return mim_flops_per_image(**common, dec_dim=m.decoder_dim, dec_depth=m.decoder_depth)


def test_every_new_preset_is_listed():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_at_real_width(name, monkeypatch):
    enc_name, img, plan = PRESETS[name]
    cfg = tiny_cfg(name)
    assert (cfg.model.name, cfg.model.img_size, cfg.data.source) == (enc_name, img, "synthetic")
    model = build_on_meta(cfg, monkeypatch)
    enc = model.encoder
    dim, depth, heads, patch, hidden = SIZES[enc_name]
    spec = ENCODERS[enc_name]
    assert (spec.dim, spec.depth, spec.heads, spec.patch_size) == (dim, depth, heads, patch)
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads, enc.patch_size) == (dim, depth, heads, patch)
    assert enc.blocks[0].mlp.fc1.weight.shape == (hidden, dim)
    assert enc.grid == img // patch == 4 and enc.num_patches == 16
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    if name == "simmim_vit_huge":
        assert model.decoder is None and model.objective.head.weight.shape == (patch * patch * 3, dim)
    else:
        d = model.decoder
        assert (d.dim, len(d.blocks), d.blocks[0].attn.num_heads) == (512, 8, 16)
        assert d.embed.weight.shape == (512, dim) and d.pred.weight.shape == (patch * patch * 3, 512)
    v, m, t = model.masker.initial_sizes()
    assert (v, m, t) == plan and v + m + t == enc.num_patches
    f = methods.flops(cfg, v, m)
    assert f > 0 and f == expected_flops(cfg, v, m)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_at_full_size_plans_and_flops(name, monkeypatch):
    """At the preset's own 224 px, still on meta: the plans of the recipe and their FLOPs."""
    cfg = preset_cfg(name, "data.source=synthetic")
    assert cfg.model.img_size == 224
    model = build_on_meta(cfg, monkeypatch)
    patch = SIZES[cfg.model.name][3]
    L = (224 // patch) ** 2
    assert model.encoder.num_patches == L
    v, m, t = model.masker.initial_sizes()
    if name == "simmim_vit_huge":  # 64 units of 2 x 2 patches: 38 masked, 26 visible
        assert (v, m, t) == (26 * 4, 38 * 4, 0)
    else:
        assert (v, m, t) == plan_sizes(L, 0.75) == ((49, 147, 0) if patch == 16 else (64, 192, 0))
    f = methods.flops(cfg, v, m)
    assert f == expected_flops(cfg, v, m) > 0


def mae_by_hand(enc: str, v: int, m: int) -> float:
    """MAE's training FLOPs per image at 224 px written out term by term, each MLP by its own width
    (the decoder's is 4 x 512, whatever the encoder's)."""
    d, depth, _, p, hidden = SIZES[enc]
    dd, L = 512, (224 // p) ** 2
    fwd = 2.0 * L * p * p * 3 * d  # patch embedding, every patch
    fwd += depth * block(1 + v, d, hidden)  # encoder on CLS + visible
    fwd += 2.0 * (1 + v) * d * dd  # encoder -> decoder
    fwd += 8 * block(1 + v + m, dd, 4 * dd)  # decoder on CLS + all patches
    fwd += 2.0 * m * dd * p * p * 3  # pixel head on the masked
    return 3 * fwd


def test_the_formula_is_the_transformer_arithmetic_for_vit_huge():
    cfg = preset_cfg("mae_vit_huge", "data.source=synthetic")
    assert methods.flops(cfg, 64, 192) == pytest.approx(mae_by_hand("vit_huge", 64, 192), rel=1e-12)


def test_the_formula_is_the_transformer_arithmetic_for_vit_giant():
    """ViT-g/14's MLP is 6144 (a ratio of 48/11), the decoder's stays 2048."""
    cfg = preset_cfg("mae_vit_giant", "data.source=synthetic")
    assert methods.flops(cfg, 64, 192) == pytest.approx(mae_by_hand("vit_giant", 64, 192), rel=1e-12)


def test_vit_giant_is_vit_g14_with_a_billion_parameters():
    spec = ENCODERS["vit_giant"]
    assert spec == EncoderSpec(dim=1408, depth=40, heads=16, patch_size=14, mlp_ratio=6144 / 1408)
    assert int(spec.dim * spec.mlp_ratio) == 6144 and spec.dim % spec.heads == 0 and spec.dim // spec.heads == 88
    with torch.device("meta"):
        enc = ViTEncoder(spec, img_size=224)
    n = sum(p.numel() for p in enc.parameters())
    d, h, p = 1408, 6144, 14
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)  # 2 norms, qkv, proj, fc1, fc2
    assert n == (p * p * 3 * d + d) + d + 40 * per_block + 2 * d == 1_010_840_576  # patch embed, CLS, blocks, norm
    assert 1.0e9 < n < 1.02e9  # Zhai et al.: 1011M


def test_vit_2b_builds_on_meta_under_the_zero3_preset(monkeypatch):
    """The 2B encoder under mae_vit_giant.yaml's recipe (model.name=vit_2b): 1.89B parameters, never allocated."""
    cfg = preset_cfg("mae_vit_giant", "model.name=vit_2b", "model.img_size=56", "data.source=synthetic")
    model = build_on_meta(cfg, monkeypatch)
    enc = model.encoder
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads, enc.patch_size) == SIZES["vit_2b"][:4]
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in enc.parameters())
    assert 1.88e9 < n < 1.90e9
    v, m, t = model.masker.initial_sizes()
    assert (v, m, t) == (4, 12, 0) and methods.flops(cfg, v, m) == expected_flops(cfg, v, m) > 0


@pytest.mark.parametrize("name", MAE_FAMILY)
def test_mae_family_presets_have_mae_table8_settings(name):
    """MAE's appendix A.1, Table 8 (one pre-training setting for every size), Table 1's decoder (512-d x 8)
    and Table 3's normalized-pixel target."""
    cfg = preset_cfg(name)
    t, m = cfg.train, cfg.model
    assert (t.global_batch, t.base_lr, t.warmup_epochs, t.weight_decay, t.beta1, t.beta2) == (4096, 1.5e-4, 40, 0.05, 0.9, 0.95)
    assert (m.img_size, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.norm_pix_loss) == (224, 512, 8, 16, True)
    assert (cfg.masking.mask_ratio, cfg.data.scale_min, cfg.data.scale_max) == (0.75, 0.2, 1.0)


def test_mae_presets_are_the_papers_lengths_and_sizes():
    """Table 3: ViT-L and ViT-H pre-trained 1600 epochs (normalized pixels); ViT-g keeps ViT-H's."""
    for name, enc in (("mae_vit_large", "vit_large"), ("mae_vit_huge", "vit_huge"), ("mae_vit_giant", "vit_giant")):
        cfg = preset_cfg(name)
        assert (cfg.model.name, cfg.masking.method, cfg.train.epochs) == (enc, "random", 1600)


def test_amt_and_automae_large_keep_their_papers_schedules():
    a = preset_cfg("amt_vit_large")
    k = a.masking.amt
    assert (a.masking.method, a.model.name, a.train.epochs) == ("amt", "vit_large", 400)
    assert (k.mask_ratio, k.throw_ratio, k.first_refresh, k.refresh_every) == (0.45, 0.40, "40", "40")
    # after the first refresh: 88 masked, 78 thrown, 30 visible of 196; the step is cheaper than MAE-L's
    v, m, t = plan_sizes(196, k.mask_ratio, k.throw_ratio)
    assert (v, m, t) == (30, 88, 78)
    assert methods.flops(a, v, m) < methods.flops(preset_cfg("mae_vit_large"), 49, 147)
    u = preset_cfg("automae_vit_large")
    x = u.masking.automae
    assert (u.masking.method, u.model.name, u.train.epochs) == ("automae", "vit_large", 800)
    assert (x.extractor, x.extractor_model, x.lam, x.throw_ratio) == ("frozen", "vit_base_patch16_224", 0.2, 0.0)
    with torch.device("meta"):  # the paper's MAE-800 ViT-B/16 extractor has ViT-L/16's patch: same 14 x 14 map
        net = timm.create_model(x.extractor_model, pretrained=False, num_classes=0)
    assert net.patch_embed.patch_size[0] == ENCODERS["vit_large"].patch_size and net.blocks[-1].attn.num_heads == 12


def test_automae_large_generator_reads_the_extractors_heads(monkeypatch):
    frozen = build_on_meta(tiny_cfg("automae_vit_large"), monkeypatch).masker
    assert frozen.frozen.heads == 12 and frozen.generator.conv1.in_channels == 12
    online = build_on_meta(tiny_cfg("automae_vit_large", "masking.automae.extractor=online"), monkeypatch).masker
    assert not hasattr(online, "frozen") and online.generator.conv1.in_channels == 16  # ViT-L's own heads


def test_simmim_huge_is_simmims_vit_b_recipe_on_28_px_units():
    cfg = preset_cfg("simmim_vit_huge")
    t = cfg.train
    assert (cfg.model.name, cfg.masking.method, cfg.masking.mask_ratio, cfg.masking.simmim.mask_patch_size) == ("vit_huge", "simmim", 0.6, 28)
    assert (t.global_batch, t.base_lr, t.epochs, t.warmup_epochs, t.weight_decay, t.beta1, t.beta2) == (2048, 5e-5, 800, 10, 0.05, 0.9, 0.999)
    assert (cfg.data.scale_min, cfg.data.scale_max) == (0.67, 1.0)
    assert unit_count(cfg) == 64  # 224 / 28 = 8 units a side


def test_simmim_unit_on_a_14_model():
    """28 (2 x 2 patches of 14) is accepted; SimMIM's 32 is refused on /14 models, naming the key and 28."""
    assert load_config(None, ["masking.method=simmim", "model.name=vit_huge", "masking.simmim.mask_patch_size=28"])
    for enc in ("vit_huge", "vit_giant", "vit_2b"):
        with pytest.raises(ConfigError, match=r"'masking\.simmim\.mask_patch_size' = 32 must be a multiple of the patch size 14 "
                                              r"and divide model\.img_size 224 \(e\.g\. 28: 2 x 2 patches of 14 px, 8 x 8 units\)"):
            load_config(None, ["masking.method=simmim", f"model.name={enc}", "masking.simmim.mask_patch_size=32"])
    with pytest.raises(ConfigError, match=r"mask_patch_size' = 32 must be a multiple of the patch size 14"):
        preset_cfg("simmim_vit_huge", "masking.simmim.mask_patch_size=32")
    # /16 models keep SimMIM's 32; another method leaves the unit unused
    assert unit_count(load_config(CONFIGS / "simmim_vit_base.yaml")) == 49
    assert load_config(None, ["model.name=vit_huge", "masking.simmim.mask_patch_size=32"]).masking.method == "random"


def test_the_suggested_unit_is_always_valid():
    assert valid_units(224, 14, 0.6) == [14, 28, 56, 112]  # 224 px: one unit leaves nothing visible
    assert nearest_unit(32, 224, 14, 0.6) == 28 and nearest_unit(32, 224, 16, 0.6) == 32
    assert nearest_unit(30, 42, 14, 0.6) == 14  # 28 does not divide 42: its suggestion would be wrong
    assert nearest_unit(32, 14, 14, 0.6) is None
    with pytest.raises(ConfigError, match=r"divide model\.img_size 42 \(e\.g\. 14: 1 x 1 patches of 14 px, 3 x 3 units\)"):
        load_config(None, ["masking.method=simmim", "model.name=vit_huge", "model.img_size=42", "masking.simmim.mask_patch_size=28"])


@pytest.mark.parametrize("name", list(PRESETS))
def test_header_names_its_source_and_launch(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    argv = shlex.split(text.splitlines()[0].lstrip("#"))
    ds = argv[argv.index("--deepspeed_config") + 1]
    assert argv[argv.index("--config") + 1] == f"mimscale/configs/{name}.yaml"
    header = " ".join(ln.lstrip("# ") for ln in text.splitlines() if ln.startswith("#"))
    if name == "mae_vit_giant":
        assert ds == "ds_configs/gpu_bf16_zero3.json" and "ZeRO-3" in header
    if name.startswith("mae_"):
        assert "Table 8" in header and "Table 3" in header
    if name != "mae_vit_large" and name != "mae_vit_huge":  # not in their papers: each says what it is derived from
        assert "derived from" in header
