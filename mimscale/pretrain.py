"""Pretraining entry point.

    deepspeed [--num_gpus N] --module mimscale.pretrain --deepspeed_config gpu_bf16_zero1 \
        --config mae_vit_base [--set key.sub=value ...]

(``deepspeed mimscale/pretrain.py ...`` in a checkout is the same.) ``--config`` and
``--deepspeed_config`` take a file, or the name of one that ships in the package (``mimscale
presets`` lists them). Also runs as ``python -m mimscale.pretrain ...`` (a world of one) for
debugging; ``--print-config`` and ``--dry-run`` show what a launch would do without launching.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `deepspeed mimscale/pretrain.py` puts this folder first on sys.path, where module names like
# `config` or `data` could shadow other packages: import mimscale only as a package.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
if str(_here.parent) not in sys.path:
    sys.path.insert(0, str(_here.parent))

# No THP_MEM_ALLOC_ENABLE default: torch's huge-page CPU allocations sped up ZeRO-1's optimizer
# step on CPU (0.25-0.3 s against 0.4-0.9 s for a ViT-B) but slowed every forward + backward by
# 20-30% (4.6-4.8 s against 3.6-3.7 s, batch 16, 2 threads): a loss per step. Export it to opt in.
import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from typing import Optional  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed's reduce_scatter_tensor on every ZeRO step, and each call
# warns that it is deprecated: one line per step per rank, with nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)

# DeepSpeed's logger writes to the sys.stdout of its first import: imported with stdout pointing at
# stderr, stdout carries only what mimscale prints there (--print-config's YAML, --dry-run's report,
# the final summary), and DeepSpeed's lines go to stderr beside mimscale's own log.
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: E402
import yaml  # noqa: E402

from mimscale import config_keys, preview, shipped  # noqa: E402
from mimscale.checkpoint import formats  # noqa: E402
from mimscale.checkpoint.checkpointer import CONFIG, MARKER, check_resume, read_marker  # noqa: E402
from mimscale.checkpoint.reshard import check_elastic, convert, converted  # noqa: E402
from mimscale.config import Config, changes_on_resume, check_paths, load_config  # noqa: E402
from mimscale.ds_config import load_ds_config  # noqa: E402
from mimscale.errors import EXIT_CONFIG, EXIT_DIVERGED, EXIT_DONE, EXIT_STOPPED, ConfigError, TrainingDiverged  # noqa: E402
from mimscale.runtime import dist  # noqa: E402
from mimscale.runtime.failfast import FailFast  # noqa: E402
from mimscale.runtime.output_dir import OutputDirLock, check_not_foreign  # noqa: E402
from mimscale.runtime.preempt import StopRequest  # noqa: E402
from mimscale.trainer import Trainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mimscale.pretrain", description="mimscale MAE-style pretraining under DeepSpeed",
                                epilog=config_keys.help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML preset: a file, or a shipped preset's name (mae_vit_base; mimscale presets)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.steps=100 data.source=synthetic (repeatable)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    preview.add_arguments(p)
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("--deepspeed_config is required (a file, or a shipped name such as gpu_bf16_zero1; mimscale presets lists them)")
    if args.world_size is not None and args.world_size < 1:
        p.error(f"argument --world-size: must be a positive integer, got {args.world_size}")
    args.deepspeed = True
    return args


def resolve_files(args) -> tuple[Path, Path]:
    """(preset, ds_config) as files: a shipped name becomes its path in the package, written back
    into ``args`` before DeepSpeed or the tracker read them. A ConfigError lists the shipped names."""
    config, ds = shipped.resolve_preset(args.config), shipped.resolve_ds_config(args.deepspeed_config)
    args.config, args.deepspeed_config = str(config), str(ds)
    return config, ds


def check_format(tag: Path) -> None:
    """A checkpoint written by a newer mimscale (a newer format version) is refused before anything is built."""
    try:
        formats.check("checkpoint", read_marker(tag), tag / MARKER)
    except formats.FormatVersionError as e:
        raise ConfigError(f"config key 'resume': {e}") from None


def resume_changes(tag: Path, cfg: Config) -> dict:
    """{key: (old, new)} where this run's config differs from the one ``tag`` was trained with,
    outside the changes a resume may make (config.RESUMABLE_CHANGES); a ConfigError naming each
    unless ``resume_changes=allow``."""
    saved = tag / CONFIG
    if not saved.is_file():  # tags written before checkpoints carried their config
        return {}
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved} cannot be read ({e}); resume from another checkpoint with --set resume=<tag>") from None
    changes = changes_on_resume(old, cfg)
    if changes and cfg.resume_changes != "allow":
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ConfigError(f"resuming {tag} with a different config ({listed}); restore those values, choose a new "
                          "output_dir, or accept the changes with --set resume_changes=allow")
    return changes


def main(argv=None) -> int:
    stop = StopRequest()
    stop.install()  # a preemption signal during start-up is honoured at the first step
    args = parse_args(argv)
    dist.ensure_env()
    lock = None
    try:  # every config problem surfaces here, before any process group or model exists
        config_path, ds_path = resolve_files(args)
        cfg = load_config(config_path, args.overrides)
        if args.print_config or args.dry_run:
            return inspect(cfg, args, config_path, ds_path)
        eng = load_ds_config(ds_path, dist.world_size(), cfg.train.global_batch, cfg.train.micro_batch,
                             clip_grad=cfg.train.clip_grad)
        check_paths(cfg)
        if dist.is_rank0():  # one job per output_dir; the other ranks recognise their own job's lock
            lock = OutputDirLock(cfg.output_dir)
            lock.acquire()
        else:
            check_not_foreign(cfg.output_dir)
        resume_from = check_resume(cfg.resume, cfg.output_dir)  # resolved once, here
        if resume_from:
            check_format(resume_from)
        changes = resume_changes(resume_from, cfg) if resume_from else {}
        elastic_note = check_elastic(resume_from, dist.world_size(), eng.zero_stage, cfg.train.global_batch is not None) if resume_from else None
    except ConfigError as e:
        if lock is not None:
            lock.release()
        print(f"mimscale: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return train(cfg, args, eng, stop, resume_from, changes, elastic_note)
    finally:
        if lock is not None:
            lock.release()


def inspect(cfg: Config, args, config_path: Path, ds_path: Path) -> int:
    """--print-config / --dry-run: what the launch would do, for --world-size ranks (default: this
    launch's), on stdout; nothing is built or written. A ConfigError propagates (exit 2)."""
    world = args.world_size or dist.world_size()
    eng = load_ds_config(ds_path, world, cfg.train.global_batch, cfg.train.micro_batch, clip_grad=cfg.train.clip_grad)
    if not dist.is_rank0():  # under a launcher: one copy of the text
        return EXIT_DONE
    if args.print_config:
        print(preview.print_config(cfg, eng, world, config_path, ds_path, args.overrides))
    if args.dry_run:
        print(preview.dry_run(cfg, eng, world, config_path, ds_path, args.overrides, resume_changes))
    return EXIT_DONE


def leave_group(watch) -> None:
    """Every rank: a barrier, then the failure watch stops, then the group goes: a finished run
    never looks like a lost rank to the watch."""
    dist.barrier()
    if watch is not None:
        watch.stop()
    dist.shutdown()


def universal_for(resume_from: Path, eng) -> Path:
    """Every rank: the tag converted for this world size / ZeRO stage (rank 0 converts, once; the
    others wait), and the engine told to load it the universal way."""
    if dist.is_rank0():
        convert(resume_from)
    dist.barrier()
    universal = converted(resume_from)
    if universal is None:
        raise RuntimeError(f"{resume_from}: the universal checkpoint conversion did not complete")
    eng.raw = {**eng.raw, "checkpoint": {**eng.raw.get("checkpoint", {}), "load_universal": True}}
    return universal


def train(cfg: Config, args, eng, stop: StopRequest, resume_from, changes: dict, elastic_note: Optional[str] = None) -> int:
    dist.init_distributed(cfg.dist.timeout_minutes)
    watch = FailFast.start()  # a rank that raises or dies ends every rank within a minute
    universal = None
    if elastic_note:
        dist.log0(elastic_note)
        universal = universal_for(resume_from, eng)
    if changes:
        dist.log0("[mimscale] resuming with config changes (resume_changes=allow): "
                  + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    trainer = None
    try:
        trainer = Trainer(cfg, args, eng, args.deepspeed_config, stop_request=stop, resume_from=resume_from,
                          resume_changes=changes, universal=universal)
        summary = trainer.fit()
    except TrainingDiverged as e:  # every rank sees it at the same log step (the packed all-reduce)
        dist.log0(f"mimscale: {e}")
        trainer.finish_saves()  # a background save from before the divergence: its marker, not lost
        trainer.tracker.end("FAILED")
        leave_group(watch)
        return EXIT_DIVERGED
    except ConfigError as e:
        # Found once the data is open (a truncated .beton, a dataset changed under a resumed run):
        # the same on every rank, which all read the same files and checkpoint, so all stop here.
        print(f"mimscale: configuration error: {e}", file=sys.stderr)
        if trainer is not None:
            trainer.finish_saves()
            trainer.tracker.end("FAILED")
        leave_group(watch)
        return EXIT_CONFIG
    except BaseException as e:
        if watch is not None:
            watch.report(e)
        if trainer is not None:
            trainer.tracker.end("FAILED")  # not left RUNNING in MLflow
        raise
    leave_group(watch)  # every rank leaves every collective before rank 0's export and upload
    trainer.close()
    if dist.is_rank0():
        short = {k: v for k, v in summary.items() if k != "loss_history"}
        print(json.dumps(short, indent=2))
        print(f"summary: {Path(cfg.output_dir) / 'summary.json'}")
        if summary.get("mlflow_tracking_uri"):
            print(f"mlflow: {summary['mlflow_tracking_uri']} (run {summary['mlflow_run_id']}); "
                  f"browse with: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}")
    if trainer.stopped_early:
        # Every rank says so (not only rank 0): any node's launcher and entrypoint then report
        # "run again to resume" without reading summary.json. The launcher tears the other ranks
        # down on the first non-zero status; they are past every collective and their SIGTERM
        # handler only sets a flag, so they finish as they would have.
        dist.log0(f"[mimscale] stopped early at step {trainer.state.step} of {trainer.total_steps}: exit {EXIT_STOPPED}, run again to resume")
        return EXIT_STOPPED
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
