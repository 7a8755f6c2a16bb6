"""Linear probe on frozen features: MAE's head, trained by one of two recipes.

The head is MAE's (He et al. 2022, appendix A.2): ``BatchNorm1d(D, affine=False, eps=1e-6)`` then
``Linear(D, classes)`` (weights trunc-normal std 0.01, bias 0). The BatchNorm without affine
parameters only standardizes the features, so one learning rate fits encoders whose feature
scales differ by orders of magnitude (a random init vs a trained MAE), and the head stays linear.

Recipes (``recipe=``; every number can be overridden):
  - ``mae``: MAE's linear probing, appendix A.2 (Table 9): LARS (momentum 0.9, trust 0.001, weights
    adapted, bias not), base lr 0.1 scaled as lr = base_lr * batch / 256, weight decay 0, batch
    16384 (clamped to the training set's size), 90 epochs (MAE's ViT-B; 50 for ViT-L/H) with 10
    warm-up epochs then a cosine to 0, per step. What MAE's and DINO-style tables report. On small
    sets the batch is the whole set and the scaled lr is small: it learns little in 90 steps.
  - ``fast`` (default): AdamW lr 1e-3 (not scaled), no weight decay, batch 256, 50 epochs, a per-step
    half-cycle cosine to 0, no warm-up. Suits the cached features of small sets (a few thousand
    samples), where LARS's large batch is most of the data and its trust ratio is noisy.
Both read cached features extracted with the evaluation transform (no training augmentation: MAE
trains its probe on RandomResizedCrop views, which cached features cannot give). Reported
accuracies are those of the last epoch (no model selection on the val split). Runs are
reproducible under ``seed`` (the head's init and the epoch permutations come from one generator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mimscale.optim import build_lars, lr_factor


@dataclass(frozen=True)
class Recipe:
    """A probe recipe's defaults. ``lr`` None: base_lr * batch / 256 (the batch after clamping)."""

    optimizer: str  # adamw | lars
    epochs: int
    batch: int
    lr: Optional[float]
    base_lr: Optional[float]
    warmup_epochs: int
    weight_decay: float
    source: str  # where the numbers come from


RECIPES = {
    "fast": Recipe("adamw", 50, 256, 1e-3, None, 0, 0.0, "mimscale: AdamW on cached features of small sets"),
    "mae": Recipe("lars", 90, 16384, None, 0.1, 10, 0.0, "MAE (He et al. 2022) appendix A.2, Table 9"),
}


def check_features(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor, classes: int) -> None:
    """Shapes [N, D] / [N] and labels in [0, classes): a clear error instead of a CUDA assert."""
    for name, f, y in (("train", train_f, train_y), ("val", val_f, val_y)):
        if f.dim() != 2 or y.dim() != 1 or len(f) != len(y):
            raise ValueError(f"{name} features {tuple(f.shape)} and labels {tuple(y.shape)}: expected [N, D] and [N]")
        if len(f) == 0:
            raise ValueError(f"{name} split is empty")
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise ValueError(f"{name} labels span [{int(y.min())}, {int(y.max())}], outside [0, classes={classes})")
    if train_f.shape[1] != val_f.shape[1]:
        raise ValueError(f"train features have D={train_f.shape[1]}, val features D={val_f.shape[1]}")


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> int:
    """logits [N, C], y [N] -> how many rows have y among their k largest scores."""
    return int((logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]).any(dim=1).sum())


def probe_head(dim: int, classes: int, generator: Optional[torch.Generator] = None) -> nn.Sequential:
    """MAE's probe head: BatchNorm1d(dim, affine=False, eps=1e-6) -> Linear(dim, classes), weights
    trunc-normal std 0.01 (bounds +-2, as MAE's timm call), bias 0. [B, dim] -> [B, classes]."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, classes))
    with torch.no_grad():
        nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
        nn.init.zeros_(head[1].bias)
    return head


def resolve_recipe(recipe: str, n: int, *, epochs=None, batch=None, lr=None, base_lr=None, warmup_epochs=None,
                   weight_decay=None) -> dict:
    """The settings a probe on ``n`` training samples runs with: the recipe's defaults, overridden by
    what is given. -> {"recipe", "optimizer", "epochs", "batch", "lr", "base_lr", "warmup_epochs",
    "weight_decay"}. ValueError naming the setting for anything out of range."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: allowed values: {', '.join(RECIPES)}")
    r = RECIPES[recipe]
    epochs = r.epochs if epochs is None else int(epochs)
    batch = r.batch if batch is None else int(batch)
    warmup = r.warmup_epochs if warmup_epochs is None else int(warmup_epochs)
    wd = r.weight_decay if weight_decay is None else float(weight_decay)
    for name, v in (("epochs", epochs), ("batch", batch)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0 <= warmup < epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup}")
    if wd < 0:
        raise ValueError(f"weight_decay must be >= 0, got {wd}")
    if r.optimizer == "lars" and wd != 0:
        raise ValueError(f"weight_decay {wd}: the {recipe} recipe uses none (MAE's probe: weight decay 0)")
    if base_lr is not None and r.base_lr is None:
        raise ValueError(f"base_lr: the {recipe} recipe takes an absolute lr (lr=), not a batch-scaled one")
    batch = min(batch, n)  # MAE's 16384 is more than a small set holds: the whole set per step
    if lr is None:
        base_lr = r.base_lr if base_lr is None else float(base_lr)
        lr = r.lr if base_lr is None else base_lr * batch / 256  # MAE's linear scaling rule
    else:
        base_lr = None  # an explicit lr is not scaled
    if not (base_lr is None or base_lr > 0):
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return {"recipe": recipe, "optimizer": r.optimizer, "epochs": epochs, "batch": batch, "lr": float(lr),
            "base_lr": base_lr, "warmup_epochs": warmup, "weight_decay": wd}


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor, classes: int, *,
                 recipe: str = "fast", epochs: Optional[int] = None, batch: Optional[int] = None, lr: Optional[float] = None,
                 base_lr: Optional[float] = None, warmup_epochs: Optional[int] = None, weight_decay: Optional[float] = None,
                 seed: int = 0, device=None) -> dict:
    """Fit the head on train features [N, D] / labels [N] with ``recipe`` (see the module docstring;
    None keeps the recipe's value), measure it on val.

    Returns {"probe_top1", "probe_top5" (only with more than 5 classes), "probe_train_top1",
    "n_train", "n_val", "classes"} and the settings it ran with ("recipe", "optimizer", "epochs",
    "batch", "lr", "base_lr", "warmup_epochs", "weight_decay"); accuracies are fractions in [0, 1]."""
    check_features(train_f, train_y, val_f, val_y, classes)
    cfg = resolve_recipe(recipe, len(train_f), epochs=epochs, batch=batch, lr=lr, base_lr=base_lr,
                         warmup_epochs=warmup_epochs, weight_decay=weight_decay)
    device = torch.device(device or "cpu")
    g = torch.Generator().manual_seed(seed)
    head = probe_head(train_f.shape[1], classes, g).to(device)
    x, y = train_f.float().to(device), train_y.long().to(device)
    n = len(x)
    # A batch of one has no batch statistics: fold a lone last sample into the previous batch.
    bounds = list(range(0, n, cfg["batch"])) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    steps_per_epoch = len(bounds) - 1
    total, warmup = cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch
    if cfg["optimizer"] == "lars":
        opt = build_lars(head, cfg["lr"], momentum=0.9)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total))
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=g).to(device)
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = perm[a:b]
            if len(idx) < 2:  # n == 1: BatchNorm cannot train on it
                continue
            loss = loss_fn(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()  # BatchNorm now uses its running statistics of the training features
    out = {"probe_top1": _accuracy(head, val_f, val_y, device, 1), "probe_train_top1": _accuracy(head, train_f, train_y, device, 1)}
    if classes > 5:
        out["probe_top5"] = _accuracy(head, val_f, val_y, device, 5)
    out.update(n_train=len(train_f), n_val=len(val_f), classes=classes, **cfg)
    return out


@torch.no_grad()
def _accuracy(head: nn.Module, f: torch.Tensor, y: torch.Tensor, device, k: int, chunk: int = 8192) -> float:
    correct = 0
    for a in range(0, len(f), chunk):
        logits = head(f[a:a + chunk].float().to(device))
        correct += topk_correct(logits, y[a:a + chunk].to(device), k)
    return correct / len(f)
