"""ZeRO stage 0 on one rank (engine.single_device_path): the engine's gradient all-reduce is off,
and training is the plain-torch loop bit for bit; ZeRO-1 keeps its reduction.

Real DeepSpeed engines, a world of one, in a subprocess (``python -m tests.unit.test_single_device
OUT``) so this process never initializes a process group."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimscale.optim import build_optimizer
from mimscale.runtime import dist
from mimscale.trainer import single_device_path
from tests.conftest import make_batch, tiny_model

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.integration.launch import env, free_port

    out = tmp_path_factory.mktemp("single") / "results.json"
    e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.unit.test_single_device", str(out)], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(out.read_text())


def test_stage0_on_one_rank_turns_the_all_reduce_off_and_trains_as_plain_torch(trained):
    s0 = trained["zero0"]
    assert s0["single_device"] is True and s0["allreduce"] is False
    assert s0["losses"] == trained["plain"]["losses"]  # bit for bit: the same model, masks and AdamW
    assert s0["weights"] == trained["plain"]["weights"]


def test_zero1_keeps_its_reduction(trained):
    s1 = trained["zero1"]
    assert s1["single_device"] is False and s1["allreduce"] is True
    assert s1["losses"] == pytest.approx(trained["plain"]["losses"], rel=1e-5)


# --- the writer (run in a subprocess by the ``trained`` fixture) ------------------------------


def _train(step_fn, model) -> dict:
    torch.manual_seed(1)  # the masks: the same draws for every variant
    losses = []
    for i in range(STEPS):
        images, meta = make_batch(4, seed=i)
        losses.append(step_fn(images, meta))
    weights = sum(float(p.detach().double().sum()) * (k + 1) for k, p in enumerate(model.parameters()))
    return {"losses": losses, "weights": weights}


def _plain() -> dict:
    model = tiny_model()
    opt = build_optimizer(model, 1e-3, 0.05)

    def step(images, meta):
        loss, _ = model(images, meta)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return _train(step, model)


def _engine(stage: int) -> dict:
    import deepspeed

    model = tiny_model()
    opt = build_optimizer(model, 1e-3, 0.05)
    cfg = json.loads((REPO / "ds_configs" / f"cpu_fp32_zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    single = single_device_path(engine, stage, dist.world_size())

    def step(images, meta):
        loss, _ = engine(images, meta)
        engine.backward(loss)
        engine.step()
        return loss.item()

    return {**_train(step, engine.module), "single_device": single, "allreduce": engine.enable_backward_allreduce}


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_distributed()
    results = {"plain": _plain(), "zero0": _engine(0), "zero1": _engine(1)}
    Path(out).write_text(json.dumps(results))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
