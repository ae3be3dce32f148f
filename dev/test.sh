#!/usr/bin/env bash
# Set up .venv and run every test (skipped ones say why: -rs): bash dev/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh test
exec .venv/bin/python -m pytest -q -rs "$@" tests
