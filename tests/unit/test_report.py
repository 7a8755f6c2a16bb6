"""mimscale/report.py: a run's pictures and one HTML page from its output_dir."""
from __future__ import annotations

import json

from PIL import Image

from mimscale import report


def _run_dir(tmp_path):
    out = tmp_path / "run"
    (out / "mask_grids").mkdir(parents=True)
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "loss_rec": 1.0 / step, "loss_g": 0.1, "lr": 1e-3 * min(1, step / 5),
                                "img_per_s": 100.0 + step, "mfu": 0.3, "data_wait_pct": 2.0}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "cka/r0.50/mean": 0.9 + step / 1000, "cka/r0.50/last": 0.8}) + "\n")
        f.write('{"step": 21, "loss"')  # torn by a crash: skipped
    for step in (5, 10, 15):
        Image.new("RGB", (30, 10), (step, 0, 0)).save(out / "mask_grids" / f"step{step:08d}.png")
    (out / "summary.json").write_text(json.dumps({"steps": 20, "final_loss": 0.05, "loss_history": [1, 2], "masking": "amt"}))
    return out


def test_report_draws_loss_throughput_cka_and_the_newest_grids(tmp_path):
    out = _run_dir(tmp_path)
    index = report.report(out)
    dest = out / "report"
    assert index == dest / "index.html"
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["cka.png", "index.html", "loss.png", "mask_grid_step00000010.png", "mask_grid_step00000015.png", "throughput.png"]
    for png in ("loss.png", "throughput.png", "cka.png"):
        with Image.open(dest / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    page = index.read_text()
    assert all(f'src="{n}"' in page for n in names if n.endswith(".png"))
    assert "final_loss" in page and "loss_history" not in page


def test_cli_names_a_folder_without_metrics(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "has no metrics.jsonl records" in capsys.readouterr().err
    out = _run_dir(tmp_path)
    assert report.main([str(out), "--out", str(tmp_path / "pics"), "--grids", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "pics" / "index.html")
    assert len(list((tmp_path / "pics").glob("mask_grid_*.png"))) == 1


def test_loss_plot_draws_each_term_once_above_the_learning_rate(tmp_path):
    records = report.read_metrics(_run_dir(tmp_path))
    fig = report.loss_figure(records)
    loss_ax, lr_ax = fig.axes
    # loss_rec equals the loss at every step (MAE): one line, labelled with both; loss_g differs
    assert [line.get_label() for line in loss_ax.get_lines()] == ["loss = loss_rec", "loss_g"]
    assert lr_ax.get_ylabel() == "learning rate" and lr_ax.get_xlabel() == "optimizer step"
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_ydata()) == [1e-3 * min(1, s / 5) for s in range(1, 21)]
    assert lr_ax.get_ylim()[0] == 0
    report.plt.close(fig)
    # a term that differs at one step is a line of its own
    records[3]["loss_rec"] += 0.5
    fig = report.loss_figure(records)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["loss", "loss_g", "loss_rec"]
    report.plt.close(fig)


def test_throughput_axes_start_at_zero(tmp_path):
    fig = report.throughput_figure(report.read_metrics(_run_dir(tmp_path)))
    ips_ax, pct_ax = fig.axes
    assert ips_ax.get_ylim()[0] == 0 and pct_ax.get_ylim()[0] == 0
    assert min(ips_ax.get_lines()[0].get_ydata()) > 100  # the data sit far above the axis' zero
    report.plt.close(fig)
