"""scripts/system_deps.sh (what `make setup` runs first): a non-root user gets a core install
without FFCV's apt packages; FFCV=1 says exactly what to install; a missing Python is named."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


# ------------------------------------------------------------------ Python 3.11/3.12: find_python.sh

FIND = SCRIPT.parent / "find_python.sh"


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _fake_python(path: Path, version: str) -> Path:
    """An interpreter stand-in: its own path for find_python's probe, `version` for system_deps'
    question, success for every other check (venv, Python.h)."""
    return _script(path, f'case "$2" in *sys.executable*) echo "$0" ;; *python_version*) echo {version} ;; esac')


def test_a_pyenv_shim_with_no_version_selected_is_resolved_to_pyenvs_interpreter(tmp_path):
    # pyenv's shims exist on PATH but fail until a version is selected (`pyenv shell 3.12.1`)
    shims, root = tmp_path / "shims", tmp_path / "pyenv"
    _script(shims / "python3.12", "echo 'pyenv: python3.12: command not found' >&2; exit 127")
    _script(shims / "pyenv", f'case "$1" in root) echo {root} ;; whence) printf "3.12.0\\n3.12.1\\n" ;; esac')
    _fake_python(root / "versions" / "3.12.0" / "bin" / "python3.12", "3.12.0")
    real = _fake_python(root / "versions" / "3.12.1" / "bin" / "python3.12", "3.12.1")
    r = subprocess.run(["bash", str(FIND), "python3.12"], env={"PATH": f"{shims}:/usr/bin:/bin", "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(real), r.stderr  # the newest version that has it
    assert "pyenv shim" in r.stderr and "3.12.1" in r.stderr


@pytest.mark.parametrize("name,want", [("python3.12", "3.12"), ("python3.11", "3.11"), ("/opt/py/bin/python", "3.11")])
def test_a_missing_python_is_named_with_how_to_get_it(tmp_path, name, want):
    bare = tmp_path / "bin"  # a PATH with the script's tools and no Python (this machine has /usr/bin/python3.11)
    bare.mkdir()
    for tool in ("basename", "sort", "head"):
        (bare / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([shutil.which("bash"), str(FIND), name], env={"PATH": str(bare), "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "" and f"{name} not found" in r.stderr
    assert "Python 3.11 or 3.12" in r.stderr and f"apt-get install python{want} python{want}-venv" in r.stderr
    assert f"pyenv install {want}" in r.stderr and f"make setup PYTHON=/path/to/python{want}" in r.stderr


@pytest.mark.parametrize("version,ok", [("3.12.1", True), ("3.11.7", True), ("3.10.13", False), ("3.13.0", False)])
def test_system_deps_takes_python_3_11_and_3_12_only(tmp_path, version, ok):
    env = _fakes(tmp_path, uid=1000, ffcv_packages=True)
    python = _fake_python(tmp_path / "py" / "python3", version)
    r = subprocess.run(["bash", str(SCRIPT), str(python), "0"], env=env, capture_output=True, text=True, timeout=60)
    if ok:
        assert r.returncode == 0 and r.stdout.strip() == "dev", r.stderr
    else:
        assert r.returncode == 1 and f"is Python {version}; mimscale runs on 3.11 or 3.12" in r.stderr


# ---------------------------------------------------------- setup.py's ranges, constraints.txt's pins

REPO = SCRIPT.parents[1]


def _setup_kwargs() -> dict:
    """What setup.py passes to setup() (intercepted: nothing is built)."""
    import runpy

    import setuptools

    captured: dict = {}
    original = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original
    return captured


def _constraints() -> dict[str, Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names)), "constraints.txt names a package twice"
    return dict(zip(names, reqs))


def test_every_requirement_is_a_range_in_setup_py_and_an_exact_pin_in_constraints():
    kw = _setup_kwargs()
    reqs = [Requirement(r) for r in kw["install_requires"] + [r for extra in kw["extras_require"].values() for r in extra]]
    pins = _constraints()
    for r in reqs:
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} (setup.py) has no pin in constraints.txt"
        (spec,) = pins[name].specifier
        assert spec.operator == "==" and "*" not in spec.version, f"constraints.txt: {pins[name]} is not an exact pin"
        assert r.specifier.contains(spec.version), f"constraints.txt's {pins[name]} is outside setup.py's {r}"
        assert not any(s.operator in ("==", "===") for s in r.specifier), f"setup.py pins {r} exactly: use a range"
    # and nothing stale: constraints.txt pins only what setup.py asks for
    assert set(pins) == {canonicalize_name(r.name) for r in reqs}


def test_an_environment_with_another_torch_keeps_it():
    """`pip install mimscale` next to a user's torch: older and newer releases both satisfy setup.py."""
    (torch_req,) = [Requirement(r) for r in _setup_kwargs()["install_requires"] if Requirement(r).name == "torch"]
    for version in ("2.4.0", "2.9.1", "2.14.1", "2.15.0", "3.0.0"):
        assert torch_req.specifier.contains(version), (str(torch_req), version)
    assert _setup_kwargs()["python_requires"] == ">=3.11,<3.13"


def test_make_setup_installs_with_the_constraints_and_ci_runs_the_py312_smoke():
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --quiet -c constraints.txt -e" in makefile
    assert "uv pip install --quiet -c constraints.txt -e" in makefile  # test-py312
    assert "make test-py312" in (REPO / ".ci" / "run").read_text().splitlines()
