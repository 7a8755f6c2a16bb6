"""The first errors a user meets, through the real entry point (issue 27.5): a malformed YAML
preset and a truncated .beton exit 2 naming the file; a run resumed over a dataset changed in
place (10 files removed, 20 added) exits 2 naming both counts, and goes on with
data.resume_changes=allow. Single-process runs of pretrain.py (the multi-rank resume paths are
covered by tests/integration/test_data_sources.py); the truncated .beton's run is also the default
suite's check that a ConfigError raised once the data is open exits 2 without a traceback."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from mimscale.errors import EXIT_CONFIG
from tests.integration.launch import run, run_group, summary, write_ds_config
from tests.unit.data.test_data_errors import write_images


def test_malformed_yaml_preset_exits_2_naming_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: vit_tiny\n\timg_size: 32\n")  # a tab
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=4, accum=1)
    r = run_group([sys.executable, "-m", "mimscale.pretrain", "--config", str(bad), "--deepspeed_config", str(ds),
                   "--set", f"output_dir={tmp_path / 'out'}"], timeout=120)
    assert r.returncode == EXIT_CONFIG, r.stderr[-3000:]
    assert f"mimscale: configuration error: config file {bad}, line 3, column 1: found character" in r.stderr, r.stderr[-3000:]
    assert "YAML indents with spaces, not tabs" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="ffcv is not importable here (the optional [ffcv] extra)")
def test_truncated_beton_exits_2_naming_file_and_verify(tmp_path):
    from data_prep.ffcv import write_beton

    write_images(tmp_path / "src" / "train", [f"n0{c}/{i}.jpg" for c in (1, 2) for i in range(8)])
    beton = tmp_path / "train.beton"
    write_beton(tmp_path / "src", "train", beton, workers=1, progress=False)
    os.truncate(beton, beton.stat().st_size // 2)
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=4, accum=1)
    r = run(ds, tmp_path / "out", ["data.source=ffcv", f"data.path={beton}", "train.steps=2"], ranks=1, timeout=240)
    assert r.returncode == EXIT_CONFIG, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"data.path {beton} is a truncated or corrupt FFCV file" in r.stderr, r.stderr[-3000:]
    assert f"python -m data_prep.verify {beton}" in r.stderr and "negative dimensions" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # make test-all: three runs; the check itself is covered at the stream level (tests/unit/data/test_data_errors.py)
def test_resume_over_a_dataset_changed_in_place_exits_2_unless_allowed(tmp_path):
    data = tmp_path / "data"
    write_images(data, [f"n0{c}/{i:02d}.jpg" for c in (1, 2) for i in range(30)], size=(48, 40))
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=4, accum=1)
    out = tmp_path / "out"
    sets = ["data.source=folder", f"data.path={data}", "data.num_workers=0", "train.steps=4", "train.ckpt_every=2"]
    first = run(ds, out, sets + ["train.stop_after=2"], ranks=1, timeout=240)
    assert first.returncode in (0, 143), first.stdout[-2000:] + first.stderr[-3000:]
    assert (out / "checkpoints" / "step00000002" / "COMPLETE").is_file()

    for f in sorted(data.rglob("*.jpg"))[:10]:  # in place: 10 files removed, 20 added
        f.unlink()
    write_images(data, [f"n02/new{i:02d}.jpg" for i in range(20)], size=(48, 40))
    refused = run(ds, out, sets, ranks=1, timeout=240)
    assert refused.returncode == EXIT_CONFIG, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert f"the data at data.path {data} changed since the checkpoint (60 samples when the checkpoint was written, 70 now" \
        in refused.stderr, refused.stderr[-3000:]
    assert "--set data.resume_changes=allow" in refused.stderr and "Traceback" not in refused.stderr

    allowed = run(ds, out, sets + ["data.resume_changes=allow"], ranks=1, timeout=240)
    assert allowed.returncode == 0, allowed.stdout[-2000:] + allowed.stderr[-3000:]
    assert "continuing on the new data (data.resume_changes=allow)" in allowed.stderr + allowed.stdout
    s = summary(out)
    assert s["steps"] == 4 and s["resumed_from"].endswith("step00000002")
