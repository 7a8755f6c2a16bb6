"""mimscale.data.normalize: bit-for-bit the formulas the three normalizers used before there was one
(MIMModel's buffers, eval's per-call tensors, C-MAE's [0, 1] round trip), buffers that move with
the module and stay out of state_dicts."""
from __future__ import annotations

import torch

from mimscale.data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalizer, denormalize, imagenet_stats, normalize, normalize_uint8
from mimscale.objectives.color import color_jitter


def _pixels(seed: int = 0, shape=(4, 3, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def _old_model_buffers(dtype=torch.float32):
    """MIMModel's buffers as they were: registered fp32, cast as an engine casts module buffers."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return mean.to(dtype), std.to(dtype)


def test_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    mean, std = imagenet_stats()
    assert mean.shape == std.shape == (1, 3, 1, 1) and mean.dtype == std.dtype == torch.float32
    unit_mean, unit_std = imagenet_stats(1)
    assert torch.equal(unit_mean, torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))  # x 1 is exact
    assert torch.equal(unit_std, torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))


def test_uint8_normalize_equals_the_old_model_formula():
    images = _pixels()
    mean, std = _old_model_buffers()
    old = (images.float() - mean.float()) / std.float()
    norm = Normalizer(255)
    for new in (norm.normalize(images), norm(images), normalize_uint8(images),
                normalize(images, *imagenet_stats(255))):
        assert new.dtype == torch.float32 and new.shape == images.shape
        assert torch.equal(new, old)
    # eval's old per-call version built the statistics on the images' device: the same bits
    m = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    assert torch.equal(normalize_uint8(images), (images.float() - m) / s)


def test_bf16_cast_buffers_keep_their_rounded_values():
    """An engine that casts module buffers to bf16: normalize still runs in fp32 on the cast values."""
    images = _pixels(1)
    mean, std = _old_model_buffers(torch.bfloat16)
    old = (images.float() - mean.float()) / std.float()
    norm = Normalizer(255).to(torch.bfloat16)
    assert norm.mean.dtype == torch.bfloat16
    new = norm.normalize(images)
    assert new.dtype == torch.float32 and torch.equal(new, old)
    assert not torch.equal(new, Normalizer(255).normalize(images))  # the cast does change the values


def test_cmae_round_trip_equals_the_old_formula():
    """C-MAE's view: (jitter(x * std + mean) - mean) / std with [0, 1] statistics, fp32 or bf16 buffers."""
    x = Normalizer(255).normalize(_pixels(2))
    for dtype in (torch.float32, torch.bfloat16):
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(dtype)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(dtype)
        unit = Normalizer(scale=1).to(dtype)
        g_old, g_new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        old = (color_jitter(x * std + mean, generator=g_old) - mean) / std
        new = unit.normalize(color_jitter(unit.denormalize(x), generator=g_new))
        assert new.dtype == torch.float32 and torch.equal(new, old), dtype
        assert torch.equal(unit.denormalize(x), x * std + mean)
        assert torch.equal(denormalize(x, mean, std), x * std + mean)


def test_buffers_move_with_the_module_and_stay_out_of_state_dicts():
    norm = Normalizer()
    assert dict(norm.state_dict()) == {}
    assert {n for n, _ in norm.named_buffers()} == {"mean", "std"}
    assert list(norm.parameters()) == []
    moved = Normalizer().to(torch.float64)  # a device move works the same way as this dtype move
    assert moved.mean.dtype == torch.float64


def test_models_use_it_without_new_state_dict_keys():
    from mimscale.masking.random import RandomMasking
    from mimscale.models.decoder import MAEDecoder
    from mimscale.models.mim import MIMModel
    from mimscale.models.registry import EncoderSpec
    from mimscale.models.vit import ViTEncoder
    from mimscale.objectives.cmae import CMAEObjective

    torch.manual_seed(0)
    enc = ViTEncoder(EncoderSpec(dim=32, depth=1, heads=4, patch_size=8), img_size=32)
    model = MIMModel(enc, MAEDecoder(32, enc.grid, enc.patch_size, dim=16, depth=1, heads=2),
                     RandomMasking(enc.num_patches, 0.75))
    images = _pixels(3, (2, 3, 32, 32))
    mean, std = _old_model_buffers()
    assert torch.equal(model.normalize(images), (images.float() - mean.float()) / std.float())
    assert not any("mean" in k or "std" in k for k in model.state_dict())
    cmae = CMAEObjective(enc, proj_hidden=16, proj_dim=8)
    assert not any("mean" in k or "std" in k for k in cmae.state_dict())
