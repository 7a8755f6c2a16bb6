"""data.decode=nvjpeg end to end: 2 CPU ranks train on a folder of real JPEGs (with a truncated and a
garbage file) decoded by the device decoder, count the bad files as the CPU decoder does, and a run
resumed from a mid-run checkpoint repeats the uninterrupted one exactly."""
from __future__ import annotations

from pathlib import Path

import pytest

from mimscale.config import DataConfig
from mimscale.data.loader import build_loader
from tests.integration.launch import losses, run, summary, write_ds_config
from tests.integration.test_train import _folder_with_bad_files

STEPS = 6
MICRO = 4


def _sets(path: Path) -> list[str]:
    return ["data.source=folder", f"data.path={path}", "data.num_workers=1", "data.decode=nvjpeg", "model.img_size=32",
            f"train.steps={STEPS}", "train.ckpt_every=3"]


def _cpu_decoder_skips(path: Path) -> int:
    """The files data.decode=cpu skips over the same steps on both ranks (train.seed 0)."""
    cfg = DataConfig(source="folder", path=str(path), num_workers=0)
    total = 0
    for rank in range(2):
        loader, _ = build_loader(cfg, img_size=32, micro_batch=MICRO, rank=rank, world_size=2, seed=0)
        it = iter(loader)
        total += sum(int(next(it)["skipped"]) for _ in range(STEPS))
    return total


@pytest.mark.slow  # make test-all: the decoder, loaders and Trainer.to_device have unit tests in the default suite
def test_two_ranks_train_with_the_device_decoder_and_resume_exactly(tmp_path):
    imagenet = _folder_with_bad_files(tmp_path / "src")
    ds = write_ds_config(tmp_path / "z1.json", 1, micro=MICRO, accum=1)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    r = run(ds, ref_out, _sets(imagenet) + ["resume=never"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = summary(ref_out)
    assert ref["steps"] == STEPS and ref["samples_seen"] == STEPS * MICRO * 2 and all(e["loss"] > 0 for e in ref["loss_history"])
    assert ref["skipped_images"] == _cpu_decoder_skips(imagenet) > 0  # skipped in the workers, as the CPU decoder skips them
    tag = ref_out / "checkpoints" / "step00000003"
    r = run(ds, out, _sets(imagenet) + [f"resume={tag}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed, expected = losses(summary(out)), losses(ref)
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():  # the same samples, boxes and device-decoded pixels after the resume
        assert abs(loss - expected[step]) <= 1e-6, (step, loss, expected[step])
