"""Resume on another world size or ZeRO stage, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds each rank's flat partition of the fp32 weights and Adam moments, laid out
for the world size and stage that wrote it. When a resume finds a checkpoint written by another
world size or stage, rank 0 converts it once with DeepSpeed's own converter
(``deepspeed.checkpoint.ds_to_universal``: one folder per parameter with its fp32 value and
moments) into ``<tag>/universal``, and every rank loads that with the engine's universal loading
(``"checkpoint": {"load_universal": true}``). Weights, Adam moments and step, the LR scheduler and
mimscale's client state (train counters, AMT's refresh generation, tracking run) carry over; the
model holds AutoMAE's generator/discriminator and every EMA copy, so they do too. What was
per rank starts fresh, with a message: RNG streams (masks do not use them: masking/noise.py keys
them by step), WebDataset cursors (new streams), the EMA's fp32 shadow (restarted from the EMA
weights). The data position carries over by samples seen.

The conversion is written to ``universal.tmp`` and renamed when whole, so a crash mid-way is
redone on the next start, and a later resume on the same new layout reuses it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mimscale.checkpoint import safe_load
from mimscale.checkpoint.checkpointer import PARAM_NAMES_KEY, fsync_path, read_marker
from mimscale.errors import ConfigError
from mimscale.runtime import dist

UNIVERSAL = "universal"
DONE = "UNIVERSAL_COMPLETE"


@dataclass
class Layout:
    world_size: int
    zero_stage: Optional[int]  # None: a tag written before markers recorded it (taken as unchanged)

    def describe(self) -> str:
        stage = "ZeRO stage ?" if self.zero_stage is None else f"ZeRO-{self.zero_stage}"
        return f"{self.world_size} ranks, {stage}"


def saved_layout(tag_dir: Path) -> Layout:
    marker = read_marker(tag_dir)
    return Layout(int(marker.get("world_size", 0)) or 0, marker.get("zero_stage"))


def needs_conversion(tag_dir: Path, world_size: int, zero_stage: int) -> bool:
    saved = saved_layout(tag_dir)
    return (saved.world_size not in (0, world_size)) or (saved.zero_stage is not None and saved.zero_stage != zero_stage)


def check_elastic(tag_dir: Path, world_size: int, zero_stage: int, global_batch_fixed: bool) -> Optional[str]:
    """Before anything is built: a ConfigError when a resume on another world size would change
    the batch (no train.global_batch); else the message to print (None when nothing changes)."""
    if not needs_conversion(tag_dir, world_size, zero_stage):
        return None
    saved = saved_layout(tag_dir)
    if zero_stage == 0:  # DeepSpeed loads universal checkpoints into ZeRO optimizers only
        raise ConfigError(f"checkpoint {tag_dir} was written by {saved.describe()}; a ZeRO stage 0 ds_config resumes only "
                          "its own world size and stage: resume with a ZeRO-1 ds_config (ds_configs/gpu_bf16_zero1.json, "
                          "cpu_fp32_zero1.json), which reads it through DeepSpeed's universal checkpoint on any world size")
    if saved.world_size != world_size and not global_batch_fixed:
        raise ConfigError(f"checkpoint {tag_dir} was written by {saved.world_size} ranks and this run has {world_size}; without "
                          "train.global_batch the batch would change with the world size: set train.global_batch to the run's "
                          "global batch (its summary.json says it) to resume on another world size")
    return (f"[mimscale] {tag_dir.name} was written by {saved.describe()}; this run has {world_size} ranks, ZeRO-{zero_stage}: "
            f"resuming through DeepSpeed's universal checkpoint ({tag_dir / UNIVERSAL})")


def converted(tag_dir: Path) -> Optional[Path]:
    out = tag_dir / UNIVERSAL
    return out if (out / DONE).is_file() else None


def convert(tag_dir: Path, workers: int = 4) -> Path:
    """``<tag>/universal`` (converted now unless a whole one is there). Rank 0 only: the others
    wait at a barrier. Our own checkpoint, unpickled weights-only as DeepSpeed's loads are."""
    done = converted(tag_dir)
    if done is not None:
        return done
    out, tmp = tag_dir / UNIVERSAL, tag_dir / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    # A process of its own: the converter forks worker processes, and forking a trainer (its
    # heartbeat, data-stall and OpenMP threads) leaves the children deadlocked on inherited locks.
    r = subprocess.run([sys.executable, "-m", "mimscale.checkpoint.reshard", str(tag_dir), str(tmp), "--workers", str(workers)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[2])
    if r.returncode != 0:
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed (status {r.returncode}):\n{r.stdout[-4000:]}")
    _ready_for_any_stage(tmp)
    seconds = time.time() - t
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    (tmp / DONE).write_text(json.dumps({"seconds": seconds, "bytes": size, "source": tag_dir.name}))
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    tmp.rename(out)
    fsync_path(tag_dir)
    dist.log0(f"[mimscale] universal checkpoint written in {seconds:.1f} s ({size / 2**20:.1f} MiB): {out}")
    return out


def _ready_for_any_stage(folder: Path) -> None:
    """Two pieces of metadata a ZeRO-3 engine's universal loading reads that DeepSpeed 0.19.8's
    converter writes only from ZeRO-3 checkpoints, added when it left them out (a ZeRO-1/2 source).
    No optimizer state is converted here: the per-parameter fp32 values and moments are the
    converter's, unchanged.

    1. ZeRO-3 opens ``zero_pp_rank_0_mp_rank_00_model_states.pt`` (ZeRO-1/2 write
       ``mp_rank_00_model_states.pt``; same content: module, client state, scheduler).
    2. ZeRO-3 reads the optimizer's step and param groups from ``zero/optimizer_state.pt`` under
       ``optimizer_state_dict``; the ZeRO-1/2 path writes the param groups at the top level and
       the step beside each parameter (``zero/<name>/step.pt``, the same for all)."""
    for f in folder.glob("mp_rank_*_model_states.pt"):
        twin = folder / f"zero_pp_rank_0_{f.name}"
        if not twin.exists():
            shutil.copy2(f, twin)
    opt = folder / "zero" / "optimizer_state.pt"
    state = safe_load.load(opt, extra=safe_load.deepspeed_globals())
    if "optimizer_state_dict" in state:
        return
    steps = [safe_load.load(s) for s in sorted((folder / "zero").glob("*/step.pt"))]
    if not steps or len({float(s) for s in steps}) != 1:
        raise RuntimeError(f"{folder}: expected one optimizer step across parameters, found {sorted({float(s) for s in steps})}")
    step = steps[0]  # a tensor, as torch's Adam keeps it
    state["optimizer_state_dict"] = {"state": {i: {"step": step} for i in range(len(state["param_groups"]))},
                                     "param_groups": state["param_groups"]}
    torch.save(state, opt)


def after_universal_load(engine, universal: Path) -> None:
    """Two corrections after a ZeRO-3 engine loaded a universal checkpoint (DeepSpeed 0.19.8; ZeRO-1/2
    targets load right). Without them the run continues silently wrong (measured: per-step losses
    off by 3e-4 relative after 6 steps on a tiny model, instead of 1e-7):

    1. every param group gets group 0's hyperparameters: mimscale's no-decay group (biases, norms,
       tokens) would decay at 0.05. Each group's own settings are put back from the checkpoint.
    2. every group's state shares ONE ``step`` tensor, which torch's Adam increments in place once
       per group per step, so the bias correction runs ahead. Each group gets its own copy."""
    if int(engine.zero_optimization_stage()) != 3:
        return
    inner = engine.optimizer.optimizer  # the client AdamW over ZeRO-3's flat partitions
    for st in inner.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
    saved = safe_load.load(universal / "zero" / "optimizer_state.pt", extra=safe_load.deepspeed_globals())
    groups = saved.get("param_groups") or saved["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(inner.param_groups):
        raise RuntimeError(f"{universal}: {len(groups)} saved param groups, the optimizer has {len(inner.param_groups)}")
    for group, saved_group in zip(inner.param_groups, groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _from_client_optimizer(tag: Path, out: Path) -> None:
    """A stage-0 checkpoint (no ZeRO optimizer files: the client AdamW's own state dict in
    ``mp_rank_00_model_states.pt``, fp32 weights in its ``module``) written out in the universal
    layout DeepSpeed's converter produces from ZeRO files: ``zero/<param>/{fp32,exp_avg,exp_avg_sq,
    step}.pt`` and ``zero/optimizer_state.pt`` (hyperparameters per group), beside the model states
    file without its optimizer. The parameter names of each group come from the checkpoint
    (checkpoint.PARAM_NAMES_KEY, recorded at save); every tensor's shape is checked against the
    weight of that name."""
    import deepspeed

    states = sorted(tag.glob("mp_rank_*_model_states.pt"))
    if len(states) != 1:
        raise RuntimeError(f"{tag}: expected one mp_rank_*_model_states.pt (stage 0 keeps no tensor parallelism), found {len(states)}")
    sd = safe_load.load(states[0], extra=safe_load.deepspeed_globals())
    names, opt = sd.get(PARAM_NAMES_KEY), sd.get("optimizer")
    if not names or not isinstance(opt, dict) or "state" not in opt:
        raise RuntimeError(f"{tag}: neither ZeRO optimizer files nor a stage-0 optimizer state with parameter names "
                           f"(checkpoints record them since mimscale 0.1.0's stage-0 path); resume it with its own ZeRO stage "
                           "and world size")
    if len(names) != len(opt["param_groups"]):
        raise RuntimeError(f"{tag}: {len(names)} named parameter groups, the optimizer state has {len(opt['param_groups'])}")
    module = sd["module"]
    zero = out / "zero"
    groups = []
    # the universal layout has one step for all parameters (torch's AdamW steps every parameter it
    # holds a gradient for, and the ZeRO loaders expect them equal)
    stepped = [s["step"] for s in opt["state"].values() if "step" in s]
    step = stepped[0] if stepped else torch.tensor(0.0)
    for g, (group, group_names) in enumerate(zip(opt["param_groups"], names)):
        if len(group["params"]) != len(group_names):
            raise RuntimeError(f"{tag}: group {g} has {len(group['params'])} parameters and {len(group_names)} names")
        for index, name in zip(group["params"], group_names):
            weight = module[name].float()
            state = opt["state"].get(index)
            if state is None:  # never got a gradient: Adam's zero moments, at the run's step
                state = {"step": step, "exp_avg": torch.zeros_like(weight), "exp_avg_sq": torch.zeros_like(weight)}
            for key in ("exp_avg", "exp_avg_sq"):
                if state[key].shape != weight.shape:
                    raise RuntimeError(f"{tag}: {name}'s {key} has shape {tuple(state[key].shape)}, the weight {tuple(weight.shape)}")
            folder = zero / name
            folder.mkdir(parents=True)
            torch.save({"param": weight}, folder / "fp32.pt")
            torch.save({"param": state["exp_avg"].float()}, folder / "exp_avg.pt")
            torch.save({"param": state["exp_avg_sq"].float()}, folder / "exp_avg_sq.pt")
            torch.save(torch.as_tensor(state["step"], dtype=torch.float32), folder / "step.pt")
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [g]})
    clip = float((sd.get("ds_config") or {}).get("gradient_clipping", 0.0))
    torch.save({"ds_version": deepspeed.__version__, "clip_grad": clip, "param_groups": groups}, zero / "optimizer_state.pt")
    torch.save({**sd, "optimizer": None}, out / states[0].name)


def _convert_main(argv=None) -> int:
    """``python -m mimscale.checkpoint.reshard <tag> <out> [--workers N]``: DeepSpeed's converter, with every
    unpickling weights-only (our own checkpoint, read as DeepSpeed's loads are in training); a
    stage-0 checkpoint (no ZeRO optimizer files) through _from_client_optimizer."""
    from deepspeed.checkpoint import ds_to_universal

    p = argparse.ArgumentParser(prog="python -m mimscale.checkpoint.reshard", description=_convert_main.__doc__)
    p.add_argument("tag")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=4)
    a = p.parse_args(argv)
    if not any(Path(a.tag).glob("*_optim_states.pt")):
        _from_client_optimizer(Path(a.tag), Path(a.out))
        return 0
    args = argparse.Namespace(input_folder=a.tag, output_folder=a.out, num_extract_workers=a.workers, num_merge_workers=a.workers,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with safe_load.deepspeed_loads():
        ds_to_universal.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(_convert_main())
