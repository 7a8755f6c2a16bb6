"""Background checkpoint writes: training stalls only while a save is copied, not while it is written.

A save has two parts of very different cost. *Staging* copies every tensor DeepSpeed hands to its
checkpoint engine (module weights, the ZeRO partitions of the fp32 master weights and Adam
moments, client state) into fresh host memory: GPU -> CPU at PCIe speed, or one memcpy on CPU.
*Writing* serialises those copies into files and fsyncs them: disk or network file system speed,
the part that takes minutes for a ViT-H or 2B tag. ``StagingEngine`` replaces DeepSpeed's
checkpoint engine for one ``save_checkpoint`` call: its ``save`` stages and queues the write, so
``save_checkpoint`` returns once the copies exist, and a ``Writer`` thread writes and fsyncs.

Why a copy at all: the tensors DeepSpeed passes are the live ones (the optimizer's flat
partitions, the module's parameters); the next optimizer step updates them in place, so writing
them later would mix two steps in one checkpoint. Host memory held: one copy of this rank's
files of the tag until they are written (ZeRO-1/2: rank 0 also holds the module's weights).

Why a thread, not a process: torch's serialiser and the file writes release the GIL for the
bulk of the work (tensor bytes), and a thread needs no second copy into shared memory. The
writer never runs a collective: agreeing that every rank's files are on disk is the
Checkpointer's, through the stop request's all-reduce (checkpointer.py), so the marker still
means "every byte of the tag is durable".
"""
from __future__ import annotations

import copy
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from mimscale.checkpoint.disk import explain_write_error


def stage(obj: Any, memo: Optional[dict] = None) -> Any:
    """A copy of ``obj`` that later training cannot change: every tensor copied to host memory
    (views of one tensor stay one copy through ``memo``), containers rebuilt, other leaves (ints,
    strings, DeepSpeed's small config objects, which training never mutates) shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same mapping type (DeepSpeed's OrderedDicts stay ordered dicts)
        for k, v in obj.items():
            out[k] = stage(v, memo)
        return out
    if type(obj) is list:
        return [stage(v, memo) for v in obj]
    if isinstance(obj, torch.Size):
        return obj  # ints; DeepSpeed's consolidation calls .numel() on the shapes it saved
    if isinstance(obj, tuple):
        items = [stage(v, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


class Writer:
    """One background thread that writes queued (object, path) jobs with ``torch.save`` and
    fsyncs each file. ``idle()`` says, without blocking, whether every queued job is done;
    ``wait()`` blocks until then. A failed write is raised from the next ``idle``/``wait``
    (the training thread's), explained when the disk is full; jobs after it are dropped, since
    their tag can never be complete."""

    def __init__(self, fsync: Callable[[Path], None]):
        self._fsync = fsync
        self._jobs: "queue.Queue[Optional[tuple[Any, Path]]]" = queue.Queue()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._done = threading.Condition(self._lock)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="mimscale-ckpt-writer", daemon=True)
        self._thread.start()

    def put(self, obj: Any, path: Path) -> None:
        with self._lock:
            self._outstanding += 1
        self._jobs.put((obj, Path(path)))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            obj, path = job
            try:
                if self._error is None:
                    torch.save(obj, path)
                    self._fsync(path)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
                self._error = explain_write_error(e, path)
            finally:
                del obj, job
                with self._lock:
                    self._outstanding -= 1
                    self._done.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def idle(self) -> bool:
        with self._lock:
            busy = self._outstanding > 0
        if not busy:
            self._raise()
        return not busy

    def wait(self) -> None:
        with self._lock:
            while self._outstanding > 0:
                self._done.wait()
        self._raise()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)


class StagingEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine for a background save: ``save`` stages the state dict and
    queues its write; ``load`` and the rest behave as DeepSpeed's torch engine (installed only for
    the length of one ``save_checkpoint``, see ``Checkpointer.save``)."""

    def __init__(self, writer: Writer):
        super().__init__(None)
        self.name = "mimscale.StagingEngine"
        self.writer = writer

    def create(self, info: CheckpointCommitInfo) -> None:
        return None

    def save(self, state_dict, path: str) -> None:
        self.writer.put(stage(state_dict), Path(path))

    def load(self, path: str, map_location=None):
        raise RuntimeError("StagingEngine only saves; loading goes through DeepSpeed's own engine")

    def preserves_storage_sharing(self) -> bool:
        # False: DeepSpeed would clone the module's tensors on the device first (so a view does not
        # save its whole storage); stage() already makes compact host copies
        return False

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True  # durability is the Checkpointer's: the marker after every rank's writer is idle
