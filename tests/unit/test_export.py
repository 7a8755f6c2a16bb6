"""mimscale.export from state dicts (no launch): timm rebuilds mimscale's encoder exactly."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from mimscale import export
from mimscale.checkpoint.weights import load_decoder, load_encoder
from mimscale.models.decoder import MAEDecoder
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder

# vit_small's widths at a size and patch no preset has, so nothing can come from timm's defaults
RUN_MODEL = dict(name="vit_small", img_size=96, patch_size=12, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                 norm_pix_loss=False)


@pytest.fixture(scope="module")
def trained():
    """An encoder and decoder with non-init weights (every tensor perturbed) and an input batch."""
    torch.manual_seed(0)
    enc = ViTEncoder(ENCODERS["vit_small"], img_size=96, patch_size=12).eval()
    dec = MAEDecoder(384, 8, 12, dim=128, depth=2, heads=4).eval()
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    return enc, dec, torch.randn(2, 3, 96, 96)


def _timm(out) -> torch.nn.Module:
    """timm's own Hub loader on the export folder: config.json + model.safetensors, loaded strictly."""
    return timm.create_model(f"local-dir:{out}", pretrained=True).eval()


def test_timm_reproduces_the_encoder(trained, tmp_path):
    enc, dec, x = trained
    out = tmp_path / "exp"
    cfg = export.write_export(out, RUN_MODEL, enc.state_dict(), dec.state_dict(), source="unit", step=7)
    assert cfg == json.loads((out / "mimscale.json").read_text())  # mimscale's metadata, beside timm's config.json
    assert cfg["architecture"] == "vit_small_patch16_224" and cfg["mimscale"]["step"] == 7
    assert cfg["mimscale"]["model"] == {"name": "vit_small", "img_size": 96, "patch_size": 12}
    hub = json.loads((out / "config.json").read_text())  # timm's Hub config, written by timm
    assert hub["architecture"] == "vit_small_patch16_224" and hub["num_features"] == 384 and hub["num_classes"] == 0
    assert hub["model_args"]["patch_size"] == 12 and hub["model_args"]["embed_dim"] == 384
    assert hub["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and hub["pretrained_cfg"]["std"] == [0.229, 0.224, 0.225]
    saved = load_file(str(out / "model.safetensors"))
    assert saved["pos_embed"].shape == (1, 1 + 64, 384) and torch.equal(saved["pos_embed"], enc.pos_embed)
    with torch.no_grad():
        want = enc(x)  # [2, 65, 384]
        model = _timm(out)
        # every timm weight comes from the file, and the file has nothing timm does not take
        assert set(model.state_dict()) == set(saved)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
        got = model.forward_features(x)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)
        # the pooled feature is the CLS token after the final norm
        assert torch.allclose(model.forward_head(got, pre_logits=True), want[:, 0], atol=1e-5, rtol=0)
        data = timm.data.resolve_model_data_config(model)
        assert tuple(data["mean"]) == (0.485, 0.456, 0.406) and tuple(data["input_size"]) == (3, 96, 96)
        back, model_cfg = load_encoder(out)  # mimscale's own loader reads the export too
        assert model_cfg == cfg["mimscale"]["model"]
        assert torch.allclose(back(x), want, atol=1e-6, rtol=0)


def test_decoder_round_trip(trained, tmp_path):
    enc, dec, _ = trained
    out = tmp_path / "exp"
    cfg = export.write_export(out, RUN_MODEL, enc.state_dict(), dec.state_dict())
    assert cfg["decoder"] == {"encoder_dim": 384, "decoder_dim": 128, "depth": 2, "heads": 4, "mlp_ratio": 4.0,
                              "patch_size": 12, "grid": 8, "norm_pix_loss": False}
    saved = load_file(str(out / "decoder.safetensors"))
    assert torch.equal(saved.pop("pos_embed"), dec.pos_embed)
    assert set(saved) == set(dec.state_dict())
    back, section = load_decoder(out)
    assert section == cfg["decoder"]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in dec.state_dict().items())
    assert torch.equal(back.pos_embed, dec.pos_embed)


def test_bf16_export_loads_in_timm(trained, tmp_path):
    enc, _, x = trained
    out = tmp_path / "bf16"
    cfg = export.write_export(out, RUN_MODEL, enc.state_dict(), dtype="bf16")
    saved = load_file(str(out / "model.safetensors"))
    assert cfg["dtype"] == "bf16" and {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert not (out / "decoder.safetensors").exists() and "decoder" not in cfg
    assert cfg["files"]["model.safetensors"]["params"] == sum(p.numel() for p in enc.parameters())
    with torch.no_grad():
        got = _timm(out).float().forward_features(x)
        assert (got - enc(x)).abs().max() < 0.1  # bf16 weights: close, not equal


def test_out_is_refused_unless_forced_and_failures_leave_nothing(trained, tmp_path, monkeypatch):
    enc, dec, _ = trained
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty: pass --force"):
        export.write_export(out, RUN_MODEL, enc.state_dict())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    broken = {k: v for k, v in enc.state_dict().items() if k != "norm.weight"}
    with pytest.raises(ValueError, match="lack 1 of"):
        export.write_export(out, RUN_MODEL, broken, force=True)
    wrong = dict(RUN_MODEL, patch_size=16)
    with pytest.raises(ValueError, match="do not fit"):
        export.write_export(out, wrong, enc.state_dict(), force=True)

    # a failure while writing (the second file): the old export stays as it was, no partial folder
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        export.write_export(out, RUN_MODEL, enc.state_dict(), dec.state_dict(), force=True)
    monkeypatch.undo()
    assert len(calls) == 2 and [p.name for p in tmp_path.iterdir()] == ["exp"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    export.write_export(out, RUN_MODEL, enc.state_dict(), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mimscale.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_preset_maps_onto_its_timm_model(name):
    """Key names and shapes of each preset against the timm model config.json names (on the meta
    device: vit_2b would be 7.6 GB)."""
    model = {"name": name, "img_size": 224, "patch_size": None}
    cfg = export.timm_section(model)
    with torch.device("meta"):
        ours = ViTEncoder(ENCODERS[name]).state_dict()
        theirs = timm.create_model(cfg["architecture"], pretrained=False, **cfg["timm_kwargs"]).state_dict()
    assert set(theirs) == set(ours) | {"pos_embed"}
    assert all(theirs[k].shape == v.shape for k, v in ours.items())
    grid = 224 // ENCODERS[name].patch_size
    assert theirs["pos_embed"].shape == (1, 1 + grid * grid, ENCODERS[name].dim)


def test_timm_fine_tunes_an_export_with_its_own_training_utilities(trained, tmp_path):
    """What `timm train.py --model local-dir:<export> --pretrained --num-classes N` does, two steps on
    CPU: create_model with a new head, the data config from the export (mimscale's mean/std,
    bicubic, crop 0.875), create_optimizer_v2 with layer decay."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2

    enc, _, _ = trained
    out = tmp_path / "exp"
    export.write_export(out, RUN_MODEL, enc.state_dict())
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10)
    # the backbone is the export's, the head is new
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], enc.state_dict()["blocks.0.attn.qkv.weight"])
    data = resolve_data_config({}, model=model)
    assert (tuple(data["mean"]), tuple(data["std"])) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (data["interpolation"], data["crop_pct"], tuple(data["input_size"])) == ("bicubic", 0.875, (3, 96, 96))
    transform = create_transform(**data, is_training=True)
    rng = np.random.default_rng(0)
    x = torch.stack([transform(Image.fromarray(rng.integers(0, 255, (120, 150, 3), dtype=np.uint8))) for _ in range(4)])
    y = torch.tensor([0, 3, 5, 9])
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    assert len({g["lr_scale"] for g in opt.param_groups}) > 2  # one scale per depth: layer decay took the export's blocks
    before = model.head.weight.detach().clone()
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert not torch.equal(model.head.weight, before)


def test_timm_loads_an_export_with_learned_positions_and_layer_scale(tmp_path):
    """model.pos_embed learned and model.layer_scale (SimMIM's recipe): the export writes the trained
    position embedding (not a sin-cos), timm builds the blocks with layer scale, and reproduces the
    encoder exactly; mimscale's loader rebuilds it from the export's model section."""
    torch.manual_seed(1)
    enc = ViTEncoder(ENCODERS["vit_small"], img_size=96, patch_size=12, pos_embed="learned", layer_scale=0.1,
                     drop_path=0.1).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(2, 3, 96, 96)
    run_model = {**RUN_MODEL, "pos_embed": "learned", "layer_scale": 0.1, "drop_path": 0.1}
    out = tmp_path / "exp"
    cfg = export.write_export(out, run_model, enc.state_dict())
    assert cfg["mimscale"]["model"] == {"name": "vit_small", "img_size": 96, "patch_size": 12, "pos_embed": "learned",
                                        "layer_scale": 0.1}
    assert cfg["timm_kwargs"]["init_values"] == 0.1
    # the trained tensors: the learned pos_embed counts, timm's unit ls1.gamma does not
    assert cfg["files"]["model.safetensors"]["params"] == sum(p.numel() for p in enc.parameters())
    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(saved["pos_embed"], enc.pos_embed.detach())
    assert not torch.allclose(saved["pos_embed"], export.sincos_pos_embed_2d(384, 8)[None], atol=1e-3)
    assert torch.equal(saved["blocks.0.ls1.gamma"], torch.ones(384)) and torch.equal(saved["blocks.3.ls2.gamma"], enc.blocks[3].ls2.gamma)
    with torch.no_grad():
        want = enc(x)
        model = _timm(out)
        assert set(model.state_dict()) == set(saved)
        got = model.forward_features(x)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        back, model_cfg = load_encoder(out)
        assert model_cfg == cfg["mimscale"]["model"] and back.pos_embed_kind == "learned"
        assert torch.allclose(back(x), want, atol=1e-6, rtol=0)
