"""What a checkpoint save costs the training loop, blocking vs in the background.

    python -m benchmarks.ckpt_background --preset mae_vit_large --gpus 2 --steps 12 --ckpt-every 4 [--json]

Runs the same short pretraining twice under the real launcher (CPU ranks: cpu_fp32_zero1, tiny
images so a step is short and the save, whose size depends only on the model, dominates), with
``train.ckpt_background=false`` then ``true``, a checkpoint every ``--ckpt-every`` steps, and
reads the run's metrics.jsonl (one line per step): ``ckpt_s`` is the time the loop stood still in
``save()`` (blocking: the whole write; background: the staging copy and the wait for a previous
save still writing), ``step_s`` the steps' own time, ``wall_s`` the whole loop's. Steps right after
a background save share the cores with its writer: their mean is reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(mode: bool, args, work: Path) -> dict:
    out = work / f"background-{str(mode).lower()}"
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32_zero1.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=args.micro, gradient_accumulation_steps=1)
    ds_path = work / "ds.json"
    ds_path.write_text(json.dumps(ds))
    sets = [f"train.steps={args.steps}", "train.warmup_steps=1", "train.log_every=1", f"train.ckpt_every={args.ckpt_every}",
            "train.keep_checkpoints=1", f"train.global_batch={args.micro * args.gpus}", f"train.ckpt_background={str(mode).lower()}",
            f"model.img_size={args.img_size}", "data.source=synthetic", "data.synthetic_count=512", f"data.synthetic_size={args.img_size}",
            "data.num_workers=1", "tracking.enabled=false", "tracking.mask_grid_every=0", "tracking.cka_every_epochs=0",
            "resume=never", f"output_dir={out}"]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.gpus), "mimscale/pretrain.py",
           "--deepspeed_config", str(ds_path), "--config", args.preset, "--set", *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"the {'background' if mode else 'blocking'} run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return {"mode": "background" if mode else "blocking", **summarize(out, args.ckpt_every), "launch_wall_s": wall}


def summarize(out: Path, ckpt_every: int) -> dict:
    """The stall per save, plain and after-save step times and the tag size from a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step_s"' in x]
    by_step = {e["step"]: e for e in lines}
    saves = [s for s in by_step if s % ckpt_every == 0]
    # a save's stall is reported on the next log line (the save runs after its step's line)
    stalls = [by_step[s + 1]["time/ckpt_s"] for s in saves if s + 1 in by_step]
    after = [by_step[s + 1]["step_s"] for s in saves if s + 1 in by_step]
    plain = [e["step_s"] for s, e in by_step.items() if s > 1 and s - 1 not in saves]
    size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    return {"save_stall_s": sum(stalls) / max(len(stalls), 1), "step_s": sum(plain) / max(len(plain), 1),
            "step_after_save_s": sum(after) / max(len(after), 1), "saves": len(saves), "tag_gib": size / 2**30}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mae_vit_large")
    p.add_argument("--gpus", type=int, default=2, help="CPU ranks (the launcher's --num_gpus)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not Path(args.preset).is_file():
        args.preset = str(REPO / "mimscale" / "configs" / f"{args.preset}.yaml")
    with tempfile.TemporaryDirectory(prefix="ckpt-bg-") as work:
        rows = [run(mode, args, Path(work)) for mode in (False, True)]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("| save | loop stalled per save (s) | step (s) | step right after a save (s) | tag (GiB) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['save_stall_s']:.2f} | {r['step_s']:.2f} | {r['step_after_save_s']:.2f} | {r['tag_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
