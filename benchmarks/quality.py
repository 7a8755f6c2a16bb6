"""Quality benchmark: the same small ViT pretrained by each method for the same compute, then probed.

    python -m benchmarks.quality --data <ImageFolder root | .tar.gz of one> \
        --methods random_init,mae,amt,automae,rmae,cmae,simmim,amt_simmim --budget <minutes per method> [--quick] --json
    python -m benchmarks.quality --data <...> --methods automae,automae_stretched --steps 200 --quick \
        --pretrain-images 5000 --probe-train 5000 --probe-val 1000 --json     # an ablation at equal steps

For every method: a short calibration run measures its step time on this machine (and, for AMT,
one attention refresh over the pretraining set), then the real run gets as many steps as fit in
the budget, refreshes included, so methods are compared at equal wall-clock compute. Each
encoder is then evaluated the same way (``python -m mimscale.eval``): linear probe and weighted
kNN on frozen features, and CKA occlusion invariance at a drop ratio of 0.5 (mean over blocks).
Prints a table, and with ``--json`` one JSON object
    {method: {probe_top1, knn_top1, pretrain_img_per_s, cka_at_0.5, ...}}
as its last line. Pretraining runs ``mimscale/pretrain.py`` as one process (all cores); the model's
input and patch size follow the images (CIFAR's 32 px: 32 / patch 4, an 8 x 8 grid).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.quality_data import prepare
from mimscale import methods

REPO = Path(__file__).resolve().parents[1]
METHODS = ("random_init", "mae", "amt", "automae", "rmae", "cmae", "simmim", "amt_simmim")
# Ablations run only when named in --methods (not in the default list): a method with one setting changed.
VARIANTS = ("automae_stretched",)
AMT_FIRST, AMT_EVERY = 0.25, 1.0  # shares of the run
AMT_BASE = {"amt": "mae", "amt_simmim": "simmim"}  # AMT on a base: the base's masking until the refresh
# Per-method overrides of the shared config; everything else is identical across methods.
METHOD_SETS = {
    "mae": [methods.select("random"), "masking.mask_ratio=0.75"],
    # AMT's ratios; ONE refresh, at 25% of the run. The paper refreshes every 40 of 400 epochs,
    # where a pass over the data costs ~1.5% of the run; in a budget of a few epochs one pass
    # (a full-length forward per image) costs as much as ~30% of the training, and the benchmark
    # bills it to AMT's budget.
    "amt": [methods.select("amt"), f"masking.amt.first_refresh={AMT_FIRST:.0%}", f"masking.amt.refresh_every={AMT_EVERY:.0%}"],
    "automae": [methods.select("automae"), "masking.automae.extractor=online"],
    # the generator's input min-max stretched per head instead of the raw softmax rows (the default)
    "automae_stretched": [methods.select("automae"), "masking.automae.extractor=online", "masking.automae.attention=stretched"],
    "rmae": [methods.select("rmae"), "masking.mask_ratio=0.75"],
    # heads scaled to the tiny model; a faster EMA for runs of a few hundred steps
    "cmae": [methods.select("cmae"), "masking.mask_ratio=0.75", "masking.cmae.proj_hidden=512",
             "masking.cmae.proj_dim=128", "masking.cmae.momentum=0.99"],
    # SimMIM's ratio on mask units of 2 x 2 patches (base_sets: 8 px at CIFAR's patch 4, as 32 px
    # over ViT-B's 16); AMT's SimMIM setting on those units, refreshed as "amt"
    "simmim": [methods.select("simmim"), "masking.mask_ratio=0.6"],
    "amt_simmim": [methods.select("amt_simmim"), "masking.mask_ratio=0.6", "masking.amt.mask_ratio=0.44",
                   "masking.amt.throw_ratio=0.26", f"masking.amt.first_refresh={AMT_FIRST:.0%}",
                   f"masking.amt.refresh_every={AMT_EVERY:.0%}"],
}
# quick: the whole pipeline in under 5 minutes on 2 cores, a smoke run: every method gets the same
# few steps (no calibration; too short to compare methods). full: calibrated budgets, under 60 minutes.
MODES = {
    True: {"budget": None, "quick_steps": 6, "pretrain_images": 1000, "probe_train": 1000, "probe_val": 500,
           "cka_images": 64, "batch": 32, "calib_steps": 0},
    False: {"budget": 5.0, "pretrain_images": 10000, "probe_train": 10000, "probe_val": 2000, "cka_images": 256,
            "batch": 128, "calib_steps": 6},
}


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def child_env() -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
         "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    e.pop("OMP_NUM_THREADS", None)  # one process: let torch use every core
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return e


def run(cmd: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr[-4000:]}")
    return r


def base_sets(args, data: dict, out: Path) -> list[str]:
    return [f"output_dir={out}", "resume=never", "model.name=vit_tiny", f"model.img_size={data['img_size']}",
            f"model.patch_size={data['patch_size']}", "model.decoder_dim=128", "model.decoder_depth=2",
            "model.decoder_heads=4", "data.source=folder", f"data.path={data['pretrain']}", "data.num_workers=1",
            # the batch is the benchmark's (the tiny preset's recipe says 16; the ds_config here says micro = batch)
            f"train.global_batch={args.batch}",
            f"train.base_lr={args.base_lr}", "train.weight_decay=0.05", f"train.seed={args.seed}",
            "train.log_every=1", "tracking.enabled=false", "tracking.mask_grid_every=0",
            # SimMIM's mask unit, 2 x 2 patches at any patch size (read by simmim and amt_simmim only)
            f"masking.simmim.mask_patch_size={2 * data['patch_size']}"]


def pretrain(args, method: str, data: dict, steps: int, out: Path, extra: list[str], timeout: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time (resume=never refuses old checkpoints)
    ds = out.parent / f"{out.name}.ds.json"
    cfg = json.loads((REPO / "ds_configs" / "cpu_fp32_zero1.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1)
    ds.parent.mkdir(parents=True, exist_ok=True)
    ds.write_text(json.dumps(cfg))
    sets = base_sets(args, data, out) + METHOD_SETS[method] + [f"train.steps={steps}", f"train.ckpt_every={steps}",
                                                               f"train.warmup_steps={max(1, steps // 20)}"] + extra
    cmd = [sys.executable, "mimscale/pretrain.py", "--deepspeed_config", str(ds),
           "--config", str(REPO / "mimscale" / "configs" / "mae_vit_tiny_cpu.yaml")]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    run(cmd, f"{method} pretraining", timeout)
    s = json.loads((out / "summary.json").read_text())
    s["wall_s"] = time.perf_counter() - t0
    return s


def step_seconds(run_dir: Path) -> float:
    """Median optimizer-step time of a calibration run, leaving out its first two steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = sorted(r["step_s"] for r in rows[2:] or rows)
    return times[len(times) // 2]


def plan_steps(args, method: str, data: dict, mode: dict, out: Path) -> tuple[int, dict]:
    """Steps that fit in the budget, from a calibration run of this method.

    AMT's calibration (amt, amt_simmim) refreshes once, at step 0 (``first_refresh=0``;
    ``refresh_every`` 100% puts no second one inside the run), so its steps are timed on the throw
    plan and one refresh is timed over the whole pretraining set. The real run refreshes once, at
    AMT_FIRST of its steps, and masks at random before that (its base's step cost: MAE's or SimMIM's,
    when the base was calibrated in this benchmark)."""
    calib = out / "calibration"
    extra = ["masking.amt.first_refresh=0"] if method in AMT_BASE else []
    s = pretrain(args, method, data, mode["calib_steps"], calib, extra, timeout=1800)
    step_s = step_seconds(calib)
    args.calibrated[method] = step_s
    refresh_s = sum(r["seconds"] for r in s.get("amt_refreshes", []))
    budget_s = args.budget * 60
    if method in AMT_BASE:
        before = args.calibrated.get(AMT_BASE[method], step_s)  # the base's random masking until the refresh
        per_step = AMT_FIRST * before + (1 - AMT_FIRST) * step_s
        steps = max(4, int((budget_s - refresh_s) / per_step))
    else:
        steps = max(4, int(budget_s / step_s))
    return steps, {"calib_step_s": step_s, "calib_refresh_s": refresh_s or None}


def evaluate(checkpoint: str, data: dict, mode: dict, cache: Path, args) -> dict:
    """Linear probe, kNN and CKA at ratio 0.5 of one encoder, in this process (what
    ``python -m mimscale.eval probe|knn|cka`` computes): one feature extraction, cached, serves
    the probe and the kNN."""
    import torch

    from mimscale.data.imagenet import list_split
    from mimscale.eval.cka import cka_by_block, pick_whole_images, plot
    from mimscale.eval.features import ListedImages, open_checkpoint, split_features
    from mimscale.eval.knn import knn_classify
    from mimscale.eval.probe import linear_probe

    ckpt = open_checkpoint(checkpoint, args.seed)
    f = split_features(ckpt, data["probe"], pool=args.pool, cache=cache, seed=args.seed, num_workers=1)
    res = {"probe": linear_probe(f.train_f, f.train_y, f.val_f, f.val_y, f.classes, seed=args.seed),
           "knn": knn_classify(f.train_f, f.train_y, f.val_f, f.val_y, f.classes)}
    source = ListedImages(list_split(str(data["probe"]), "val"))
    images = pick_whole_images(source, ckpt.model["img_size"], mode["cka_images"], args.seed)  # [N, 3, S, S] uint8
    with torch.no_grad():
        res["cka"] = cka_by_block(ckpt.load(), images, (0.5,), args.seed)  # {0.5: [per block]}
    plot(res["cka"], cache / "cka.png", title=f"{checkpoint} ({len(images)} images)")
    return res


def cka_mean(cka: dict, ratio: float = 0.5) -> float:
    """Mean over blocks of the CKA at ``ratio``."""
    per_block = cka[ratio]
    return float(sum(per_block) / len(per_block))


def bench_method(args, method: str, data: dict, mode: dict, root: Path) -> dict:
    out = root / method
    row: dict = {}
    if method == "random_init":
        ckpt = f"random:vit_tiny:{data['img_size']}:{data['patch_size']}"
        row.update(pretrain_img_per_s=None, pretrain_steps=0)
    else:
        if mode["calib_steps"]:
            steps, calib = plan_steps(args, method, data, mode, out)
        else:
            steps, calib = mode["quick_steps"], {}
        log(f"{method}: {steps} steps in the budget ({calib})")
        s = pretrain(args, method, data, steps, out / "run", [], timeout=(args.budget or 2) * 60 * 3 + 600)
        ckpt = str(out / "run")
        row.update(pretrain_img_per_s=s["img_per_s"], pretrain_steps=s["steps"], pretrain_wall_s=s["wall_s"],
                   final_loss=s["final_loss"], mask_fractions=s.get("mask_fractions"),
                   refresh_s=sum(r["seconds"] for r in s.get("amt_refreshes", [])) or None, **calib)
    ev = evaluate(ckpt, data, mode, out / "eval", args)
    row.update({"probe_top1": ev["probe"]["probe_top1"], "knn_top1": ev["knn"]["knn_top1"], "cka_at_0.5": cka_mean(ev["cka"]),
                "cka_at_0.5_last_block": ev["cka"][0.5][-1]})
    return row


def table(results: dict) -> str:
    head = f"{'method':<12} {'probe top-1':>11} {'kNN top-1':>10} {'CKA@0.5':>8} {'img/s':>8} {'steps':>6}"
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        ips = f"{r['pretrain_img_per_s']:.1f}" if r.get("pretrain_img_per_s") else "-"
        lines.append(f"{m:<12} {r['probe_top1']:>11.4f} {r['knn_top1']:>10.4f} {r['cka_at_0.5']:>8.4f} {ips:>8} "
                     f"{r.get('pretrain_steps', 0):>6}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (or test/), or a .tar.gz of one")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS + VARIANTS)}")
    p.add_argument("--budget", type=float, default=None,
                   help="pretraining minutes per method, refreshes included (default 5; --quick: a fixed 6 steps instead)")
    p.add_argument("--steps", type=int, default=None,
                   help="the same fixed number of pretraining steps for every method (no budget, no calibration)")
    p.add_argument("--quick", action="store_true", help="small subsets and budget: the whole run in under 5 minutes")
    p.add_argument("--out", default="runs/quality", help="working directory (runs, caches, extracted data)")
    p.add_argument("--pretrain-images", type=int, default=None, help="images pretrained on (quick: 1000, full: 10000)")
    p.add_argument("--probe-train", type=int, default=None, help="probe/kNN training images (quick: 1000, full: 10000)")
    p.add_argument("--probe-val", type=int, default=None, help="probe/kNN evaluation images (quick: 500, full: 2000)")
    p.add_argument("--img-size", type=int, default=None, help="model input size (default: from the images)")
    p.add_argument("--patch-size", type=int, default=None, help="patch size (default: an 8 x 8 grid up to 64 px, else 16)")
    p.add_argument("--base-lr", type=float, default=1.5e-3, help="lr = base_lr x batch / 256, the same for every method")
    p.add_argument("--pool", default="mean", choices=("cls", "mean"),
                   help="probe/kNN features: mean of patch tokens (default: the same pooling for a random and a trained encoder) or CLS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS + VARIANTS]
    if bad or not methods:
        p.error(f"--methods: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(METHODS + VARIANTS)}")
    args.methods = methods
    mode = dict(MODES[args.quick])
    if args.quick and args.budget is not None:
        mode["calib_steps"] = MODES[False]["calib_steps"]  # a budget given: calibrate even in quick mode
    for key in ("budget", "pretrain_images", "probe_train", "probe_val"):
        if getattr(args, key) is not None:
            if getattr(args, key) <= 0:
                p.error(f"--{key.replace('_', '-')} must be > 0")
            mode[key] = getattr(args, key)
    if args.steps is not None:
        if args.steps <= 0:
            p.error("--steps must be > 0")
        mode.update(quick_steps=args.steps, calib_steps=0, budget=None)
    args.budget = mode["budget"]
    args.calibrated = {}  # method -> calibrated step seconds
    args.batch = mode["batch"]
    return args, mode


def main(argv=None) -> int:
    args, mode = parse_args(argv)
    root = Path(args.out).resolve()
    data = prepare(Path(args.data), root / "data", mode, args.img_size, args.patch_size, args.seed)
    log(f"data: {data['counts']}, model input {data['img_size']} px, patch {data['patch_size']}")
    results = {}
    t0 = time.perf_counter()
    for m in args.methods:
        t = time.perf_counter()
        results[m] = bench_method(args, m, data, mode, root)
        log(f"{m}: {json.dumps(results[m])} ({time.perf_counter() - t:.0f} s)")
    print(table(results))
    print(f"total {time.perf_counter() - t0:.0f} s; budget {args.budget} min per method; data {data['counts']}")
    (root / "quality.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
