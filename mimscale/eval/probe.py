"""Linear probe on frozen features: MAE's head, an optimizer that suits small sets.

The head is MAE's (He et al. 2022, appendix A.3): ``BatchNorm1d(D, affine=False)`` then
``Linear(D, classes)`` (weights trunc-normal std 0.01, bias 0). The BatchNorm without affine
parameters only standardizes the features, so one learning rate fits encoders whose feature
scales differ by orders of magnitude (a random init vs a trained MAE), and the head stays linear.

MAE trains it with LARS at batch 16384 for 90 epochs on ImageNet. On the cached features of small
sets (a few thousand samples) such a batch is most of the data and LARS's trust ratio is noisy, so
the default here is AdamW (lr 1e-3, no weight decay, like MAE's wd 0), batch 256, 50 epochs, a
per-step half-cycle cosine to 0; it is cheap because it only reads cached features. Reported
accuracies are those of the last epoch (no model selection on the val split). Runs are
reproducible under ``seed`` (the head's init and the epoch permutations come from one generator).
"""
from __future__ import annotations

import math

import torch
from torch import nn


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


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor, classes: int, *,
                 epochs: int = 50, batch: int = 256, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 device=None) -> dict:
    """Fit the head on train features [N, D] / labels [N], measure it on val.

    Returns {"probe_top1", "probe_top5" (only with more than 5 classes), "probe_train_top1",
    "n_train", "n_val", "classes", "epochs", "batch", "lr"}; accuracies are fractions in [0, 1]."""
    check_features(train_f, train_y, val_f, val_y, classes)
    for name, v in (("epochs", epochs), ("batch", batch)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = torch.device(device or "cpu")
    g = torch.Generator().manual_seed(seed)
    dim = train_f.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, classes))
    with torch.no_grad():
        nn.init.trunc_normal_(head[1].weight, std=0.01, generator=g)
        nn.init.zeros_(head[1].bias)
    head = head.to(device)
    x, y = train_f.float().to(device), train_y.long().to(device)
    n = len(x)
    # A batch of one has no batch statistics: fold a lone last sample into the previous batch.
    bounds = list(range(0, n, batch)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    steps_per_epoch = len(bounds) - 1
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    for _ in range(epochs):
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
    out.update(n_train=len(train_f), n_val=len(val_f), classes=classes, epochs=epochs, batch=batch, lr=lr)
    return out


@torch.no_grad()
def _accuracy(head: nn.Module, f: torch.Tensor, y: torch.Tensor, device, k: int, chunk: int = 8192) -> float:
    correct = 0
    for a in range(0, len(f), chunk):
        logits = head(f[a:a + chunk].float().to(device))
        correct += topk_correct(logits, y[a:a + chunk].to(device), k)
    return correct / len(f)
