"""Install mimscale and its pinned dependencies into the image's virtual environment.

Run by docker/Dockerfile with the NGC image's own python3 (the one that holds NVIDIA's torch):

    python3 docker/install_deps.py deps --venv /opt/venv [--torch-source auto|pypi] [--extra ffcv]
    python3 docker/install_deps.py project --venv /opt/venv

setup.py says what mimscale needs (ranges); constraints.txt pins the tested versions, and the image
installs those. Why this is a script and not one `pip install -c constraints.txt .`: the NGC image's
torch is NVIDIA's CUDA build with a version such as ``2.14.0a0+b2c75dd062.nv26.9...``, which never
equals constraints.txt's ``torch==2.14.1``. A plain install would therefore replace it, and NGC's
global pip constraint file (PIP_CONSTRAINT=/etc/pip/constraint.txt) would instead reject our other
pins (numpy, pillow, ...). So the torch decision is made here, explicitly:

* ``auto`` (default): if the image's torch has the pin's major.minor (2.14), keep it. The venv then
  sees the image's packages (--system-site-packages), our pins are installed into the venv (where
  they shadow NGC's copies without touching them), torch and torchvision are left out of the
  install and constrained to the exact versions already there (in place of constraints.txt's), so
  pip stops with an error rather than swap them for wheels from PyPI. If the major.minor differs,
  ``pypi`` is used.
* ``pypi``: a venv without the image's packages and exactly constraints.txt's pins, torch included
  (the PyPI torch 2.14.1 wheels for Linux x86_64 and aarch64 are CUDA 13.0 builds).

Either way the build fails unless the venv's torch is the one chosen and reports a CUDA version
(``torch.version.cuda``): a CPU wheel (from a CPU-only index in a pip config, say) never slips in.

The NGC image's Python is 3.12, which setup.py allows (3.11 and 3.12; CI runs the suite on 3.11 and
a smoke run on 3.12, make test-py312); every pinned package has cp312 wheels or builds on 3.12.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Kept from the image in "keep" mode: NVIDIA builds torchvision against its own torch.
TORCH_FAMILY = ("torch", "torchvision")

# Imported by the build's smoke test: a package that installs but cannot load fails the build.
SMOKE_IMPORTS = ("torch", "torchvision", "timm", "deepspeed", "webdataset", "mlflow", "yaml", "simplejpeg", "cv2",
                 "numpy", "PIL", "psutil", "tqdm")


class PlanError(RuntimeError):
    pass


def canonical(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise PlanError(f"cannot read a project name from requirement {req!r}")
    return canonical(m.group(1))


def pinned_version(reqs: list[str], name: str) -> Optional[str]:
    for r in reqs:
        if requirement_name(r) == canonical(name):
            m = re.search(r"==\s*([^\s;,]+)", r)
            return m.group(1) if m else None
    return None


def major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    if not m:
        raise PlanError(f"cannot read major.minor from version {version!r}")
    return int(m.group(1)), int(m.group(2))


def setup_requirements(setup_py: Path, extras: list[str]) -> list[str]:
    """install_requires plus the named extras, as setup.py computes them (setup() is intercepted,
    so nothing is built)."""
    import setuptools

    captured: dict = {}
    original = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(setup_py.parent)  # setup.py's find_packages() looks around it
        runpy.run_path(str(setup_py), run_name="__main__")
    finally:
        setuptools.setup = original
        os.chdir(cwd)
    reqs = list(captured.get("install_requires", []))
    available = captured.get("extras_require", {})
    for extra in extras:
        if extra not in available:
            raise PlanError(f"setup.py has no extra {extra!r} (it has: {', '.join(sorted(available))})")
        reqs += available[extra]
    return reqs


def read_constraints(path: Path) -> list[str]:
    """The requirement lines of a pip constraints file (comments and blank lines dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Plan:
    mode: str  # "keep": the image's torch family; "pypi": constraints.txt's pins for everything
    system_site_packages: bool
    requirements: list[str]  # setup.py's (ranges)
    constraints: list[str] = field(default_factory=list)  # exact pins, as pip -c lines
    expected_torch: str = ""
    reason: str = ""


def make_plan(reqs: list[str], pins: list[str], torch_source: str,
              installed: Callable[[str], Optional[str]] = installed_version) -> Plan:
    """reqs: setup.py's requirements (ranges); pins: constraints.txt's exact versions."""
    if torch_source not in ("auto", "pypi"):
        raise PlanError(f"--torch-source must be auto or pypi, got {torch_source!r}")
    pin = pinned_version(pins, "torch")
    if pin is None:
        raise PlanError("constraints.txt does not pin torch (torch==X.Y.Z): nothing to compare the image's torch with")
    have = installed("torch")
    if torch_source == "auto" and have is not None and major_minor(have) == major_minor(pin):
        versions = {name: installed(name) for name in TORCH_FAMILY}
        missing = [name for name, v in versions.items() if v is None]
        if missing:
            raise PlanError(f"the image has torch {have} but not {', '.join(missing)}; its PyPI wheels require torch=={pin}. "
                            "Build with --build-arg TORCH_SOURCE=pypi")
        return Plan(
            mode="keep",
            system_site_packages=True,
            requirements=[r for r in reqs if requirement_name(r) not in TORCH_FAMILY],
            constraints=[c for c in pins if requirement_name(c) not in TORCH_FAMILY]
                        + [f"{name}=={v}" for name, v in versions.items()],
            expected_torch=have,
            reason=f"the image's torch {have} is a {'.'.join(map(str, major_minor(pin)))} like the pin ({pin}): "
                   f"kept, with its torchvision {versions['torchvision']}",
        )
    why = ("--torch-source pypi" if torch_source == "pypi" else
           "the image has no torch" if have is None else f"the image's torch {have} is not a {'.'.join(map(str, major_minor(pin)))} release")
    return Plan(mode="pypi", system_site_packages=False, requirements=list(reqs), constraints=list(pins),
                expected_torch=pin, reason=f"{why}: installing constraints.txt's pins, torch=={pin} included")


def pip(venv_python: Path, *args: str) -> None:
    # The image's PIP_CONSTRAINT pins NGC's versions of packages we pin differently; the plan's own
    # constraint file (keep mode) is what protects torch here.
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
    cmd = [sys.executable, "-m", "pip", "--python", str(venv_python), "install", "--no-cache-dir", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def create_venv(venv: Path, system_site_packages: bool) -> Path:
    # --without-pip: Debian/Ubuntu pythons may lack ensurepip; pip is driven from the image's python.
    flags = ["--system-site-packages"] if system_site_packages else []
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *flags, str(venv)], check=True)
    return venv / "bin" / "python"


def check_torch(venv_python: Path, expected: str, imports: tuple[str, ...]) -> None:
    code = (
        "import importlib, importlib.metadata as md, json, sys\n"
        "import torch\n"
        f"for m in {list(imports)!r}: importlib.import_module(m)\n"
        "print(json.dumps({'torch': md.version('torch'), 'cuda': torch.version.cuda, 'python': sys.version.split()[0]}))\n"
    )
    # stdout only: an import error's traceback goes to the build log as it is
    out = subprocess.run([str(venv_python), "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    print(f"venv: torch {info['torch']} (CUDA {info['cuda']}), Python {info['python']}", flush=True)
    if info["torch"] != expected:
        raise PlanError(f"the venv's torch is {info['torch']}, expected {expected}")
    if not info["cuda"]:
        raise PlanError(f"the venv's torch {info['torch']} is a CPU build (torch.version.cuda is None)")


def install_deps(args) -> None:
    reqs = setup_requirements(Path(args.setup), args.extra)
    plan = make_plan(reqs, read_constraints(Path(args.constraints)), args.torch_source)
    print(f"torch: {plan.mode}: {plan.reason}", flush=True)
    if args.dry_run:
        print(json.dumps(plan.__dict__, indent=2))
        return
    venv_python = create_venv(Path(args.venv), plan.system_site_packages)
    with tempfile.TemporaryDirectory() as tmp:
        extra_args = []
        if plan.constraints:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("".join(c + "\n" for c in plan.constraints))
            extra_args = ["--constraint", str(constraints)]
        pip(venv_python, *extra_args, *plan.requirements)
    imports = SMOKE_IMPORTS + (("ffcv",) if "ffcv" in args.extra else ())
    check_torch(venv_python, plan.expected_torch, imports)
    (Path(args.venv) / "mimscale-torch.json").write_text(json.dumps({"mode": plan.mode, "torch": plan.expected_torch}) + "\n")


def install_project(args) -> None:
    venv = Path(args.venv)
    chosen = json.loads((venv / "mimscale-torch.json").read_text())
    venv_python = venv / "bin" / "python"
    pip(venv_python, "--no-deps", "--editable", str(Path(args.project).resolve()))
    check_torch(venv_python, chosen["torch"], ("mimscale.config", "mimscale.trainer", "data_prep.wds"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deps", help="create the venv and install the pinned dependencies")
    d.add_argument("--venv", required=True)
    d.add_argument("--setup", default="setup.py")
    d.add_argument("--constraints", default="constraints.txt", help="the exact versions to install (pip -c)")
    d.add_argument("--torch-source", default="auto", help="auto (keep the image's torch when its major.minor matches) or pypi")
    d.add_argument("--extra", action="append", default=[], help="a setup.py extra to include (repeatable), e.g. ffcv")
    d.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    pr = sub.add_parser("project", help="install mimscale itself (editable, no dependencies) into the venv")
    pr.add_argument("--venv", required=True)
    pr.add_argument("--project", default=".")
    args = p.parse_args(argv)
    try:
        install_deps(args) if args.cmd == "deps" else install_project(args)
    except PlanError as e:
        print(f"install_deps: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
