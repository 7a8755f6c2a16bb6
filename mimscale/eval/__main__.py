"""Evaluate a pretrained encoder: linear probe, weighted kNN, occlusion-invariance CKA.

    python -m mimscale.eval probe --checkpoint runs/x --data /data/cifar10 [--recipe fast|mae] [--pool cls|mean] [--json]
    python -m mimscale.eval knn   --checkpoint runs/x --data /data/cifar10 [--k 20] [--json]
    python -m mimscale.eval cka   --checkpoint runs/x --data /data/cifar10 [--plot cka.png] [--json]
    deepspeed --num_gpus 8 --module mimscale.eval probe ...   # every rank extracts its share

Images: short side resized to round(S / --crop-pct) (bicubic, 0.875), S x S center crop
(mimscale.data.eval_transform). ``--checkpoint random:vit_tiny:32:4`` evaluates an untrained encoder (seeded by --seed). Features
are cached (``--cache``, default ``<checkpoint>/eval_cache``): probe and knn on the same checkpoint
and data extract them once. Exit status 2 for a bad argument, naming it.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script (deepspeed mimscale/eval/__main__.py): this folder must not shadow packages
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

from mimscale.data.eval_transform import CROP_PCT, check_crop_pct  # noqa: E402
from mimscale.data.imagenet import LayoutError, list_split  # noqa: E402
from mimscale.data.sources import FolderSource  # noqa: E402
from mimscale.eval.cka import DEFAULT_RATIOS, check_ratios, cka_by_block, pick_whole_images, plot, summarize  # noqa: E402
from mimscale.eval.features import ListedImages, OptionError, eval_splits, log, open_checkpoint, split_features  # noqa: E402
from mimscale.eval.knn import knn_classify  # noqa: E402
from mimscale.eval.mlflow_run import log_results, run_target  # noqa: E402
from mimscale.eval.probe import RECIPES, linear_probe  # noqa: E402
from mimscale.runtime import dist  # noqa: E402


def _positive(kind, allow_zero: bool = False):
    """argparse type: a number > 0 (>= 0 with allow_zero); argparse names the option in its error."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (v >= 0 if allow_zero else v > 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>= 0' if allow_zero else '> 0'}")
        return v

    return parse


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return check_ratios(float(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e} (expected comma-separated drop ratios in [0, 1), e.g. 0.1,0.5,0.9)") from None


def _crop_pct(text: str) -> float:
    try:
        return check_crop_pct(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mimscale.eval", description=__doc__.split("\n")[0])
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    sub = p.add_subparsers(dest="task", required=True, metavar="{probe,knn,cka}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True,
                        help="checkpoint dir (any ZeRO stage), export dir/file, or random:<model>[:img_size[:patch_size]]")
    common.add_argument("--seed", type=int, default=0, help="random: init, probe init/order, CKA masks")
    common.add_argument("--batch", type=_positive(int), default=128, help="images per encoder forward")
    common.add_argument("--workers", type=_positive(int, allow_zero=True), default=4, help="DataLoader workers (folder, wds) / FFCV threads")
    common.add_argument("--threads", type=_positive(int, allow_zero=True), default=0, help="torch threads per rank (0: cores / local ranks)")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    common.add_argument("--crop-pct", type=_crop_pct, default=CROP_PCT,
                        help="eval transform: short side resized to round(S / crop_pct) (bicubic), center crop S (default 0.875)")
    common.add_argument("--mlflow-run", type=run_target, default="run", metavar="run|new|none|<run id>",
                        help="MLflow run the results are logged into (default: the run that produced the checkpoint)")

    feat = argparse.ArgumentParser(add_help=False)
    feat.add_argument("--data", help="ImageFolder root with train/ and val/ (or test/); wds: the shard folder")
    feat.add_argument("--source", choices=("folder", "wds", "ffcv"), default="folder")
    feat.add_argument("--train-data", help="ffcv: the training split's .beton")
    feat.add_argument("--val-data", help="ffcv: the evaluation split's .beton")
    feat.add_argument("--pool", choices=("cls", "mean"), default="cls", help="CLS token or mean of the patch tokens")
    feat.add_argument("--cache", help="feature cache folder (default <checkpoint>/eval_cache; random: a temp folder)")

    pr = sub.add_parser("probe", parents=[common, feat], help="linear probe (BatchNorm + Linear on frozen features)")
    pr.add_argument("--recipe", choices=tuple(RECIPES), default="fast",
                    help="fast: AdamW, batch 256, 50 epochs; mae: MAE's LARS protocol (batch 16384, 90 epochs, 10 warm-up)")
    pr.add_argument("--epochs", type=_positive(int), default=None, help="default: the recipe's (fast 50, mae 90)")
    pr.add_argument("--lr", type=_positive(float), default=None,
                    help="peak lr, not scaled (default: fast 1e-3; mae --blr x batch / 256); cosine to 0")
    pr.add_argument("--blr", type=_positive(float), default=None, help="mae: base lr scaled by batch / 256 (default 0.1)")
    pr.add_argument("--warmup-epochs", type=_positive(int, allow_zero=True), default=None, help="default: fast 0, mae 10")
    pr.add_argument("--wd", type=_positive(float, allow_zero=True), default=None, help="weight decay (fast only; default 0)")
    pr.add_argument("--probe-batch", type=_positive(int), default=None,
                    help="default: fast 256, mae 16384 (both clamped to the training set's size)")

    kn = sub.add_parser("knn", parents=[common, feat], help="weighted kNN on L2-normalized features")
    kn.add_argument("--k", type=_positive(int), default=20)
    kn.add_argument("--temperature", type=_positive(float), default=0.07)

    ck = sub.add_parser("cka", parents=[common], help="CKA of full vs occluded images, per block")
    ck.add_argument("--data", required=True, help="ImageFolder root (or a folder of class folders with --split '')")
    ck.add_argument("--split", default="val", help="split folder the images come from (default val)")
    ck.add_argument("--images", type=_positive(int), default=256, help="images (a seeded random subset of the split)")
    ck.add_argument("--ratios", type=_ratios, default=None, help="comma-separated drop ratios (default 0.1,...,0.9)")
    ck.add_argument("--tokens", choices=("kept", "cls"), default="kept",
                    help="per-block feature: mean of the tokens the occluded view kept, or CLS")
    ck.add_argument("--plot", help="write the per-block plot here (PNG)")
    return p


def _fail(e: Exception) -> tuple[int, str]:
    print(f"python -m mimscale.eval: error: {e}", file=sys.stderr)
    return 2, ""


def run_features_task(args) -> tuple[int, str]:
    """probe / knn -> (exit status, what to print on stdout)."""
    try:  # every argument problem surfaces on every rank before any process group exists
        ckpt = open_checkpoint(args.checkpoint, args.seed)
        splits = eval_splits(args.data, args.source, args.train_data, args.val_data, args.workers)
    except OptionError as e:
        return _fail(e)
    world = dist.world_size()
    if world > 1:
        dist.init_distributed()
    try:
        feats = split_features(ckpt, pool=args.pool, cache=args.cache, batch=args.batch, seed=args.seed, device=dist.device(),
                               splits=splits, crop_pct=args.crop_pct)
    except OptionError as e:  # an unwritable cache folder: the same on every rank
        return _fail(e)
    if world > 1:
        dist.shutdown()  # the probe runs on rank 0 alone: no rank waits at a barrier meanwhile
    if feats is None:
        return 0, ""
    if splits[1].split != "val":
        log(f"evaluating on {splits[1].split}/ (no val/ split)")
    fit_device = dist.device()
    if args.task == "probe":
        try:
            res = linear_probe(feats.train_f, feats.train_y, feats.val_f, feats.val_y, feats.classes, recipe=args.recipe,
                               epochs=args.epochs, batch=args.probe_batch, lr=args.lr, base_lr=args.blr,
                               warmup_epochs=args.warmup_epochs, weight_decay=args.wd, seed=args.seed, device=fit_device)
        except ValueError as e:  # a setting the recipe does not take (named by resolve_recipe)
            return _fail(OptionError(f"--recipe {args.recipe}", str(e)))
    else:
        res = knn_classify(feats.train_f, feats.train_y, feats.val_f, feats.val_y, feats.classes, k=args.k,
                           T=args.temperature, device=fit_device)
    res.update(pool=feats.pool, crop_pct=feats.crop_pct, checkpoint=feats.checkpoint, model=feats.model, val_split=feats.val_split,
               skipped=feats.skipped, dim=int(feats.train_f.shape[1]))
    args.results = res  # for MLflow (main)
    if args.json:
        return 0, json.dumps(res)
    lines = [f"{args.task}  {feats.checkpoint}  ({feats.model['name']} {feats.model['img_size']}px, pool {feats.pool})",
             f"  train {res['n_train']}  {feats.val_split} {res['n_val']}  classes {res['classes']}  skipped {feats.skipped}"]
    lines += [f"  {k}  {100 * res[f'{args.task}_{k}']:6.2f} %" for k in ("top1", "top5") if f"{args.task}_{k}" in res]
    return 0, "\n".join(lines)


def run_cka(args) -> tuple[int, str]:
    """cka -> (exit status, what to print on stdout)."""
    if dist.rank() != 0:  # a few hundred images: one process is enough
        return 0, ""

    try:
        ckpt = open_checkpoint(args.checkpoint, args.seed)
        try:
            listing = list_split(args.data, args.split) if args.split else None
        except (LayoutError, OSError) as e:
            raise OptionError("--data", f"{e} (--split {args.split})") from None
    except OptionError as e:
        return _fail(e)
    if listing is None:
        source = FolderSource(args.data, "")
    else:
        source = ListedImages(listing)
    size = ckpt.model["img_size"]
    images = pick_whole_images(source, size, args.images, args.seed, args.crop_pct)  # [N, 3, S, S] uint8
    encoder = ckpt.load()
    ratios = args.ratios or DEFAULT_RATIOS
    result = cka_by_block(encoder, images, ratios, args.seed, tokens=args.tokens, batch=args.batch, device=dist.device())
    args.results = {"cka": result, "tokens": args.tokens, "images": len(images), "split": args.split, "seed": args.seed}  # for MLflow (main)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.plot, title=f"{args.checkpoint} ({len(images)} images, tokens {args.tokens})")
        log(f"plot written to {args.plot}")
    if args.json:
        return 0, json.dumps({"checkpoint": args.checkpoint, "model": ckpt.model, "images": len(images), "split": args.split,
                              "tokens": args.tokens, "seed": args.seed, "crop_pct": args.crop_pct, "cka": {f"{r:g}": v for r, v in result.items()},
                              "mean": {f"{r:g}": float(np.mean(v)) for r, v in result.items()}, "plot": args.plot})
    return 0, (f"linear CKA, full vs occluded images, per block ({args.checkpoint}, {len(images)} images, tokens {args.tokens})\n"
               + summarize(result))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # stdout carries only the result (one JSON object with --json): anything else printed meanwhile
    # goes to stderr. DeepSpeed's logger writes to the stdout of the moment it is imported (here).
    with contextlib.redirect_stdout(sys.stderr):
        dist.set_threads(args.threads)
        code, text = run_cka(args) if args.task == "cka" else run_features_task(args)
        if code == 0:  # into the run that trained the checkpoint, unless --mlflow-run says otherwise
            code = log_results(args.checkpoint, args.task, getattr(args, "results", None), args.mlflow_run, getattr(args, "plot", None))
    if text:
        print(text, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
