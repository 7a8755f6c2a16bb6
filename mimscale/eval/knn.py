"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, InstDisc;
the protocol DINO reports: k = 20, T = 0.07).

Features are L2-normalized, so a dot product is the cosine similarity. Each val sample takes its k
most similar train samples; neighbour j votes for its class with weight exp(s_j / T), and the
classes are ranked by their summed votes. The similarity matrix is formed in blocks of
``val_chunk`` x ``train_chunk`` with a running top-k per val row, so N_val x N_train never exists
at once (ImageNet's 50k x 1.28M would be 256 GB in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mimscale.eval.probe import check_features


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor, classes: int, *,
                 k: int = 20, T: float = 0.07, val_chunk: int = 1024, train_chunk: int = 65536, device=None) -> dict:
    """train_f [N, D], train_y [N], val_f [M, D], val_y [M] -> {"knn_top1", "knn_top5" (only with
    more than 5 classes), "k", "temperature", "n_train", "n_val", "classes"}; fractions in [0, 1].
    ``k`` is capped at N."""
    check_features(train_f, train_y, val_f, val_y, classes)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not T > 0:
        raise ValueError(f"T (temperature) must be > 0, got {T}")
    device = torch.device(device or "cpu")
    k = min(k, len(train_f))
    train_y = train_y.to(device)
    correct1 = correct5 = 0
    for a in range(0, len(val_f), val_chunk):
        q = F.normalize(val_f[a:a + val_chunk].float().to(device), dim=1)  # [m, D]
        best_s = torch.full((len(q), 0), float("-inf"), device=device)  # [m, <=k] running top-k similarities
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)  # [m, <=k] their train indices
        for b in range(0, len(train_f), train_chunk):
            t = F.normalize(train_f[b:b + train_chunk].float().to(device), dim=1)  # [n, D]
            s = q @ t.T  # [m, n]
            idx = torch.arange(b, b + len(t), device=device).expand(len(q), -1)
            s, idx = torch.cat([best_s, s], dim=1), torch.cat([best_i, idx], dim=1)
            best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
            best_i = idx.gather(1, pos)
        votes = torch.zeros(len(q), classes, device=device)  # [m, C]
        votes.scatter_add_(1, train_y[best_i], (best_s / T).exp())  # weight exp(sim / T) per neighbour
        y = val_y[a:a + val_chunk].to(device)
        ranked = votes.topk(min(5, classes), dim=1).indices  # [m, <=5]
        correct1 += int((ranked[:, 0] == y).sum())
        correct5 += int((ranked == y[:, None]).any(dim=1).sum())
    out = {"knn_top1": correct1 / len(val_f)}
    if classes > 5:
        out["knn_top5"] = correct5 / len(val_f)
    out.update(k=k, temperature=T, n_train=len(train_f), n_val=len(val_f), classes=classes)
    return out
