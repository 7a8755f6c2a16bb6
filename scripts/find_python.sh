#!/usr/bin/env bash
# The Python interpreter that a PYTHON= setting names, as an absolute path that runs.
#
#   scripts/find_python.sh <python>     e.g. python3.12 or /opt/python/bin/python3.11
#
# Prints the interpreter's sys.executable on stdout (messages go to stderr); exit 1, naming how to
# get one, when there is none. A pyenv shim is a command that exists but fails ("pyenv: python3.12:
# command not found") while no pyenv version that has it is selected; it is resolved to the newest
# pyenv version that has it, so `make setup PYTHON=python3.12` works without `pyenv shell`.
set -euo pipefail
PYTHON=${1:?usage: scripts/find_python.sh <python>}

# The path the interpreter reports for itself, when it runs (a shim does not).
runs() { "$1" -c 'import sys; print(sys.executable)' 2>/dev/null; }

if exe=$(runs "$PYTHON"); then
  echo "$exe"
  exit 0
fi

name=$(basename "$PYTHON")
pyenv_cmd=$(command -v pyenv 2>/dev/null || true)
pyenv_root=${PYENV_ROOT:-${HOME:-/nonexistent}/.pyenv}
[ -z "$pyenv_cmd" ] && [ -x "$pyenv_root/bin/pyenv" ] && pyenv_cmd="$pyenv_root/bin/pyenv"
if [ -n "$pyenv_cmd" ]; then
  root=$("$pyenv_cmd" root)
  # `pyenv whence` lists the installed versions that have the command; newest first.
  for v in $("$pyenv_cmd" whence "$name" 2>/dev/null | sort -rV); do
    if exe=$(runs "$root/versions/$v/bin/$name"); then
      echo "mimscale: $PYTHON is a pyenv shim and no version that has it is selected: using pyenv's $v ($exe)" >&2
      echo "$exe"
      exit 0
    fi
  done
fi

# The version to suggest: the one the name asks for (python3.12 -> 3.12), else 3.11.
want=3.11
[[ "$name" =~ ^python(3\.1[12])$ ]] && want=${BASH_REMATCH[1]}
if command -v "$PYTHON" >/dev/null 2>&1; then
  echo "mimscale: $PYTHON is there but does not run ($("$PYTHON" -c '' 2>&1 | head -n 1))." >&2
else
  echo "mimscale: $PYTHON not found." >&2
fi
echo "  mimscale runs on Python 3.11 or 3.12. Install one: apt-get install python$want python$want-venv" >&2
echo "  python$want-dev (Debian/Ubuntu releases that package it; Debian 12 has 3.11, Ubuntu 24.04 3.12)," >&2
echo "  or pyenv install $want; then make setup PYTHON=python$want, or point at any: make setup PYTHON=/path/to/python$want" >&2
exit 1
