#!/usr/bin/env bash
# Create .venv (Python 3.11) with the benchmark's or the tests' dependencies: dev/setup.sh [bench|test]
# torch comes first, from $TORCH_INDEX_URL when set (dev/install-torch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-test}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
bash dev/install-torch.sh .venv
if [ "$kind" = test ]; then
  "${pip[@]}" -r dev/requirements-test.txt
  "${pip[@]}" --no-deps -r dev/requirements-nodeps.txt -r dev/requirements-test-nodeps.txt
else
  "${pip[@]}" -r dev/requirements.txt
  "${pip[@]}" --no-deps -r dev/requirements-nodeps.txt
fi
