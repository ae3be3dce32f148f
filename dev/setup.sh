#!/usr/bin/env bash
# Create .venv (Python 3.11) with the benchmark's or the tests' dependencies: dev/setup.sh [bench|test]
# torch comes first, from $TORCH_INDEX_URL when set: the CPU-only build is enough for the benchmark
# and the tests (TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, about 0.2 GB to download);
# without it pip takes PyPI's default build, which on Linux is the CUDA one (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-test}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing torch${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (once; set TORCH_INDEX_URL to choose the build, see README)"
  "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -r dev/requirements-torch.txt
fi
if [ "$kind" = test ]; then
  "${pip[@]}" -r dev/requirements-test.txt
  "${pip[@]}" --no-deps -r dev/requirements-nodeps.txt -r dev/requirements-test-nodeps.txt
else
  "${pip[@]}" -r dev/requirements.txt
  "${pip[@]}" --no-deps -r dev/requirements-nodeps.txt
fi
