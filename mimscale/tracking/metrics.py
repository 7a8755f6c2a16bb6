"""The log window: what the loop measures between two log steps, and the run's throughput.

Inside a step there is no host sync: loss terms accumulate in a device tensor, non-finite losses
are flagged on the device, and data wait and file counts are host numbers. On a log step the
ranks meet in ONE packed all-reduce (terms, non-finite count, micro batches, data wait, skipped
and converted files), after which every rank holds the same metrics. FLOPs per image are the
method's (``mimscale.methods.flops``) at the plan sizes actually used, passed in by the Trainer.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import deepspeed.comm as ds_comm
import torch

from mimscale.errors import TrainingDiverged
from mimscale.runtime import dist


@dataclass
class Window:
    """One closed log window, as the run's throughput remembers it."""

    steps: int
    seconds: float
    img_per_s: float
    flops_per_img: float


PHASES = ("forward", "backward", "optimizer")


class PhaseClock:
    """Seconds spent in each phase of the micro steps (forward, backward, optimizer step), with no
    host sync inside a step: on a GPU a CUDA event is recorded at each phase boundary (a few
    microseconds on the host, nothing on the device's queue) and the pairs are read at the log
    step, after the window's all-reduce has synchronized; on a CPU, where kernels run as they are
    called, the host clock is the device's. ``start()`` opens a phase, ``mark(phase)`` closes it
    (and opens the next)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.pending: list = []  # GPU: (phase, start event, end event) not read yet
        self.last = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def mark(self, phase: str) -> None:
        now = self._now()
        if self.last is not None:
            if self.cuda:
                self.pending.append((phase, self.last, now))
            else:
                self.totals[phase] += now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        """Each phase's seconds so far. On a GPU call it after a sync (the log step's all-reduce)."""
        for phase, a, b in self.pending:
            self.totals[phase] += a.elapsed_time(b) / 1000.0
        self.pending.clear()
        return dict(self.totals)


class LogWindow:
    """Accumulates the micro steps of one log window on the device; ``close`` reduces it."""

    def __init__(self, device: torch.device, first_step: int, clock: Optional[PhaseClock] = None):
        self.device = device
        self.clock = clock or PhaseClock(device)
        # The optimizer step being taken, kept on the device so recording a bad step needs no
        # host-to-device copy (a synchronous cudaMemcpy would stall the queue every micro step).
        self.step_dev = torch.full((), float(first_step + 1), device=device)
        self.term_names: Optional[list[str]] = None
        self.bad = torch.zeros((), device=device)  # non-finite losses seen
        self.first_bad = torch.full((), float("inf"), device=device)
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.clock.reset()
        self.ckpt_s = 0.0  # the save just before this window (see note_checkpoint)
        self.wait = 0.0
        self.steps = 0
        self.micro = 0
        self.acc: Optional[torch.Tensor] = None  # [1 + n_terms] summed over micro steps
        self.files = [0, 0]  # skipped, converted files (host ints from CPU tensors)

    def exclude(self, seconds: float) -> None:
        """Time spent outside training (a refresh, a health check) is not billed to the steps."""
        self.t0 += seconds

    def note_checkpoint(self, seconds: float) -> None:
        """The seconds of the save that closed the previous window, reported as this window's
        ``ckpt_s`` (never part of any window's step time: windows reset after the save)."""
        self.ckpt_s += seconds

    def add_batch(self, batch: dict, wait: float) -> None:
        self.wait += wait
        self.files[0] += int(batch["skipped"])  # CPU tensors: no device sync
        self.files[1] += int(batch["converted"])

    def add_micro(self, loss: torch.Tensor, terms: dict) -> None:
        if self.term_names is None:
            self.term_names = sorted(terms)
        vals = torch.stack([loss.detach().float()] + [terms[k].float() for k in self.term_names])
        self.acc = vals if self.acc is None else self.acc + vals
        nonfinite = ~torch.isfinite(vals[0])
        self.bad = self.bad + nonfinite.float()
        self.first_bad = torch.where(nonfinite, torch.minimum(self.first_bad, self.step_dev), self.first_bad)
        self.micro += 1

    def end_step(self) -> None:
        self.steps += 1
        self.step_dev += 1

    def close(self, step: int, world: int, grad_norm: Callable[[], Optional[float]], last_checkpoint: Optional[str]) -> dict:
        """The one packed all-reduce (every rank), then the window's metrics, the same on every
        rank: loss, terms, img/s inputs (seconds, steps), data wait, file counts, grad norm. Raises
        TrainingDiverged on a non-finite loss or gradient norm. The caller ``reset()``s the window
        once it is done with the log step (after a checkpoint, whose time is not billed either)."""
        n_terms = len(self.term_names or [])
        extras = torch.tensor([self.micro, self.wait, self.files[0], self.files[1]], dtype=torch.float32, device=self.device)
        packed = torch.cat([self.acc.float(), self.bad.reshape(1), extras])
        ds_comm.all_reduce(packed)
        v = packed.tolist()  # the one host sync of this window
        elapsed = time.perf_counter() - self.t0  # after the sync: all queued work is counted
        # this rank's phase times (rank 0 logs them: ranks run in lockstep, so they differ little)
        phases = self.clock.seconds()
        sums, n_bad = v[: 1 + n_terms], v[1 + n_terms]
        micro_all, wait_all, skipped_all, converted_all = v[2 + n_terms:6 + n_terms]
        grad_norm = grad_norm()  # read after the sync above (a device scalar on GPUs)
        if n_bad > 0 or (grad_norm is not None and not math.isfinite(grad_norm)):
            if n_bad > 0:
                ds_comm.all_reduce(self.first_bad, op=ds_comm.ReduceOp.MIN)
                what = f"non-finite loss at step {int(self.first_bad.item())}"
            else:
                what = f"non-finite gradient norm at step {step}"
            raise TrainingDiverged(f"{what} (detected at log step {step}); stopping without saving. "
                                   f"Last good checkpoint: {last_checkpoint or 'none yet'}")
        out = {
            "loss": sums[0] / micro_all,
            "terms": {k: s / micro_all for k, s in zip(self.term_names or [], sums[1:])},
            "seconds": elapsed,
            "steps": self.steps,
            "data_wait_pct": 100.0 * wait_all / world / max(elapsed, 1e-9),
            # where a step's time goes, seconds per optimizer step (this rank's; checkpoint: per save window)
            "time": {"data_s": wait_all / world / max(self.steps, 1),
                     **{f"{p}_s": phases[p] / max(self.steps, 1) for p in PHASES}, "ckpt_s": self.ckpt_s},
            "skipped": int(skipped_all),
            "converted": int(converted_all),
            "grad_norm": grad_norm,
        }
        return out


class RunMeter:
    """Throughput of this invocation from its closed windows, leaving out the first (warm-up,
    compilation) when there is more than one."""

    def __init__(self, global_batch: int, world: int, peak: Optional[float]):
        self.global_batch = global_batch
        self.world = world
        self.peak = peak
        self.windows: list[Window] = []

    def add(self, steps: int, seconds: float, flops_per_img: float) -> Window:
        w = Window(steps, seconds, self.global_batch * steps / seconds if seconds else 0.0, flops_per_img)
        self.windows.append(w)
        return w

    def mfu(self, img_per_s: float, flops_per_img: float) -> Optional[float]:
        return flops_per_img * img_per_s / self.world / self.peak if self.peak else None

    def _timed(self) -> list[Window]:
        return self.windows[1:] if len(self.windows) > 1 else self.windows

    def mean_step_seconds(self) -> Optional[float]:
        """Seconds per optimizer step over the windows logged so far (None before the first)."""
        w = self._timed()
        steps = sum(x.steps for x in w)
        return sum(x.seconds for x in w) / steps if steps else None

    def img_per_s(self) -> float:
        w = self._timed()
        secs = sum(x.seconds for x in w)
        return sum(x.steps for x in w) * self.global_batch / secs if secs else 0.0

    def run_mfu(self) -> Optional[float]:
        """Model FLOP/s over the windows, each at the plan sizes it ran with, against the peak."""
        w = self._timed()
        secs = sum(x.seconds for x in w)
        flop_s = sum(x.steps * self.global_batch * x.flops_per_img for x in w) / secs if secs else 0.0
        return flop_s / self.world / self.peak if self.peak and flop_s else None


class MetricsFile:
    """``metrics.jsonl`` (rank 0): one JSON line per log step."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def lines_upto(self, step: int) -> list[str]:
        """The lines up to ``step`` (a resume redoes the steps after it); a torn line (a crash in
        the middle of a write) is dropped with a warning instead of stopping the start."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                dist.log0(f"[mimscale] WARNING: dropped a torn line of {self.path}: {line[:80]!r}")
                continue
            if record is not None and record["step"] <= step:
                keep.append(line)
        return keep

    def trim(self, step: int) -> None:
        if self.path.is_file():
            self.path.write_text("".join(line + "\n" for line in self.lines_upto(step)))
