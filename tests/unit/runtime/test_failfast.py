"""mimscale/failfast.py: the data-stall watch (the cross-rank failure watch runs in tests/faults)."""
import datetime
import subprocess
import sys
import textwrap

import deepspeed
import pytest
import torch

from mimscale.config import load_config
from mimscale.errors import ConfigError
from mimscale.runtime import dist
from mimscale.runtime.failfast import DataStallWatch


def _run(body: str) -> subprocess.CompletedProcess:
    code = "import time, torch\nfrom mimscale.runtime.failfast import DataStallWatch\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_no_batch_for_stall_seconds_ends_the_process_naming_source_rank_and_last_sample():
    r = _run("""
        with DataStallWatch(0.4, "data.source=wds /shards", rank=3) as w:
            w.waiting(); w.got({"index": torch.tensor([5, 17])})
            w.waiting(); time.sleep(10)
        print("not reached")
    """)
    assert r.returncode == 1 and "not reached" not in r.stdout
    assert "rank 3: no batch from data.source=wds /shards for" in r.stderr and "held sample 17" in r.stderr


def test_steady_batches_and_zero_seconds_never_trip():
    r = _run("""
        with DataStallWatch(0.4, "x", rank=0) as w:
            for _ in range(8):
                w.waiting(); time.sleep(0.1); w.got({"index": torch.tensor([1])})
        with DataStallWatch(0, "x", rank=0) as w:
            w.waiting(); time.sleep(0.5)
        print("done")
    """)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr


def test_watch_records_the_last_sample_and_its_shard():
    w = DataStallWatch(0, "x", 0)
    w.waiting()
    w.got({"index": torch.tensor([4, 9])})
    assert w.since is None and w.last == "sample 9"
    w.got({"index": torch.tensor([3]), "shard": "train-000012.tar"})  # a WebDataset batch
    assert w.last == "sample 3 of shard train-000012.tar"


def test_the_process_group_timeout_comes_from_the_config_key(monkeypatch):
    """dist.timeout_minutes reaches DeepSpeed's process group as its timeout; a bad value names the key."""
    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "_unlink_shm_workspace", lambda: None)
    cfg = load_config(None, ["dist.timeout_minutes=45"])
    dist.init_distributed(cfg.dist.timeout_minutes)
    assert seen["timeout"] == datetime.timedelta(minutes=45)
    assert load_config(None, []).dist.timeout_minutes == 30.0
    with pytest.raises(ConfigError, match="dist.timeout_minutes"):
        load_config(None, ["dist.timeout_minutes=0"])
