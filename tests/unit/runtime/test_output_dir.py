"""mimscale/runtime/output_dir.py: one job per output_dir."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mimscale.errors import ConfigError
from mimscale.runtime import output_dir
from mimscale.runtime.output_dir import LOCK, OutputDirLock, check_not_foreign


@pytest.fixture(autouse=True)
def launch(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for var in ("SLURM_JOB_ID", "MIMSCALE_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def _foreign(tmp_path, **fields):
    """A lock as another job (another launch on this host, alive: this test's parent process) wrote it."""
    owner = {"host": socket.gethostname(), "pid": os.getppid(), "job": "slurm_job_id=77", "master": "10.0.0.9:1234",
             "started": time.time() - 60, "refreshed": time.time(), **fields}
    (tmp_path / LOCK).write_text(json.dumps(owner))
    return owner


def test_acquire_release_and_the_other_ranks_of_the_job(tmp_path):
    lock = OutputDirLock(tmp_path / "run")
    lock.acquire()
    owner = json.loads((tmp_path / "run" / LOCK).read_text())
    assert owner["pid"] == os.getpid() and owner["master"] == "127.0.0.1:29500"
    check_not_foreign(tmp_path / "run")  # rank 1 of the same launch: fine
    lock.release()
    assert not (tmp_path / "run" / LOCK).exists()


def test_a_second_job_on_a_live_lock_is_refused_naming_the_owner(tmp_path):
    _foreign(tmp_path)
    with pytest.raises(ConfigError, match=r"in use by job slurm_job_id=77 \(host .*, pid \d+"):
        OutputDirLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match="in use by job slurm_job_id=77"):
        check_not_foreign(tmp_path)


@pytest.mark.parametrize("how", ["dead pid", "no refresh", "same job requeued", "torn"])
def test_a_gone_owner_is_taken_over(tmp_path, monkeypatch, capsys, how):
    if how == "dead pid":
        p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        _foreign(tmp_path, pid=int(p.stdout))
    elif how == "no refresh":
        _foreign(tmp_path, host="elsewhere", refreshed=time.time() - output_dir.STALE_S - 1)
    elif how == "same job requeued":
        _foreign(tmp_path, host="elsewhere")
        monkeypatch.setenv("SLURM_JOB_ID", "77")
    else:
        (tmp_path / LOCK).write_text('{"host": "x", "pi')
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "taking over output_dir" in capsys.readouterr().err
    assert any(p.name.startswith(f"{LOCK}.stale-") for p in tmp_path.iterdir())  # the old lock is kept
    lock.release()


def test_the_lock_is_refreshed_while_the_run_lives(tmp_path, monkeypatch):
    monkeypatch.setattr(output_dir, "REFRESH_S", 0.05)
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    first = json.loads((tmp_path / LOCK).read_text())["refreshed"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK).read_text())["refreshed"] > first
    lock.release()
