"""train.ckpt_every_minutes on 2 ranks: rank 0's clock decides, the stop-request reduction carries
the decision, and both ranks save the same steps (a rank that saved alone would hang the other in
DeepSpeed's collective save or leave a tag without its shard)."""
from __future__ import annotations

import json

from tests.integration.launch import run, summary, write_ds_config

STEPS = 6


def test_timed_checkpoints_are_taken_by_every_rank_at_the_same_step(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", stage=1, micro=4, accum=1)
    out = tmp_path / "run"
    # a checkpoint due after 6 ms of training: every step, one step after rank 0 saw it due
    r = run(ds, out, [f"train.steps={STEPS}", "train.ckpt_every=1000", "train.ckpt_every_minutes=0.0001",
                      "train.keep_checkpoints=10"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert summary(out)["steps"] == STEPS
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    steps = [int(t[4:]) for t in tags]
    # more than the end-of-run save; the first can come no earlier than step 2 (decided a step late)
    assert steps[-1] == STEPS and len(steps) >= 3 and steps[0] >= 2, steps
    for tag in tags:
        marker = json.loads((out / "checkpoints" / tag / "COMPLETE").read_text())
        names = " ".join(marker["files"]) if isinstance(marker.get("files"), list) else json.dumps(marker)
        assert "rng_rank0" in names and "rng_rank1" in names, (tag, marker)  # both ranks wrote their part
