"""train.clip_grad reaches DeepSpeed: the gradient its optimizer steps with is clipped to that norm
(ZeRO stage 0 and 1, a world of one; real engines in a subprocess, ``python -m
tests.unit.test_clip_grad OUT``, so this process never initializes a process group)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimscale.ds_config import check_ds_config
from mimscale.optim import build_optimizer
from mimscale.runtime import dist

REPO = Path(__file__).resolve().parents[2]
BETA1 = 0.9


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def _loss(model) -> torch.Tensor:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    return 50.0 * model(x).square().mean()  # large: its gradient norm is far above the clip


def grad_norm() -> float:
    model = _model()
    _loss(model).backward()
    return float(torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters())))


def stepped_norm(stage: int, clip_grad) -> float:
    """The norm of the gradient the engine's AdamW took one step with: its first moment after one
    step is (1 - beta1) x that gradient, whatever the parameters' layout (ZeRO-1's flat partitions)."""
    import deepspeed

    model = _model()
    raw = json.loads((REPO / "ds_configs" / f"cpu_fp32_zero{stage}.json").read_text())
    raw.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    eng = check_ds_config(raw, 1, clip_grad=clip_grad)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, 1e-3, 0.0, betas=(BETA1, 0.95)),
                                      config=eng.raw)
    engine.backward(_loss(engine.module))
    engine.step()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    sq = sum(float(s["exp_avg"].double().square().sum()) for s in inner.state.values() if "exp_avg" in s)
    return sq ** 0.5 / (1 - BETA1)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.integration.launch import env, free_port

    out = tmp_path_factory.mktemp("clip") / "results.json"
    e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.unit.test_clip_grad", str(out)], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", ["0", "1"])
def test_the_engine_steps_with_the_recipes_clipped_gradient(results, stage):
    full = grad_norm()
    assert full > 1.0
    got = results[stage]
    assert got["none"] == pytest.approx(full, rel=1e-4)  # the shipped JSONs: no clipping
    assert got["clip"] == pytest.approx(0.5, rel=1e-3)  # train.clip_grad=0.5: the step's gradient has norm 0.5


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_distributed()
    results = {str(s): {"none": stepped_norm(s, None), "clip": stepped_norm(s, 0.5)} for s in (0, 1)}
    Path(out).write_text(json.dumps(results))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
