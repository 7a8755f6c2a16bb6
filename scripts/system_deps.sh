#!/usr/bin/env bash
# System packages mimscale needs beyond Python wheels, installed with apt when run as root.
#
#   scripts/system_deps.sh <python> [FFCV]      FFCV: 1 | 0 | auto (default auto)
#
# <python> must be Python 3.11 or 3.12 (scripts/find_python.sh finds it, or says how to get it).
#
# Core (always):
#   g++                      DeepSpeed JIT-builds its CPU communication op on a machine's first launch
#   python3.X-venv, python3.X-dev  the venv module and Python.h for that build (a Debian python only;
#                            pyenv/conda pythons ship both)
#   libgl1                   opencv-python's cv2 loads libGL.so.1 on import
#   libjpeg-dev              jpeglib.h (libjpeg-turbo) for mimscale's crop decoder (mimscale/data/_jpeg_region.c): it
#                            decodes only the rows and columns of a crop. Optional for a non-root
#                            user: without it crops use full decodes (same pixels, ~25% slower; the
#                            loader says so once)
# FFCV (the optional [ffcv] extra; data.source=ffcv):
#   pkg-config, libopencv-dev, libturbojpeg0-dev   ffcv builds from source against them and links
#                            them at run time
# FFCV=auto takes the extra when its packages are there or can be installed (root), and otherwise
# goes on without it, saying what to install for `make setup FFCV=1`. A non-root user with the core
# packages in place therefore always gets a working install.
#
# Prints the pip extras to install ("dev" or "dev,ffcv") on stdout; messages go to stderr.
set -euo pipefail
PYTHON=${1:-python3.11}
FFCV=${2:-auto}
case "$FFCV" in 0 | 1 | auto) ;; *) echo "mimscale: FFCV=$FFCV: use 1, 0 or auto" >&2; exit 2 ;; esac

# find_python.sh resolves a pyenv shim to its interpreter, and names how to get a missing Python.
PYTHON=$(bash "$(dirname "$0")/find_python.sh" "$PYTHON")
version=$("$PYTHON" -c 'import platform; print(platform.python_version())')
case "$version" in
  3.11.* | 3.12.*) ;;
  *)
    echo "mimscale: $PYTHON is Python $version; mimscale runs on 3.11 or 3.12 (constraints.txt's wheels are" >&2
    echo "  tested on both): make setup PYTHON=python3.12, or PYTHON=/path/to/python3.11" >&2
    exit 1
    ;;
esac

core=()
command -v g++ >/dev/null 2>&1 || core+=(g++)
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then core+=("python${version%.*}-venv"); fi
if ! "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  core+=("python${version%.*}-dev")
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libGL\.so\.1'; then core+=(libgl1); fi
jpeg=()
if ! echo '#include <stdio.h>
#include <jpeglib.h>' | "${CC:-cc}" -E -x c - >/dev/null 2>&1; then jpeg+=(libjpeg-dev); fi

ffcv=()
if [ "$FFCV" != 0 ]; then
  command -v pkg-config >/dev/null 2>&1 || ffcv+=(pkg-config)
  if ! pkg-config --exists opencv4 2>/dev/null; then ffcv+=(libopencv-dev); fi
  if ! pkg-config --exists libturbojpeg 2>/dev/null; then ffcv+=(libturbojpeg0-dev); fi
fi

root=0
[ "$(id -u)" -eq 0 ] && root=1
if [ "$root" -eq 0 ]; then
  if [ ${#core[@]} -gt 0 ]; then
    echo "mimscale: please install (as root): apt-get install -y ${core[*]}" >&2
    exit 1
  fi
  if [ ${#jpeg[@]} -gt 0 ]; then
    echo "mimscale: installing without the crop decoder extension (crops then use full JPEG decodes, ~25% slower):" >&2
    echo "  it needs apt-get install -y ${jpeg[*]} (as root); then make setup again" >&2
    jpeg=()
  fi
  if [ ${#ffcv[@]} -gt 0 ]; then
    if [ "$FFCV" = 1 ]; then
      echo "mimscale: FFCV=1 needs: apt-get install -y ${ffcv[*]} (as root), then make setup FFCV=1 again" >&2
      exit 1
    fi
    echo "mimscale: installing without FFCV (optional, data.source=ffcv): it needs apt-get install -y ${ffcv[*]}" >&2
    echo "  (as root); then make setup FFCV=1" >&2
    echo "dev"
    exit 0
  fi
fi

missing=("${core[@]}" "${jpeg[@]}" "${ffcv[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
if [ "$FFCV" = 0 ]; then echo "dev"; else echo "dev,ffcv"; fi
