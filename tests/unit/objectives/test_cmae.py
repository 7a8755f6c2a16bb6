"""C-MAE (objectives/cmae.py) cannot cheat: on images without content only the mask positions
differ between images, so a loss below chance means the pair was told apart by position alone."""
import json
import math

import pytest
import torch

from benchmarks import cmae_shortcut
from mimscale.masking.noise import SampleNoise
from mimscale.masking.random import RandomMasking
from mimscale.models.vit import ViTEncoder
from mimscale.objectives import cmae
from mimscale.objectives.cmae import CMAEObjective, info_nce

SMALL = cmae_shortcut.SMALL
B = cmae_shortcut.BATCH
train_on_blank_images = cmae_shortcut.train_on_blank_images


@pytest.mark.parametrize("mask_token", [True, False])
def test_blank_images_keep_the_loss_at_chance_with_independent_views(mask_token):
    first, last = train_on_blank_images("independent", mask_token=mask_token)
    chance = math.log(B)
    assert abs(first - chance) < 0.05
    # nothing tells the images apart: the best a model can do is chance (log B = 2.77); the old
    # token-wise loss went from 2.78 to 0.55 here in 150 steps
    assert last > chance - 0.1, (first, last)


position_only_loss = cmae_shortcut.position_only_loss


def test_complementary_masks_name_the_pair_by_position_and_independent_ones_do_not():
    chance = math.log(B)
    assert position_only_loss("complementary") < chance - 1.5  # 0.76: the shortcut the default avoids
    assert position_only_loss("independent") > chance  # no better than a constant code


def test_info_nce_positive_is_the_same_image_of_the_gathered_keys():
    torch.manual_seed(0)
    k = torch.randn(8, 16)
    q_local = k[4:8] * 3.0  # rank 1 of 2: its positives are rows 4..7 of the gathered keys
    assert info_nce(q_local, k, 4, 0.05) < 1e-3
    assert info_nce(q_local, k, 0, 0.05) > 5.0
    chance = info_nce(torch.zeros(4, 16) + 1.0, torch.ones(8, 16), 4, 0.2)  # all equal: log N
    assert abs(chance.item() - math.log(8)) < 1e-5


def test_the_views_are_keyed_by_position_in_the_global_batch():
    """The second mask and both jitters of a sample do not depend on how the batch is split."""
    torch.manual_seed(0)
    enc = ViTEncoder(SMALL, img_size=32)
    obj = CMAEObjective(enc, proj_hidden=32, proj_dim=16)
    x = torch.randn(4, 3, 32, 32)
    whole = obj.second(x, {"noise": SampleNoise(seed=3, step=7, offset=0, global_batch=4)}).visible
    half = obj.second(x[2:], {"noise": SampleNoise(seed=3, step=7, offset=2, global_batch=4)}).visible
    assert torch.equal(whole[2:], half)
    plan = RandomMasking(enc.num_patches, 0.75)(x, {})
    t1, t2 = obj.view_plans(x, plan, {"noise": SampleNoise(seed=3, step=7, offset=0, global_batch=4)})
    assert t1 is plan and not torch.equal(t2.visible.sort(1).values, plan.masked.sort(1).values[:, :t2.visible.shape[1]])
    comp = CMAEObjective(enc, proj_hidden=32, proj_dim=16, views="complementary").view_plans(x, plan, {})[1]
    assert torch.equal(comp.visible, plan.masked) and torch.equal(comp.masked, plan.visible)


def test_codes_are_pooled_and_projected_to_the_papers_width():
    enc = ViTEncoder(SMALL, img_size=32)
    obj = CMAEObjective(enc)
    assert obj.projector[-1].out_features == 768 and obj.predictor[-1].out_features == 768
    assert obj.projector[0].out_features == 2048
    with pytest.raises(ValueError, match="allowed values: independent, complementary"):
        CMAEObjective(enc, views="same")
    assert cmae.POOLS == ("cls", "mean")


def test_the_shortcut_benchmark_prints_its_numbers_as_json(capsys):
    assert cmae_shortcut.main(["--steps", "12", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(d["blank"]) == {"independent", "independent_no_mask_token", "complementary", "complementary_no_mask_token"}
    assert d["position_code"]["complementary"] < d["chance"] < d["position_code"]["independent"]
    assert d["position_code"]["complementary_vit_b"] < d["chance_vit_b"]
