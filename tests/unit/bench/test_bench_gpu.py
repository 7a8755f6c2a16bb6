"""benchmarks/gpu.py without running a case: the matrix, the command lines, the table and the
GPU peak table (the runs themselves: tests/integration/test_bench.py)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from benchmarks import gpu
from mimscale.tracking.peak import GPU_PEAK_BF16


def _args(**kw):
    base = dict(model="vit_base", batch=0, steps=10, warmup=3, ffcv="", workers=8, set=[], tiny=False, timeout=60)
    return SimpleNamespace(**{**base, **kw})


def test_the_default_matrix_is_every_method_stage_compile_and_data():
    cases = gpu.matrix(list(gpu.METHODS), list(gpu.ZERO), list(gpu.COMPILE), list(gpu.DATA))
    assert len(cases) == 4 * 2 * 2 * 2
    assert {c.name for c in cases} >= {"mae zero1 eager synthetic", "automae-stored zero2 compile ffcv"}


def test_lists_name_a_bad_choice():
    assert gpu.parse_list("1, 2", gpu.ZERO, "--zero", int) == [1, 2]
    with pytest.raises(ValueError, match="--zero '3': allowed values: 1, 2"):
        gpu.parse_list("1,3", gpu.ZERO, "--zero", int)
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
    ok = gpu.Case("mae", 1, False, "synthetic", result={"img_per_s": 1234.5, "mfu": 0.41, "data_wait_pct": 0.0,
                                                       "max_memory_gib": 30.25, "step_s": 0.1037})
    bad = gpu.Case("amt", 2, True, "ffcv", error="failed (exit 1): CUDA out of memory")
    lines = gpu.table([ok, bad]).splitlines()
    assert lines[0].split()[:4] == ["method", "zero", "compile", "data"] and len(lines) == 4
    assert lines[2].split() == ["mae", "1", "off", "synthetic", "1234.5", "41.0", "0.0", "30.25", "0.1037"]
    assert lines[3].split()[:4] == ["amt", "2", "on", "ffcv"] and lines[3].endswith("CUDA out of memory")


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                                          ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362),
                                          ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA GH200 480GB", 989)])
def test_known_gpus_get_their_bf16_peak(name, tflops):
    first = next(v for k, v in GPU_PEAK_BF16 if k in name)
    assert first == tflops * 1e12
