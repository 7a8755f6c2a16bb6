"""mimscale/optim.py: parameter groups and the per-step LR schedule."""
import math

import torch

from mimscale.optim import build_scheduler, lr_factor, param_groups
from tests.unit.models.test_model import small_model


def test_param_groups_no_decay_on_bias_norm_tokens():
    model = small_model()
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    assert "encoder.cls_token" in no_decay and "decoder.mask_token" in no_decay
    assert all(n.endswith("bias") or "norm" in n or "token" in n for n in no_decay)
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "encoder.patch_embed.proj.weight" in decay
    assert all(n.endswith("weight") and "norm" not in n for n in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))



def test_lr_schedule_warmup_then_half_cosine():
    w, T = 10, 110
    assert lr_factor(0, w, T) == 0.1
    assert lr_factor(9, w, T) == 1.0
    assert lr_factor(10, w, T) == 1.0
    assert math.isclose(lr_factor(60, w, T), 0.5, abs_tol=1e-12)
    assert math.isclose(lr_factor(110, w, T), 0.0, abs_tol=1e-12)
    assert math.isclose(lr_factor(110, w, T, min_ratio=0.1), 0.1)
    vals = [lr_factor(s, w, T) for s in range(T)]
    assert all(a < b for a, b in zip(vals[:9], vals[1:10]))
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, w, T)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert math.isclose(lrs[0], 0.2) and math.isclose(lrs[9], 2.0) and lrs[11] < 2.0


def test_rebase_scheduler_moves_the_peak_at_once():
    from mimscale.optim import rebase_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.param_groups[1:] = []
    sched = build_scheduler(opt, 2, 10)
    for _ in range(4):
        opt.step(), sched.step()
    before = opt.param_groups[0]["lr"]
    rebase_scheduler(sched, 3.0)
    assert math.isclose(opt.param_groups[0]["lr"], 3.0 * before) and sched.base_lrs == [3.0]
    opt.step(), sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 3.0 * lr_factor(5, 2, 10))
