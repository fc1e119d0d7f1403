#!/usr/bin/env bash
# Set up everything the package, its tests and its quick start need, on a fresh machine.
#
#   bash scripts/setup.sh            # creates ./.venv (or $VENV) and installs into it
#
# torch: an already-installed torch is kept (clusters bring their own CUDA build). Otherwise a
# machine without an NVIDIA GPU gets the CPU build pinned by $TORCH_SPEC, so that pip never
# pulls several GB of CUDA packages; a GPU machine gets the default (CUDA) build.
# MPI: the 'mpi-wheel' extra brings Open MPI from PyPI (laptops, CI). On a cluster, set
# EXTRAS=dev,mpi and build mpi4py against the site MPI instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,mpi-wheel}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  say "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "NVIDIA GPU found: installing the default (CUDA) torch build"
  pip_install torch
else
  say "no GPU: installing the CPU build ($TORCH_SPEC)"
  pip_install "$TORCH_SPEC"
fi

say "installing hpc_asgd (editable) with extras [$EXTRAS]"
pip_install -e ".[$EXTRAS]"
say "done: $("$VENV/bin/python" -c 'import hpc_asgd, torch; print("hpc_asgd", hpc_asgd.__version__, "torch", torch.__version__)')"
