"""One command for a GPU node: the training-step numbers that matter, on whatever GPUs it has.

    python -m benchmarks.gpu [--ffcv /data/imagenet_train.beton] [--json-out gpu_bench.json]
    make bench-gpu FFCV_BETON=/data/imagenet_train.beton

Runs the matrix
    method   mae | amt | automae-stored | automae-online     (ViT-B/16, the presets' recipes)
    zero     1 | 2                                          (ds_configs/gpu_bf16_zeroN.json: bf16)
    compile  off | on                                       (DeepSpeed's engine.compile, inductor)
    data     synthetic | ffcv                               (one batch on the device | the run's FFCV loader)
each case one ``python -m mimscale.bench step`` (under ``torchrun --nproc_per_node <GPUs>`` when
there are several), at the preset micro batch per GPU (the ds_config's 128), and prints one table
and, as its last line, one JSON object: img/s per GPU, MFU against the device's bf16 peak
(mimscale.tracking.peak.GPU_PEAK_BF16; an unknown GPU gets no MFU and says so), data wait %, peak memory.
A case that fails (e.g. out of memory) is a row with its error; the others still run. FFCV cases
need ``--ffcv``: without it they are rows saying so. AMT and AutoMAE-stored first refresh their
attention store over the whole data set (synthetic: a few batches; ffcv: the file), so give a
.beton of a subset (e.g. 10k images) to keep that short; its cost per image is in the JSON.

``--tiny`` runs the same plumbing on a CPU in fp32 at toy sizes (ViT-Tiny, 32 px, batch 2): what
the tests run; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
# name -> the bench step's method options
METHODS = {
    "mae": ["--method", "mae"],
    "amt": ["--method", "amt"],
    "automae-stored": ["--method", "automae", "--extractor", "stored"],
    "automae-online": ["--method", "automae", "--extractor", "online"],
}
ZERO = (1, 2)
COMPILE = ("off", "on")
DATA = ("synthetic", "ffcv")
# --tiny: the model and images of the tests (a 4 x 4 grid of 8 px patches, a one-block decoder)
TINY_SETS = ["model.img_size=32", "model.patch_size=8", "model.decoder_depth=1", "model.decoder_dim=32",
             "model.decoder_heads=2", "data.synthetic_size=40"]


@dataclass
class Case:
    method: str
    zero: int
    compile: bool
    data: str
    result: dict = field(default_factory=dict)
    error: Optional[str] = None
    wall_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.method} zero{self.zero} {'compile' if self.compile else 'eager'} {self.data}"


def parse_list(text: str, allowed, what: str, kind=str) -> list:
    """A comma-separated choice from ``allowed``; a ValueError names the bad item and the choices."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        value = kind(item) if kind is not int or item.isdigit() else item
        if value not in allowed:
            raise ValueError(f"{what} {item!r}: allowed values: {', '.join(map(str, allowed))}")
        out.append(value)
    if not out:
        raise ValueError(f"{what}: give at least one of {', '.join(map(str, allowed))}")
    return out


def matrix(methods: list[str], zeros: list[int], compiles: list[str], datas: list[str]) -> list[Case]:
    return [Case(m, z, c == "on", d) for m in methods for z in zeros for c in compiles for d in datas]


def preset_micro_batch(zero: int) -> int:
    """The micro batch per GPU the presets run at: the GPU ds_config's."""
    return int(json.loads((REPO / "ds_configs" / f"gpu_bf16_zero{zero}.json").read_text())["train_micro_batch_size_per_gpu"])


def case_command(case: Case, args, nproc: int) -> list[str]:
    """The bench step command line of one case."""
    step = ["-m", "mimscale.bench", "step", *METHODS[case.method], "--model", args.model, "--zero", str(case.zero),
            "--batch", str(args.batch or preset_micro_batch(case.zero)), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--data", case.data, "--json"]
    if case.compile:
        step.append("--compile")
    if case.data != "synthetic":
        step += ["--data-path", args.ffcv, "--workers", str(args.workers)]
    for s in (TINY_SETS if args.tiny else []) + args.set:
        step += ["--set", s]
    if args.tiny:
        step += ["--threads", "1"]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *step]
    return [sys.executable, *step]


def run_case(case: Case, args, nproc: int) -> Case:
    if case.data == "ffcv" and not args.ffcv:
        case.error = "skipped: no --ffcv PATH (.beton) given"
        return case
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    t = time.perf_counter()
    try:
        r = subprocess.run(case_command(case, args, nproc), cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        case.error = f"timed out after {args.timeout} s"
        return case
    finally:
        case.wall_s = time.perf_counter() - t
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {r.returncode}"]
        case.error = f"failed (exit {r.returncode}): {tail[0][-300:]}"
        return case
    case.result = json.loads(lines[-1])
    return case


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"


COLUMNS = ("method", "zero", "compile", "data", "img/s/GPU", "MFU %", "data wait %", "peak mem GiB", "step s")


def rows(cases: list[Case]) -> list[list[str]]:
    out = []
    for c in cases:
        r = c.result
        mem = r.get("max_memory_gib", r.get("max_rss_gib"))
        if c.error:
            out.append([c.method, str(c.zero), "on" if c.compile else "off", c.data, c.error, "", "", "", ""])
            continue
        out.append([c.method, str(c.zero), "on" if c.compile else "off", c.data, _num(r["img_per_s"], ".1f"),
                    _num(100 * r["mfu"] if r.get("mfu") is not None else None, ".1f"), _num(r.get("data_wait_pct"), ".1f"),
                    _num(mem, ".2f"), _num(r["step_s"], ".4f")])
    return out


def table(cases: list[Case]) -> str:
    body = rows(cases)
    # an error spans the numeric columns: it does not set their widths
    widths = [max([len(COLUMNS[i])] + [len(r[i]) for r in body if not (i == 4 and r[5] == "" and r[8] == "")]) for i in range(len(COLUMNS))]
    line = lambda cells: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(list(COLUMNS)), line(["-" * w for w in widths])]
    for r in body:
        out.append(line(r) if r[5] or r[8] else "  ".join(c.ljust(w) for c, w in zip(r[:4], widths[:4])) + "  " + r[4])
    return "\n".join(out)


def summary(cases: list[Case], args, nproc: int, device: str) -> dict:
    first = next((c.result for c in cases if c.result), {})
    return {
        "bench": "gpu", "device": device, "gpus": nproc, "model": args.model, "tiny": args.tiny,
        "precision": first.get("precision"), "peak_source": first.get("peak_source"),
        "peak_tflops": first["peak_gflops"] / 1e3 if first.get("peak_gflops") else None,
        "cases": [{"method": c.method, "zero": c.zero, "compile": c.compile, "data": c.data, "error": c.error, "wall_s": c.wall_s,
                   **({k: c.result.get(k) for k in ("batch", "world_size", "img_per_s", "img_per_s_total", "mfu", "data_wait_pct",
                                                     "max_memory_gib", "max_rss_gib", "step_s", "fwd_bwd_s", "optimizer_s",
                                                     "gflop_per_img", "plan", "refresh_s_per_img", "refresh_pct_of_epoch")}
                      if c.result else {})}
                  for c in cases],
    }


def detect(args) -> tuple[int, str]:
    """(processes per case, device description): every GPU, or one CPU process with --tiny."""
    import torch

    n = torch.cuda.device_count()
    if n:
        return args.nproc or n, f"{n} x {torch.cuda.get_device_name(0)}"
    if not args.tiny:
        raise SystemExit("benchmarks.gpu: no CUDA device is visible (torch.cuda.device_count() == 0); "
                         "run it on a GPU node, or pass --tiny for the CPU plumbing run")
    return args.nproc or 1, f"cpu ({os.cpu_count()} cores), --tiny plumbing run"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--zero", default="1,2", help="ZeRO stages (1, 2)")
    p.add_argument("--compile", default="off,on", help="off, on")
    p.add_argument("--data", default="synthetic,ffcv", help="synthetic, ffcv")
    p.add_argument("--ffcv", default="", help="the .beton the ffcv cases read (without it they are skipped)")
    p.add_argument("--workers", type=int, default=8, help="FFCV loader threads per GPU")
    p.add_argument("--model", default="vit_base")
    p.add_argument("--batch", type=int, default=0, help="micro batch per GPU (0: the preset's, from ds_configs/gpu_bf16_zeroN.json)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, loader start)")
    p.add_argument("--nproc", type=int, default=0, help="processes (GPUs) per case (0: every visible GPU)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case before it is reported as timed out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every case")
    p.add_argument("--tiny", action="store_true", help="CPU plumbing run at toy sizes (fp32, ViT-Tiny at 32 px, batch 2)")
    p.add_argument("--json-out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        cases = matrix(parse_list(args.methods, tuple(METHODS), "--methods"), parse_list(args.zero, ZERO, "--zero", int),
                       parse_list(args.compile, COMPILE, "--compile"), parse_list(args.data, DATA, "--data"))
    except ValueError as e:
        p.error(str(e))
    if args.tiny:
        args.model = "vit_tiny" if args.model == "vit_base" else args.model
        args.batch = args.batch or 2
    nproc, device = detect(args)
    for i, case in enumerate(cases, 1):
        print(f"[benchmarks.gpu] {i}/{len(cases)} {case.name} ...", file=sys.stderr, flush=True)
        run_case(case, args, nproc)
        print(f"[benchmarks.gpu]   {case.error or 'done'} ({case.wall_s:.0f} s)", file=sys.stderr, flush=True)
    result = summary(cases, args, nproc, device)
    print(f"{device}; {nproc} process(es) per case; micro batch per GPU: {args.batch or 'preset'}; {result['precision']}; "
          f"peak {_num(result['peak_tflops'], '.3g')} TFLOP/s ({result['peak_source']})")
    print(table(cases))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if any(c.result for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
