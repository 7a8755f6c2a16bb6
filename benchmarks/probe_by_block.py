"""Diagnostic: linear probe and kNN on every encoder block's mean-pooled patch tokens.

    python -m benchmarks.probe_by_block --checkpoint <ckpt | export | random:...> --data <root with train/ val/> [--json]

Answers "where in the encoder is the signal": a short MIM run can change early blocks long before
the last block's features beat a random encoder's. Features are taken once per image with
forward hooks (``mimscale.eval.cka.walk_blocks``), pooled over patch tokens, and probed with the
same linear probe and kNN as ``python -m mimscale.eval``.
"""
from __future__ import annotations

import argparse
import json

import torch

from mimscale.data.normalize import normalize_uint8
from mimscale.eval.cka import walk_blocks
from mimscale.eval.features import eval_splits, open_checkpoint
from mimscale.eval.knn import knn_classify
from mimscale.eval.probe import linear_probe


@torch.no_grad()
def block_features(encoder, split, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ([depth, N, D] mean-pooled block outputs, labels [N])."""
    from mimscale.data.eval_transform import CROP_PCT
    from mimscale.data.streams import open_full_pass

    feats, labels = [], []
    for b in open_full_pass(split.cfg, split.source, img_size=encoder.img_size, batch_size=batch, rank=0, world_size=1, seed=0, crop_pct=CROP_PCT):
        if len(b["image"]) == 0:
            continue
        outs, _ = walk_blocks(encoder, normalize_uint8(b["image"]), reduce=lambda t: t[:, 1:].mean(dim=1))
        feats.append(torch.stack(outs))  # [depth, B, D]
        labels.append(b["label"])
    return torch.cat(feats, dim=1), torch.cat(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ckpt = open_checkpoint(args.checkpoint, args.seed)
    encoder = ckpt.load()
    train, val = eval_splits(args.data, "folder", None, None, 1)
    tr_f, tr_y = block_features(encoder, train)
    va_f, va_y = block_features(encoder, val)
    classes = int(torch.cat([tr_y, va_y]).max()) + 1
    rows = []
    for i in range(len(tr_f)):
        probe = linear_probe(tr_f[i], tr_y, va_f[i], va_y, classes, seed=args.seed)["probe_top1"]
        knn = knn_classify(tr_f[i], tr_y, va_f[i], va_y, classes)["knn_top1"]
        rows.append({"block": i + 1, "probe_top1": probe, "knn_top1": knn})
        print(f"block {i + 1:>2}: probe {probe:.4f}  kNN {knn:.4f}", flush=True)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "blocks": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
