"""Throughput benchmarks (print numbers and JSON; never asserted in tests).

    python -m mimscale.bench step --method mae|amt|automae [--extractor online|ema|frozen|stored] --model vit_base --batch 16 --steps 3 [--vs-plain] --json
    python -m mimscale.bench loader --source pil|folder|wds|ffcv --path <data> [--decode cpu|nvjpeg] --workers 2 --batch 64 --batches 20 --json
    python -m mimscale.bench convert --model vit_base|vit_large [--zero 1|2|3] [--no-convert: the save alone] --json
    python -m mimscale.bench decode --path <folder of JPEGs> [--images 1000] --json

``loader``: loader.py; ``decode`` (where a loader's time goes): decode.py; ``convert``: convert.py.

``step`` (step.py) builds the same Trainer and DeepSpeed engine as pretrain.py (on
one rank, or on every rank under torchrun), takes one synthetic batch onto the device (or reads
the run's loader: ``--data``), and times full training steps (forward, backward, optimizer) after
warm-up ones; ``--vs-plain`` times the plain-torch reference interleaved with them. MFU =
analytic FLOPs per image x img/s / peak FLOP/s of the device (a table for GPUs, a timed fp32
matmul on CPUs). ``python -m benchmarks.gpu`` runs the matrix of step benches a GPU node needs.
"""
from __future__ import annotations

import argparse
import json
import sys

from mimscale.bench.convert import add_convert_parser, bench_convert
from mimscale.bench.decode import add_decode_parser, bench_decode
from mimscale.bench.loader import add_parser, bench_loader
from mimscale.bench.step import add_step_parser, bench_step
from mimscale.errors import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimscale.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    add_step_parser(sub)
    add_convert_parser(sub)
    add_parser(sub)
    add_decode_parser(sub)
    args = p.parse_args(argv)
    try:
        result = {"step": bench_step, "convert": bench_convert, "loader": bench_loader, "decode": bench_decode}[args.what](args)
    except ConfigError as e:
        print(f"mimscale.bench: configuration error: {e}", file=sys.stderr)
        return 2
    if result is None:  # not rank 0 of a multi-rank step bench
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0
