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
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

say() { printf '[setup] %s\n' "$*"; }

# pip's own output: on a terminal, its usual lines and download progress bars, so that the
# minutes a fresh machine spends downloading (torch's CPU wheel alone is ~190 MB) show as
# progress; elsewhere (CI logs, pipes) quiet, and the [setup] lines, one per package group
# with its time, are the log.
if [ -t 1 ]; then
  pip_output=(--progress-bar on) # pip's default, named: an empty array trips set -u in bash < 4.4
else
  pip_output=(-q --progress-bar off)
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check "${pip_output[@]}" "$@"
}

SECONDS=0
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  say "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "NVIDIA GPU found: installing the default (CUDA) torch build" \
    "(a few GB with its CUDA libraries)..."
  pip_install torch
  say "torch installed in ${SECONDS} s"
else
  # PyPI's Linux torch wheel is the CUDA build (with GBs of nvidia-* packages); the CPU build
  # lives on PyTorch's own index. Where that index cannot be reached (an offline mirror, a
  # wheelhouse in pip's configuration), pip's configured sources are used as they are.
  torch_index=()
  if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$TORCH_CPU_INDEX/', timeout=5)" \
    >/dev/null 2>&1; then
    torch_index=(--index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple)
  else
    say "$TORCH_CPU_INDEX unreachable: torch comes from pip's configured sources"
  fi
  say "no GPU: installing the CPU build ($TORCH_SPEC, a download of ~190 MB)..."
  pip_install ${torch_index[@]+"${torch_index[@]}"} "$TORCH_SPEC"
  say "torch installed in ${SECONDS} s"
fi

SECONDS=0
# -I: import the installed package, not this checkout (the current directory).
if "$VENV/bin/python" -I -c "import hpc_asgd" 2>/dev/null; then
  # A re-run: little or nothing to fetch, and pip would list every satisfied requirement.
  say "hpc_asgd already installed: checking its dependencies and extras [$EXTRAS]"
  pip_output=(-q --progress-bar off)
else
  say "installing hpc_asgd (editable), its dependencies (numpy, scikit-learn, ...) and" \
    "extras [$EXTRAS] (mpi-wheel: mpi4py and Open MPI)..."
fi
pip_install -e ".[$EXTRAS]"
say "hpc_asgd and its dependencies ready in ${SECONDS} s"
say "done: $("$VENV/bin/python" -c 'import hpc_asgd, torch; print("hpc_asgd", hpc_asgd.__version__, "torch", torch.__version__)')"
