"""mimscale as someone outside the repository gets it: a wheel built from a copy of the checkout,
installed into a fresh virtual environment, driven from an empty folder by shipped names only.

No network: the wheel is built with ``pip wheel --no-deps --no-build-isolation --no-index`` (this
environment's setuptools), and the fresh venv sees this environment's packages (torch, DeepSpeed,
pip...) through a folder of links to them that leaves mimscale and data_prep out, so neither the
checkout nor the venv's editable install can stand in for the wheel; ``pip install --no-index``
then resolves every requirement of the wheel against those packages, with the upper bounds.

The fast test installs and inspects (the import location, ``mimscale --version``, ``presets``,
``--print-config`` by name); the slow one launches a tiny pretrain under the DeepSpeed launcher
(``--module mimscale.pretrain``), exports and evaluates it with the ``mimscale`` command.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import mimscale
from tests.integration.launch import REPO, TINY_SETS, env, free_port, run_group
from tests.unit.eval.test_eval import write_folder

# What a copy of the checkout leaves behind: built or run outputs and other environments.
LEFT_OUT = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "runs", "mlruns", "mlartifacts", "logs",
                                  "__pycache__", "*.pyc", "*.so", "wheels", ".pytest_cache", ".ruff_cache")
# This environment's entries the fresh venv must not see: the checkout's editable install of mimscale.
NOT_LINKED = ("mimscale", "data_prep", "__editable__", "__pycache__")


def _timed(timings: dict, what: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    timings[what] = round(time.perf_counter() - t0, 1)
    assert r.returncode == 0, f"{what}: {' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def dependency_links(into: Path) -> Path:
    """A folder of links to every package of this environment but mimscale's own (and no .pth
    file, so the editable install's import hook stays out)."""
    into.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.startswith(NOT_LINKED) or entry.suffix == ".pth":
            continue
        (into / entry.name).symlink_to(entry)
    return into


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel")
    timings: dict[str, float] = {}
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=LEFT_OUT)  # the build leaves the checkout untouched
    _timed(timings, "build", [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                              "--wheel-dir", str(root / "dist"), str(src)], cwd=root)
    (wheel,) = (root / "dist").glob(f"mimscale-{mimscale.__version__}-*.whl")
    venv = root / "venv"
    _timed(timings, "venv", [sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "_mimscale_test_deps.pth").write_text(f"{dependency_links(root / 'deps')}\n")
    _timed(timings, "install", [str(python), "-m", "pip", "install", "--quiet", "--no-index", str(wheel)], cwd=root)
    work = root / "work"  # an empty folder: no checkout around, nothing by relative path
    work.mkdir()
    e = {k: v for k, v in env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    e["PATH"] = f"{venv / 'bin'}{os.pathsep}{e['PATH']}"  # the venv's mimscale first; this env's ninja for DeepSpeed's JIT op
    return {"root": root, "venv": venv, "python": python, "site": site, "work": work, "env": e, "wheel": wheel, "timings": timings}


def _in_venv(inst: dict, what: str, *cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return _timed(inst["timings"], what, list(cmd), cwd=inst["work"], env=inst["env"])


def test_the_wheel_installs_offline_and_its_mimscale_is_the_one_imported(installed):
    inst = installed
    py = str(inst["python"])
    r = _in_venv(inst, "import", py, "-c", "import mimscale, data_prep; from mimscale.data import jpeg_region; "
                                           "print(mimscale.__file__); print(data_prep.__file__); print(jpeg_region.FUNCTION is not None)")
    *files, decoder = r.stdout.split()
    for line in files:
        assert Path(line).is_relative_to(inst["site"]) and not Path(line).is_relative_to(REPO), r.stdout
    from mimscale.data import jpeg_region

    assert decoder == str(jpeg_region.FUNCTION is not None)  # the optional crop decoder built as it did for the checkout
    r = _in_venv(inst, "version", str(inst["venv"] / "bin" / "mimscale"), "--version")
    assert r.stdout == f"mimscale {mimscale.__version__}\n"
    r = _in_venv(inst, "presets", "mimscale", "presets")
    assert f"in {inst['site'] / 'mimscale' / 'configs'}" in r.stdout and f"in {inst['site'] / 'mimscale' / 'ds_configs'}" in r.stdout
    assert "mae_vit_base" in r.stdout and "gpu_bf16_zero1" in r.stdout
    r = _in_venv(inst, "print-config", py, "-m", "mimscale.pretrain", "--config", "mae_vit_base", "--deepspeed_config", "gpu_bf16_zero1",
                 "--world-size", "32", "--set", "data.source=synthetic", "--print-config")
    assert f"# deepspeed_config: {inst['site'] / 'mimscale' / 'ds_configs' / 'gpu_bf16_zero1.json'}" in r.stdout
    assert "world size 32: global batch 4096 = micro batch 128 x accumulation 1 x 32 ranks" in r.stdout
    # every requirement of the installed wheel is met here, upper bounds included
    r = _in_venv(inst, "requirements", py, "-c", "import importlib.metadata as m; from packaging.requirements import Requirement as R\n"
                 "for s in m.requires('mimscale'):\n r = R(s)\n if r.marker is None:\n"
                 "  v = m.version(r.name); assert r.specifier.contains(v), (s, v); print(r.name, v)")
    assert "deepspeed 0.19.8" in r.stdout
    assert not list(inst["work"].iterdir())  # the inspection wrote nothing
    print("wheel install timings (s):", inst["timings"])


@pytest.mark.slow  # a launch, an export and an evaluation from the installed package (~1-2 min)
def test_a_tiny_pretrain_export_and_eval_run_from_the_installed_package_by_name(installed):
    inst = installed
    work, py = inst["work"], str(inst["python"])
    launcher = str(Path(sys.executable).parent / "deepspeed")  # DeepSpeed's launcher script, run by the venv's Python
    sets = [*TINY_SETS, "output_dir=run", "train.steps=2", "train.ckpt_every=2", "resume=never"]
    t0 = time.perf_counter()
    r = run_group([py, launcher, "--num_gpus", "1", "--master_port", str(free_port()), "--module", "mimscale.pretrain",
                   "--deepspeed_config", "cpu_fp32_zero1", "--config", "mae_vit_tiny_cpu", "--set", *sets],
                  timeout=600, cwd=work, env=inst["env"])
    inst["timings"]["pretrain"] = round(time.perf_counter() - t0, 1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    marker = json.loads((work / "run" / "checkpoints" / "step00000002" / "COMPLETE").read_text())
    assert marker["format_version"] == 1 and marker["mimscale_version"] == mimscale.__version__

    r = _in_venv(inst, "export", "mimscale", "export", "--checkpoint", "run", "--out", "exp")
    assert "exported" in r.stdout
    assert json.loads((work / "exp" / "mimscale.json").read_text())["format_version"] == 1

    write_folder(work / "data", {"train": 4, "val": 2})  # 16 + 8 labelled images, 4 classes
    r = _in_venv(inst, "eval", "mimscale", "eval", "knn", "--checkpoint", "exp", "--data", "data", "--k", "3", "--workers", "0",
                 "--batch", "8", "--threads", "1", "--mlflow-run", "none", "--json")
    result = json.loads(r.stdout)
    assert (result["n_train"], result["n_val"]) == (16, 8) and 0.0 <= result["knn_top1"] <= 1.0
    print("wheel install timings (s):", inst["timings"])
