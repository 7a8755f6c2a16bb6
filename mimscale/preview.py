"""What a launch would do, without doing it: ``python -m mimscale.pretrain ... --print-config`` and
``--dry-run``.

``--print-config``: the resolved config as YAML (loadable again with ``--config``), then, as YAML
comments, what it derives for the world size: the batch split, the scaled learning rate, steps and
epochs. ``--dry-run``: the same numbers after every check a launch makes before it builds a model
(the data is listed, the resume resolved and compared), plus the memory planner's estimate for the
ds_config's ZeRO stage (mimscale.plan). Neither builds a model, starts a process group or writes
anything: output_dir is only read.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import yaml

from mimscale import plan
from mimscale.checkpoint import formats
from mimscale.checkpoint.checkpointer import MARKER, check_resume, checkpoint_root, complete_tags, read_marker, resolve_resume
from mimscale.checkpoint.reshard import check_elastic
from mimscale.config import Config, check_paths, to_dict
from mimscale.data.streams import build_source
from mimscale.ds_config import EngineSettings
from mimscale.errors import ConfigError
from mimscale.optim import RunLength, run_length
from mimscale.runtime.output_dir import check_not_foreign


def samples(cfg: Config, strict: bool) -> tuple[Optional[int], str]:
    """(samples per epoch, where they come from). The data is listed as the trainer lists it (a
    folder's listing, a WebDataset manifest, an FFCV header; never the images). ``strict``: a
    ConfigError when data.path is not there; else (None, why)."""
    d = cfg.data
    if d.source == "synthetic":
        return d.synthetic_count, f"synthetic: {d.synthetic_count} generated images"
    try:
        check_paths(cfg)
        n = len(build_source(d, cfg.train.seed))
    except (ConfigError, OSError, ValueError) as e:
        if strict:
            raise ConfigError(str(e)) from None
        return None, f"{d.source} {d.path}: not readable here ({e})"
    return n, f"{d.source} {d.path} (split {d.split}): {n} samples"


def derived(cfg: Config, eng: EngineSettings, world: int, n: Optional[int]) -> tuple[Optional[RunLength], list[str]]:
    """(the run's length or None without a sample count, lines saying what the config derives)."""
    t = cfg.train
    lines = [f"world size {world}: global batch {eng.global_batch} = micro batch {eng.micro_batch} x accumulation "
             f"{eng.grad_accum} x {world} ranks" + ("" if t.global_batch else
                                                    " (train.global_batch unset: the ds_config's batch, which grows with the world size)"),
             f"lr {t.base_lr * eng.global_batch / 256:.4g} (base_lr {t.base_lr:g} x {eng.global_batch}/256, then warmup + "
             f"cosine to min_lr {t.min_lr:g})",
             f"engine: ZeRO stage {eng.zero_stage}, {eng.precision}, gradient clipping {eng.clip:g}"]
    if n is None:
        steps = f"{t.steps} steps" if t.steps is not None else f"{t.epochs:g} epochs"
        return None, [*lines, f"{steps}; steps per epoch unknown without the data"]
    length = run_length(t, eng.global_batch, n)
    stop = f"; this invocation stops after step {t.stop_after}" if t.stop_after else ""
    lines.append(f"{length.total_steps} steps = {length.epochs:.4g} epochs of {length.steps_per_epoch} steps "
                 f"({n} samples // {eng.global_batch}); warmup {length.warmup_steps} steps{stop}")
    return length, lines


def print_config(cfg: Config, eng: EngineSettings, world: int, config_path: Path, ds_path: Path, overrides: list[str]) -> str:
    """The resolved YAML and, as comments after it, what it derives (the data listed if it is here)."""
    n, data_note = samples(cfg, strict=False)
    _, lines = derived(cfg, eng, world, n)
    head = [f"# mimscale config: {config_path}" + (f" with --set {' '.join(overrides)}" if overrides else ""),
            f"# deepspeed_config: {ds_path}"]
    tail = ["# derived:", *(f"#   {line}" for line in [f"data: {data_note}", *lines])]
    return "\n".join([*head, yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), *tail])


def memory_line(cfg: Config, eng: EngineSettings, world: int, config_path: Path, ds_path: Path, overrides: list[str]) -> str:
    """The memory planner's per-GPU estimate at this ZeRO stage, grad_ckpt and micro batch."""
    def planned(gpus: int) -> dict:
        argv = ["--config", str(config_path), "--deepspeed_config", str(ds_path), "--gpus", str(gpus),
                "--micro-batch", str(eng.micro_batch), *(a for s in overrides for a in ("--set", s))]
        return plan.build_plan(plan.parse_args(argv))

    # The planner's rows are ZeRO-1..3; ZeRO-0 keeps whole states on every GPU: ZeRO-1's row on one GPU.
    stage = eng.zero_stage or 1
    p = planned(world if eng.zero_stage else 1)
    row = next(r for r in p["rows"] if r["zero_stage"] == stage and r["grad_ckpt"] == cfg.model.grad_ckpt)
    return (f"memory per GPU (mimscale plan's estimate, ZeRO-{eng.zero_stage}, grad_ckpt {cfg.model.grad_ckpt}, micro batch "
            f"{eng.micro_batch}, {p['precision']}): {row['total_gib']:.2f} GiB = model states {row['model_states_gib']:.2f} + buffers "
            f"{row['buffers_gib']:.2f} + activations {row['activations_gib']:.2f} + margin {row['margin_gib']:.2f}; "
            f"at most micro batch {row['max_micro_batch']} in {p['gpu_mem_gib']:g} GiB (mimscale plan --gpu-mem-gib for your GPUs)")


def dry_run(cfg: Config, eng: EngineSettings, world: int, config_path: Path, ds_path: Path, overrides: list[str],
            resume_check) -> str:
    """Every start-up check of a launch, then what it would do (a ConfigError for what would stop
    it). ``resume_check(tag, cfg)``: the launch's own config comparison against a checkpoint."""
    n, data_note = samples(cfg, strict=True)
    _, lines = derived(cfg, eng, world, n)
    out = Path(cfg.output_dir)
    check_not_foreign(out)  # another live job's lock on output_dir (read only: the launch would take the lock)
    if cfg.resume == "never":
        check_resume("never", out)  # refuses an output_dir holding another run's checkpoints; reads only
        tag = None
    else:
        try:
            tag = resolve_resume(cfg.resume, out, repair=False)  # a launch would set damaged tags aside
        except FileNotFoundError as e:
            raise ConfigError(f"config key 'resume': {e}") from None
    if tag is None:
        resume = f"a fresh start in {out}" + (" (created at launch)" if not out.exists() else "")
    else:
        try:
            formats.check("checkpoint", read_marker(tag), tag / MARKER)
        except formats.FormatVersionError as e:
            raise ConfigError(f"config key 'resume': {e}") from None
        resume_check(tag, cfg)
        note = check_elastic(tag, world, eng.zero_stage, cfg.train.global_batch is not None)
        resume = f"resumes from {tag} (step {read_marker(tag)['step']})" + (f"; {note.removeprefix('[mimscale] ')}" if note else "")
    older = complete_tags(checkpoint_root(out))
    if tag is None and older:
        resume += f" ({len(older)} complete checkpoints there)"
    return "\n".join(["mimscale dry run: the config, ds_config, data and resume checks passed; nothing built, nothing written",
                      f"config: {config_path}" + (f" with --set {' '.join(overrides)}" if overrides else ""),
                      f"deepspeed_config: {ds_path}", f"data: {data_note}", *lines, f"output_dir: {resume}",
                      memory_line(cfg, eng, world, config_path, ds_path, overrides)])


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inspect before a launch (no model is built, nothing is written)")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML with the derived batch split, learning rate, steps and epochs; exit 0")
    g.add_argument("--dry-run", action="store_true",
                   help="run every start-up check (config, ds_config, data, resume) and print the batch split, learning rate, "
                        "steps and the memory plan; exit 0 (2 naming the problem)")
    g.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="ranks to derive the batch split for with --print-config/--dry-run (default: the launcher's WORLD_SIZE, else 1)")
