#!/usr/bin/env bash
# System packages mimscale needs beyond Python wheels, installed with apt when run as root:
#   g++                      DeepSpeed JIT-builds its CPU communication op on a machine's first launch
#   python3-venv, python3-dev  the venv module and Python.h for that build (a Debian python only;
#                            pyenv/conda pythons ship both)
#   pkg-config, libopencv-dev, libturbojpeg0-dev   ffcv builds from source against them and links
#                            them at run time
#   libgl1                   opencv-python's cv2 loads libGL.so.1 on import
set -euo pipefail
PYTHON=${1:-python3.11}
missing=()
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then missing+=(python3-venv); fi
if ! "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  missing+=(python3-dev)
fi
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! pkg-config --exists opencv4 2>/dev/null; then missing+=(libopencv-dev); fi
if ! pkg-config --exists libturbojpeg 2>/dev/null; then missing+=(libturbojpeg0-dev); fi
if ! ldconfig -p 2>/dev/null | grep -q 'libGL\.so\.1'; then missing+=(libgl1); fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "mimscale: please install: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y --no-install-recommends "${missing[@]}"
