"""Ablation: which AMT choices matter, at equal steps and at equal training FLOPs (issue 29, item 3).

    python -m benchmarks.ablate --data /work/shared/data/cifar10-jpeg.tar.gz [--steps 1000] [--json]
    python -m benchmarks.ablate --data <...> --list                 # the cells and their steps, nothing run
    python -m benchmarks.ablate --data <...> --table-only [--json]  # the table of what is cached

Every cell (a variant, a seed, a comparison) pretrains the quality benchmark's ViT-Tiny on CIFAR-10
train images and probes the export on held-out test images (benchmarks/quality.py's pretrain and
evaluate: linear probe and kNN on frozen mean-pooled features, CKA occlusion invariance at 0.5).
Variants: MAE; AMT with map_crop box (the paper's) and released (the authors' code); AMT with the
other normalise order; AMT with uniform weights (masking.amt.weights=uniform: its r masked and t
thrown drawn at random, no attention); SimMIM and AMT on SimMIM; AutoMAE with its online extractor
and with AMT's stored maps. MAE and AMT box run 2 seeds, the others one.

``steps``: every cell runs the same number of optimizer steps (--steps, the budget).
``flops``: every cell gets MAE's training FLOPs at that budget (mimscale.methods.flops of its
plans: AMT's random warm-up at its base's cost for the first 25% of the run, then its plan); a
cell whose FLOPs-equal steps equal its step count is the same run and is not repeated.

Each finished cell is one JSON file, committed, under --results/steps<N>/ (config, seed, steps,
FLOPs, wall time, machine, metrics); a cell whose file holds the same config is skipped, so an
interrupted sweep (or a fresh clone) continues where the files end. Prints a markdown table and,
with --json, one JSON object {cell: result} as the last line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks import quality
from benchmarks.quality_data import extract, find_root, listing, model_size, prepare

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ablation"
_AMT_SCHEDULE = [f"masking.amt.first_refresh={quality.AMT_FIRST:.0%}", f"masking.amt.refresh_every={quality.AMT_EVERY:.0%}"]
# variant -> (quality.METHOD_SETS entry, extra --set overrides): one choice changed per variant
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "mae": ("mae", []),
    "amt_box": ("amt", ["masking.amt.map_crop=box"]),
    "amt_released": ("amt", ["masking.amt.map_crop=released"]),
    "amt_minmax_then_mean": ("amt", ["masking.amt.normalize=minmax_then_mean"]),
    "amt_uniform": ("amt", ["masking.amt.weights=uniform"]),
    "simmim": ("simmim", []),
    "amt_simmim": ("amt_simmim", []),
    "automae_online": ("automae", []),
    # AutoMAE reading AMT's store, refreshed on AMT's schedule in this benchmark
    "automae_stored": ("automae", ["masking.automae.extractor=stored", *_AMT_SCHEDULE]),
}
SEEDS = {"mae": (0, 1), "amt_box": (0, 1)}  # the spread across seeds; the others run seed 0
COMPARES = ("steps", "flops")
# full-size subsets (quality.py's full mode): 10k images pretrained on, 10k probe-train, 2k test
MODE = {"pretrain_images": 10000, "probe_train": 10000, "probe_val": 2000, "cka_images": 256, "batch": 128}
DEFAULT_STEPS = 600  # from a calibration on 2 cores: the sweep in about 3 CPU-hours (docs/methods.md, "Budget")


@dataclass(frozen=True)
class Cell:
    variant: str
    seed: int
    compare: str  # steps | flops
    steps: int  # this cell's optimizer steps

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.compare}-s{self.seed}"

    @property
    def method(self) -> str:
        return VARIANTS[self.variant][0]

    def sets(self) -> list[str]:
        """The cell's overrides on top of quality.base_sets (seed and steps are added by pretrain)."""
        return quality.METHOD_SETS[self.method] + VARIANTS[self.variant][1]


def flops_model(variant: str, img_size: int, patch_size: int) -> tuple[float, float, float]:
    """(warm-up FLOPs per image, FLOPs per image after it, warm-up share of the run) of a variant's
    training step: mimscale.methods.flops at its masker's plan sizes. AMT-style maskers plan random
    masking until the first refresh (quality.AMT_FIRST of the run), then their r / t plan."""
    from mimscale import methods
    from mimscale.config import load_config
    from mimscale.masking.amt import AMTMasking
    from mimscale.masking.base import plan_sizes
    from mimscale.masking.coarse import CoarseMasking

    method, extra = VARIANTS[variant]
    sets = [s for s in quality.METHOD_SETS[method] + extra if s.startswith(("masking.", "model."))]
    sets += ["model.name=vit_tiny", f"model.img_size={img_size}", f"model.patch_size={patch_size}", "model.decoder_dim=128",
             "model.decoder_depth=2", "model.decoder_heads=4", f"masking.simmim.mask_patch_size={2 * patch_size}"]
    cfg = load_config(str(REPO / "mimscale" / "configs" / "mae_vit_tiny_cpu.yaml"), sets)
    masker = methods.build_model(cfg).masker
    warm = masker.initial_sizes()
    inner, per_unit = (masker.inner, masker.k * masker.k) if isinstance(masker, CoarseMasking) else (masker, 1)
    if isinstance(inner, AMTMasking):
        v, m, _ = plan_sizes(inner.num_patches, inner.mask_ratio, inner.throw_ratio)
        main, share = (v * per_unit, m * per_unit), quality.AMT_FIRST
    else:
        main, share = warm[:2], 0.0
    return methods.flops(cfg, *warm[:2]), methods.flops(cfg, *main), share


def flops_equal_steps(budget: float, warm: float, main: float, share: float) -> int:
    """Steps whose training FLOPs per image (share of them at ``warm``, the rest at ``main``) sum to ``budget``."""
    return max(1, int(round(budget / (share * warm + (1.0 - share) * main))))


def plan_cells(steps: int, img_size: int, patch_size: int, flops_of: Callable = flops_model) -> list[Cell]:
    """Every cell, in run order: seed 0 at equal steps (MAE, then AMT box first), then the cells at
    equal FLOPs, then the second seeds. A FLOPs-equal cell that would run the same steps as its
    steps-equal twin is left out (it is that run)."""
    models = {v: flops_of(v, img_size, patch_size) for v in VARIANTS}
    budget = steps * models["mae"][0]  # MAE's FLOPs per image x steps (the batch is the same everywhere)
    first, flops, second = [], [], []
    for v in VARIANTS:
        for seed in SEEDS.get(v, (0,)):
            n = flops_equal_steps(budget, *models[v])
            (first if seed == 0 else second).append(Cell(v, seed, "steps", steps))
            if n != steps:
                (flops if seed == 0 else second).append(Cell(v, seed, "flops", n))
    return first + flops + second


def cell_config(cell: Cell, args) -> dict:
    """What a cached result must match to be reused."""
    return {"sets": cell.sets(), "steps": cell.steps, "seed": cell.seed, "batch": args.batch, "base_lr": args.base_lr,
            "data": Path(args.data).name, "subsets": {k: MODE[k] for k in ("pretrain_images", "probe_train", "probe_val", "cka_images")}}


def machine() -> dict:
    return {"host_cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def run_cell(cell: Cell, args, data: dict, work: Path) -> dict:
    """Pretrain and evaluate one cell (quality.py's functions); its metrics and costs."""
    a = copy.copy(args)
    a.seed = cell.seed
    out = work / cell.name
    t0 = time.perf_counter()
    s = quality.pretrain(a, cell.method, data, cell.steps, out / "run", VARIANTS[cell.variant][1],
                         timeout=args.cell_timeout)
    ev = quality.evaluate(str(out / "run"), data, MODE, out / "eval", a)
    return {"probe_top1": ev["probe"]["probe_top1"], "knn_top1": ev["knn"]["knn_top1"],
            "cka_at_0.5": quality.cka_mean(ev["cka"]), "cka_at_0.5_last_block": ev["cka"][0.5][-1],
            "final_loss": s.get("final_loss"), "pretrain_wall_s": s["wall_s"], "pretrain_img_per_s": s.get("img_per_s"),
            "refresh_s": sum(r["seconds"] for r in s.get("amt_refreshes", [])) or None,
            "cell_wall_s": time.perf_counter() - t0}


def load_cached(path: Path, config: dict) -> dict | None:
    """The cached result at ``path`` when it was made with ``config``; None when absent or stale."""
    if not path.is_file():
        return None
    try:
        got = json.loads(path.read_text())
    except json.JSONDecodeError:
        log(f"{path}: not valid JSON, running the cell again")
        return None
    if got.get("config") != config:
        log(f"{path}: made with another config, running the cell again")
        return None
    return got


def sweep(cells: list[Cell], args, results_dir: Path, runner: Callable[[Cell], dict], stop_at: float | None = None) -> dict:
    """Run every cell not cached in ``results_dir`` (one JSON per cell, written when it finishes);
    returns {cell name: result} of every cell done. ``stop_at``: a time.time() after which no new
    cell starts."""
    results_dir.mkdir(parents=True, exist_ok=True)
    done = {}
    for cell in cells:
        path = results_dir / f"{cell.name}.json"
        cfg = cell_config(cell, args)
        cached = load_cached(path, cfg)
        if cached is not None:
            done[cell.name] = cached
            continue
        if stop_at is not None and time.time() >= stop_at:
            log(f"stop time reached: {cell.name} and later cells not started")
            break
        log(f"{cell.name}: {cell.steps} steps")
        metrics = runner(cell)
        res = {"cell": cell.name, "variant": cell.variant, "compare": cell.compare, "seed": cell.seed, "steps": cell.steps,
               "train_gflop_per_img": args.cell_flops.get(cell.name),
               # the run's training FLOPs: steps x batch x mean FLOPs per image and step
               "train_pflop": cell.steps * args.batch * args.cell_flops[cell.name] / 1e6 if cell.name in args.cell_flops else None,
               "config": cfg, "machine": machine(),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(path)  # a cell is either whole on disk or absent
        done[cell.name] = res
        log(f"{cell.name}: {json.dumps(metrics)}")
    return done


def _pct(got: list[dict], key: str) -> str:
    """Mean in percent over seeds, each seed's value beside it when there are several."""
    vals = [g[key] * 100 for g in got]
    if not vals:
        return "-"
    mean = f"{sum(vals) / len(vals):.1f}"
    return mean if len(vals) == 1 else f"{mean} ({' / '.join(f'{x:.1f}' for x in vals)})"


def table(cells: list[Cell], done: dict) -> str:
    """Markdown: one row per variant and comparison, seeds as mean (and each seed's value)."""
    head = "| variant | compare | steps | seeds | probe top-1 | kNN top-1 | CKA@0.5 | pretrain s |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    rows: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        rows.setdefault((c.variant, c.compare), []).append(c)
    for (v, cmp), cs in rows.items():
        got = [done[c.name]["metrics"] for c in cs if c.name in done]

        cka = "-" if not got else f"{sum(g['cka_at_0.5'] for g in got) / len(got):.3f}"
        wall = "-" if not got else f"{sum(g['pretrain_wall_s'] for g in got) / len(got):.0f}"
        lines.append(f"| {v} | {cmp} | {cs[0].steps} | {len(got)}/{len(cs)} | {_pct(got, 'probe_top1')} | {_pct(got, 'knn_top1')} | {cka} | {wall} |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"[ablate] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/), or a .tar.gz of one")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"the budget: optimizer steps per cell at equal steps "
                   f"(and MAE's FLOPs at that many steps for the equal-FLOPs cells); default {DEFAULT_STEPS}")
    p.add_argument("--budget", type=float, default=None,
                   help="CPU-hours for the whole sweep instead of --steps: steps from a calibration (see --calib-step-s)")
    p.add_argument("--calib-step-s", type=float, default=None,
                   help="with --budget: seconds per MAE step measured on this machine (python -m benchmarks.quality --steps 40)")
    p.add_argument("--calib-eval-s", type=float, default=120.0, help="with --budget: seconds of evaluation per cell")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds to run (MAE and AMT box have 0 and 1, the others 0)")
    p.add_argument("--compare", default=",".join(COMPARES), help="steps, flops or both")
    p.add_argument("--results", default=str(RESULTS), help="folder of the cached cells (committed); steps<N>/ under it")
    p.add_argument("--out", default="runs/ablate", help="working directory (runs, extracted data; not committed)")
    p.add_argument("--base-lr", type=float, default=1.5e-3)
    p.add_argument("--stop-at", default=None, help="UTC HH:MM after which no new cell starts (running ones finish)")
    p.add_argument("--list", action="store_true", help="print the cells and their steps, run nothing")
    p.add_argument("--table-only", action="store_true", help="print the table of the cached cells, run nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"--variants: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(VARIANTS)}")
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    if not compare or any(c not in COMPARES for c in compare):
        p.error(f"--compare {args.compare!r}: allowed: {', '.join(COMPARES)}")
    try:
        args.seeds = {int(x) for x in args.seeds.split(",") if x.strip()}
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if args.steps <= 0:
        p.error("--steps must be > 0")
    if args.budget is not None:
        if args.budget <= 0 or not args.calib_step_s or args.calib_step_s <= 0:
            p.error("--budget needs a positive value and --calib-step-s > 0 (MAE's measured seconds per step)")
    args.variants, args.compare = variants, compare
    args.batch, args.pool = MODE["batch"], "mean"
    args.cell_timeout = 6 * 3600
    return args


def steps_for_budget(hours: float, costs: list[float], step_s: float, eval_s: float) -> int:
    """Steps per cell so that the sweep fits ``hours``: each cell costs ``eval_s`` plus its
    ``costs`` entry (MAE steps per budget step) x the budget x ``step_s``."""
    spare = hours * 3600 - eval_s * len(costs)
    if spare <= 0:
        raise ValueError(f"{hours} h does not cover the evaluations alone ({len(costs)} x {eval_s:.0f} s)")
    return max(1, int(spare / (step_s * sum(costs))))


def data_shape(src: Path, work: Path) -> dict:
    """The model's input and patch size from the images, without relinking the subsets (which a
    sweep running in the same --out reads): for --list and --table-only."""
    base = extract(src, work / "extracted") if src.is_file() else find_root(src)
    size, patch = model_size([f for fs in listing(base / "train").values() for f in fs[:8]], None, None)
    return {"img_size": size, "patch_size": patch}


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.out).resolve()
    if args.list or args.table_only:
        data = data_shape(Path(args.data), root / "data")
    else:
        data = prepare(Path(args.data), root / "data", MODE, None, None, seed=0)  # the same subsets for every cell and seed
    models = {v: flops_model(v, data["img_size"], data["patch_size"]) for v in VARIANTS}
    mean_flops = {v: share * w + (1 - share) * m for v, (w, m, share) in models.items()}
    if args.budget is not None:
        # a cell's time ~ its steps x MAE's measured step time x its FLOPs per step over MAE's
        # (a FLOPs-equal cell: MAE's time); AMT's refresh and per-step overheads are not in it
        unit = plan_cells(1000, data["img_size"], data["patch_size"], lambda v, i, p: models[v])
        costs = [mean_flops[c.variant] / mean_flops["mae"] if c.compare == "steps" else 1.0 for c in unit]
        args.steps = steps_for_budget(args.budget, costs, args.calib_step_s, args.calib_eval_s)
        log(f"budget {args.budget} CPU-h at {args.calib_step_s} s per MAE step: {args.steps} steps per cell")
    cells = [c for c in plan_cells(args.steps, data["img_size"], data["patch_size"], lambda v, i, p: models[v])
             if c.variant in args.variants and c.compare in args.compare and c.seed in args.seeds]
    args.cell_flops = {c.name: mean_flops[c.variant] / 1e9 for c in cells}  # GFLOP per image and step, averaged over the run
    if args.list:
        for c in cells:
            print(f"{c.name:<32} {c.steps:>6} steps  {args.cell_flops[c.name]:.4f} GFLOP/img/step")
        return 0
    results_dir = Path(args.results) / f"steps{args.steps}"
    stop_at = None
    if args.stop_at:
        hh, mm = (int(x) for x in args.stop_at.split(":"))
        now = time.gmtime()
        stop_at = time.mktime(time.struct_time((now.tm_year, now.tm_mon, now.tm_mday, hh, mm, 0, 0, 0, 0))) - time.timezone
    if args.table_only:
        found = {c.name: load_cached(results_dir / f"{c.name}.json", cell_config(c, args)) for c in cells}
        done = {k: v for k, v in found.items() if v is not None}
    else:
        done = sweep(cells, args, results_dir, lambda c: run_cell(c, args, data, root), stop_at)
    print(table(cells, done))
    print(f"\n{len(done)}/{len(cells)} cells in {results_dir}")
    if args.json:
        print(json.dumps(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
