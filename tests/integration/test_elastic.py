"""Elastic runs: the recipe's global batch on any world size, and resume on another world size or
ZeRO stage (2-rank and 1-rank CPU runs, fp32; four training launches in all).

A step's global batch holds the same samples, crops and masks on 1 rank or 2 (sampler.py deals
global batches, masking/noise.py keys the masks by position in them); only the reduction order of
the gradients differs, so per-step losses agree to float rounding.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.integration.launch import REPO, command, losses, run, run_group, summary, write_ds_config

GLOBAL = ["train.global_batch=16"]  # after TINY_SETS' null: the recipe fixes the batch
ELASTIC = ["train.steps=16", "train.ckpt_every=8", "train.keep_checkpoints=3", *GLOBAL]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _run_dumping(ds: Path, out: Path, sets: list[str], dump: Path, when: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """pretrain.py through tests/integration/elastic_moments.py (dumps Adam moments at ``when``)."""
    cmd = command(ds, out, sets, ranks)
    at = cmd.index("mimscale/pretrain.py")
    cmd[at:at + 1] = [str(REPO / "tests" / "integration" / "elastic_moments.py"), str(dump), when, "--"]
    return run_group(cmd)


def _assert_moments_equal(a: Path, b: Path) -> float:
    x, y = torch.load(a), torch.load(b)
    assert x.keys() == y.keys() and x
    worst = 0.0
    for name in x:
        for k in ("exp_avg", "exp_avg_sq", "fp32"):
            assert x[name][k].shape == y[name][k].shape, (name, k)
            worst = max(worst, float((x[name][k] - y[name][k]).abs().max()))
    assert worst <= 1e-6, worst
    return worst


def _resume_copy(src: Path, dst: Path, step: int) -> Path:
    """The run folder as a crash right after step ``step``'s checkpoint would have left it."""
    shutil.copytree(src, dst)
    for tag in (dst / "checkpoints").glob("step*"):
        if tag.name != f"step{step:08d}":
            shutil.rmtree(tag)
    return dst


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted 2-rank ZeRO-2 run of 16 steps (checkpoints at 8 and 16, moments dumped at 8)."""
    root = tmp_path_factory.mktemp("elastic")
    out = root / "ref"
    r = _run_dumping(write_ds_config(root / "z2.json", 2, accum=None), out, ELASTIC, root / "ref-moments8.pt", "save@8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"root": root, "out": out, "losses": losses(summary(out)), "moments8": root / "ref-moments8.pt"}


@pytest.mark.slow  # make test-all; make test keeps the other direction (1 rank -> 2 ranks, ZeRO-3 universal)
def test_two_ranks_zero2_resume_on_one_rank_zero1(reference, tmp_path):
    out = _resume_copy(reference["out"], tmp_path / "run", 8)
    # a micro batch the recipe's 16 does not divide on this world size: exit 2 naming what would, nothing built
    bad = run(write_ds_config(tmp_path / "z1-bad.json", 1, micro=32, accum=None), out, ELASTIC, ranks=1)
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "train.global_batch 16 is not divisible by micro batch 32 x world size 1" in bad.stderr
    assert "micro batches that work on 1 ranks (--set train.micro_batch=M): 8 (accumulation 2), 16 (accumulation 1)" in bad.stderr
    assert not (out / "checkpoints" / "step00000008" / "universal").exists()
    dumped = tmp_path / "moments.pt"
    r = _run_dumping(write_ds_config(tmp_path / "z1.json", 1, micro=8, accum=None), out, ELASTIC, dumped, "restore", ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming through DeepSpeed's universal checkpoint" in r.stdout + r.stderr
    moments = _assert_moments_equal(reference["moments8"], dumped)
    post = summary(out)
    assert (post["world_size"], post["zero_stage"], post["global_batch"], post["steps"]) == (1, 1, 16, 16)
    got, ref = losses(post), reference["losses"]
    assert sorted(got) == list(range(9, 17))
    worst = max(_rel(got[s], ref[s]) for s in got)
    print(f"2 ranks ZeRO-2 -> 1 rank ZeRO-1 at step 8: moments differ by {moments:.1e}, losses 9-16 by {worst:.2e} relative")
    # the bound is 1e-3; fp32 here lands near 1e-7, and a tighter bound also catches a load that
    # is silently off (ZeRO-3 giving the no-decay group weight decay drifts by ~3e-4 in 6 steps)
    assert worst <= 1e-5, {s: (got[s], ref[s]) for s in got}
    assert (out / "checkpoints" / "step00000008" / "universal" / "UNIVERSAL_COMPLETE").is_file()


def test_one_rank_resume_on_two_ranks_zero3(reference, tmp_path):
    out = tmp_path / "run"
    pre = tmp_path / "pre-moments8.pt"
    # 1 rank x micro 8 x accumulation 2 = 16, stopped (with a checkpoint) after step 8
    r = _run_dumping(write_ds_config(tmp_path / "z1.json", 1, micro=8, accum=None), out, [*ELASTIC, "train.stop_after=8"],
                     pre, "save@8", ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # The same global batches, crops and masks as the 2-rank run (sampler.py, masking/noise.py):
    # only the reduction order differs. The issue asks 1e-4 relative over 8 steps.
    one, ref = losses(summary(out)), reference["losses"]
    assert sorted(one) == list(range(1, 9))
    same = max(_rel(one[s], ref[s]) for s in one)
    print(f"1 rank x accumulation 2 vs 2 ranks x 1, steps 1-8: worst relative loss difference {same:.2e}")
    assert same <= 1e-4, {s: (one[s], ref[s]) for s in one}

    dumped = tmp_path / "moments.pt"
    z3 = write_ds_config(tmp_path / "z3.json", 3, micro=4, accum=None)  # persistence threshold 0: every tensor partitioned
    r = _run_dumping(z3, out, ELASTIC, dumped, "restore")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    moments = _assert_moments_equal(pre, dumped)
    post = summary(out)
    assert (post["world_size"], post["zero_stage"], post["steps"]) == (2, 3, 16)
    got = losses(post)
    assert sorted(got) == list(range(9, 17))
    worst = max(_rel(got[s], ref[s]) for s in got)
    print(f"1 rank ZeRO-1 -> 2 ranks ZeRO-3 at step 8: moments differ by {moments:.1e}, losses 9-16 by {worst:.2e} relative")
    assert worst <= 1e-5, {s: (got[s], ref[s]) for s in got}  # see the test above


def test_stage0_single_device_resume_on_zero1_and_back_refused(reference, tmp_path):
    """The single-device path (ZeRO stage 0, the client AdamW's own state) resumes at ZeRO-1 through
    the universal layout elastic.py writes from it; a ZeRO checkpoint cannot go to stage 0 (DeepSpeed
    loads universal checkpoints into ZeRO optimizers only): exit 2 naming what to use instead."""
    out = tmp_path / "run"
    pre = tmp_path / "pre-moments8.pt"
    r = _run_dumping(write_ds_config(tmp_path / "z0.json", 0, micro=8, accum=None), out, [*ELASTIC, "train.stop_after=8"],
                     pre, "save@8", ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dumped = tmp_path / "moments.pt"
    r = _run_dumping(write_ds_config(tmp_path / "z1.json", 1, micro=8, accum=None), out, ELASTIC, dumped, "restore", ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "was written by 1 ranks, ZeRO-0; this run has 1 ranks, ZeRO-1" in r.stdout + r.stderr
    moments = _assert_moments_equal(pre, dumped)
    post = summary(out)
    assert (post["zero_stage"], post["steps"]) == (1, 16)
    got, ref = losses(post), reference["losses"]
    assert sorted(got) == list(range(9, 17))
    worst = max(_rel(got[s], ref[s]) for s in got)
    print(f"1 rank stage 0 -> 1 rank ZeRO-1 at step 8: moments differ by {moments:.1e}, losses 9-16 by {worst:.2e} relative")
    assert worst <= 1e-5, {s: (got[s], ref[s]) for s in got}  # 1 rank vs the 2-rank reference: reduction order only

    back = run(write_ds_config(tmp_path / "z0b.json", 0, micro=8, accum=None), out, [*ELASTIC, "train.steps=24"], ranks=1)
    assert back.returncode == 2, back.stdout[-2000:] + back.stderr[-2000:]
    assert "a ZeRO stage 0 ds_config resumes only its own world size and stage: resume with a ZeRO-1 ds_config" in back.stderr
