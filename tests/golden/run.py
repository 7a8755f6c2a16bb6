"""Run under ``deepspeed --num_gpus 2 tests/golden/run.py <stage> <out.json> [key=value ...]``: every
golden case for one ZeRO stage, one after another in the same process group (one launch, not one per
case). Trailing ``key=value`` arguments are ``--set`` overrides applied to every case after its own
(e.g. ``model.grad_ckpt=1``: the same runs with activation checkpointing, compared to the same curves).

Rank 0 writes {case: [loss of step 1, ..., loss of step 20]} to ``out.json``.
"""
from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for mimscale and tests

from mimscale.config import load_config  # noqa: E402
from mimscale.ds_config import load_ds_config  # noqa: E402
from mimscale.runtime import dist  # noqa: E402
from mimscale.trainer import Trainer  # noqa: E402
from tests.golden.cases import CASES, COMMON, CONFIGS, ds_config  # noqa: E402


def run_case(name: str, stage: int, work: Path, sets: list[str] = ()) -> list[float]:
    preset, extra = CASES[name]
    work.mkdir(parents=True, exist_ok=True)
    ds_path = str(ds_config(stage, work / f"{name}-zero{stage}-rank{dist.rank()}.json"))  # one writer per file
    cfg = load_config(CONFIGS / preset, [*COMMON, *extra, *sets, f"output_dir={work / name}"])
    eng = load_ds_config(ds_path, dist.world_size(), cfg.train.global_batch, cfg.train.micro_batch, clip_grad=cfg.train.clip_grad)
    args = Namespace(deepspeed_config=ds_path, deepspeed=True, config=str(CONFIGS / preset), local_rank=dist.local_rank())
    summary = Trainer(cfg, args, eng, ds_path).fit()
    return [e["loss"] for e in summary["loss_history"]]


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    stage, out, sets = int(argv[0]), Path(argv[1]), argv[2:]
    work = out.parent / f"golden-zero{stage}"
    dist.ensure_env()
    dist.init_distributed()
    curves = {name: run_case(name, stage, work, sets) for name in CASES}
    if dist.is_rank0():
        out.write_text(json.dumps(curves, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    main()
