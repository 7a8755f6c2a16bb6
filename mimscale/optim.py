"""AdamW with MAE's parameter groups, LARS as MAE's linear probe uses it, and the per-step warmup +
half-cycle cosine schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.optim import Lars
from torch import nn

LARS_TRUST = 1e-3  # MAE's (and MoCo v3's) LARS trust coefficient

# Parameters that never get weight decay: biases, norm weights (1-D), tokens, position embeddings.
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decayed weights (matrices, convs), everything MAE leaves undecayed, and AutoMAE's
    discriminator (no decay; empty for other methods and dropped by build_optimizer).

    Group dicts carry a ``name`` so later methods can add their own groups (e.g. a discriminator)."""
    decay, no_decay, disc = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".discriminator." in f".{name}":  # AutoMAE's D: Adam without weight decay, as its paper
            disc.append(p)
        # ds_shape: a parameter zero.Init partitioned keeps its real shape there (its data is a placeholder)
        elif len(getattr(p, "ds_shape", p.shape)) <= 1 or name.endswith(".bias") or any(n in name for n in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "discriminator", "params": disc, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), fused: bool = True):
    """torch AdamW, handed to ``deepspeed.initialize`` as the client optimizer. Fused on GPU and
    on CPU alike: on ZeRO's flat fp32 buffers the unfused update allocates several full-size
    temporaries per step, which on CPU costs more than the update itself."""
    groups = [g for g in param_groups(model, weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def build_lars(model: nn.Module, lr: float, momentum: float = 0.9) -> Lars:
    """LARS as MAE's linear probe runs it (MAE's util/lars.py, from MoCo v3), built on timm's Lars:
    SGD with momentum whose matrices (and convs: ndim > 1) step by g * trust * ||w|| / ||g||, while
    biases and norm parameters (ndim <= 1) are not adapted, as MAE excludes them. No weight decay
    (MAE's probe uses 0; with decay timm's trust ratio divides by ||g|| + wd ||w||, MAE's by
    ||g + wd w||, so the two would differ). eps 0: timm's ratio is then exactly MAE's, a zero
    weight or gradient norm giving ratio 1 in both. The momentum buffer starts at the first
    (adapted) gradient, MAE's at 0 + that gradient: the same."""
    adapt, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (adapt if p.ndim > 1 else plain).append(p)
    groups = [{"params": adapt, "always_adapt": True}, {"params": plain, "always_adapt": False}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, weight_decay=0.0, trust_coeff=LARS_TRUST, eps=0.0)


@dataclass(frozen=True)
class RunLength:
    """What a recipe's train section gives for a global batch and a dataset size (the trainer's
    schedule, and what ``--print-config`` shows before a launch)."""

    steps_per_epoch: int  # global batches per epoch (the same on any world size)
    total_steps: int
    warmup_steps: int
    lr: float  # the peak: base_lr scaled by global_batch / 256

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def run_length(train, global_batch: int, n_samples: int) -> RunLength:
    """``train``: the config's train section (steps or epochs, warmup_steps or warmup_epochs, base_lr).
    ValueError when ``n_samples`` cannot fill one global batch."""
    steps_per_epoch = n_samples // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{n_samples} samples cannot fill one global batch of {global_batch}")
    total = train.steps if train.steps is not None else max(1, int(round(train.epochs * steps_per_epoch)))
    warmup = train.warmup_steps if train.warmup_steps is not None else int(round(train.warmup_epochs * steps_per_epoch))
    return RunLength(steps_per_epoch, total, warmup, train.base_lr * global_batch / 256)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup reaching the
    peak at step ``warmup_steps - 1`` (so no step runs at lr 0), then half-cycle cosine down to
    ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LambdaLR stepped once per optimizer step (DeepSpeed steps it at accumulation boundaries);
    its state is saved in the engine's checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_ratio))


def rebase_scheduler(scheduler, lr: float) -> None:
    """Give a restored LambdaLR a new peak ``lr`` (a resume that changed base_lr or the global
    batch): its base and the optimizer's current lr follow at once, not from the next step."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
