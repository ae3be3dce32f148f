#!/usr/bin/env bash
# Set up .venv and run the benchmark: bash dev/bench.sh [benchmark options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh bench
exec .venv/bin/python -m lib_unetmods.bench "$@"
