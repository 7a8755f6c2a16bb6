"""A checkpoint written by mimscale before its package layout changed (flat root modules, commit
PRE_PACKAGES) resumes under today's code: same files, client-state parts and RNG streams, so the
resumed steps equal an uninterrupted run of today's code."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.integration.launch import REPO, env, losses, run, summary, write_ds_config

PRE_PACKAGES = "749fd8a"  # the last commit with mimscale/checkpoint.py, engine.py, elastic.py at the root
STEPS = 4
SETS = [f"train.steps={STEPS}", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    """The package as it was at PRE_PACKAGES, from the repository's history."""
    if shutil.which("git") is None:
        pytest.skip("needs git and the repository's history (a clone, not an installed wheel)")
    root = tmp_path_factory.mktemp("pre_packages")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PRE_PACKAGES, "mimscale"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {PRE_PACKAGES} is not in this clone's history: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    assert (root / "mimscale" / "engine.py").is_file() and not (root / "mimscale" / "trainer.py").exists()
    return root


# slow (make test-all): a one-time migration check of the packages layout; every resume path of
# today's code is covered in make test by the fault suite, golden, elastic and cadence runs
@pytest.mark.slow
def test_a_checkpoint_of_the_flat_layout_resumes_exactly(old_tree, tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", stage=1, micro=4, accum=1)
    out = tmp_path / "run"
    # the old code: steps 1-2 and a checkpoint at step 2 (pretrain.py puts its own package first on sys.path)
    from tests.integration.launch import TINY, TINY_SETS

    cmd = [sys.executable, str(old_tree / "mimscale" / "pretrain.py"), "--deepspeed_config", str(ds), "--config", str(TINY),
           "--set", f"output_dir={out}"]
    for s in [*TINY_SETS, *SETS, "train.stop_after=2"]:
        cmd += ["--set", s]
    old = subprocess.run(cmd, cwd=old_tree, env=env(), capture_output=True, text=True, timeout=300)
    assert old.returncode == 0, old.stdout[-3000:] + old.stderr[-3000:]
    assert (out / "checkpoints" / "step00000002" / "COMPLETE").is_file()

    # today's code resumes it (resume=auto) and finishes steps 3-4
    r = run(ds, out, SETS, ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = summary(out)
    assert resumed["resumed_from"].endswith("step00000002") and resumed["steps"] == STEPS

    # an uninterrupted run of today's code
    ref_out = tmp_path / "ref"
    r = run(ds, ref_out, [*SETS, "resume=never"], ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = losses(summary(ref_out))
    got = losses(resumed)
    assert sorted(got) == [3, 4]
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= 1e-6, (step, loss, ref[step])
