#!/usr/bin/env bash
# The wheels benchmarks/gpu_quick.sh installs on a bare GPU check node (no network there; it runs
# `pip install --no-index --find-links wheels/`): what mimscale's bench path imports that the
# node's own Python 3.12 lacks. ../shared/PLATFORM.md, 'The GPU check node': it has torch,
# torchvision, timm, numpy, pillow, opencv, safetensors and pyyaml; it lacks deepspeed, webdataset,
# simplejpeg, mlflow and FFCV. mlflow is not needed (the bench runs with tracking.enabled=false and
# mimscale imports mlflow only when tracking is on); FFCV cannot go (no apt there).
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default wheels/ (git-ignored): 17 wheels, 6.4 MiB, seconds
#
# Versions: the ones this checkout's venv runs (.venv, i.e. constraints.txt's pins and what pip
# resolved with them), so the node runs the tested set; unpinned where the venv lacks a package.
# Binary wheels are for CPython 3.12 on x86-64 Linux (manylinux 2.28 or older: torch 2.11's own
# wheels need glibc 2.28, so the node has it). deepspeed has only an sdist on PyPI: it is built here
# into a pure-Python wheel (`pip wheel --no-deps`; its CUDA ops are JIT-built on use, and the bench
# uses none: mimscale's AdamW is torch's fused one).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${1:-${WHEELS:-wheels}}
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-3.12}
# What the node lacks: deepspeed, webdataset, simplejpeg ...
TOP=(deepspeed webdataset simplejpeg)
# ... and their dependencies that a bare Python with torch, timm, numpy, pillow, opencv and pyyaml may
# lack (deepspeed: einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic tqdm; pydantic:
# pydantic-core annotated-types typing-extensions typing-inspection; webdataset: braceexpand). pip on
# the node installs only those it does not already have.
DEPS=(einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic pydantic-core annotated-types
      typing-extensions typing-inspection tqdm braceexpand)

command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || { echo "gpu_wheels.sh: no $PY (make setup, or PYTHON=python3)" >&2; exit 1; }

# name==version as this venv has it, else the bare name
pin() {
    local v
    v=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null) || v=
    if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}

mkdir -p "$DEST"
specs=()
for name in "${TOP[@]:1}" "${DEPS[@]}"; do
    specs+=("$(pin "$name")")
done
echo "gpu_wheels.sh: downloading ${specs[*]} for CPython $PYVER into $DEST/"
quiet() {  # pip, without its warnings about index locations of this machine's pip config that do not exist
    "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
quiet "$PY" -m pip download --quiet --only-binary=:all: --no-deps --dest "$DEST" \
    --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    "${specs[@]}"
ds=$(pin deepspeed)
echo "gpu_wheels.sh: building $ds (sdist only on PyPI) into a pure-Python wheel"
quiet "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DEST" "$ds"

# What came, and the total: the working tree and these wheels go to the node together (64 MiB cap).
for f in "$DEST"/*.whl; do
    printf '%8s KiB  %s\n' "$(( $(stat -c %s "$f") / 1024 ))" "$(basename "$f")"
done
total=$(du -sk "$DEST" | cut -f1)
echo "gpu_wheels.sh: $(find "$DEST" -name '*.whl' | wc -l) wheels, ${total} KiB in $DEST/"
