"""One command for a GPU node: the training-step numbers that matter, on whatever GPUs it has.

    python -m benchmarks.gpu [--ffcv /data/imagenet_train.beton] [--json-out gpu_bench.json]
    python -m benchmarks.gpu --models vit_base,vit_large --batches 128,64 --zero 1,2,3 --grad-ckpt 0,1 --ckpt-save
    make bench-gpu FFCV_BETON=/data/imagenet_train.beton MODELS=vit_base,vit_large BATCHES=128,64 ZERO=1,2,3 GRAD_CKPT=0,1

Runs the matrix
    model      vit_base | vit_large | vit_huge | ...          (--models; default ViT-B/16)
    micro      the preset's | 128 | 64 | ...                  (--batches: micro batch per GPU)
    method     mae | amt | automae-stored | automae-online     (the presets' recipes; automae-frozen on request)
    zero       1 | 2 (| 3)                                     (ds_configs/gpu_bf16_zeroN.json: bf16)
    grad_ckpt  0 (| k: checkpoint every k-th block)            (--grad-ckpt: --set model.grad_ckpt=k)
    compile    off | on                                        (DeepSpeed's engine.compile, inductor)
    data       synthetic | ffcv (| wds | folder)               (one batch on the device | the run's loader)
each case one ``python -m mimscale.bench step`` (under ``torchrun --nproc_per_node <GPUs>`` when
there are several), by default at the preset micro batch per GPU (the ds_config's 128), and prints
one table and, as its last line, one JSON object: img/s per GPU, MFU against the device's bf16 peak
(mimscale.tracking.peak.GPU_PEAK_BF16; an unknown GPU gets no MFU and says so), data wait %, peak memory.
``--ckpt-save`` adds, per model and ZeRO stage, one checkpoint save of the model after one step
(``python -m mimscale.bench convert --no-convert``: every rank writes its shards under ``--save-dir``;
its seconds and GiB). ``--case method=mae,model=vit_huge,micro=128,zero=2,plan=1`` (repeatable) runs
the cases it lists instead of the matrix (what benchmarks/gpu_quick.sh does); unnamed fields take
the first value of the list options. ``plan=1`` (or ``--vs-plan`` for every case) compares the
measured peak memory with ``python -m mimscale.plan``'s estimate, when this tree has the planner.
``decode=nvjpeg`` in a case (wds and folder data) decodes the loader's JPEGs on the GPU (data.decode);
``kind=loader`` times the loader alone (``python -m mimscale.bench loader``, batches decoded and
delivered on the GPU): img/s and the CPU cores it used, for one decoder at ``--workers`` workers.
A case that fails (e.g. out of memory) is a row with its error; the others still run. Loader cases
need their data (``--ffcv`` .beton, ``--wds`` shard folder, ``--folder`` ImageNet root): without it
they are rows saying so. AMT and AutoMAE-stored first refresh their attention store over the whole
data set (synthetic: a few batches; a loader: the whole set), so give a subset (e.g. 10k images) to
keep that short; its cost per image is in the JSON.

``--tiny`` runs the same plumbing on a CPU in fp32 at toy sizes (ViT-Tiny for ViT-B, 32 px, batch 2):
what the tests run; its numbers mean nothing. ``--list`` prints the cases and their commands and runs nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
    "automae-frozen": ["--method", "automae", "--extractor", "frozen"],  # the preset's (a fresh extractor: its cost, not its weights)
}
# the bench's fresh frozen extractor is mimscale's encoder of the case's model (at its image and patch
# size): an empty timm name builds that architecture (the preset's vit_base_patch16_224 fits ViT-B/16 alone)
METHOD_SETS = {"automae-frozen": ["masking.automae.extractor_model="]}
DEFAULT_METHODS = ("mae", "amt", "automae-stored", "automae-online")
ZERO = (1, 2, 3)
DEFAULT_ZERO = (1, 2)
COMPILE = ("off", "on")
DATA = ("synthetic", "ffcv", "wds", "folder")
DEFAULT_DATA = ("synthetic", "ffcv")
# a loader's data: the option that gives its path, and what it is
DATA_PATHS = {"ffcv": ("--ffcv", "PATH (.beton)"), "wds": ("--wds", "DIR (WebDataset shards)"), "folder": ("--folder", "DIR (ImageNet root)")}
KINDS = ("step", "save", "loader")
DECODES = ("cpu", "nvjpeg")  # data.decode of a loader case: the workers' CPU decoder, or nvJPEG on the GPU
SAVE_BATCH = 2  # the save case's one step: its batch does not change the checkpoint
# --tiny: the model and images of the tests (a 4 x 4 grid of 8 px patches, a one-block decoder)
TINY_SETS = ["model.img_size=32", "model.patch_size=8", "model.decoder_depth=1", "model.decoder_dim=32",
             "model.decoder_heads=2", "data.synthetic_size=40"]
PLANNER = REPO / "mimscale" / "plan.py"


@dataclass
class Case:
    method: str
    zero: int
    compile: bool
    data: str
    model: str = "vit_base"
    batch: int = 0  # micro batch per GPU; 0: the preset's (the ds_config's)
    grad_ckpt: int = 0  # model.grad_ckpt: 0 off, k: every k-th block
    kind: str = "step"  # step: timed training steps; save: one checkpoint save
    vs_plan: bool = False  # compare the peak memory with python -m mimscale.plan's estimate
    decode: str = "cpu"  # data.decode of its loader: cpu (the workers) or nvjpeg (the GPU)
    result: dict = field(default_factory=dict)
    error: Optional[str] = None
    wall_s: float = 0.0
    plan: Optional[dict] = None

    @property
    def name(self) -> str:
        if self.kind == "save":
            return f"{self.method} {self.model} zero{self.zero} checkpoint save"
        if self.kind == "loader":
            return f"loader {self.data} decode {self.decode}" + (f" micro{self.batch}" if self.batch else "")
        extra = ([f"micro{self.batch}"] if self.batch else []) + ([f"grad_ckpt{self.grad_ckpt}"] if self.grad_ckpt else [])
        data = self.data + ("" if self.decode == "cpu" else f" decode {self.decode}")
        return " ".join([self.method, self.model, f"zero{self.zero}", "compile" if self.compile else "eager", data, *extra])


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


def parse_ints(text: str, what: str, minimum: int = 0) -> list[int]:
    """Comma-separated integers >= ``minimum`` (micro batches, checkpointing intervals)."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if not item.isdigit() or int(item) < minimum:
            raise ValueError(f"{what} {item!r}: give integers >= {minimum}, comma-separated")
        out.append(int(item))
    if not out:
        raise ValueError(f"{what}: give at least one integer >= {minimum}")
    return out


def model_names() -> tuple[str, ...]:
    from mimscale.models.registry import ENCODERS  # a table, no torch

    return tuple(ENCODERS)


def matrix(methods: list[str], zeros: list[int], compiles: list[str], datas: list[str], models=("vit_base",), batches=(0,),
           grad_ckpts=(0,), ckpt_save: bool = False) -> list[Case]:
    """Every step case of the lists (model, micro batch, method, ZeRO, grad_ckpt, compile, data: the
    last varies fastest), then with ``ckpt_save`` one save case per model and ZeRO stage (the first method's)."""
    steps = [Case(m, z, c == "on", d, model=mo, batch=b, grad_ckpt=k)
             for mo in models for b in batches for m in methods for z in zeros for k in grad_ckpts for c in compiles for d in datas]
    saves = [Case(methods[0], z, False, "synthetic", model=mo, kind="save") for mo in models for z in zeros] if ckpt_save else []
    return steps + saves


CASE_KEYS = ("method", "model", "micro", "zero", "grad_ckpt", "compile", "data", "kind", "plan", "decode")


def parse_case(spec: str, defaults: dict, models: tuple[str, ...]) -> Case:
    """``--case key=value,...`` (keys: CASE_KEYS); a key left out takes ``defaults[key]``."""
    given = {}
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        key, eq, value = part.partition("=")
        if not eq or key not in CASE_KEYS:
            raise ValueError(f"--case {spec!r}: {part!r} is not key=value with a key of {', '.join(CASE_KEYS)}")
        given[key] = value.strip()
    v = {"decode": "cpu", **defaults, **given}
    one = lambda key, allowed, kind=str: parse_list(str(v[key]), allowed, f"--case {key}", kind)[0]  # noqa: E731
    flag = one("plan", ("0", "1"))
    case = Case(one("method", tuple(METHODS)), one("zero", ZERO, int), one("compile", COMPILE) == "on", one("data", DATA),
                model=one("model", models), batch=parse_ints(str(v["micro"]), "--case micro")[0],
                grad_ckpt=parse_ints(str(v["grad_ckpt"]), "--case grad_ckpt")[0], kind=one("kind", KINDS), vs_plan=flag == "1",
                decode=one("decode", DECODES))
    if (case.decode != "cpu" or case.kind == "loader") and case.data not in ("wds", "folder"):
        raise ValueError(f"--case {spec!r}: " + ("kind=loader" if case.kind == "loader" else f"decode={case.decode}")
                         + f" needs JPEG files: data=wds or data=folder, not {case.data}")
    return case


def preset_micro_batch(zero: int) -> int:
    """The micro batch per GPU the presets run at: the GPU ds_config's."""
    return int(json.loads((REPO / "ds_configs" / f"gpu_bf16_zero{zero}.json").read_text())["train_micro_batch_size_per_gpu"])


def micro_batch(case: Case, args) -> int:
    """The micro batch per GPU a case runs at: its own, else the preset's (--tiny: 2); a save: SAVE_BATCH."""
    if case.kind == "save":
        return SAVE_BATCH
    return case.batch or (2 if args.tiny else preset_micro_batch(case.zero))


def case_sets(case: Case, args) -> list[str]:
    """The config overrides a case passes (--tiny's sizes, its method's, its grad_ckpt, then --set)."""
    return ((TINY_SETS if args.tiny else []) + METHOD_SETS.get(case.method, []) + ([f"model.grad_ckpt={case.grad_ckpt}"] if case.grad_ckpt else [])
            + args.set)


def case_command(case: Case, args, nproc: int, save_dir: Optional[Path] = None) -> list[str]:
    """The bench step (or, for a save case, bench convert --no-convert) command line of one case."""
    common = [*METHODS[case.method], "--model", case.model, "--zero", str(case.zero), "--batch", str(micro_batch(case, args)), "--json"]
    if case.kind == "loader":  # the loader alone: its batches decoded and delivered on the GPU
        step = ["-m", "mimscale.bench", "loader", "--source", case.data, "--path", data_path(case, args), "--decode", case.decode,
                "--workers", str(args.workers), "--batch", str(micro_batch(case, args)), "--batches", str(args.steps),
                "--warmup", str(args.warmup), "--size", "32" if args.tiny else "224", "--json"]
        return [sys.executable, *step]  # one process: a loader feeds one GPU
    if case.kind == "save":
        step = ["-m", "mimscale.bench", "convert", "--no-convert", *common]
        sets = case_sets(case, args) + ([f"output_dir={save_dir}"] if save_dir else [])
    else:
        step = ["-m", "mimscale.bench", "step", *common, "--steps", str(args.steps), "--warmup", str(args.warmup), "--data", case.data]
        if case.compile:
            step.append("--compile")
        if case.data != "synthetic":
            step += ["--data-path", data_path(case, args), "--workers", str(args.workers)]
        if case.decode != "cpu":
            step += ["--decode", case.decode]
        sets = case_sets(case, args)
    for s in sets:
        step += ["--set", s]
    if args.tiny:
        step += ["--threads", "1"]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *step]
    return [sys.executable, *step]


def data_path(case: Case, args) -> str:
    return getattr(args, DATA_PATHS[case.data][0].lstrip("-"), "") if case.data in DATA_PATHS else ""


def subprocess_env(args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_case(case: Case, args, nproc: int) -> Case:
    if case.kind in ("step", "loader") and case.data in DATA_PATHS and not data_path(case, args):
        option, what = DATA_PATHS[case.data]
        case.error = f"skipped: no {option} {what} given"
        return case
    save_dir = None
    if case.kind == "save":  # one folder every rank writes into, on the disk --save-dir names
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        save_dir = Path(tempfile.mkdtemp(prefix="save-", dir=args.save_dir))
    t = time.perf_counter()
    try:
        r = subprocess.run(case_command(case, args, nproc, save_dir), cwd=REPO, env=subprocess_env(args), capture_output=True, text=True,
                           timeout=args.timeout)
    except subprocess.TimeoutExpired:
        case.error = f"timed out after {args.timeout} s"
        return case
    finally:
        case.wall_s = time.perf_counter() - t
        if save_dir is not None:
            shutil.rmtree(save_dir, ignore_errors=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {r.returncode}"]
        case.error = f"failed (exit {r.returncode}): {tail[0][-300:]}"
        return case
    case.result = json.loads(lines[-1])
    return case


# ------------------------------------------------------------------------------- the planner


def preset_config(case: Case) -> Path:
    """The preset of the case's method and model (e.g. mae_vit_huge.yaml), else the method's ViT-B one."""
    method = METHODS[case.method][1]
    own = REPO / "mimscale" / "configs" / f"{method}_{case.model}.yaml"
    return own if own.exists() else REPO / "mimscale" / "configs" / f"{method}_vit_base.yaml"


def planner_gib(estimate) -> Optional[float]:
    """A per-GPU GiB figure in a planner JSON of unknown layout: the first number under a key ending in
    ``_gib`` that names a peak, total or per-GPU figure (depth first), else None."""
    if isinstance(estimate, dict):
        for key, value in estimate.items():
            if key.endswith("_gib") and any(w in key for w in ("peak", "total", "per_gpu", "estimate")) \
                    and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        for value in estimate.values():
            found = planner_gib(value)
            if found is not None:
                return found
    return None


def planner_json(stdout: str) -> Optional[dict]:
    """The JSON object a planner printed: from its first line that opens one (log lines may come before)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("{"):
            try:
                found = json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
            return found if isinstance(found, dict) else None
    return None


def planner_row(estimate: dict, case: Case) -> dict:
    """The planner's figures for the case's ZeRO stage and grad_ckpt: ``plan_gib``, what torch's allocator
    should peak at (model states + buffers + activations: what ``max_memory_allocated`` measures, without
    the planner's fragmentation margin and CUDA context) and ``plan_total_gib`` (with them: what the GPU
    must hold). A JSON without per-stage rows gives its first per-GPU figure as both."""
    row = next((r for r in estimate.get("rows", []) if isinstance(r, dict) and r.get("zero_stage") == case.zero
                and r.get("grad_ckpt") == case.grad_ckpt), None)
    if row is None:
        gib = planner_gib(estimate)
        return {"plan_gib": gib, "plan_total_gib": gib}
    parts = [row.get(k) for k in ("model_states_gib", "buffers_gib", "activations_gib")]
    context = (row.get("buffers") or {}).get("cuda_context_gib", 0.0)
    allocated = sum(parts) - context if all(isinstance(v, (int, float)) for v in parts) else None
    return {"plan_gib": allocated, "plan_total_gib": row.get("total_gib"), "plan_row": row}


def vs_plan(case: Case, args, nproc: int) -> dict:
    """``python -m mimscale.plan``'s estimate for the case (its preset, its ds_config, its micro batch,
    the GPUs it ran on) beside the measured peak; a note instead when the tree has no planner or it fails."""
    measured = case.result.get("max_memory_gib", case.result.get("max_rss_gib"))
    if not PLANNER.exists():
        return {"note": "skipped: python -m mimscale.plan is not in this tree (mimscale/plan.py)", "measured_gib": measured}
    config = preset_config(case)
    ds = json.loads((REPO / "ds_configs" / f"{'cpu_fp32' if args.tiny else 'gpu_bf16'}_zero{case.zero}.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = micro_batch(case, args)
    env = subprocess_env(args)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-plan-") as tmp:
        ds_path = Path(tmp) / f"ds_zero{case.zero}.json"
        ds_path.write_text(json.dumps(ds))
        cmd = [sys.executable, "-m", "mimscale.plan", "--config", str(config), "--deepspeed_config", str(ds_path),
               "--gpus", str(nproc), "--gpu-mem-gib", f"{args.gpu_mem_gib:g}", "--json"]
        options = PLANNER.read_text()  # the options it takes (cheaper than a --help run)
        if '"--micro-batch"' in options:
            cmd += ["--micro-batch", str(micro_batch(case, args))]
        if '"--set"' in options:
            for s in [f"model.name={case.model}", *case_sets(case, args)]:
                cmd += ["--set", s]
        elif config.stem.split("_", 1)[1] != case.model or args.tiny or case.grad_ckpt or args.set:
            return {"note": f"skipped: the planner takes no --set, and {config.name} is not this case's model and settings",
                    "measured_gib": measured}
        try:
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return {"note": "the planner timed out", "measured_gib": measured}
    estimate = planner_json(r.stdout) if r.returncode == 0 else None
    if estimate is None:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["no JSON object in its output"]
        return {"note": f"the planner failed (exit {r.returncode}): {tail[0][-300:]}", "measured_gib": measured}
    figures = planner_row(estimate, case)
    gib = figures["plan_gib"]
    return {"config": str(config.relative_to(REPO)), **figures, "measured_gib": measured,
            "measured_over_plan": measured / gib if gib and measured is not None else None,
            "note": None if gib is not None else "no per-GPU GiB figure found in the planner's JSON (kept whole under 'planner')",
            **({"planner": estimate} if "plan_row" not in figures else {})}


# ------------------------------------------------------------------------------- the output


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"


TEXT_COLUMNS = ("case", "method", "model", "micro", "zero", "grad_ckpt", "compile", "data")
COLUMNS = TEXT_COLUMNS + ("img/s/GPU", "MFU %", "data wait %", "peak mem GiB", "plan GiB", "step s", "save s", "ckpt GiB", "CPU cores")
N_TEXT = len(TEXT_COLUMNS)


def rows(cases: list[Case], args=None) -> list[list[str]]:
    """One row of cells per case; a failed case has its error as the one cell after the text columns."""
    out = []
    for c in cases:
        r = c.result
        micro = r.get("batch") or (micro_batch(c, args) if args is not None else c.batch) or "preset"
        data = c.data + ("" if c.decode == "cpu" else f"+{c.decode}")
        if c.kind == "loader":
            text = [c.kind, "-", "-", str(micro), "-", "-", "-", data]
        else:
            text = [c.kind, c.method, c.model, str(micro), str(c.zero), str(c.grad_ckpt),
                    "-" if c.kind == "save" else "on" if c.compile else "off", "-" if c.kind == "save" else data]
        if c.error:
            out.append([*text, c.error])
            continue
        mem = r.get("max_memory_gib", r.get("max_rss_gib"))
        plan = c.plan or {}
        out.append([*text, _num(r.get("img_per_s"), ".1f"), _num(100 * r["mfu"] if r.get("mfu") is not None else None, ".1f"),
                    _num(r.get("data_wait_pct"), ".1f"), _num(mem, ".2f"), _num(plan.get("plan_gib"), ".2f"),
                    _num(r.get("step_s"), ".4f"), _num(r.get("save_s"), ".2f"), _num(r.get("checkpoint_gib"), ".2f"),
                    _num(r.get("cores_used"), ".1f")])
    return out


def table(cases: list[Case], args=None) -> str:
    body = rows(cases, args)
    # an error spans the numeric columns: it does not set their widths
    widths = [max([len(COLUMNS[i])] + [len(r[i]) for r in body if len(r) == len(COLUMNS)]) for i in range(len(COLUMNS))]
    line = lambda cells: "  ".join(c.ljust(w) if i < N_TEXT else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(list(COLUMNS)), line(["-" * w for w in widths])]
    for r in body:
        out.append(line(r) if len(r) == len(COLUMNS) else "  ".join(c.ljust(w) for c, w in zip(r[:N_TEXT], widths)) + "  " + r[N_TEXT])
    return "\n".join(out)


def markdown(cases: list[Case], args=None, title: str = "") -> str:
    """The table as markdown (an error fills the first numeric column), then each planner note."""
    out = [title, ""] if title else []
    out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows(cases, args):
        cells = r if len(r) == len(COLUMNS) else r + [""] * (len(COLUMNS) - len(r))
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"- {c.name}: {n}" for c in cases if (n := plan_note(c))]
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def plan_note(case: Case) -> Optional[str]:
    """One sentence on the case's planner comparison, or None without one."""
    plan = case.plan or {}
    if plan.get("note"):
        return f"planner {plan['note']}"
    if plan.get("plan_gib") is None:
        return None
    ratio = plan.get("measured_over_plan")
    total = plan.get("plan_total_gib")
    what = "torch's allocator" if "max_memory_gib" in case.result else "the process's max RSS" if case.result else "the case failed"
    return (f"measured peak {_num(plan.get('measured_gib'), '.2f')} GiB ({what}) against the planner's "
            f"{plan['plan_gib']:.2f} GiB allocated" + (f" ({total:.2f} GiB with its margin and CUDA context)" if total is not None else "")
            + (f": measured / planned = {ratio:.2f}" if ratio is not None else ""))


CASE_FIELDS = ("batch", "world_size", "img_per_s", "img_per_s_total", "mfu", "data_wait_pct", "max_memory_gib", "max_rss_gib", "step_s",
               "fwd_bwd_s", "optimizer_s", "gflop_per_img", "plan", "refresh_s_per_img", "refresh_pct_of_epoch", "h2d_s", "h2d_gib_per_s")
SAVE_FIELDS = ("world_size", "params", "save_s", "save_stall_s", "checkpoint_gib", "save_gib_per_s", "max_memory_gib", "max_rss_gib")
# a loader case: img/s of one loader delivering to one GPU, and the CPU cores (its process + workers) that took
LOADER_FIELDS = ("batch", "workers", "device", "img_per_s", "cores_used", "main_cores", "img_per_s_per_core", "seconds")


def summary(cases: list[Case], args, nproc: int, device: str) -> dict:
    first = next((c.result for c in cases if c.result and c.kind == "step"), {})
    return {
        "bench": "gpu", "device": device, "gpus": nproc, "models": sorted({c.model for c in cases}), "tiny": args.tiny,
        "precision": first.get("precision"), "peak_source": first.get("peak_source"),
        "peak_tflops": first["peak_gflops"] / 1e3 if first.get("peak_gflops") else None,
        "cases": [{"kind": c.kind, "method": c.method, "model": c.model, "micro_batch": micro_batch(c, args), "zero": c.zero,
                   "grad_ckpt": c.grad_ckpt, "compile": c.compile, "data": c.data, "decode": c.decode, "error": c.error, "wall_s": c.wall_s,
                   **({k: c.result.get(k) for k in {"save": SAVE_FIELDS, "loader": LOADER_FIELDS}.get(c.kind, CASE_FIELDS)}
                      if c.result else {}),
                   **({"save_s": None} if c.kind == "step" else {}), **({"vs_plan": c.plan} if c.vs_plan else {})}
                  for c in cases],
    }


def detect(args) -> tuple[int, str]:
    """(processes per case, device description): every GPU, or one CPU process with --tiny."""
    import torch

    n = torch.cuda.device_count()
    if n:
        if not args.gpu_mem_gib:
            args.gpu_mem_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        return args.nproc or n, f"{n} x {torch.cuda.get_device_name(0)}"
    if not args.tiny:
        raise SystemExit("benchmarks.gpu: no CUDA device is visible (torch.cuda.device_count() == 0); "
                         "run it on a GPU node, or pass --tiny for the CPU plumbing run")
    args.gpu_mem_gib = args.gpu_mem_gib or 80.0  # the planner's budget in a plumbing run
    return args.nproc or 1, f"cpu ({os.cpu_count()} cores), --tiny plumbing run"


def build_cases(args) -> list[Case]:
    """The matrix of the list options, or the --case list; ValueError for a bad item."""
    models = parse_list(args.models or args.model, model_names(), "--models")
    if args.tiny:  # ViT-B's stand-in at toy size, as --model did
        models = ["vit_tiny" if m == "vit_base" else m for m in models]
    batches = parse_ints(args.batches, "--batches") if args.batches else [args.batch]
    if args.tiny:
        batches = [b or 2 for b in batches]
    methods = parse_list(args.methods, tuple(METHODS), "--methods")
    zeros = parse_list(args.zero, ZERO, "--zero", int)
    compiles = parse_list(args.compile, COMPILE, "--compile")
    datas = parse_list(args.data, DATA, "--data")
    ckpts = parse_ints(args.grad_ckpt, "--grad-ckpt")
    if args.case:
        defaults = dict(method=methods[0], model=models[0], micro=batches[0], zero=zeros[0], grad_ckpt=ckpts[0], compile=compiles[0],
                        data=datas[0], kind="step", plan="1" if args.vs_plan else "0")
        cases = [parse_case(spec, defaults, model_names()) for spec in args.case]
        if args.tiny:
            for c in cases:
                c.model = "vit_tiny" if c.model == "vit_base" else c.model
                c.batch = c.batch or 2
        return cases
    cases = matrix(methods, zeros, compiles, datas, models=models, batches=batches, grad_ckpts=ckpts, ckpt_save=args.ckpt_save)
    for c in cases:
        c.vs_plan = args.vs_plan and c.kind == "step"
    return cases


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="", help="comma-separated encoders (mimscale/models/registry.py), e.g. vit_base,vit_large (default: --model)")
    p.add_argument("--model", default="vit_base", help="the one model when --models is not given")
    p.add_argument("--batches", default="", help="comma-separated micro batches per GPU, e.g. 128,64 (default: --batch)")
    p.add_argument("--batch", type=int, default=0, help="micro batch per GPU (0: the preset's, from ds_configs/gpu_bf16_zeroN.json)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--zero", default=",".join(map(str, DEFAULT_ZERO)), help="ZeRO stages (1, 2, 3)")
    p.add_argument("--grad-ckpt", default="0", help="activation checkpointing: comma-separated k (0 off, k: every k-th block), e.g. 0,1")
    p.add_argument("--compile", default="off,on", help="off, on")
    p.add_argument("--data", default=",".join(DEFAULT_DATA), help=f"comma-separated: {', '.join(DATA)}")
    p.add_argument("--ffcv", default="", help="the .beton the ffcv cases read (without it they are skipped)")
    p.add_argument("--wds", default="", help="the WebDataset shard folder the wds cases read (python -m data_prep.wds)")
    p.add_argument("--folder", default="", help="the ImageNet root the folder cases read")
    p.add_argument("--workers", type=int, default=8, help="loader workers per GPU (FFCV: threads)")
    p.add_argument("--ckpt-save", action="store_true", help="also time one checkpoint save per model and ZeRO stage")
    p.add_argument("--save-dir", default=str(REPO / "runs" / "bench_gpu_save"),
                   help="where the save cases write (a fresh folder each, removed after): put it on the run's checkpoint disk")
    p.add_argument("--case", action="append", default=[], metavar="KEY=VALUE,...",
                   help=f"run this case instead of the matrix (repeatable); keys: {', '.join(CASE_KEYS)}")
    p.add_argument("--vs-plan", action="store_true", help="compare every step case's peak memory with python -m mimscale.plan")
    p.add_argument("--gpu-mem-gib", type=float, default=0.0, help="the planner's GPU memory (0: the device's; --tiny: 80)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, loader start)")
    p.add_argument("--nproc", type=int, default=0, help="processes (GPUs) per case (0: every visible GPU)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case before it is reported as timed out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every case")
    p.add_argument("--tiny", action="store_true", help="CPU plumbing run at toy sizes (fp32, ViT-Tiny at 32 px, batch 2)")
    p.add_argument("--list", action="store_true", help="print the cases and their commands, run nothing")
    p.add_argument("--json-out", default="", help="also write the JSON here")
    p.add_argument("--md-out", default="", help="also write the table as markdown here")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cases = build_cases(args)
    except ValueError as e:
        p.error(str(e))
    if args.list:
        nproc = args.nproc or 1
        for i, case in enumerate(cases, 1):
            print(f"{i}/{len(cases)} {case.name}{' (vs plan)' if case.vs_plan else ''}:")
            # a save case writes into a fresh mkdtemp folder under --save-dir, named when it runs
            save_dir = Path(args.save_dir) / "save-<mkdtemp suffix>" if case.kind == "save" else None
            print("    " + " ".join(case_command(case, args, nproc, save_dir)))
        return 0
    nproc, device = detect(args)
    for i, case in enumerate(cases, 1):
        print(f"[benchmarks.gpu] {i}/{len(cases)} {case.name} ...", file=sys.stderr, flush=True)
        run_case(case, args, nproc)
        print(f"[benchmarks.gpu]   {case.error or 'done'} ({case.wall_s:.0f} s)", file=sys.stderr, flush=True)
        if case.vs_plan and case.kind == "step" and not (case.error or "").startswith("skipped"):  # a failed run too (out of memory?)
            case.plan = vs_plan(case, args, nproc)
    result = summary(cases, args, nproc, device)
    head = (f"{device}; {nproc} process(es) per case; {result['precision']}; "
            f"peak {_num(result['peak_tflops'], '.3g')} TFLOP/s ({result['peak_source']})")
    print(head)
    print(table(cases, args))
    for c in cases:
        if note := plan_note(c):
            print(f"{c.name}: {note}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    if args.md_out:
        Path(args.md_out).write_text(markdown(cases, args, title=head))
    print(json.dumps(result))
    return 0 if any(c.result for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
