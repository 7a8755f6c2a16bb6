"""AMT: the CLS-attention pass, the memory-mapped store, the refresh schedule, whole-image
passes and the masker inside MIMModel (thrown patches cost nothing); the mask grid: test_viz.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale import methods
from mimscale.config import DataConfig, load_config
from mimscale.data.crop import crop_array, crop_bytes
from mimscale.data.full_pass import share
from mimscale.data.sources import SyntheticSource
from mimscale.data.streams import open_full_pass
from mimscale.errors import ConfigError
from mimscale.hooks.amt_refresh import parse_when, refresh_steps
from mimscale.masking.amt import AMTMasking
from mimscale.masking.amt_store import AttentionStore, prune
from mimscale.models.registry import ENCODERS
from mimscale.models.vit import ViTEncoder
from tests.conftest import make_batch, tiny_config, tiny_model


# ---------------------------------------------------------------- the attention pass
def _reference_cls_attention(encoder: ViTEncoder, x: torch.Tensor) -> torch.Tensor:
    """The full attention matrix of the last block (timm's own path), CLS row over patches,
    averaged over heads and then min-max normalized (the AMT paper's Algorithm 1)."""
    seen = []
    handle = encoder.blocks[-1].attn.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    encoder(x)
    handle.remove()
    t, attn = seen[0], encoder.blocks[-1].attn
    B, N, C = t.shape
    qkv = attn.qkv(t).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    a = ((qkv[0] @ qkv[1].transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0, 1:]  # softmax over all keys
    a = a.mean(1)
    return (a - a.amin(-1, keepdim=True)) / (a.amax(-1, keepdim=True) - a.amin(-1, keepdim=True))


def test_cls_attention_equals_the_full_attention_row():
    torch.manual_seed(0)
    enc = ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = enc(x, cls_attention=True)
        ref = _reference_cls_attention(enc, x)
    assert got.shape == (3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the head average is stretched to exactly [0, 1] per image
    torch.testing.assert_close(got.amin(-1), torch.zeros(3))
    torch.testing.assert_close(got.amax(-1), torch.ones(3))


# ---------------------------------------------------------------- the store
def test_store_round_trip_generations_and_prune(tmp_path):
    AttentionStore.create(tmp_path, 1, num_samples=10, num_patches=4)
    store = AttentionStore.open(tmp_path, 1, 10, 4, writable=True)
    maps = torch.rand(3, 4)
    store.write(torch.tensor([7, 2, 5]), maps)
    store.flush()
    store.close()
    again = AttentionStore.open(tmp_path, 1, 10, 4)
    got = again.lookup(torch.tensor([5, 7, 0]))
    assert got.dtype == torch.float16 and got.shape == (3, 4)
    torch.testing.assert_close(got[0].float(), maps[2], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got[1].float(), maps[0], atol=1e-3, rtol=1e-3)
    assert torch.equal(got[2], torch.zeros(4, dtype=torch.float16))  # never written
    assert again.generations_of([7, 2, 5, 0]) == [1, 1, 1, 0]
    assert AttentionStore.complete(tmp_path, 1) is None
    AttentionStore.mark_complete(tmp_path, 1, {"step": 3})
    assert AttentionStore.complete(tmp_path, 1)["step"] == 3
    with pytest.raises(FileNotFoundError, match="expected"):
        AttentionStore.open(tmp_path, 1, 11, 4)
    AttentionStore.create(tmp_path, 2, 10, 4)
    assert prune(tmp_path, keep={2}) == [1]
    assert sorted(p.name for p in (tmp_path / "amt").iterdir()) == ["maps-0002.f16"]


# ---------------------------------------------------------------- schedule and config
def test_refresh_schedule_in_epochs_and_percent():
    # the paper: 400 epochs, refresh every 40 from epoch 40
    assert refresh_steps("40", "40", total_steps=400 * 10, steps_per_epoch=10) == [400 * k for k in range(1, 10)]
    assert refresh_steps("25%", "50%", total_steps=40, steps_per_epoch=64) == [10, 30]
    assert refresh_steps("0", "1000", total_steps=5, steps_per_epoch=1) == [0]
    assert refresh_steps("10", "1", total_steps=50, steps_per_epoch=5) == []  # the run ends first
    assert parse_when("12.5%", 80) == 10.0 and parse_when("0.5", 80) == 0.5


@pytest.mark.parametrize("key,value,needle", [
    ("masking.amt.first_refresh", "soon", "masking.amt.first_refresh"),
    ("masking.amt.refresh_every", "0", "masking.amt.refresh_every"),
    ("masking.amt.refresh_every", "150%", "masking.amt.refresh_every"),
    ("masking.amt.throw_ratio", "0.6", "masking.amt.mask_ratio"),
    ("masking.amt.speed", "1", "allowed keys here: mask_ratio, throw_ratio"),
    ("masking.method", "amtt", "allowed values: random, amt"),
])
def test_bad_amt_config_names_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [f"{key}={value}"])


def test_presets_load_and_match_the_paper():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3] / "mimscale" / "configs"
    base = load_config(root / "amt_vit_base.yaml")
    a = base.masking.amt
    assert (base.masking.method, a.mask_ratio, a.throw_ratio, a.first_refresh, a.refresh_every) == ("amt", 0.45, 0.40, "40", "40")
    assert base.train.epochs == 400 and base.masking.mask_ratio == 0.75
    tiny = load_config(root / "amt_vit_tiny_cpu.yaml")
    # 40 steps with refreshes inside, whatever the data size
    assert refresh_steps(tiny.masking.amt.first_refresh, tiny.masking.amt.refresh_every, 40, 7) == [10, 30]


# ---------------------------------------------------------------- whole-image passes
@pytest.mark.parametrize("n,world", [(10, 2), (7, 3), (1, 2), (1000, 8)])
def test_shares_cover_every_sample_exactly_once(n, world):
    seen = [i for r in range(world) for i in share(n, r, world)]
    assert sorted(seen) == list(range(n))
    sizes = [len(share(n, r, world)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_whole_image_crops_have_the_full_box():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    c = crop_array(arr, rng, 16, scale=None)
    assert c.box == (0.0, 0.0, 1.0, 1.0) and not c.flip and c.image.shape == (16, 16, 3)
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    c = crop_bytes(buf.getvalue(), rng, 16, scale=None)
    # a reduced-IDCT decode (here 5/8) leaves out a last column that is only part image
    assert c.box[:2] == (0.0, 0.0) and min(c.box[2:]) >= 0.98 and not c.flip


def test_synthetic_full_pass_two_ranks_sees_each_whole_image_once():
    cfg = DataConfig(source="synthetic", synthetic_count=23, synthetic_size=24, num_workers=0)
    src = SyntheticSource(23, 24)
    seen = []
    for rank in range(2):
        for b in open_full_pass(cfg, src, img_size=16, batch_size=4, rank=rank, world_size=2):
            assert b["image"].shape[1:] == (3, 16, 16)
            seen += b["index"].tolist()
            i = b["index"][0].item()
            expected = crop_array(src.array(i), np.random.default_rng(0), 16, scale=None).image
            assert np.array_equal(b["image"][0].permute(1, 2, 0).numpy(), expected)
    assert sorted(seen) == list(range(23))


def test_wds_full_pass_two_ranks_sees_each_sample_once(tmp_path):
    from data_prep.wds import write_shards
    from mimscale.data.streams import build_source
    from tests.unit.data.test_crop import _gradient

    for i in range(19):
        d = tmp_path / "src" / "train" / f"n0{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_gradient(40 + i, 30)).save(d / f"{i}.JPEG", quality=95)
    write_shards(tmp_path / "src", "train", tmp_path / "wds", shard_size=4, workers=1, progress=False)
    cfg = DataConfig(source="wds", path=str(tmp_path / "wds"), num_workers=2)
    src = build_source(cfg)
    seen = []
    for rank in range(2):
        for b in open_full_pass(cfg, src, img_size=16, batch_size=3, rank=rank, world_size=2):
            assert torch.equal(b["box"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(b["index"]), 4))
            assert not b["flip"].any()
            seen += b["index"].tolist()
    assert sorted(seen) == list(range(19))


# ---------------------------------------------------------------- the masker in the model
def _batch(B=4):
    """A crop box inside the image and every other image flipped: AMT's maps are aligned to both."""
    return make_batch(B, box=(0.1, 0.2, 0.9, 0.8), flip=[True, False] * (B // 2))


def test_random_masking_before_the_first_refresh():
    model = tiny_model("amt")
    images, meta = _batch()
    model(images, meta)
    assert model.last_plan.fractions() == {"visible": 0.25, "masked": 0.75, "thrown": 0.0}
    assert model.masker.last_weights is None


def test_thrown_patches_get_no_gradient_and_are_not_in_the_decoder():
    model = tiny_model("amt")
    images, meta = _batch()
    L = model.encoder.num_patches
    meta["attn"] = torch.rand(4, L).half()
    x = model.normalize(images).requires_grad_(True)
    model.normalize = lambda _images: x  # the real forward, with the pixels as a leaf we can inspect
    lengths = {}

    def seq_len(name):
        def hook(_module, inputs, _output):  # returns None: the output is left alone
            lengths[name] = inputs[0].shape[1]
        return hook

    model.encoder.blocks[0].register_forward_hook(seq_len("encoder"))
    model.decoder.blocks[0].register_forward_hook(seq_len("decoder"))
    loss, _ = model(images, meta)
    loss.backward()
    plan = model.last_plan
    V, M, T = plan.visible.shape[1], plan.masked.shape[1], plan.thrown.shape[1]
    assert (V, M, T) == (3, 7, 6)  # L=16: round(0.45 L)=7 masked, round(0.40 L)=6 thrown
    assert lengths == {"encoder": 1 + V, "decoder": 1 + V + M}
    from mimscale.models.losses import patchify

    g = patchify(x.grad, model.patch_size).abs().sum(-1)  # [B, L] gradient mass per patch
    for b in range(4):
        assert torch.all(g[b, plan.thrown[b]] == 0)
        assert torch.all(g[b, plan.visible[b]] > 0)
        assert torch.all(g[b, plan.masked[b]] > 0)  # through the (normalized) target


def test_aligned_weights_follow_the_box_and_flip():
    masker = AMTMasking(16, 0.45, 0.40)
    maps = torch.zeros(2, 16)
    maps[:, 0] = 1.0  # hot top-left cell of the whole image
    meta = {"attn": maps.half(), "box": torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2), "flip": torch.tensor([False, True]),
            "index": torch.arange(2)}
    masker(torch.zeros(2, 3, 32, 32), meta)
    w = masker.last_weights.view(2, 4, 4)
    # the box is the top-left quarter: the hot cell covers its top-left 2 x 2 patches (mirrored when flipped)
    assert w[0, :2, :2].min() > w[0, 2:, :].max() and w[0, :2, :2].min() > w[0, :, 2:].max()
    assert torch.allclose(w[1], w[0].flip(-1))


def test_registry_builds_amt_masker():
    cfg = tiny_config("amt")
    m = methods.get("amt").masker(cfg, ViTEncoder(ENCODERS["vit_tiny"], img_size=32, patch_size=8))
    assert isinstance(m, AMTMasking) and m.initial_sizes() == (4, 12, 0)
