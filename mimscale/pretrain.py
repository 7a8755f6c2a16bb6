"""Pretraining entry point.

    deepspeed [--num_gpus N] mimscale/pretrain.py --deepspeed_config ds_configs/X.json \
        --config mimscale/configs/Y.yaml [--set key.sub=value ...]

Also runs as ``python mimscale/pretrain.py ...`` (a world of one) for debugging.
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

import os  # noqa: E402

# Transparent huge pages for torch's CPU allocations of 2 MB and more: ZeRO's full-size flat
# buffers are re-allocated every step, and with 4 KB pages the page faults cost more than the
# optimizer update on CPU. Read once by torch's allocator, so set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed's reduce_scatter_tensor on every ZeRO step, and each call
# warns that it is deprecated: one line per step per rank, with nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)

import deepspeed  # noqa: E402

from mimscale import dist  # noqa: E402
from mimscale.checkpoint import check_resume  # noqa: E402
from mimscale.config import check_paths, load_config  # noqa: E402
from mimscale.ds_config import load_ds_config  # noqa: E402
from mimscale.engine import Trainer  # noqa: E402
from mimscale.errors import ConfigError, TrainingDiverged  # noqa: E402
from mimscale.preempt import StopRequest  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="mimscale MAE-style pretraining under DeepSpeed")
    p.add_argument("--config", required=True, help="YAML preset (mimscale/configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("--deepspeed_config is required (ds_configs/*.json)")
    args.deepspeed = True
    return args


def main(argv=None) -> int:
    stop = StopRequest()
    stop.install()  # a preemption signal during start-up is honoured at the first step
    args = parse_args(argv)
    dist.ensure_env()
    try:  # every config problem surfaces here, before any process group or model exists
        cfg = load_config(args.config, args.overrides)
        eng = load_ds_config(args.deepspeed_config, dist.world_size())
        check_paths(cfg)
        resume_from = check_resume(cfg.resume, cfg.output_dir, dist.world_size())  # resolved once, here
    except ConfigError as e:
        print(f"mimscale: configuration error: {e}", file=sys.stderr)
        return 2

    dist.init_distributed()
    trainer = Trainer(cfg, args, eng, args.deepspeed_config, stop_request=stop, resume_from=resume_from)
    try:
        summary = trainer.fit()
    except TrainingDiverged as e:
        dist.log0(f"mimscale: {e}")
        trainer.tracker.end("FAILED")
        dist.shutdown()
        return 3
    except BaseException:
        trainer.tracker.end("FAILED")  # not left RUNNING in MLflow
        raise
    if dist.is_rank0():
        short = {k: v for k, v in summary.items() if k != "loss_history"}
        print(json.dumps(short, indent=2))
        print(f"summary: {Path(cfg.output_dir) / 'summary.json'}")
        if summary.get("mlflow_tracking_uri"):
            print(f"mlflow: {summary['mlflow_tracking_uri']} (run {summary['mlflow_run_id']}); "
                  f"browse with: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}")
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
