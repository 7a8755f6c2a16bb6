"""Preemption: SIGTERM/SIGUSR1 become a stop request that every rank acts on at the same step.

Slurm signals every task, Kubernetes and the deepspeed launcher signal the ranks one by one, and
the launcher SIGKILLs them 30 s later, so the decision cannot wait for a log step. Each optimizer
step starts an asynchronous all-reduce of the local flag on a small CPU (gloo) group and reads
the previous step's result: all ranks see the same value at the same step, at most two steps
after the signal, and the GPU stream is never synchronized for it.
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
        self._buf = torch.zeros(1)

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

    def poll(self) -> bool:
        """Called once per optimizer step on every rank: True when some rank was signalled at
        or before the previous poll (the same answer on every rank)."""
        if self._group is None:
            return self.signal_name is not None
        import torch.distributed as tdist

        stop = False
        if self._pending is not None:
            self._pending.wait()
            stop = bool(self._buf.item() > 0)  # a CPU tensor: no device sync
        self._buf = torch.tensor([1.0 if self.signal_name else 0.0])
        self._pending = tdist.all_reduce(self._buf, group=self._group, async_op=True)
        return stop

    def drain(self) -> None:
        """Finish the in-flight reduction (before the group is torn down)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
