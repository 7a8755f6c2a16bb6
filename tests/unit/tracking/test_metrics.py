"""mimscale/metrics.py: the log window (device accumulators, the packed reduce, non-finite flags)
and the run's throughput. The all-reduce of a world of one is the identity, so it is stubbed."""
import math

import pytest
import torch

from mimscale import methods
from mimscale.config import load_config
from mimscale.errors import TrainingDiverged
from mimscale.tracking import metrics
from mimscale.tracking.metrics import LogWindow, RunMeter


@pytest.fixture(autouse=True)
def world_of_one(monkeypatch):
    calls = []
    monkeypatch.setattr(metrics.ds_comm, "all_reduce", lambda t, op=None: calls.append(t.numel()))
    return calls


def _batch(skipped=0, converted=0):
    return {"skipped": torch.tensor(skipped), "converted": torch.tensor(converted)}


def test_window_averages_terms_over_micro_steps_in_one_reduce(world_of_one):
    win = LogWindow(torch.device("cpu"), first_step=0)
    for step, (loss, rec) in enumerate(((2.0, 1.0), (4.0, 3.0))):
        win.add_batch(_batch(skipped=1, converted=step), wait=0.5)
        win.add_micro(torch.tensor(loss), {"loss_rec": torch.tensor(rec)})
        win.end_step()
    out = win.close(step=2, world=1, grad_norm=lambda: 0.7, last_checkpoint=None)
    assert world_of_one == [1 + 1 + 1 + 4]  # ONE packed tensor: loss, 1 term, bad count, 4 extras
    assert out["loss"] == 3.0 and out["terms"] == {"loss_rec": 2.0}
    assert (out["steps"], out["skipped"], out["converted"], out["grad_norm"]) == (2, 2, 1, 0.7)
    assert 0 < out["data_wait_pct"] <= 100 * 1.0 / out["seconds"]


def test_window_reset_starts_a_new_window_and_exclude_is_not_billed():
    win = LogWindow(torch.device("cpu"), first_step=0)
    win.add_batch(_batch(), wait=0.0)
    win.add_micro(torch.tensor(1.0), {})
    win.end_step()
    win.reset()
    assert (win.steps, win.micro, win.acc, win.files) == (0, 0, None, [0, 0])
    t0 = win.t0
    win.exclude(5.0)
    assert win.t0 == t0 + 5.0


@pytest.mark.parametrize("bad_at", [1, 2])
def test_nonfinite_loss_names_its_step(bad_at):
    win = LogWindow(torch.device("cpu"), first_step=10)
    for step in (1, 2):
        win.add_batch(_batch(), 0.0)
        win.add_micro(torch.tensor(float("nan") if step == bad_at else 1.0), {})
        win.end_step()
    with pytest.raises(TrainingDiverged, match=f"non-finite loss at step {10 + bad_at}.*Last good checkpoint: ckpt/x"):
        win.close(step=12, world=1, grad_norm=lambda: 1.0, last_checkpoint="ckpt/x")


def test_nonfinite_grad_norm_stops_too():
    win = LogWindow(torch.device("cpu"), first_step=0)
    win.add_batch(_batch(), 0.0)
    win.add_micro(torch.tensor(1.0), {})
    win.end_step()
    with pytest.raises(TrainingDiverged, match="non-finite gradient norm at step 1"):
        win.close(step=1, world=1, grad_norm=lambda: float("inf"), last_checkpoint=None)


def test_run_meter_leaves_the_first_window_out():
    m = RunMeter(global_batch=8, world=2, peak=100.0)
    assert m.mean_step_seconds() is None and m.img_per_s() == 0.0 and m.run_mfu() is None
    m.add(steps=2, seconds=10.0, flops_per_img=1.0)  # warm-up: slow
    assert m.mean_step_seconds() == 5.0  # one window: it counts
    m.add(steps=4, seconds=2.0, flops_per_img=1.0)
    m.add(steps=4, seconds=2.0, flops_per_img=3.0)
    assert m.mean_step_seconds() == 0.5 and m.img_per_s() == 16.0
    assert math.isclose(m.run_mfu(), (4 * 8 * 1.0 + 4 * 8 * 3.0) / 4.0 / 2 / 100.0)  # FLOP/s over the windows / world / peak
    assert m.mfu(img_per_s=10.0, flops_per_img=20.0) == 1.0
    assert RunMeter(8, 1, None).mfu(1.0, 1.0) is None  # unknown peak: no MFU


def test_flops_follow_the_method():
    base = ["model.name=vit_base"]
    mae = methods.flops(load_config(None, base), 49, 147)
    assert 57e9 < mae < 61e9
    rmae = methods.flops(load_config(None, base + ["masking.method=rmae"]), 49, 147)
    cmae = methods.flops(load_config(None, base + ["masking.method=cmae"]), 49, 147)
    assert rmae > 2 * mae * 0.9 and cmae > rmae  # two views; C-MAE encodes all L patches four times


def test_metrics_file_keeps_steps_up_to_the_resume_and_drops_a_torn_line(tmp_path, capsys):
    from mimscale.tracking.metrics import MetricsFile

    f = MetricsFile(tmp_path / "metrics.jsonl")
    f.trim(3)  # no file yet: nothing to do
    for s in (1, 2, 3, 4):
        f.append(s, {"loss": 1.0})
    with open(f.path, "a") as out:
        out.write('{"step": 5, "lo')  # a crash in the middle of a write
    f.trim(3)
    import json

    assert [json.loads(line)["step"] for line in f.path.read_text().splitlines()] == [1, 2, 3]
    assert "dropped a torn line" in capsys.readouterr().err


def test_phase_clock_sums_each_phase_on_the_host_clock_of_a_cpu(monkeypatch):
    clock = metrics.PhaseClock(torch.device("cpu"))
    ticks = iter([0.0, 1.0, 3.0, 10.0, 14.0, 20.0, 20.5, 21.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(ticks))
    for _ in range(2):  # two micro steps: forward, backward, then the optimizer
        clock.start()
        clock.mark("forward")
        clock.mark("backward")
    clock.start()
    clock.mark("optimizer")
    assert clock.seconds() == {"forward": 1.0 + 4.0, "backward": 2.0 + 6.0, "optimizer": 0.5}
    clock.reset()
    assert clock.seconds() == dict.fromkeys(metrics.PHASES, 0.0)


def test_the_log_window_reports_where_a_step_went(monkeypatch):
    """Per optimizer step: data wait, forward, backward, optimizer; the save before the window."""
    monkeypatch.setattr(metrics.ds_comm, "all_reduce", lambda t, op=None: None)  # one rank
    clock = metrics.PhaseClock(torch.device("cpu"))
    win = LogWindow(torch.device("cpu"), 0, clock)
    win.note_checkpoint(7.5)
    for _ in range(2):
        win.add_batch({"skipped": torch.tensor(0), "converted": torch.tensor(0)}, 0.5)
        clock.totals["forward"] += 1.0
        clock.totals["backward"] += 2.0
        clock.totals["optimizer"] += 0.5
        win.add_micro(torch.tensor(1.0), {})
        win.end_step()
    out = win.close(2, 1, lambda: None, None)
    assert out["time"] == {"data_s": 0.5, "forward_s": 1.0, "backward_s": 2.0, "optimizer_s": 0.5, "ckpt_s": 7.5}
    win.reset()
    assert win.ckpt_s == 0.0 and clock.seconds()["forward"] == 0.0
