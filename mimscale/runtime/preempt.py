"""Preemption: SIGTERM/SIGUSR1 become a stop request that every rank acts on at the same step.

Slurm signals every task, Kubernetes and the deepspeed launcher signal the ranks one by one, and
the launcher SIGKILLs them 30 s later, so the decision cannot wait for a log step. Each optimizer
step starts an asynchronous all-reduce of the local flags on a small CPU (gloo) group and reads
the previous step's result: all ranks see the same value at the same step, at most two steps
after the signal, and the GPU stream is never synchronized for it.

The same reduction carries a second flag, "a timed checkpoint is due" (``train.ckpt_every_minutes``,
decided on rank 0's clock), so every rank saves at the same step without another collective, and
a third, "this rank is still writing a background checkpoint", so every rank learns at the same
step that all the files of a save are on disk (the marker may then be published).
"""
from __future__ import annotations

import signal
from typing import Optional

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._group = None
        self._pending = None
        self._buf = torch.zeros(3)
        self._busy_before = False  # without a group: the previous poll's ``busy``

    def install(self) -> None:
        """Catch the signals (call early: a signal during start-up is honoured at step one)."""
        for s in SIGNALS:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def attach(self) -> None:
        """Create the control group; a collective call, so every rank must make it."""
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            self._group = tdist.new_group(backend="gloo")

    def poll(self, save_due: bool = False, busy: bool = False) -> tuple[bool, bool, bool]:
        """Called once per optimizer step on every rank: (stop, save, idle), the same answer on
        every rank. stop: some rank was signalled at or before the previous poll; save: some rank
        (rank 0, which keeps the checkpoint clock) passed ``save_due`` at the previous poll; idle:
        no rank passed ``busy`` (still writing a checkpoint) at the previous poll."""
        if self._group is None:
            idle, self._busy_before = not self._busy_before, busy
            return self.signal_name is not None, save_due, idle
        import torch.distributed as tdist

        stop = save = False
        idle = True
        if self._pending is not None:
            self._pending.wait()
            flags = self._buf.tolist()  # a CPU tensor: no device sync
            stop, save, idle = flags[0] > 0, flags[1] > 0, flags[2] == 0
        self._buf = torch.tensor([1.0 if self.signal_name else 0.0, 1.0 if save_due else 0.0, 1.0 if busy else 0.0])
        self._pending = tdist.all_reduce(self._buf, group=self._group, async_op=True)
        return stop, save, idle

    def drain(self) -> None:
        """Finish the in-flight reduction (before the group is torn down)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
