"""Pictures of a run, from what it wrote to its output_dir (no MLflow needed):

    python -m mimscale.report <output_dir> [--out <dir>]      # default <output_dir>/report

writes ``loss.png`` (the loss and each term that differs from it per step, from metrics.jsonl,
above the learning rate), ``throughput.png`` (img/s, MFU and data-wait % per step, axes from
zero), ``cka.png`` (the in-training occlusion-invariance check per ratio, when it ran), copies the
newest mask grids (original | masked input | reconstruction | + visible pasted, and the method's
weights when it has them; from mask_grids/) and writes ``index.html`` showing them all with the
run's summary. Prints the HTML's path.
"""
from __future__ import annotations

import argparse
import html
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on a login node
import matplotlib.pyplot as plt  # noqa: E402

LOSS_SKIP = ("lr", "img_per_s", "step_s", "data_wait_pct", "skipped_images", "converted_images", "epoch", "gflop_per_img",
             "mfu", "grad_norm")


def read_metrics(out_dir: Path) -> list[dict]:
    """metrics.jsonl's records (a torn last line is skipped)."""
    path = out_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def same_series(records: list[dict], a: str, b: str, rel: float = 1e-6) -> bool:
    """Whether ``a`` and ``b`` are logged at the same steps with the same values (MAE's loss_rec is
    its whole loss): such a term is the total's line again, not a line of its own."""
    sa, va = _series(records, a)
    sb, vb = _series(records, b)
    return sa == sb and all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(va, vb))


def loss_lines(records: list[dict]) -> list[tuple[str, str]]:
    """(key, label) of each loss line to draw: ``loss`` first, labelled with the terms equal to it
    (``loss = loss_rec``), then each term that differs from it."""
    keys = sorted({k for r in records for k in r if k.startswith("loss") and k not in LOSS_SKIP})
    if "loss" not in keys:
        return [(k, k) for k in keys]
    terms = [k for k in keys if k != "loss"]
    same = [k for k in terms if same_series(records, "loss", k)]
    return [("loss", " = ".join(["loss", *same])), *((k, k) for k in terms if k not in same)]


def loss_figure(records: list[dict]):
    """Loss lines over the steps above the learning rate, on a shared step axis (a Figure with the
    axes [loss, lr]; the lr axis only when lr was logged); None when nothing was logged."""
    lines = loss_lines(records)
    if not lines:
        return None
    lr_steps, lr = _series(records, "lr")
    if lr_steps:
        fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in lines:
        ax.plot(*_series(records, key), label=label, lw=1.5 if key == "loss" else 1.0)
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if lr_steps:
        lr_ax.plot(lr_steps, lr, color="tab:gray")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lr_ax.grid(alpha=0.3)
        lr_ax.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def _saved(fig, path: Path) -> Optional[Path]:
    """``fig`` written to ``path`` and closed; None (nothing written) when there was no figure."""
    if fig is None:
        return None
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_loss(records: list[dict], path: Path) -> Optional[Path]:
    return _saved(loss_figure(records), path)


def throughput_figure(records: list[dict]):
    """img/s (left axis) and MFU / data-wait % (right axis) per step, both axes from zero (a
    Figure with the axes [img/s, %]); None when no img/s was logged."""
    steps, ips = _series(records, "img_per_s")
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, ips, label="img/s", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("images / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    right = ax.twinx()
    for key, scale, label, color in (("mfu", 100.0, "MFU %", "tab:green"), ("data_wait_pct", 1.0, "data wait %", "tab:red")):
        s, v = _series(records, key)
        if s:
            right.plot(s, [x * scale for x in v], label=label, color=color, lw=1.0)
    right.set_ylabel("%")
    right.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right")
    ax.set_title("throughput")
    fig.tight_layout()
    return fig


def plot_throughput(records: list[dict], path: Path) -> Optional[Path]:
    return _saved(throughput_figure(records), path)


def plot_cka(records: list[dict], path: Path) -> Optional[Path]:
    keys = sorted({k for r in records for k in r if k.startswith("cka/") and k.endswith("/mean")})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot(*_series(records, k), marker="o", label=k.split("/")[1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("CKA(full, occluded), mean over blocks")
    ax.set_title("occlusion invariance (higher: more invariant)")
    ax.legend(title="drop ratio")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out_dir: str | Path, dest: Optional[str | Path] = None, grids: int = 2) -> Path:
    """Write the pictures and index.html for the run in ``out_dir``; returns index.html's path."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a run's output_dir")
    records = read_metrics(out_dir)
    if not records:
        raise FileNotFoundError(f"{out_dir} has no metrics.jsonl records: has the run logged a step yet?")
    dest = Path(dest) if dest else out_dir / "report"
    dest.mkdir(parents=True, exist_ok=True)
    pictures = [p for p in (plot_loss(records, dest / "loss.png"), plot_throughput(records, dest / "throughput.png"),
                            plot_cka(records, dest / "cka.png")) if p is not None]
    for old in dest.glob("mask_grid_*.png"):
        old.unlink()
    for grid in sorted((out_dir / "mask_grids").glob("step*.png"))[-grids:]:
        pictures.append(Path(shutil.copy2(grid, dest / f"mask_grid_{grid.name}")))
    summary = out_dir / "summary.json"
    facts = json.loads(summary.read_text()) if summary.is_file() else {}
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in facts.items() if k != "loss_history" and not isinstance(v, (dict, list)))
    images = "".join(f'<figure><img src="{p.name}" alt="{p.stem}"><figcaption>{p.stem}</figcaption></figure>' for p in pictures)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>mimscale run {html.escape(out_dir.name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}figure{display:inline-block;margin:1em;"
            "vertical-align:top;max-width:48%}td{padding:0 1em}</style></head><body>"
            f"<h1>{html.escape(str(out_dir))}</h1>{images}<h2>summary.json</h2><table>{rows}</table></body></html>")
    index = dest / "index.html"
    index.write_text(page)
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimscale.report", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", help="a run's output_dir")
    p.add_argument("--out", help="where to write (default <output_dir>/report)")
    p.add_argument("--grids", type=int, default=2, help="the newest mask grids to show")
    args = p.parse_args(argv)
    try:
        index = report(args.output_dir, args.out, args.grids)
    except FileNotFoundError as e:
        print(f"mimscale.report: error: {e}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
