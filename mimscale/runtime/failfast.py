"""Failures end the whole job fast: a rank that raises or dies makes every rank exit non-zero
within about a minute, instead of the others waiting in a collective for the process group's
timeout (10-30 minutes) while a launcher signals them one at a time.

Every rank runs a daemon thread on the process group's own key-value store (the TCPStore that
rank 0 hosts), so it works while the main thread is blocked inside a collective:
  - it writes a heartbeat every ``BEAT_S`` seconds and exits the process (status 1) when the
    store holds a ``failed`` record, or when the store stops answering (rank 0 is gone);
  - rank 0's thread also reads every rank's heartbeat and records ``failed`` for a rank silent
    for ``SILENT_S`` seconds (killed, or its node lost).
A rank that raises records ``failed`` (with the exception) before it exits. ``stop`` is called by
every rank after a final barrier, before the group is destroyed, so a finished run never trips it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

import torch.distributed as tdist
from torch.distributed import distributed_c10d

BEAT_S = float(os.environ.get("MIMSCALE_FAILFAST_BEAT_S", 2))
SILENT_S = float(os.environ.get("MIMSCALE_FAILFAST_SILENT_S", 45))
FAILED = "failed"


class FailFast:
    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mimscale-failfast", daemon=True)

    @classmethod
    def start(cls) -> Optional["FailFast"]:
        """On every rank once the process group exists; None for a world of one (nothing to wait for)."""
        if not tdist.is_initialized() or tdist.get_world_size() < 2:
            return None
        store = tdist.PrefixStore("mimscale/failfast/", distributed_c10d._get_default_store())
        watch = cls(store, tdist.get_rank(), tdist.get_world_size())
        watch.store.set(f"hb/{watch.rank}", str(time.time()))
        watch.thread.start()
        return watch

    def report(self, error: BaseException) -> None:
        """This rank is going down with ``error``: tell every other rank."""
        try:
            self.store.set(FAILED, f"rank {self.rank} raised {type(error).__name__}: {error}"[:2000])
        except Exception:  # the store may be gone with rank 0: the others notice that too
            pass

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2 * BEAT_S + 1)

    def _exit(self, why: str) -> None:
        print(f"[mimscale] rank {self.rank}: {why}; exiting now (status 1)", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread may be stuck in a collective: nothing else would end it

    def _run(self) -> None:
        last_seen = {k: time.time() for k in range(self.world)}
        while not self.stopping.wait(BEAT_S):
            try:
                self.store.set(f"hb/{self.rank}", str(time.time()))
                if self.store.check([FAILED]):
                    self._exit(f"the job failed: {self.store.get(FAILED).decode(errors='replace')}")
                if self.rank == 0:
                    self._watch_heartbeats(last_seen)
            except Exception as e:
                # At a normal end rank 0 may close the store just as this thread polls: give the
                # main thread a moment to say it is stopping before calling it a failure.
                if self.stopping.wait(2 * BEAT_S):
                    return
                self._exit(f"lost the job's store (rank 0 gone?): {type(e).__name__}: {e}")

    def _watch_heartbeats(self, last_seen: dict) -> None:
        now = time.time()
        for k in range(self.world):
            key = f"hb/{k}"
            if self.store.check([key]):
                beat = float(self.store.get(key))
                if beat != last_seen.get(("beat", k)):  # a new beat (compared by value: clocks differ across nodes)
                    last_seen[("beat", k)] = beat
                    last_seen[k] = now
            if now - last_seen[k] > SILENT_S:
                self.store.set(FAILED, f"rank {k} sent no heartbeat for {now - last_seen[k]:.0f} s (killed, or its node lost)")
                self._exit(f"rank {k} stopped responding")


class DataStallWatch:
    """Ends the run when the training stream gives no batch for ``seconds`` (a dead mount, a hung
    reader): a daemon thread, since the main thread is the one blocked waiting for data. It names
    the source, the rank and the last sample read (and its shard, for WebDataset), and exits the process (status 1); the other
    ranks' FailFast then sees this rank go silent and ends them too."""

    def __init__(self, seconds: float, where: str, rank: int):
        self.seconds, self.where, self.rank = seconds, where, rank
        self.since: Optional[float] = None  # when the wait for the current batch began (None: not waiting)
        self.last = "none yet"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mimscale-datastall", daemon=True)

    def __enter__(self) -> "DataStallWatch":
        if self.seconds > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()

    def waiting(self) -> None:
        self.since = time.time()

    def got(self, batch: dict) -> None:
        self.since = None
        index = batch.get("index")
        if index is not None and len(index):
            shard = batch.get("shard")
            self.last = f"sample {int(index[-1])}" + (f" of shard {shard}" if shard else "")

    def _run(self) -> None:
        while not self.done.wait(min(10.0, self.seconds / 4)):
            since = self.since
            if since is not None and time.time() - since > self.seconds:
                print(f"[mimscale] rank {self.rank}: no batch from {self.where} for {time.time() - since:.0f} s "
                      f"(data.stall_seconds = {self.seconds:g}); the last one read held {self.last}; exiting (status 1)",
                      file=sys.stderr, flush=True)
                os._exit(1)
