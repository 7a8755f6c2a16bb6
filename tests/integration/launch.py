"""Run mimscale/pretrain.py for real: under the deepspeed launcher on 2 CPU ranks, or as one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "mimscale" / "configs" / "mae_vit_tiny_cpu.yaml"
ZERO_STAGES = (1, 2, 3)  # what the zero_checks launch (tests/integration/conftest.py) checks, in turn
# A model small enough that a 2-rank CPU step takes a fraction of a second.
TINY_SETS = [
    "model.img_size=32",
    "model.patch_size=8",
    "data.source=synthetic",
    "data.synthetic_count=512",
    "data.synthetic_size=48",
    "data.num_workers=1",
    "train.warmup_steps=2",
    "train.log_every=1",
    "tracking.enabled=false",
    # these tests size each run's batch through their ds_config (micro x accumulation x ranks);
    # tests/integration/test_elastic.py runs the recipe's train.global_batch
    "train.global_batch=null",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ds_config(path: Path, stage: int, micro: int = 4, accum: int | None = 2, **extra) -> Path:
    """A CPU fp32 ds_config; ``accum`` None leaves the accumulation out (the recipe's train.global_batch derives it)."""
    cfg = json.loads((REPO / "ds_configs" / f"cpu_fp32_zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, **extra)
    if accum is not None:
        cfg["gradient_accumulation_steps"] = accum
    path.write_text(json.dumps(cfg))
    return path


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"  # the venv's deepspeed, ninja
    e.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")  # CPU ranks even on a GPU machine
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def command(ds_config: Path, out: Path, sets: list[str], ranks: int = 2) -> list[str]:
    args = ["mimscale/pretrain.py", "--deepspeed_config", str(ds_config), "--config", str(TINY),
            "--set", f"output_dir={out}"]
    for s in TINY_SETS + list(sets):
        args += ["--set", s]
    if ranks == 1:
        return [sys.executable, *args]
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]


def run_group(cmd: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on a timeout (a hung rank) the launcher AND its
    ranks are killed, instead of leaving orphaned ranks that hold memory for the rest of the suite."""
    import signal

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **{"cwd": REPO, "env": env(), **kw}) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"timed out after {timeout} s; the process group was killed\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run(ds_config: Path, out: Path, sets: list[str] = (), ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_group(command(ds_config, out, list(sets), ranks), timeout)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def losses(s: dict) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in s["loss_history"]}


def run_script_json(script: str, stage: int | str, out: Path, timeout: int = 300) -> dict:
    """``deepspeed --num_gpus 2 <script> <stage> <out>``: a 2-rank check script that writes its
    result as JSON to ``out`` (rank 0); returns that JSON, or fails with the launch's output.
    ``stage`` is one ZeRO stage, or several as "1,2,3" for scripts that check each in turn."""
    launcher = str(Path(env()["PATH"].split(":")[0]) / "deepspeed")
    r = run_group([launcher, "--num_gpus", "2", "--master_port", str(free_port()), script, str(stage), str(out)],
                  timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())
