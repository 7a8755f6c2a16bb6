"""scripts/system_deps.sh (what `make setup` runs first): a non-root user gets a core install
without FFCV's apt packages; FFCV=1 says exactly what to install; a missing Python is named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "system_deps.sh"


def _fakes(tmp_path: Path, uid: int, ffcv_packages: bool, libgl: bool = True) -> dict:
    """A PATH whose id, pkg-config, ldconfig and g++ answer as a machine with/without them would."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    tools = {
        "id": f"echo {uid}",
        "g++": "exit 0",
        "pkg-config": "exit 0" if ffcv_packages else "exit 1",
        "ldconfig": "echo '\tlibGL.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libGL.so.1'" if libgl else "exit 0",
        "apt-get": f"echo apt-get \"$@\" >> {tmp_path / 'apt.log'}",
    }
    for name, body in tools.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    return {"PATH": f"{bin_}:/usr/bin:/bin"}


def _run(tmp_path, env, *args):
    return subprocess.run(["bash", str(SCRIPT), sys.executable, *args], env=env, capture_output=True, text=True, timeout=60)


def test_non_root_without_ffcv_packages_gets_a_core_install(tmp_path):
    env = _fakes(tmp_path, uid=1000, ffcv_packages=False)
    r = _run(tmp_path, env)  # FFCV=auto
    assert r.returncode == 0 and r.stdout.strip() == "dev", r.stderr
    assert "installing without FFCV" in r.stderr and "apt-get install -y libopencv-dev libturbojpeg0-dev" in r.stderr
    assert "make setup FFCV=1" in r.stderr and not (tmp_path / "apt.log").exists()
    r = _run(tmp_path, env, "0")
    assert r.returncode == 0 and r.stdout.strip() == "dev" and r.stderr == ""
    r = _run(tmp_path, env, "1")  # asked for FFCV: the exact packages, and a failure
    assert r.returncode == 1 and "FFCV=1 needs: apt-get install -y libopencv-dev libturbojpeg0-dev" in r.stderr


@pytest.mark.parametrize("uid,ffcv_packages,extras,apt", [(1000, True, "dev,ffcv", False), (0, False, "dev,ffcv", True)])
def test_ffcv_when_its_packages_are_there_or_root_can_install_them(tmp_path, uid, ffcv_packages, extras, apt):
    r = _run(tmp_path, _fakes(tmp_path, uid, ffcv_packages))
    assert r.returncode == 0 and r.stdout.strip() == extras, r.stderr
    assert (tmp_path / "apt.log").exists() == apt


def test_missing_core_packages_and_python_are_named(tmp_path):
    r = _run(tmp_path, _fakes(tmp_path, uid=1000, ffcv_packages=True, libgl=False))
    assert r.returncode == 1 and "apt-get install -y libgl1" in r.stderr
    r = subprocess.run(["bash", str(SCRIPT), "python3.9-nowhere"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert r.returncode == 1 and "python3.9-nowhere not found" in r.stderr and "make setup PYTHON=" in r.stderr
