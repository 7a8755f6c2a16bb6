"""End-to-end 2-rank CPU runs under the real deepspeed launcher (fp32).

ZeRO-1 and ZeRO-3 training is pinned step by step by tests/golden's stored loss curves (MAE, AMT,
AutoMAE on 2 ranks), and resume under ZeRO-3 by tests/integration/test_amt.py and test_automae.py;
here: a ZeRO-2 run that learns and resumes exactly from a mid-run checkpoint, preemption by
SIGTERM under ZeRO-1 on real JPEGs with MLflow, and the shipped bf16 ZeRO-3 config.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.launch import REPO, command, env, free_port, losses, run, summary, write_ds_config

STEPS = 8
SHARED_JPEGS = REPO.parent / "shared" / "data" / "imagenet-sample" / "train"


@pytest.fixture(scope="module")
def zero2(tmp_path_factory) -> dict:
    """The uninterrupted ZeRO-2 reference run (checkpoints at steps 4 and 8), shared by the tests below."""
    root = tmp_path_factory.mktemp("zero2")
    ds = write_ds_config(root / "z2.json", 2)
    out = root / "ref"
    r = run(ds, out, [f"train.steps={STEPS}", "train.ckpt_every=4", "resume=never"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"ds": ds, "out": out, "summary": summary(out)}


# make test-all: ZeRO-2 training and exact resume are also the reference and resumes of
# tests/integration/test_elastic.py, and exact resume under ZeRO-1 is the fault suite's
@pytest.mark.slow
def test_loss_falls_under_zero2(zero2):
    s = zero2["summary"]
    assert s["steps"] == STEPS and s["world_size"] == 2 and s["zero_stage"] == 2
    assert s["samples_seen"] == STEPS * 4 * 2 * 2  # micro 4 x accumulation 2 x 2 ranks per step
    curve = [e["loss"] for e in s["loss_history"]]
    assert len(curve) == STEPS
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:2]) / 2, curve
    assert Path(s["checkpoint"]).name == f"step{STEPS:08d}" and (Path(s["checkpoint"]) / "COMPLETE").exists()
    assert s["img_per_s"] > 0 and 0 < s["mfu"] < 1


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_matches_uninterrupted_zero2(zero2, tmp_path):
    """A run resumed from the reference's step-4 checkpoint (resume=<tag>, an output_dir of its own)
    repeats the reference's steps 5..8 exactly. (train.stop_after then resume=auto: the FFCV run in
    test_data_sources.py; exactly so, under ZeRO-3: test_amt.py.)"""
    ref = losses(zero2["summary"])
    tag = zero2["out"] / "checkpoints" / "step00000004"
    out = tmp_path / "run"
    r = run(zero2["ds"], out, [f"train.steps={STEPS}", "train.ckpt_every=4", f"resume={tag}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    second = summary(out)
    assert second["resumed_from"] == str(tag) and second["steps"] == STEPS
    resumed = losses(second)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step, loss in resumed.items():
        assert abs(loss - ref[step]) <= 1e-6, (step, loss, ref[step])
    assert second["samples_seen"] == STEPS * 16


def _folder_with_bad_files(root: Path) -> Path:
    """48 real ImageNet JPEGs (some grayscale; generated JPEGs where ../shared is absent) plus a
    truncated and a garbage file."""
    data = root / "imagenet" / "train"
    if SHARED_JPEGS.is_dir():
        classes = [c.name for c in sorted(SHARED_JPEGS.iterdir())[:48]]
        for c in classes:
            (data / c).mkdir(parents=True)
            f = sorted((SHARED_JPEGS / c).iterdir())[0]
            shutil.copy(f, data / c / f.name)
    else:
        import numpy as np
        from PIL import Image

        classes = [f"n{i:08d}" for i in range(48)]
        rng = np.random.default_rng(0)
        for i, c in enumerate(classes):
            (data / c).mkdir(parents=True)
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((200 + 7 * i, 150 + 5 * i), Image.BICUBIC).save(data / c / f"{c}_0.JPEG", quality=90)
    good = sorted((data / classes[0]).iterdir())[0]
    (data / classes[1] / "truncated.JPEG").write_bytes(good.read_bytes()[:2000])
    (data / classes[2] / "garbage.JPEG").write_bytes(b"not an image at all" * 50)
    return root / "imagenet"


def _rank_processes(launcher: psutil.Process) -> list[psutil.Process]:
    """The training ranks: children of DeepSpeed's per-node launch process (their DataLoader
    workers share their command line, so match on the parent)."""
    node = [p for p in launcher.children(recursive=True) if any("deepspeed.launcher.launch" in a for a in p.cmdline())]
    assert len(node) == 1
    return node[0].children()


def test_sigterm_saves_and_resumes_exactly_on_real_jpegs_with_mlflow(tmp_path):
    data = _folder_with_bad_files(tmp_path)
    ds = write_ds_config(tmp_path / "z1.json", 1)
    sets = ["train.steps=24", "data.source=folder", f"data.path={data}", "tracking.enabled=true"]
    ref_out = tmp_path / "ref"
    r = run(ds, ref_out, sets + ["resume=never"])
    assert r.returncode == 0, r.stderr[-3000:]
    ref = summary(ref_out)
    assert ref["skipped_images"] >= 1  # the truncated and garbage files were skipped and counted

    out = tmp_path / "pre"
    # Through docker/entrypoint.sh as every Slurm task runs it, in a session of its own so the test
    # can signal the way Slurm does at preemption: SIGTERM to every process of the step at once
    # (the entrypoint's session and the launcher's, ranks and DataLoader workers included).
    launcher_args = command(ds, out, sets)
    launcher_args = launcher_args[launcher_args.index("mimscale/pretrain.py"):]  # without `deepspeed --num_gpus 2 ...`
    node_env = {**env(), "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()), "TMPDIR": str(tmp_path)}
    proc = psutil.Popen([str(REPO / "docker" / "entrypoint.sh"), *launcher_args[1:]], cwd=REPO, env=node_env,
                        stdout=open(tmp_path / "pre.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    everyone = [proc] + proc.children(recursive=True)
    assert len(_rank_processes(proc)) == 2
    for group in {proc.pid, os.getpgid(_rank_processes(proc)[0].pid)}:
        os.killpg(group, signal.SIGTERM)
    gone, alive = psutil.wait_procs(everyone, timeout=120)
    assert not alive, (tmp_path / "pre.log").read_text()[-3000:]
    assert proc.returncode == 143, (tmp_path / "pre.log").read_text()[-3000:]  # stopped early: run again to resume
    pre = summary(out)
    assert pre["stopped_by"] in ("SIGTERM", "SIGUSR1") and pre["steps"] < 24, (tmp_path / "pre.log").read_text()[-3000:]
    k = pre["steps"]
    assert pre["checkpoint"].endswith(f"step{k:08d}")

    r = run(ds, out, sets)  # resume: auto
    assert r.returncode == 0, r.stderr[-3000:]
    post = summary(out)
    assert post["steps"] == 24 and post["resumed_from"].endswith(f"step{k:08d}")
    assert post["mlflow_run_id"] == pre["mlflow_run_id"]  # the same MLflow run continues
    ref_l, post_l = losses(ref), losses(post)
    assert sorted(post_l) == list(range(k + 1, 25))
    for step, loss in post_l.items():
        assert abs(loss - ref_l[step]) <= 1e-6, (step, loss, ref_l[step])

    import mlflow

    client = mlflow.tracking.MlflowClient(post["mlflow_tracking_uri"])
    hist = client.get_metric_history(post["mlflow_run_id"], "loss")
    assert sorted({m.step for m in hist}) == list(range(1, 25))
    run_info = client.get_run(post["mlflow_run_id"])
    assert run_info.data.params["model.name"] == "vit_tiny" and "ds.zero_optimization" in " ".join(run_info.data.params)
    assert run_info.data.metrics["skipped_images"] >= 1
    (inp,) = run_info.inputs.dataset_inputs  # the image folder, logged by both invocations, recorded once
    from mimscale.data.sources import FolderSource

    assert inp.dataset.name == "imagenet/train" and inp.dataset.digest == FolderSource(data, "train").fingerprint()[:16]




@pytest.mark.slow  # make test-all: bf16 on CPU ranks is ~500x slower than fp32
def test_gpu_bf16_zero3_config_runs_on_two_ranks(tmp_path):
    """The shipped GPU config path (bf16 engine, ZeRO-3, every tensor partitioned) on CPU ranks with
    a tiny model, with AutoMAE (MAE's encoder and decoder plus the generator, the tiny discriminator
    and the EMA extractor): inputs are cast to the engine's dtype and the loss stays finite."""
    cfg = json.loads((REPO / "ds_configs" / "gpu_bf16_zero3.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds = tmp_path / "bf16_z3.json"
    ds.write_text(json.dumps(cfg))
    method = ["masking.method=automae", "masking.automae.extractor=ema", "masking.automae.throw_ratio=0.125"]
    r = run(ds, tmp_path / "out", ["train.steps=3", "resume=never", *method])
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(tmp_path / "out")
    assert s["precision"] == "bf16" and s["zero_stage"] == 3 and s["steps"] == 3
    assert s["mask_fractions"] == {"visible": 2 / 16, "masked": 12 / 16, "thrown": 2 / 16}  # AutoMAE's plan ran
    assert all(math.isfinite(e["loss"]) and 0.1 < e["loss"] < 10 for e in s["loss_history"])
