#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up, lint, then pytest (unit and real MPI ranks).
#
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}

bash scripts/setup.sh
# Horovod engine (tests/mpi/test_horovod.py): built once (~6 min on 2 cores), later from the
# wheel cache in seconds.
if [ "${HPC_ASGD_SKIP_HOROVOD:-0}" != 1 ]; then
  VENV="$VENV" bash scripts/install_horovod.sh \
    || echo "[test] Horovod could not be built: tests/mpi/test_horovod.py will skip"
fi
export PATH="$PWD/$VENV/bin:$PATH"
# Open MPI refuses to run as root without these (CI and containers run as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# As root (CI, containers): shellcheck for the shell-script lint test, and a real SLURM cluster
# of 4 emulated nodes (network namespaces on a private bridge, a slurmd each) for tests/slurm
# and tests/cluster (Debian packages, installed when missing). Elsewhere those tests skip,
# saying why.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  if ! command -v shellcheck >/dev/null; then
    echo "[test] installing shellcheck"
    { DEBIAN_FRONTEND=noninteractive apt-get -q update \
      && DEBIAN_FRONTEND=noninteractive apt-get -q -y install shellcheck; } </dev/null >/dev/null 2>&1 \
      || echo "[test] shellcheck could not be installed: its test will skip"
  fi
  echo "[test] local SLURM cluster of 4 emulated nodes"
  bash scripts/slurm_local.sh start --nodes 4 </dev/null \
    || echo "[test] scripts/slurm_local.sh start failed: tests/slurm will report why"
fi

echo "[test] ruff"
ruff check hpc_asgd tests benchmarks scripts examples
ruff format --check hpc_asgd tests benchmarks scripts examples
echo "[test] mypy"
python -m mypy  # [tool.mypy] in pyproject.toml: basic checks of hpc_asgd

echo "[test] pytest"
exec python -m pytest -q -p no:cacheprovider --durations=25 "$@"
