#!/usr/bin/env bash
# Set up .venv and run every test: bash dev/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh test
exec .venv/bin/python -m pytest -q "$@" tests
