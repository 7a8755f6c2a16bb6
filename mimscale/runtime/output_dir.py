"""One owner per output_dir: a lock file that a second job pointed at the same folder meets.

Rank 0 creates ``<output_dir>/OWNER.lock`` (host, pid, job id, the launcher's master address,
start time) with O_EXCL and rewrites its ``refreshed`` time every ``REFRESH_S`` seconds from a
daemon thread. Another job finding a live lock stops with a ConfigError (exit 2) naming the owner;
a lock whose owner is gone (no refresh for ``STALE_S`` seconds, or on this host a dead pid) is
taken over with a message. The other ranks of the owning job recognise it by the master address
(MASTER_ADDR:MASTER_PORT is the same for every rank of a job and differs between live jobs).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from mimscale.errors import ConfigError
from mimscale.runtime import dist

LOCK = "OWNER.lock"
REFRESH_S = float(os.environ.get("MIMSCALE_LOCK_REFRESH_S", 30))
STALE_S = float(os.environ.get("MIMSCALE_LOCK_STALE_S", 300))


def job_id() -> str:
    """The scheduler's id of this job ("" when there is none): a requeued job keeps it, so a new
    allocation of the same job takes its lock over at once."""
    for var in ("SLURM_JOB_ID", "MIMSCALE_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(var):
            return f"{var.lower()}={os.environ[var]}"
    return ""


def same_job(owner: dict, me: dict) -> bool:
    """The lock is this job's: the same launch (master address), or the same scheduler job id."""
    return owner.get("master") == me["master"] or bool(me["job"] and owner.get("job") == me["job"])


def _me() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(), "started": now, "refreshed": now,
            "master": f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"}


def _read(path: Path) -> Optional[dict]:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}  # torn: treated as stale below


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(owner: dict, now: Optional[float] = None) -> Optional[str]:
    """Why a lock's owner is gone, or None when it is alive."""
    now = time.time() if now is None else now
    if not owner.get("refreshed"):
        return "its lock file is torn"
    if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
        return f"process {owner.get('pid')} no longer runs on this host"
    age = now - float(owner["refreshed"])
    if age > STALE_S:
        return f"its lock was last refreshed {age:.0f} s ago (stale after {STALE_S:.0f} s)"
    return None


def describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"job {owner.get('job') or '(no scheduler id)'} (host {owner.get('host')}, pid {owner.get('pid')}, started {started})"


class OutputDirLock:
    """Rank 0's ownership of output_dir for the life of the run (``acquire`` / ``release``)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK
        self.mine: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming its live owner; a dead owner's lock is taken
        over (the old file is kept beside it as ``OWNER.lock.stale-<time>``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _me()
        for _ in range(3):  # a race with another starting job: one of the two O_EXCL creates wins
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read(self.path)
                if owner is None:
                    continue  # released in between
                why = "the same job, restarted" if same_job(owner, me) else stale_reason(owner)
                if why is None:
                    raise ConfigError(f"output_dir {self.path.parent} is in use by {describe(owner)}: "
                                      "two jobs must not share an output_dir (choose another, or stop that job)") from None
                dist.log0(f"[mimscale] taking over output_dir {self.path.parent} from {describe(owner)}: {why}")
                try:
                    self.path.rename(self.path.with_name(f"{LOCK}.stale-{int(time.time())}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        else:
            raise ConfigError(f"output_dir {self.path.parent}: could not take {LOCK} (another job keeps taking it)")
        self.mine = me
        self._thread = threading.Thread(target=self._refresh_loop, name="mimscale-lock", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            owner = _read(self.path)
            if owner is None or owner.get("pid") != self.mine["pid"] or owner.get("host") != self.mine["host"]:
                dist.log0(f"[mimscale] WARNING: {self.path} was taken by "
                          f"{describe(owner) if owner else 'nobody'}; this job no longer refreshes it")
                return
            self.mine["refreshed"] = time.time()
            tmp = self.path.with_name(f"{LOCK}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.mine))
            os.replace(tmp, self.path)

    def release(self) -> None:
        """Stop refreshing and remove the lock if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        owner = _read(self.path) if self.mine else None
        if owner and owner.get("pid") == self.mine["pid"] and owner.get("host") == self.mine["host"]:
            self.path.unlink(missing_ok=True)
        self.mine = None


def check_not_foreign(output_dir: str | Path) -> None:
    """The other ranks: refuse (ConfigError) a live lock of another job; rank 0 takes the lock."""
    owner = _read(Path(output_dir) / LOCK)
    me = _me()
    if owner and not same_job(owner, me) and stale_reason(owner) is None:
        raise ConfigError(f"output_dir {output_dir} is in use by {describe(owner)}: two jobs must not share an output_dir")
