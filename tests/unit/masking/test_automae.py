"""AutoMAE's parts and its one-backward gradient routing (single process; the 2-rank ZeRO
versions are in tests/integration/test_automae.py)."""
from __future__ import annotations

import pytest
import torch

from mimscale.errors import ConfigError
from mimscale.masking.automae import AutoMAEMasking
from mimscale.masking.automae_parts import Discriminator, lsgan_terms, pseudo_masks, sigma_max, straight_through_topk
from mimscale.optim import param_groups
from tests.conftest import tiny_config, tiny_model


def _model(*sets):
    return tiny_model("automae", *sets)


def test_pseudo_masks_rectangles_in_range():
    torch.manual_seed(0)
    m, inside = pseudo_masks(3000, 14, with_rectangles=True)
    assert m.shape == (3000, 196)
    torch.testing.assert_close(m.sum(1), torch.ones(3000))
    box = inside.view(-1, 14, 14)
    rows, cols, area = box.any(2).sum(1), box.any(1).sum(1), box.sum((1, 2))
    assert torch.equal(area, rows * cols)  # one solid rectangle each
    short, long = torch.minimum(rows, cols), torch.maximum(rows, cols)
    assert short.min() >= 3 and long.max() <= 14  # one side 4..10 (or the other, clipped to 14)
    assert area.min() >= 40 and area.max() <= 160 + 10  # ceil(area / side) may add up to side - 1
    assert (rows > cols).float().mean().item() == pytest.approx(0.5, abs=0.1)  # both orientations
    # the rectangle is lifted by 0.5 before the softmax: log-ratios inside vs outside
    logm = m.log()
    lifted = (logm * inside).sum(1) / area - (logm * ~inside).sum(1) / (196 - area)
    assert lifted.mean().item() == pytest.approx(0.5, abs=0.02)


def test_discriminator_size_and_spectral_norm():
    d = Discriminator(14)
    assert sum(p.numel() for p in d.parameters()) == 8769
    x = torch.rand(8, 1, 14, 14)
    for _ in range(30):  # power iterations converge with training-mode forwards
        d(x)
    for conv in (d.conv1, d.conv2, d.conv3):
        assert abs(sigma_max(conv) - 1.0) < 0.05
    assert d(x).shape == (8,)


def test_straight_through_topk_passes_gradient():
    m = torch.softmax(torch.randn(3, 10), 1).requires_grad_(True)
    b = straight_through_topk(m, 4)
    assert torch.equal(b.detach().sum(1), torch.full((3,), 4.0))
    assert set(b.detach().unique().tolist()) <= {0.0, 1.0}
    w = torch.randn(3, 10)
    (b * w).sum().backward()
    torch.testing.assert_close(m.grad, w)  # identity gradient


def test_lsgan_routing_d_learns_only_from_ld_and_g_only_from_lg():
    torch.manual_seed(0)
    d = Discriminator(4)
    logits = torch.randn(5, 16, requires_grad=True)
    m = torch.softmax(logits, 1)
    real = pseudo_masks(5, 4)
    d.eval()  # no power-iteration update between the calls compared here
    scores = d(torch.cat([real, m.detach(), m]).view(15, 1, 4, 4))
    loss_d, routed, loss_g = lsgan_terms(*scores.split(5), lam=0.2)
    # routed L_G' gives D nothing and the generator the gradient of lambda (D(m) - 1)^2
    gd = torch.autograd.grad(routed, list(d.parameters()), retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() < 1e-7 for g in gd)
    g_routed = torch.autograd.grad(routed, logits, retain_graph=True)[0]
    g_ref = torch.autograd.grad(0.2 * (d(m.view(5, 1, 4, 4)) - 1).pow(2).mean(), logits, retain_graph=True)[0]
    torch.testing.assert_close(g_routed, g_ref)
    # L_D reaches D and not the generator
    g = torch.autograd.grad(loss_d, logits, allow_unused=True)[0]
    assert g is None or torch.all(g == 0)
    assert loss_g.item() == pytest.approx(0.2 * (scores[10:] - 1).pow(2).mean().item())


@pytest.mark.parametrize("extractor", ["online", "ema", "stored"])
def test_one_backward_equals_separate_backwards(extractor, monkeypatch, tiny_batch):
    """Gradients of every parameter from total = L_rec + lambda L_G + L_D in one backward equal
    a reference with one backward per term into its own parameters only: L_rec into the MAE and
    G, lambda (D(m) - 1)^2 into G, (D(real) - 1)^2 + D(sg(m))^2 into D."""
    import mimscale.masking.automae as automae

    seen = {}
    real_terms = automae.lsgan_terms

    def spy(d_real, d_sg, d_gen, lam):
        seen.update(d_real=d_real, d_sg=d_sg, d_gen=d_gen, lam=lam)
        return real_terms(d_real, d_sg, d_gen, lam)

    monkeypatch.setattr(automae, "lsgan_terms", spy)
    model = _model(f"masking.automae.extractor={extractor}")
    model.masker.discriminator.eval()  # no power-iteration step between the two backward passes
    images, meta = tiny_batch
    if extractor == "stored":
        meta["attn"] = torch.rand(4, 16).half()
    loss, terms = model(images, meta)
    assert set(terms) == {"loss_rec", "loss_g", "loss_d", "d_real", "d_fake"}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    one = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)

    mk = model.masker
    G, D = list(mk.generator.parameters()), list(mk.discriminator.parameters())
    mae = [p for n, p in params if not n.startswith("masker.")]
    rec = loss - model.last_plan.aux_loss
    torch.testing.assert_close(rec.detach(), terms["loss_rec"])
    lam = seen["lam"]
    separate = [
        (mae + G, rec),
        (G, lam * (seen["d_gen"] - 1).pow(2).mean()),
        (D, (seen["d_real"] - 1).pow(2).mean() + seen["d_sg"].pow(2).mean()),
    ]
    expect = {id(p): torch.zeros_like(p) for _, p in params}
    for ps, term in separate:
        for p, g in zip(ps, torch.autograd.grad(term, ps, retain_graph=True, allow_unused=True)):
            if g is not None:
                expect[id(p)] += g
    for (n, p), g in zip(params, one):
        got = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(got, expect[id(p)], atol=1e-6, rtol=1e-5, msg=n)
    for group in (G, D):
        assert any(expect[id(p)].abs().sum() > 0 for p in group)
    assert not any(n.startswith("masker.ema.") for n, _ in params)  # the EMA copy is not trained


def test_generator_learns_from_reconstruction_through_token_scale(tiny_batch):
    model = _model("masking.automae.lam=0")
    images, meta = tiny_batch
    loss, _ = model(images, meta)
    grads = torch.autograd.grad(loss - model.last_plan.aux_loss, list(model.masker.generator.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_throwing_plan_sizes(tiny_batch):
    model = _model("masking.automae.throw_ratio=0.125")
    images, meta = tiny_batch
    model(images, meta)
    p = model.last_plan
    assert (p.visible.shape[1], p.masked.shape[1], p.thrown.shape[1]) == (2, 12, 2)
    every = torch.cat([p.visible, p.masked, p.thrown], 1).sort(1).values
    assert torch.equal(every, torch.arange(16).expand(4, 16))


def test_bad_automae_config_names_the_key():
    with pytest.raises(ConfigError, match="masking.automae.extractor"):
        tiny_config("automae", "masking.automae.extractor=teacher")
    with pytest.raises(ConfigError, match="extractor_checkpoint"):
        tiny_config("automae", "masking.automae.extractor=frozen")
    with pytest.raises(ConfigError, match="throw_ratio"):
        tiny_config("automae", "masking.automae.throw_ratio=0.3")


def test_param_groups_put_the_discriminator_without_decay():
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    d_ids = {id(p) for p in model.masker.discriminator.parameters()}
    assert {id(p) for p in groups["discriminator"]["params"]} == d_ids and groups["discriminator"]["weight_decay"] == 0.0
    assert not any(id(p) in d_ids for g in ("decay", "no_decay") for p in groups[g]["params"])
    assert isinstance(model.masker, AutoMAEMasking)
