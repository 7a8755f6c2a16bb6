"""2-rank CPU pretraining on WebDataset shards and on an FFCV file made by data_prep: each resumed
from a mid-run checkpoint repeats the uninterrupted run exactly."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.launch import losses, run, summary, write_ds_config
from tests.integration.test_train import _folder_with_bad_files

STEPS = 6


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """48 real ImageNet JPEGs plus a truncated and a garbage file, in the ImageNet layout."""
    root = tmp_path_factory.mktemp("src")
    return _folder_with_bad_files(root)


def _sets(source: str, path: Path) -> list[str]:
    return [f"data.source={source}", f"data.path={path}", "data.num_workers=2", "data.shuffle_buffer=16",
            "model.img_size=32", f"train.steps={STEPS}"]


@pytest.mark.slow  # make test-all: the module it drives has unit tests in the default suite
def test_wds_two_ranks_resume_from_a_mid_run_checkpoint_matches_uninterrupted(imagenet, tmp_path):
    from data_prep.wds import write_shards

    shards = tmp_path / "shards"
    m = write_shards(imagenet, "train", shards, shard_size=10, max_side=96, workers=1, progress=False)
    assert m["num_samples"] == 48 and len(m["skipped"]) == 2
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=4, accum=1)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    # the reference saves at step 3 on its way to step 6; the second run resumes from that mid-run
    # checkpoint in an output_dir of its own
    r = run(ds, ref_out, _sets("wds", shards) + ["resume=never", "train.ckpt_every=3"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = summary(ref_out)
    assert ref["steps"] == STEPS and ref["skipped_images"] == 0
    tag = ref_out / "checkpoints" / "step00000003"
    r = run(ds, out, _sets("wds", shards) + ["train.ckpt_every=3", f"resume={tag}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    second = summary(out)
    assert second["resumed_from"] == str(tag) and second["steps"] == STEPS
    resumed, expected = losses(second), losses(ref)
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():  # the resumed streams continue exactly where they stopped
        assert abs(loss - expected[step]) <= 1e-6, (step, loss, expected[step])


@pytest.mark.slow  # make test-all; the loader it drives is covered by its unit tests
def test_ffcv_two_ranks_resume_from_a_mid_run_checkpoint_matches_uninterrupted(imagenet, tmp_path):
    from data_prep.ffcv import write_beton

    beton = tmp_path / "train.beton"
    m = write_beton(imagenet, "train", beton, max_side=96, workers=1, progress=False)
    assert m["num_samples"] == 48
    ds = write_ds_config(tmp_path / "z2.json", 2, micro=4, accum=1)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    r = run(ds, ref_out, _sets("ffcv", beton) + ["resume=never", "train.ckpt_every=3"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = summary(ref_out)
    assert ref["steps"] == STEPS and ref["samples_seen"] == STEPS * 4 * 2 and all(e["loss"] > 0 for e in ref["loss_history"])
    tag = ref_out / "checkpoints" / "step00000003"
    r = run(ds, out, _sets("ffcv", beton) + ["train.ckpt_every=3", f"resume={tag}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    second = summary(out)
    assert second["steps"] == STEPS and second["resumed_from"] == str(tag)
    assert second["samples_seen"] == STEPS * 4 * 2
    resumed, expected = losses(second), losses(ref)
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():  # the FFCV loader restarts at the checkpoint's batch
        assert abs(loss - expected[step]) <= 1e-6, (step, loss, expected[step])
    for d in (ref_out, out):
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
