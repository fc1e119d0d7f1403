#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up, lint, then pytest (unit and real MPI ranks).
#
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}

bash scripts/setup.sh
export PATH="$PWD/$VENV/bin:$PATH"
# Open MPI refuses to run as root without these (CI and containers run as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "[test] ruff"
ruff check hpc_asgd tests benchmarks scripts
ruff format --check hpc_asgd tests benchmarks scripts

echo "[test] pytest"
exec python -m pytest -q -p no:cacheprovider "$@"
