"""What a person reads while a run trains: rank 0's progress, on the console and in ``train.log``.

On a terminal the console gets tqdm's bar. Anywhere else (a Slurm ``logs/*.out`` file, ``kubectl
logs``, a pipe) a carriage-return bar is one unreadable line that shows nothing until it ends, so
the console gets one plain line per log step instead, as MAE, timm and torchtitan print. The
per-run ``<output_dir>/train.log`` always gets the plain lines (appended across resumes), plus the
start-up lines that say how the run resolved its settings.

    step 120/1000 (12.0%) epoch 0.24 | loss 0.8123 loss_rec 0.8123 | lr 1.20e-04 | 812.3 img/s | MFU 41.2% | data wait 1.3%
        | s/step: data 0.006 fwd 0.142 bwd 0.290 opt 0.031 | ckpt 41.7 s | mem 12.3 GiB | ETA 0:11:52

(one line; ``s/step`` is where an optimizer step's seconds go, ``ckpt`` the save before this window)
"""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from tqdm import tqdm

# metrics a line names on its own, in this order; other keys of the step's metrics are loss terms
_OWN = ("loss", "lr", "img_per_s", "step_s", "data_wait_pct", "skipped_images", "converted_images", "epoch", "gflop_per_img",
        "mfu", "hfu", "gflop_recompute_per_img", "grad_norm")


def format_step(step: int, total: int, metrics: dict, eta_s: Optional[float], mem_gib: Optional[float]) -> str:
    """One plain progress line (see the module docstring)."""
    parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.1f}%) epoch {metrics.get('epoch', 0.0):.2f}"]
    terms = " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                     if k not in _OWN and not k.startswith("time/") and isinstance(v, float))
    parts.append(f"loss {metrics['loss']:.4f}" + (f" {terms}" if terms else ""))
    parts.append(f"lr {metrics['lr']:.2e}")
    parts.append(f"{metrics['img_per_s']:.1f} img/s")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100.0 * metrics['mfu']:.1f}%" + (f" (HFU {100.0 * metrics['hfu']:.1f}% with recomputation)"
                                                             if metrics.get("hfu") is not None else ""))
    parts.append(f"data wait {metrics.get('data_wait_pct', 0.0):.1f}%")
    if "time/forward_s" in metrics:  # where a step's time goes (seconds per optimizer step)
        split = " ".join(f"{name} {metrics[f'time/{key}_s']:.3f}" for name, key in
                         (("data", "data"), ("fwd", "forward"), ("bwd", "backward"), ("opt", "optimizer")))
        ckpt = metrics.get("time/ckpt_s", 0.0)
        parts.append(f"s/step: {split}" + (f" | ckpt {ckpt:.1f} s" if ckpt else ""))
    if mem_gib is not None:
        parts.append(f"mem {mem_gib:.1f} GiB")
    if eta_s is not None:
        parts.append(f"ETA {datetime.timedelta(seconds=int(round(eta_s)))}")
    return " | ".join(parts)


class Progress:
    """Rank 0's progress output; on other ranks every method does nothing."""

    def __init__(self, out_dir: Path, total: int, initial: int, active: bool, console: TextIO = sys.stdout,
                 tty: Optional[bool] = None):
        self.total, self.active = total, active
        self.console = console
        self.tty = console.isatty() if tty is None else tty
        self.file = None
        self.bar = None
        if not active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "train.log", "a", buffering=1)  # line-buffered: readable while it runs
        if self.tty:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0, file=console)

    def note(self, text: str) -> None:
        """A start-up or event line: console (above the bar on a terminal) and train.log."""
        if not self.active:
            return
        self._write_file(text)
        if self.bar is not None:
            self.bar.write(text, file=self.console)
        else:
            print(text, file=self.console, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def step(self, step: int, metrics: dict, eta_s: Optional[float], mem_gib: Optional[float] = None) -> None:
        """The log step's line: train.log always; the console as a line, or the bar's postfix on a terminal."""
        if not self.active:
            return
        line = format_step(step, self.total, metrics, eta_s, mem_gib)
        self._write_file(line)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.1f}", refresh=False)
        else:
            print(line, file=self.console, flush=True)

    def _write_file(self, text: str) -> None:
        if self.file is None:  # closed: the console still gets the line
            return
        try:
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        except OSError:  # a full disk must not stop training
            pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
