"""mimscale/console.py: one plain line per log step off a terminal, the bar on one, train.log always."""
from __future__ import annotations

import io
import re

from mimscale.tracking.console import Progress, format_step

METRICS = {"loss": 0.81234, "loss_g": 0.1, "loss_d": 0.5, "lr": 1.2e-4, "img_per_s": 812.34, "step_s": 0.3, "data_wait_pct": 1.3,
           "epoch": 0.24, "mfu": 0.412, "grad_norm": 1.0, "skipped_images": 0.0, "converted_images": 0.0, "gflop_per_img": 20.0}


def test_a_line_names_step_epoch_loss_terms_lr_speed_mfu_wait_memory_and_eta():
    line = format_step(120, 1000, METRICS, eta_s=712.4, mem_gib=12.34)
    assert line == ("step 120/1000 (12.0%) epoch 0.24 | loss 0.8123 loss_d 0.5000 loss_g 0.1000 | lr 1.20e-04 | 812.3 img/s | "
                    "MFU 41.2% | data wait 1.3% | mem 12.3 GiB | ETA 0:11:52")
    bare = format_step(1, 10, {k: v for k, v in METRICS.items() if k != "mfu"}, eta_s=None, mem_gib=None)
    assert "MFU" not in bare and "mem" not in bare and "ETA" not in bare and "\r" not in bare


def test_off_a_terminal_the_console_gets_lines_and_train_log_gets_everything(tmp_path):
    out = io.StringIO()
    p = Progress(tmp_path, 1000, 0, active=True, console=out, tty=False)
    p.note("[mimscale] world size 8: global batch 4096 = micro batch 128 x accumulation 4 x 8 ranks")
    for step in (20, 40):
        p.advance(20)
        p.step(step, METRICS, eta_s=100.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[1].startswith("step 20/1000") and lines[2].startswith("step 40/1000")
    logged = (tmp_path / "train.log").read_text().splitlines()
    assert [re.sub(r"^\S+ \S+ ", "", x) for x in logged] == lines  # timestamped copies
    Progress(tmp_path, 1000, 40, active=True, console=io.StringIO(), tty=False).note("resumed")  # appended, not replaced
    assert (tmp_path / "train.log").read_text().count("\n") == 4


def test_on_a_terminal_the_bar_carries_the_loss_and_the_file_still_gets_lines(tmp_path):
    out = io.StringIO()
    p = Progress(tmp_path, 100, 0, active=True, console=out, tty=True)
    p.advance(5)
    p.step(5, METRICS, eta_s=10.0)
    p.close()
    assert "step 5/100" not in out.getvalue() and "\r" in out.getvalue()  # the bar, not a line
    assert "step 5/100 (5.0%)" in (tmp_path / "train.log").read_text()


def test_a_line_after_close_still_reaches_the_console(tmp_path):
    out = io.StringIO()
    p = Progress(tmp_path, 10, 0, active=True, console=out, tty=False)
    p.close()
    p.note("[mimscale] SIGTERM received: saving a checkpoint")  # e.g. a stop handled after the loop
    p.step(3, METRICS, None)
    assert "SIGTERM received" in out.getvalue() and "step 3/10" in out.getvalue()


def test_other_ranks_write_nothing(tmp_path):
    out = io.StringIO()
    p = Progress(tmp_path / "run", 10, 0, active=False, console=out, tty=False)
    p.note("x")
    p.step(1, METRICS, None)
    p.close()
    assert out.getvalue() == "" and not (tmp_path / "run").exists()


def test_a_line_says_where_the_step_went_without_listing_it_as_a_loss_term():
    times = {"time/data_s": 0.006, "time/forward_s": 0.142, "time/backward_s": 0.29, "time/optimizer_s": 0.031, "time/ckpt_s": 41.7}
    line = format_step(120, 1000, {**METRICS, **times}, eta_s=None, mem_gib=None)
    assert "| s/step: data 0.006 fwd 0.142 bwd 0.290 opt 0.031 | ckpt 41.7 s" in line
    assert "time/" not in line
    no_save = format_step(120, 1000, {**METRICS, **times, "time/ckpt_s": 0.0}, eta_s=None, mem_gib=None)
    assert "ckpt" not in no_save


def test_with_activation_checkpointing_the_line_gives_mfu_and_hfu_apart():
    line = format_step(120, 1000, {**METRICS, "hfu": 0.55, "gflop_recompute_per_img": 12.0}, eta_s=None, mem_gib=None)
    assert "MFU 41.2% (HFU 55.0% with recomputation)" in line and "gflop_recompute" not in line
